"""A tiny dynamic volume provisioner: one directory on this machine per PersistentVolumeClaim.

Why not something off the shelf: Rancher's local-path-provisioner needs a helper image to create
directories, and kube-controller-manager's ``--enable-hostpath-provisioner`` creates directories
0750 owned by root, which non-root pods (our Redis runs as UID 10001) cannot write. This loop does
what both do on a single node: for every Pending claim of a StorageClass whose provisioner is
``snakepit.dev/local-path`` (after the scheduler picked the node, for WaitForFirstConsumer) it makes
a world-writable directory under the cluster's state dir and a hostPath PersistentVolume
pre-bound to the claim; when such a volume is Released and its policy is Delete it removes both.

Run by ``scripts/local-cluster up`` as a supervised process:
``python -m localkube.provisioner``. For a kind cluster made from this project's node image
(``--kind-state-dir``) the same loop runs on the host, makes the directory inside the chosen node's
container (``docker exec``) and binds the volume to that node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config
from .kubeapi import ApiError, Kube

SELECTED_NODE = "volume.kubernetes.io/selected-node"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"


def _log(msg: str) -> None:
    print(f"{time.strftime('%F %T')} {msg}", flush=True)


class HostDirs:
    """Volumes are directories on this machine (the local cluster's only node is this machine)."""

    def make(self, node: str, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)  # pods run as arbitrary non-root UIDs

    def remove(self, node: str, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


class NodeContainerDirs:
    """Volumes are directories inside a kind node's container (named like the node)."""

    def _exec(self, node: str, *cmd: str) -> None:
        subprocess.run(["docker", "exec", node, *cmd], check=True, capture_output=True, timeout=60)

    def make(self, node: str, path: Path) -> None:
        self._exec(node, "mkdir", "-p", "-m", "0777", str(path))
        self._exec(node, "chmod", "0777", str(path))

    def remove(self, node: str, path: Path) -> None:
        try:
            self._exec(node, "rm", "-rf", str(path))
        except (subprocess.SubprocessError, OSError) as exc:  # a stopped node keeps its files
            _log(f"could not remove {path} on {node}: {exc}")


class Provisioner:
    def __init__(
        self,
        cfg: Config,
        kube: Kube,
        root: Path | None = None,
        dirs: HostDirs | NodeContainerDirs | None = None,
    ) -> None:
        self.cfg, self.kube = cfg, kube
        self.name = cfg.net.provisioner_name
        self.root = root or cfg.volumes_dir
        self.dirs = dirs or HostDirs()

    def our_classes(self) -> dict[str, dict[str, Any]]:
        items = self.kube.get("/apis/storage.k8s.io/v1/storageclasses")["items"]
        return {sc["metadata"]["name"]: sc for sc in items if sc.get("provisioner") == self.name}

    def provision(self, pvc: dict[str, Any], sc: dict[str, Any]) -> None:
        meta, spec = pvc["metadata"], pvc["spec"]
        pv_name = f"pvc-{meta['uid']}"
        if self.kube.exists(f"/api/v1/persistentvolumes/{pv_name}"):
            return
        path = self.root / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        node = meta.get("annotations", {}).get(SELECTED_NODE) or self.cfg.node_name
        self.dirs.make(node, path)
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {PROVISIONED_BY: self.name}},
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy", "Delete"),
                "storageClassName": sc["metadata"]["name"],
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "In",
                                        "values": [node],
                                    }
                                ]
                            }
                        ]
                    }
                },
            },
        }
        self.kube.create("/api/v1/persistentvolumes", pv)
        _log(f"provisioned {pv_name} for {meta['namespace']}/{meta['name']} at {path}")

    def reclaim(self, pv: dict[str, Any]) -> None:
        meta, spec = pv["metadata"], pv["spec"]
        path = Path(spec.get("hostPath", {}).get("path", ""))
        if path.parent == self.root:  # never delete anything we did not create
            terms = spec.get("nodeAffinity", {}).get("required", {}).get("nodeSelectorTerms", [])
            nodes = [v for t in terms for e in t.get("matchExpressions", []) for v in e["values"]]
            self.dirs.remove(nodes[0] if nodes else self.cfg.node_name, path)
        try:
            self.kube.delete(f"/api/v1/persistentvolumes/{meta['name']}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        _log(f"deleted {meta['name']} and {path}")

    def sync(self) -> None:
        classes = self.our_classes()
        claims = self.kube.get("/api/v1/persistentvolumeclaims")["items"]
        for pvc in claims:
            sc = classes.get(pvc["spec"].get("storageClassName") or "")
            if sc is None or pvc.get("status", {}).get("phase") != "Pending":
                continue
            if pvc["spec"].get("volumeName"):
                continue
            waits = sc.get("volumeBindingMode") == "WaitForFirstConsumer"
            if waits and SELECTED_NODE not in pvc["metadata"].get("annotations", {}):
                continue
            self.provision(pvc, sc)
        for pv in self.kube.get("/api/v1/persistentvolumes")["items"]:
            ours = pv["metadata"].get("annotations", {}).get(PROVISIONED_BY) == self.name
            if (
                ours
                and pv.get("status", {}).get("phase") == "Released"
                and pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete"
            ):
                self.reclaim(pv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hostPath volume provisioner of the local cluster")
    parser.add_argument("--state-dir", type=Path, help="the cluster's state dir (default: env)")
    kind = parser.add_argument_group("kind cluster (volumes inside the node containers)")
    kind.add_argument("--kind-state-dir", type=Path, help="state dir of the kind cluster")
    kind.add_argument("--server", help="API server URL")
    kind.add_argument("--ca", type=Path)
    kind.add_argument("--cert", type=Path)
    kind.add_argument("--key", type=Path)
    kind.add_argument("--root", type=Path, help="folder of the volumes inside every node")
    args = parser.parse_args(argv)
    if args.kind_state_dir:
        cfg = Config(state_dir=args.kind_state_dir)
        kube = Kube(args.server, args.ca, args.cert, args.key)
        prov = Provisioner(cfg, kube, args.root, NodeContainerDirs())
    else:
        cfg = Config(state_dir=args.state_dir) if args.state_dir else Config()
        kube = Kube.for_identity(cfg, "provisioner")
        prov = Provisioner(cfg, kube)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _log(f"provisioner {prov.name} serving volumes under {prov.root} (pid {os.getpid()})")
    while not stopping:
        try:
            prov.sync()
        except Exception as exc:  # keep serving; the API server may be restarting
            _log(f"sync failed: {exc}")
        time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
