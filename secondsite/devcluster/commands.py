"""`secondsite devcluster ...` and `secondsite demo`: the command-line face of the dev cluster."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from secondsite.devcluster import build
from secondsite.devcluster.cluster import DEFAULT_NODES, ClusterError, DevCluster


def add_devcluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="default", help="which dev cluster (default: default)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="build (or find cached) the Kubernetes binaries")
    up = sub.add_parser(
        "up", help="start the cluster; returns once the API server and nodes are ready"
    )
    up.add_argument(
        "--node",
        action="append",
        dest="nodes",
        help="name[:label=value,...]; repeat per node (default: two protected, two recovery)",
    )
    up.add_argument("--fresh", action="store_true", help="wipe etcd data and pod sandboxes first")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    sub.add_parser("down", help="stop every component of the cluster")
    sub.add_parser("status", help="print what runs, as JSON; exit 1 when the API is not ready")
    sub.add_parser("kubeconfig", help="print the kubeconfig path")
    kc = sub.add_parser("kubectl", help="run the cluster's kubectl with its kubeconfig")
    kc.add_argument("args", nargs=argparse.REMAINDER)


def run_devcluster(args: argparse.Namespace) -> int:
    cluster = DevCluster(name=args.name)
    try:
        if args.action == "build":
            tc = build.build()
            print(tc.bin_dir)
        elif args.action == "up":
            print(cluster.up(args.nodes or DEFAULT_NODES, fresh=args.fresh, timeout=args.timeout))
        elif args.action == "down":
            cluster.down()
        elif args.action == "status":
            st = cluster.status()
            print(json.dumps(st, indent=2))
            return 0 if st["ready"] else 1
        elif args.action == "kubeconfig":
            if not cluster.kubeconfig.exists():
                print(f"dev cluster {args.name!r} was never started", file=sys.stderr)
                return 1
            print(cluster.kubeconfig)
        elif args.action == "kubectl":
            return subprocess.call(cluster.kubectl_argv(*args.args))
    except (build.BuildError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
