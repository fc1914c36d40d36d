"""Start, stop and inspect a local Kubernetes control plane made of upstream binaries.

A dev cluster is a state directory (`<cache>/clusters/<name>`) holding its certificates, etcd data,
logs, kubeconfig and a `state.json` with the ports and process ids of: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and the node simulator (which stands in for kubelets only).
Every component listens on loopback. `up` returns once the API server is ready and every simulated
node reports Ready; the processes keep running in their own sessions until `down`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from secondsite.devcluster import build, pki
from secondsite.devcluster.nodesim import NodeSpec, parse_node_spec

DEFAULT_NODES = (
    "protected-1:secondsite.io/site=protected",
    "protected-2:secondsite.io/site=protected",
    "recovery-1:secondsite.io/site=recovery",
    "recovery-2:secondsite.io/site=recovery",
)
SERVICE_CIDR = "10.96.0.0/16"  # allocation range for ClusterIPs only; nothing is routed there


# Components outlive the call that starts them; holding their Popen objects here lets `down` reap
# them when the same process stops the cluster (as the test fixtures do).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ClusterError(RuntimeError):
    """The dev cluster could not be started or is not in the expected state."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclasses.dataclass
class Component:
    """One running process of the cluster."""

    name: str
    pid: int
    argv: list[str]
    log: str


