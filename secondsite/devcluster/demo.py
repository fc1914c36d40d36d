"""`make demo`: bring the dev cluster up, install SecondSite's API and samples, show them.

This is the first version of the demo; it grows into the full replication demo as the operator and
the appliances arrive.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from secondsite.devcluster.cluster import ClusterError, DevCluster

REPO = Path(__file__).resolve().parents[2]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="default", help="which dev cluster to use")


def _step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def _kubectl(cluster: DevCluster, *args: str) -> None:
    print("$ kubectl " + " ".join(args), flush=True)
    subprocess.run(cluster.kubectl_argv(*args), check=True)


def run_demo(args: argparse.Namespace) -> int:
    cluster = DevCluster(name=args.name)
    started = time.monotonic()
    try:
        _step("dev cluster: etcd, kube-apiserver, controller-manager, scheduler, node simulator")
        cluster.up()
        _kubectl(cluster, "get", "nodes", "-L", "secondsite.io/site")
        _step("SecondSite custom resource definitions")
        _kubectl(cluster, "apply", "-f", str(REPO / "crds"))
        _kubectl(
            cluster,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            str(REPO / "crds"),
        )
        _step("samples of every kind")
        _kubectl(cluster, "apply", "-k", str(REPO / "manifests" / "samples"))
        _step("what the cluster now holds (kubectl get secondsite -A)")
        _kubectl(cluster, "get", "secondsite", "-A")
    except (ClusterError, subprocess.CalledProcessError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    print(
        f"\ndemo done in {time.monotonic() - started:.0f} s; the cluster keeps running:\n"
        f"  secondsite devcluster kubectl get vpg -A    # explore\n"
        f"  make demo-down                              # stop it"
    )
    return 0
