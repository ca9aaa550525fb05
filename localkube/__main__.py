"""Command line of the local cluster: ``scripts/local-cluster`` runs ``python -m localkube``.

up [--tier control-plane|node]   start (or reuse) a cluster; last stdout line: export KUBECONFIG=…
down                             stop everything and restore the machine
images [--no-load] [NAME…]       build the project images; load them into the node's containerd
build [--check]                  build/cached binaries only, print their build times
                                 (--check: build nothing, exit 1 unless everything is cached)
status                           JSON: tier, processes, paths
path TOOL                        print the path of kubectl, helm, kind, etcd or coredns
leftovers                        JSON: whatever of a cluster remains on the machine

--provider kind (after the command) runs a kind cluster instead: on a Docker engine that already
runs, or on one started here by hand; `up --provider kind --nodes N` makes 1 control plane and
N-1 workers; `build --provider kind` also builds the node image (docs/local-cluster.md, "kind").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from . import build, cluster, images
from .config import TIERS, Config
from .run import log

PROVIDERS = ("local", "kind")


def _require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("local-cluster must run as root (it runs a kubelet, containerd and iptables)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="local-cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start a cluster (idempotent)")
    p_up.add_argument("--tier", choices=TIERS, default="node")
    p_up.add_argument("--nodes", type=int, default=1, help="kind only: number of nodes")
    p_down = sub.add_parser("down", help="stop the cluster and clean the machine")
    p_img = sub.add_parser("images", help="build project images and load them into the node")
    p_img.add_argument("--no-load", action="store_true", help="only build the archives")
    p_img.add_argument("names", nargs="*", choices=[[], *images.PROJECT_IMAGES], default=[])
    p_build = sub.add_parser("build", help="build the pinned binaries into the cache")
    p_build.add_argument(
        "--check", action="store_true", help="build nothing; exit 1 unless all is cached"
    )
    p_status = sub.add_parser("status", help="print the cluster's status as JSON")
    p_path = sub.add_parser("path", help="print the path of a cached tool")
    p_path.add_argument("tool", choices=["kubectl", "helm", "kind", "etcd", "coredns"])
    p_left = sub.add_parser("leftovers", help="print what of a cluster remains on the machine")
    for p in (p_up, p_down, p_img, p_build, p_status, p_left):
        p.add_argument("--provider", choices=PROVIDERS, default="local")
    args = parser.parse_args(argv)
    cfg = Config()
    if getattr(args, "provider", "local") == "kind":
        return _kind(args)

    match args.cmd:
        case "up":
            _require_root()
            with _on_failure(
                f"start-up failed; logs are in {cfg.log_dir} "
                "(run `scripts/local-cluster down` to clean up)"
            ):
                cluster.up(cfg, args.tier)
            print(cluster.kubeconfig_export(cfg))
        case "down":
            _require_root()
            return _exit_code(cluster.down(cfg))
        case "images":
            _require_root()
            names = args.names or list(images.PROJECT_IMAGES)
            if not args.no_load and cluster.current_tier(cfg) != "node":
                sys.exit(
                    "no node-tier cluster runs: `scripts/local-cluster up` first "
                    "(or pass --no-load)"
                )
            archives, timings = images.build_images(cfg, names)
            if not args.no_load:
                timings["load"] = images.load_images(cfg, archives)
            _print_images(archives, timings)
        case "build" if args.check:
            absent = [
                n for n in build.LOCAL_COMPONENTS if not build.is_built(cfg, build.COMPONENTS[n])
            ]
            print(json.dumps({"missing": absent}))
            return 1 if absent else 0
        case "build":
            timings = build.ensure_all(cfg)
            print(json.dumps({"built_now": timings, "stamps": build.build_report(cfg)}, indent=1))
        case "status":
            print(json.dumps(cluster.status(cfg), indent=1))
        case "path":
            print(cluster.path_of(cfg, args.tool))
        case "leftovers":
            print(json.dumps(cluster.leftovers(cfg), indent=1))
    return 0


def _kind(args: argparse.Namespace) -> int:
    from .kind import cluster as kind
    from .kind import nodeimage
    from .kind.settings import KindConfig

    kcfg = KindConfig()
    match args.cmd:
        case "up":
            _require_root()
            with _on_failure(
                f"start-up failed; state and logs are in {kcfg.state_dir} "
                "(run `scripts/local-cluster down --provider kind` to clean up)"
            ):
                kind.up(kcfg, args.nodes)
            print(kind.kubeconfig_export(kcfg))
        case "down":
            _require_root()
            return _exit_code(kind.down(kcfg))
        case "images":
            _require_root()
            names = args.names or list(images.PROJECT_IMAGES)
            if not args.no_load and not kind.status(kcfg)["running"]:
                sys.exit("no kind cluster runs: `scripts/local-cluster up --provider kind` first")
            archives, timings = images.build_images(kcfg.cfg, names)
            if not args.no_load:
                timings["load"] = kind.load_images(kcfg, archives)
            _print_images(archives, timings)
        case "build" if args.check:
            absent = nodeimage.missing(kcfg.cfg)
            print(json.dumps({"missing": absent}))
            return 1 if absent else 0
        case "build":
            _require_root()
            timings = build.ensure_all(kcfg.cfg)
            tarball, image_timings = nodeimage.build_node_tarball(kcfg.cfg)
            report = {
                "built_now": timings,
                "node_image": str(tarball),
                "node_image_timings": image_timings,
            }
            print(json.dumps({**report, "stamps": build.build_report(kcfg.cfg)}, indent=1))
        case "status":
            print(json.dumps(kind.status(kcfg), indent=1))
        case "leftovers":
            print(json.dumps(kind.leftovers(kcfg), indent=1))
    return 0


@contextlib.contextmanager
def _on_failure(message: str) -> Iterator[None]:
    """Say where to look and how to clean up when ``up`` fails (the error itself follows)."""
    try:
        yield
    except BaseException:
        log(message)
        raise


def _exit_code(down_report: dict[str, object]) -> int:
    """1 when ``down`` found anything left over (its report lists it), else 0."""
    return 1 if any(v for k, v in down_report.items() if k != "seconds") else 0


def _print_images(archives: dict[str, Path], timings: dict[str, float]) -> None:
    log("images: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    for name, archive in archives.items():
        print(f"{images.image_ref(name)}\t{archive}")


if __name__ == "__main__":
    sys.exit(main())
