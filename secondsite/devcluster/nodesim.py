"""The node simulator: the one stand-in for kubelet in a dev cluster.

No container runtime can run here, so this process registers Nodes, keeps their Leases and status
fresh, and runs each container of every Pod bound to one of its nodes as a local process: the
container's `command` + `args` (with `$(VAR)` expansion as kubelet does), its `env` (values, the
downward API, ConfigMap and Secret keys) plus NODE_NAME, POD_NAME, POD_NAMESPACE and POD_IP. Each
pod gets its own loopback address (127.1.x.y) as its IP and a sandbox directory as working
directory; a container's output goes to `<sandbox>/<container>.log`. Pod status (phase,
conditions, container states, exit codes, restart counts) is reported as kubelet would, restarts
follow `restartPolicy`,
and deleting a Pod stops its processes (SIGTERM, then SIGKILL after the grace period) before the
simulator removes the Pod object. Scheduling, controllers and garbage collection stay upstream's.

What is not simulated: images (the command runs on this machine), volume mounts (a container sees
the host's file system), probes (a running container counts as ready), resource limits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("secondsite.devcluster.nodesim")

KUBELET_VERSION = "v1.34.4"
_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """A simulated node: its name and labels (`name:key=value,key=value`)."""

    name: str
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_arg(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.labels.items()))


def parse_node_spec(text: str) -> NodeSpec:
    """Parse `name[:k=v,k=v]`; raises ValueError with what is wrong."""
    name, _, rest = text.partition(":")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
        raise ValueError(f"node name {name!r} is not a valid DNS subdomain")
    labels: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"node label {item!r} of {name!r} is not key=value")
        labels[key] = value
    return NodeSpec(name, labels)


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubelet's `$(VAR)` expansion: known variables are replaced, `$$` escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_RE.sub(sub, text)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class ContainerRun:
    """One container of one pod: its process (if running) and what kubelet would report."""

    name: str
    image: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None
    waiting_reason: str | None = "ContainerCreating"
    waiting_message: str | None = None
    next_start: float = 0.0

    def state(self) -> dict[str, Any]:
        if self.proc is not None and self.proc.poll() is None:
            return {"running": {"startedAt": self.started_at}}
        if self.terminated is not None:
            return {"terminated": self.terminated}
        waiting: dict[str, Any] = {"reason": self.waiting_reason or "ContainerCreating"}
        if self.waiting_message:
            waiting["message"] = self.waiting_message
        return {"waiting": waiting}

    def status(self) -> dict[str, Any]:
        running = self.proc is not None and self.proc.poll() is None
        st: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state(),
        }
        if self.proc is not None:
            st["containerID"] = f"sim://{self.proc.pid}"
        if self.last_terminated:
            st["lastState"] = {"terminated": self.last_terminated}
        return st


@dataclasses.dataclass
class PodRun:
    """A pod bound to one of our nodes."""

    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    sandbox: Path
    body: dict[str, Any]
    containers: list[ContainerRun]
    start_time: str = dataclasses.field(default_factory=_now)
    deleting_since: float | None = None
    reported: dict[str, Any] | None = None

    @property
    def restart_policy(self) -> str:
        return str(self.body["spec"].get("restartPolicy", "Always"))


class NodeSimulator:
    """Runs the nodes; `run()` blocks until `stop()` (or SIGTERM)."""

    def __init__(self, api_client: Any, nodes: list[NodeSpec], pods_dir: Path) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.coord = client.CoordinationV1Api(api_client)
        self.nodes = {n.name: n for n in nodes}
        self.node_ips = {n.name: f"127.0.1.{i + 1}" for i, n in enumerate(nodes)}
        self.pods_dir = pods_dir
        self.pods: dict[str, PodRun] = {}
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.stopping = threading.Event()
        self._ip_counter = 0

    # -- nodes -------------------------------------------------------------------------------

    def _node_status(self, name: str) -> dict[str, Any]:
        now = _now()
        conditions = [
            ("Ready", "True", "KubeletReady", "node simulator is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
        ]
        capacity = {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        return {
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": m,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s, r, m in conditions
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.node_ips[name]},
                {"type": "Hostname", "address": name},
            ],
            "capacity": capacity,
            "allocatable": capacity,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "secondsite-nodesim://1",
                "osImage": "SecondSite node simulator",
                "kernelVersion": os.uname().release,
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
            },
        }

    def register_nodes(self) -> None:
        from kubernetes.client.rest import ApiException

        for spec in self.nodes.values():
            labels = {
                "kubernetes.io/hostname": spec.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **spec.labels,
            }
            body = {"metadata": {"name": spec.name, "labels": labels}, "spec": {}}
            try:
                self.core.create_node(body)
                log.info("node=%s event=registered", spec.name)
            except ApiException as e:
                if e.status != 409:
                    raise
                self.core.patch_node(spec.name, {"metadata": {"labels": labels}})
            self.core.patch_node_status(spec.name, {"status": self._node_status(spec.name)})

    def heartbeat(self) -> None:
        """Renew each node's Lease every 10 s and post its status every 30 s."""
        from kubernetes.client.rest import ApiException

        last_status = time.monotonic()
        while not self.stopping.wait(10):
            for name in self.nodes:
                try:
                    self._renew_lease(name)
                    if time.monotonic() - last_status >= 30:
                        self.core.patch_node_status(name, {"status": self._node_status(name)})
                except ApiException as e:
                    log.warning("node=%s event=heartbeat-failed status=%s", name, e.status)
                except Exception as e:  # the API server may be restarting; retry next beat
                    log.warning("node=%s event=heartbeat-failed error=%r", name, e)
            if time.monotonic() - last_status >= 30:
                last_status = time.monotonic()

    def _renew_lease(self, name: str) -> None:
        from kubernetes.client.rest import ApiException

        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now},
        }
        try:
            self.coord.patch_namespaced_lease(name, "kube-node-lease", body)
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    # -- pods --------------------------------------------------------------------------------

    def watch_pods(self) -> None:
        """Feed pod events into the queue; relist after every watch ends or fails."""
        from kubernetes import watch

        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(_preload_content=False)
                import json

                data = json.loads(listing.data)
                seen = set()
                for item in data["items"]:
                    seen.add(item["metadata"]["uid"])
                    self.events.put(("SYNC", item))
                self.events.put(("RELIST", {"uids": sorted(seen)}))
                w = watch.Watch()
                for ev in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=data["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                    _preload_content=False,
                ):
                    if self.stopping.is_set():
                        w.stop()
                        break
                    obj = ev["raw_object"]
                    self.events.put((ev["type"], obj))
            except Exception as e:
                if not self.stopping.is_set():
                    log.warning("event=watch-failed error=%r", e)
                    self.stopping.wait(1)

    def _pod_key(self, obj: dict[str, Any]) -> str:
        return str(obj["metadata"]["uid"])

    def handle(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "RELIST":
            alive = set(obj["uids"])
            for uid in [u for u in self.pods if u not in alive]:
                self._kill_pod(self.pods.pop(uid), grace=0)
            return
        node = obj.get("spec", {}).get("nodeName")
        uid = self._pod_key(obj)
        if node not in self.nodes:
            return
        if kind == "DELETED":
            run = self.pods.pop(uid, None)
            if run is not None:
                self._kill_pod(run, grace=0)
            return
        run = self.pods.get(uid)
        if run is None:
            phase = obj.get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                return  # finished before we (re)started: nothing to run
            run = self._admit(obj, node)
            self.pods[uid] = run
        run.body = obj
        if obj["metadata"].get("deletionTimestamp") and run.deleting_since is None:
            run.deleting_since = time.monotonic()

    def _admit(self, obj: dict[str, Any], node: str) -> PodRun:
        self._ip_counter += 1
        ip = f"127.1.{(self._ip_counter >> 8) & 0xFF}.{(self._ip_counter & 0xFF) or 1}"
        meta = obj["metadata"]
        sandbox = self.pods_dir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        sandbox.mkdir(parents=True, exist_ok=True)
        containers = [
            ContainerRun(name=c["name"], image=c.get("image", ""))
            for c in obj["spec"]["containers"]
        ]
        log.info(
            "pod=%s/%s node=%s ip=%s event=admitted", meta["namespace"], meta["name"], node, ip
        )
        return PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            node=node,
            ip=ip,
            sandbox=sandbox,
            body=obj,
            containers=containers,
        )

    def _env(self, run: PodRun, container: dict[str, Any]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(run.sandbox),
            "HOSTNAME": run.name,
            "NODE_NAME": run.node,
            "POD_NAME": run.name,
            "POD_NAMESPACE": run.namespace,
            "POD_IP": run.ip,
        }
        for src in container.get("envFrom", []) or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                cm = self.core.read_namespaced_config_map(
                    src["configMapRef"]["name"], run.namespace
                )
                env.update({prefix + k: v for k, v in (cm.data or {}).items()})
            if "secretRef" in src:
                import base64

                sec = self.core.read_namespaced_secret(src["secretRef"]["name"], run.namespace)
                env.update(
                    {prefix + k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}
                )
        for item in container.get("env", []) or []:
            env[item["name"]] = self._env_value(run, item, env)
        return env

    def _env_value(self, run: PodRun, item: dict[str, Any], env: Mapping[str, str]) -> str:
        if "valueFrom" not in item:
            return expand_vars(str(item.get("value", "")), env)
        src = item["valueFrom"]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            meta = run.body["metadata"]
            fields: dict[str, str] = {
                "metadata.name": run.name,
                "metadata.namespace": run.namespace,
                "metadata.uid": run.uid,
                "spec.nodeName": run.node,
                "spec.serviceAccountName": run.body["spec"].get("serviceAccountName", "default"),
                "status.podIP": run.ip,
                "status.hostIP": self.node_ips[run.node],
            }
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                return str(meta.get(m.group(1), {}).get(m.group(2), ""))
            if path not in fields:
                raise ValueError(f"unsupported fieldRef {path}")
            return fields[path]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            cm = self.core.read_namespaced_config_map(ref["name"], run.namespace)
            return str((cm.data or {})[ref["key"]])
        if "secretKeyRef" in src:
            import base64

            ref = src["secretKeyRef"]
            sec = self.core.read_namespaced_secret(ref["name"], run.namespace)
            return base64.b64decode((sec.data or {})[ref["key"]]).decode()
        raise ValueError(f"unsupported env source for {item['name']}")

    def _start(self, run: PodRun, cr: ContainerRun) -> None:
        spec = next(c for c in run.body["spec"]["containers"] if c["name"] == cr.name)
        command = list(spec.get("command") or []) + list(spec.get("args") or [])
        if not spec.get("command"):
            cr.waiting_reason = "CreateContainerError"
            cr.waiting_message = (
                "the node simulator runs a container's `command` on the host; "
                "this container relies on its image's entrypoint"
            )
            return
        try:
            env = self._env(run, spec)
        except Exception as e:
            cr.waiting_reason = "CreateContainerConfigError"
            cr.waiting_message = str(e)
            return
        argv = [expand_vars(a, env) for a in command]
        workdir = Path(spec.get("workingDir") or run.sandbox)
        logf = run.sandbox / f"{cr.name}.log"
        try:
            with logf.open("ab") as out:
                cr.proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as e:
            cr.waiting_reason = "RunContainerError"
            cr.waiting_message = f"cannot run {shlex.join(argv)}: {e}"
            cr.terminated = None
            return
        cr.started_at = _now()
        cr.terminated = None
        cr.waiting_reason = cr.waiting_message = None
        log.info(
            "pod=%s/%s container=%s pid=%d event=started argv=%s",
            run.namespace,
            run.name,
            cr.name,
            cr.proc.pid,
            shlex.join(argv),
        )

    def _reap(self, run: PodRun, cr: ContainerRun) -> None:
        """Record a container's exit and decide whether (and when) it restarts."""
        assert cr.proc is not None
        rc = cr.proc.returncode
        code = 128 - rc if rc < 0 else rc
        term = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": cr.started_at,
            "finishedAt": _now(),
            "containerID": f"sim://{cr.proc.pid}",
        }
        log.info(
            "pod=%s/%s container=%s event=exited code=%d", run.namespace, run.name, cr.name, code
        )
        cr.proc = None
        policy = run.restart_policy
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            cr.last_terminated = term
            cr.restart_count += 1
            cr.waiting_reason = "CrashLoopBackOff"
            cr.waiting_message = f"back-off restarting failed container {cr.name}"
            cr.next_start = time.monotonic() + min(10.0, 2.0 ** min(cr.restart_count - 1, 4))
        else:
            cr.terminated = term

    def _kill_pod(self, run: PodRun, grace: float) -> None:
        procs = [c.proc for c in run.containers if c.proc is not None and c.proc.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if procs:
            log.info("pod=%s/%s event=killed processes=%d", run.namespace, run.name, len(procs))

    def _phase(self, run: PodRun) -> str:
        if any(c.proc is not None and c.proc.poll() is None for c in run.containers):
            return "Running"
        terms = [c.terminated for c in run.containers]
        if all(t is not None for t in terms):
            return "Succeeded" if all(t and t["exitCode"] == 0 for t in terms) else "Failed"
        if any(c.restart_count for c in run.containers):
            return "Running"
        return "Pending"

    def _report(self, run: PodRun) -> None:
        from kubernetes.client.rest import ApiException

        statuses = [c.status() for c in run.containers]
        ready = all(s["ready"] for s in statuses)
        now = _now()

        def cond(t: str, ok: bool) -> dict[str, Any]:
            return {"type": t, "status": "True" if ok else "False", "lastTransitionTime": now}

        phase = self._phase(run)
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": self.node_ips[run.node],
            "hostIPs": [{"ip": self.node_ips[run.node]}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.start_time,
            "containerStatuses": statuses,
            "conditions": [
                cond("PodReadyToStartContainers", True),
                cond("Initialized", True),
                cond("ContainersReady", ready),
                cond("Ready", ready),
                cond("PodScheduled", True),
            ],
        }
        # Report only on change (transition times aside) to keep API traffic low.
        fingerprint = {
            **status,
            "conditions": [(c["type"], c["status"]) for c in status["conditions"]],
        }
        if fingerprint == run.reported:
            return
        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
            run.reported = fingerprint
        except ApiException as e:
            if e.status != 404:
                log.warning(
                    "pod=%s/%s event=status-failed status=%s", run.namespace, run.name, e.status
                )

    def _finish_deletion(self, run: PodRun) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        grace = float(run.body["spec"].get("terminationGracePeriodSeconds", 30))
        self._kill_pod(run, grace=min(grace, 30.0))
        try:
            self.core.delete_namespaced_pod(
                run.name,
                run.namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=run.uid)
                ),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise
        self.pods.pop(run.uid, None)
        log.info("pod=%s/%s event=deleted", run.namespace, run.name)

    def step(self) -> None:
        """One reconcile pass over all pods."""
        for run in list(self.pods.values()):
            if run.deleting_since is not None:
                self._finish_deletion(run)
                continue
            for cr in run.containers:
                if cr.proc is not None and cr.proc.poll() is not None:
                    self._reap(run, cr)
                if (
                    cr.proc is None
                    and cr.terminated is None
                    and time.monotonic() >= cr.next_start
                    and cr.waiting_reason not in ("CreateContainerError",)
                ):
                    self._start(run, cr)
            self._report(run)

    def run(self) -> None:
        self.register_nodes()
        threads = [
            threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True),
            threading.Thread(target=self.watch_pods, name="watch", daemon=True),
        ]
        for t in threads:
            t.start()
        for name in self.nodes:
            self._renew_lease(name)
        while not self.stopping.is_set():
            try:
                kind, obj = self.events.get(timeout=0.5)
                self.handle(kind, obj)
                while True:
                    try:
                        kind, obj = self.events.get_nowait()
                    except queue.Empty:
                        break
                    self.handle(kind, obj)
            except queue.Empty:
                pass
            try:
                self.step()
            except Exception:
                log.exception("event=step-failed")
                time.sleep(0.5)
        for run in list(self.pods.values()):
            self._kill_pod(run, grace=5)

    def stop(self) -> None:
        self.stopping.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secondsite-nodesim", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--pods-dir", required=True, type=Path)
    parser.add_argument("--node", action="append", required=True, help="name[:key=value,...]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=args.kubeconfig)
    sim = NodeSimulator(api_client, [parse_node_spec(n) for n in args.node], args.pods_dir)
    signal.signal(signal.SIGTERM, lambda *_: sim.stop())
    signal.signal(signal.SIGINT, lambda *_: sim.stop())
    sim.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