@dataclasses.dataclass
class DevCluster:
    """A dev cluster's state directory and what runs from it."""

    name: str = "default"
    root: Path = dataclasses.field(default_factory=lambda: build.cache_root() / "clusters")

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def pods_dir(self) -> Path:
        return self.dir / "pods"

    # -- state -------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
            return data
        except FileNotFoundError:
            return {}

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def components(self) -> list[Component]:
        return [Component(**c) for c in self._load().get("components", [])]

    def status(self) -> dict[str, Any]:
        """What runs and whether the API server answers; safe to call at any time."""
        state = self._load()
        comps = {c.name: _alive(c.pid) for c in self.components()}
        ready = False
        if state.get("apiserverPort"):
            ready = self._api_ready(state["apiserverPort"], timeout=2)
        return {
            "name": self.name,
            "kubeconfig": str(self.kubeconfig) if self.kubeconfig.exists() else None,
            "apiserver": f"https://127.0.0.1:{state['apiserverPort']}" if state else None,
            "ready": ready,
            "components": comps,
            "version": state.get("version"),
        }

    # -- start -------------------------------------------------------------------------------

    def up(
        self,
        nodes: Sequence[str] = DEFAULT_NODES,
        *,
        version: str = build.KUBERNETES_VERSION,
        timeout: float = 180.0,
        fresh: bool = False,
        say: build.Progress = build._say,
    ) -> Path:
        """Start the cluster (building binaries on first use); return the kubeconfig path.

        A running cluster is reused unless `fresh`, which also wipes etcd data and pod sandboxes.
        """
        node_specs = [parse_node_spec(n) for n in nodes]
        st = self.status()
        if not fresh and st["ready"] and st["components"] and all(st["components"].values()):
            say(f"cluster {self.name!r} already running at {st['apiserver']}")
            return self.kubeconfig
        self.down(quiet=True)
        if fresh:
            shutil.rmtree(self.dir / "etcd", ignore_errors=True)
            shutil.rmtree(self.pods_dir, ignore_errors=True)
        tc = build.build(version, progress=say)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        keys = pki.ensure_pki(self.dir / "pki")
        state: dict[str, Any] = {
            "version": version,
            "etcdPort": _free_port(),
            "etcdPeerPort": _free_port(),
            "apiserverPort": _free_port(),
            "components": [],
        }
        self._save(state)
        self._write_kubeconfigs(keys, state["apiserverPort"])
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._start(state, "etcd", self._etcd_argv(tc, state))
            self._wait(
                "etcd",
                lambda: _http_ok(f"http://127.0.0.1:{state['etcdPort']}/health"),
                deadline,
            )
            self._start(state, "kube-apiserver", self._apiserver_argv(tc, keys, state))
            self._wait(
                "kube-apiserver",
                lambda: self._api_ready(state["apiserverPort"], timeout=2),
                deadline,
            )
            self._start(state, "kube-controller-manager", self._kcm_argv(tc, keys))
            self._start(state, "kube-scheduler", self._scheduler_argv(tc))
            self._start(state, "node-simulator", self._nodesim_argv(node_specs))
            self._wait("nodes Ready", lambda: self._nodes_ready(tc, node_specs), deadline)
            self._wait(
                "default service account",
                lambda: self._kubectl_ok(tc, "get", "serviceaccount", "default"),
                deadline,
            )
        except BaseException:
            self.down(quiet=True)
            raise
        say(
            f"cluster {self.name!r} up in {time.monotonic() - started:.1f} s: "
            f"Kubernetes v{version}, {len(node_specs)} nodes, kubeconfig {self.kubeconfig}"
        )
        return self.kubeconfig

    def _start(self, state: dict[str, Any], name: str, argv: list[str]) -> None:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        _CHILDREN[proc.pid] = proc
        state["components"].append(
            dataclasses.asdict(Component(name=name, pid=proc.pid, argv=argv, log=str(log)))
        )
        self._save(state)

    def _wait(self, what: str, check: Any, deadline: float) -> None:
        while True:
            if check():
                return
            for c in self.components():
                if not _alive(c.pid):
                    raise ClusterError(
                        f"{c.name} exited while waiting for {what}; last lines of {c.log}:\n"
                        + _tail(Path(c.log))
                    )
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}; logs are in {self.logs}")
            time.sleep(0.25)

    def _etcd_argv(self, tc: build.Toolchain, state: dict[str, Any]) -> list[str]:
        client = f"http://127.0.0.1:{state['etcdPort']}"
        peer = f"http://127.0.0.1:{state['etcdPeerPort']}"
        return [
            str(tc.path("etcd")),
            "--name=devcluster",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=devcluster={peer}",
            "--listen-metrics-urls=",
            # A throwaway dev store: durability is not worth an fsync per write here.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ]

    def _apiserver_argv(
        self, tc: build.Toolchain, keys: pki.Pki, state: dict[str, Any]
    ) -> list[str]:
        return [
            str(tc.path("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{state['etcdPort']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={state['apiserverPort']}",
            f"--tls-cert-file={keys.serving_cert}",
            f"--tls-private-key-file={keys.serving_key}",
            f"--client-ca-file={keys.ca_cert}",
            f"--kubelet-client-certificate={keys.client_cert(pki.APISERVER_KUBELET)}",
            f"--kubelet-client-key={keys.client_key(pki.APISERVER_KUBELET)}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={keys.sa_pub}",
            f"--service-account-signing-key-file={keys.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # The loopback address may not back the `kubernetes` Service's endpoints.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            "--v=1",
        ]

    def _kcm_argv(self, tc: build.Toolchain, keys: pki.Pki) -> list[str]:
        return [
            str(tc.path("kube-controller-manager")),
            f"--kubeconfig={self.dir / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={self.dir / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={self.dir / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={keys.sa_key}",
            f"--root-ca-file={keys.ca_cert}",
            f"--cluster-signing-cert-file={keys.ca_cert}",
            f"--cluster-signing-key-file={keys.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service,-route",
            "--v=1",
        ]

    def _scheduler_argv(self, tc: build.Toolchain) -> list[str]:
        kc = self.dir / "scheduler.kubeconfig"
        return [
            str(tc.path("kube-scheduler")),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
            "--v=1",
        ]

    def _nodesim_argv(self, nodes: Sequence[NodeSpec]) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "secondsite.devcluster.nodesim",
            f"--kubeconfig={self.kubeconfig}",
            f"--pods-dir={self.pods_dir}",
        ]
        return argv + [f"--node={n.to_arg()}" for n in nodes]

    # -- checks ------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        keys = pki.Pki(self.dir / "pki")
        ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
        ctx.load_cert_chain(str(keys.client_cert(pki.ADMIN)), str(keys.client_key(pki.ADMIN)))
        return ctx

    def _api_ready(self, port: int, timeout: float) -> bool:
        try:
            return _http_ok(f"https://127.0.0.1:{port}/readyz", self._ssl(), timeout)
        except (OSError, ssl.SSLError):
            return False

    def kubectl_argv(self, *args: str, tc: build.Toolchain | None = None) -> list[str]:
        """The argv of kubectl bound to this cluster."""
        tc = tc or build.toolchain(self._load().get("version", build.KUBERNETES_VERSION))
        return [str(tc.path("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]

    def _kubectl_ok(self, tc: build.Toolchain, *args: str) -> bool:
        proc = subprocess.run(
            self.kubectl_argv(*args, tc=tc), capture_output=True, text=True, timeout=30
        )
        return proc.returncode == 0

    def _nodes_ready(self, tc: build.Toolchain, nodes: Sequence[NodeSpec]) -> bool:
        proc = subprocess.run(
            self.kubectl_argv("get", "nodes", "-o", "json", tc=tc),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            return False
        ready = set()
        for item in json.loads(proc.stdout)["items"]:
            for cond in item.get("status", {}).get("conditions", []):
                if cond["type"] == "Ready" and cond["status"] == "True":
                    ready.add(item["metadata"]["name"])
        return all(n.name in ready for n in nodes)

    # -- kubeconfigs -------------------------------------------------------------------------

    def _write_kubeconfigs(self, keys: pki.Pki, port: int) -> None:
        for path, who in (
            (self.kubeconfig, pki.ADMIN),
            (self.dir / "controller-manager.kubeconfig", pki.CONTROLLER_MANAGER),
            (self.dir / "scheduler.kubeconfig", pki.SCHEDULER),
        ):
            path.write_text(yaml.safe_dump(_kubeconfig(keys, who, port, self.name)))
            path.chmod(0o600)

    # -- stop --------------------------------------------------------------------------------

    def down(self, *, quiet: bool = False, grace: float = 10.0) -> None:
        """Stop every component (node simulator first, so pod processes end too)."""
        comps = list(reversed(self.components()))
        for c in comps:
            if _alive(c.pid) and _is_ours(c):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.pid, signal.SIGTERM)
                _wait_gone(c.pid, grace)
                if _alive(c.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(c.pid, signal.SIGKILL)
                    _wait_gone(c.pid, 5)
                if not quiet:
                    build._say(f"stopped {c.name} (pid {c.pid})")
        state = self._load()
        if state:
            state["components"] = []
            self._save(state)


def _is_ours(c: Component) -> bool:
    """Guard against pid reuse: the process must still run the command we started."""
    try:
        cmdline = Path(f"/proc/{c.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].decode(errors="replace") == c.argv[0]


def _wait_gone(pid: int, seconds: float) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=seconds)
        if child.returncode is not None:
            del _CHILDREN[pid]
        return
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _kubeconfig(keys: pki.Pki, who: pki.ClientIdentity, port: int, name: str) -> dict[str, Any]:
    ctx = f"secondsite-{name}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": ctx,
                "cluster": {
                    "server": f"https://127.0.0.1:{port}",
                    "certificate-authority-data": _b64(keys.ca_cert),
                },
            }
        ],
        "users": [
            {
                "name": who.user,
                "user": {
                    "client-certificate-data": _b64(keys.client_cert(who)),
                    "client-key-data": _b64(keys.client_key(who)),
                },
            }
        ],
        "contexts": [{"name": ctx, "context": {"cluster": ctx, "user": who.user}}],
        "current-context": ctx,
    }
