"""Command line of the local cluster: ``scripts/local-cluster`` runs ``python -m localkube``.

up [--tier control-plane|node]   start (or reuse) a cluster; last stdout line: export KUBECONFIG=…
down                             stop everything and restore the machine
images [--no-load] [NAME…]       build the project images; load them into the node's containerd
build                            build/cached binaries only, print their build times
status                           JSON: tier, processes, paths
path TOOL                        print the path of kubectl, helm, kind, etcd or coredns
leftovers                        JSON: whatever of a cluster remains on the machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import build, cluster, images
from .config import TIERS, Config
from .run import log


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
    sub.add_parser("down", help="stop the cluster and clean the machine")
    p_img = sub.add_parser("images", help="build project images and load them into the node")
    p_img.add_argument("--no-load", action="store_true", help="only build the archives")
    p_img.add_argument("names", nargs="*", choices=[[], *images.PROJECT_IMAGES], default=[])
    sub.add_parser("build", help="build the pinned binaries into the cache")
    sub.add_parser("status", help="print the cluster's status as JSON")
    p_path = sub.add_parser("path", help="print the path of a cached tool")
    p_path.add_argument("tool", choices=["kubectl", "helm", "kind", "etcd", "coredns"])
    sub.add_parser("leftovers", help="print what of a cluster remains on the machine")
    args = parser.parse_args(argv)
    cfg = Config()

    match args.cmd:
        case "up":
            _require_root()
            try:
                cluster.up(cfg, args.tier)
            except BaseException:
                log(
                    "start-up failed; logs are in "
                    + str(cfg.log_dir)
                    + " (run `scripts/local-cluster down` to clean up)"
                )
                raise
            print(cluster.kubeconfig_export(cfg))
        case "down":
            _require_root()
            report = cluster.down(cfg)
            dirty = any(v for k, v in report.items() if k != "seconds")
            return 1 if dirty else 0
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
            log("images: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
            for name, archive in archives.items():
                print(f"{images.image_ref(name)}\t{archive}")
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


if __name__ == "__main__":
    sys.exit(main())
