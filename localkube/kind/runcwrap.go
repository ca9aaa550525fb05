// runcwrap runs runc after removing one capability from the container's OCI spec.
//
// Why: on the build VMs no process has CAP_SYS_RESOURCE in its bounding set, so runc fails with
// "unable to apply caps: operation not permitted" for any container whose spec asks for it, and
// a privileged container (a kind node, kube-proxy) asks for every capability. Docker ignores
// --cap-drop with --privileged, and the kubelet offers no way at all, so the spec is edited here,
// between the engine and runc: on `create`/`run` the bundle's config.json, on `exec` the
// --process file. Every other argument goes to the real runc unchanged.
//
// Environment: RUNCWRAP_RUNC (the real runc, default /usr/sbin/runc), RUNCWRAP_DROP (capability
// names to remove, comma separated, default CAP_SYS_RESOURCE).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Global runc flags that take a value (the subcommand comes after them).
var globalWithValue = map[string]bool{"--root": true, "--log": true, "--log-format": true, "--criu": true, "--rootless": true}

func flagValue(args []string, names ...string) (string, bool) {
	for i, a := range args {
		for _, n := range names {
			if a == n && i+1 < len(args) {
				return args[i+1], true
			}
			if strings.HasPrefix(a, n+"=") {
				return a[len(n)+1:], true
			}
		}
	}
	return "", false
}

func subcommand(args []string) (string, []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return a, args[i+1:]
		}
		if globalWithValue[a] {
			i++
		}
	}
	return "", nil
}

func filterCaps(caps map[string]any, drop map[string]bool) bool {
	changed := false
	for set, v := range caps {
		list, ok := v.([]any)
		if !ok {
			continue
		}
		kept := make([]any, 0, len(list))
		for _, c := range list {
			if s, ok := c.(string); ok && drop[s] {
				changed = true
				continue
			}
			kept = append(kept, c)
		}
		caps[set] = kept
	}
	return changed
}

// edit removes the capabilities from a JSON file; processKey is "process" for a bundle's
// config.json and "" for an exec process file (the process object itself).
func edit(path, processKey string, drop map[string]bool) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		return err
	}
	proc := doc
	if processKey != "" {
		p, ok := doc[processKey].(map[string]any)
		if !ok {
			return nil
		}
		proc = p
	}
	caps, ok := proc["capabilities"].(map[string]any)
	if !ok || !filterCaps(caps, drop) {
		return nil
	}
	out, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	tmp := path + ".runcwrap"
	if err := os.WriteFile(tmp, out, info.Mode().Perm()); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func main() {
	runc := os.Getenv("RUNCWRAP_RUNC")
	if runc == "" {
		runc = "/usr/sbin/runc"
	}
	dropList := os.Getenv("RUNCWRAP_DROP")
	if dropList == "" {
		dropList = "CAP_SYS_RESOURCE"
	}
	drop := map[string]bool{}
	for _, c := range strings.Split(dropList, ",") {
		drop[strings.TrimSpace(c)] = true
	}
	args := os.Args[1:]
	cmd, rest := subcommand(args)
	var err error
	switch cmd {
	case "create", "run":
		bundle, ok := flagValue(rest, "--bundle", "-b")
		if !ok {
			bundle, _ = os.Getwd()
		}
		err = edit(filepath.Join(bundle, "config.json"), "process", drop)
	case "exec":
		if file, ok := flagValue(rest, "--process", "-p"); ok {
			err = edit(file, "", drop)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "runcwrap: %v\n", err)
		os.Exit(1)
	}
	err = syscall.Exec(runc, append([]string{runc}, args...), os.Environ())
	fmt.Fprintf(os.Stderr, "runcwrap: exec %s: %v\n", runc, err)
	os.Exit(1)
}
