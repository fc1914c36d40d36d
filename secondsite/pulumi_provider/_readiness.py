"""Wait until a VPG is Ready: its Ready condition True for its current generation.

The kubernetes provider does not await custom resources (it cannot know what "ready" means for a
CRD), so `pulumi up` would finish as soon as the VPG object exists. `ProtectedApplication` can wait
instead, by reading the VPG until `status.conditions` says Ready for the generation just written,
or failing the update after a timeout with what the status said last.

Ready is written by the SecondSite operator. Without a running operator no VPG ever becomes Ready,
so the wait is off by default and fails, when asked for, with a message that says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pulumi

from secondsite.api import GROUP, VERSION, VIRTUAL_PROTECTION_GROUP


class NotReadyError(pulumi.RunError):
    """The VPG did not become Ready within the timeout."""


@dataclasses.dataclass(frozen=True)
class ReadyWait:
    """How `ProtectedApplication` waits for its VPG to be Ready (during `pulumi up` only)."""

    timeout_seconds: float = 600.0
    """Give up, failing the update, after this long."""
    poll_seconds: float = 2.0
    """Time between reads of the VPG."""
    kubeconfig: str | None = None
    """Kubeconfig file to read the VPG with. None: $KUBECONFIG or ~/.kube/config, as the
    kubernetes provider does by default; give the same file as an explicit provider's."""
    context: str | None = None
    """Kubeconfig context. None: the file's current context."""


def readiness(obj: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether an object (as read from the API) is Ready for its generation, and why (not)."""
    if obj is None:
        return False, "the VirtualProtectionGroup does not exist"
    generation = obj.get("metadata", {}).get("generation")
    status = obj.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None:
        return False, "no Ready condition in status (is the SecondSite operator running?)"
    observed = ready.get("observedGeneration", status.get("observedGeneration"))
    said = (
        f"Ready={ready.get('status')} reason={ready.get('reason')} message={ready.get('message')}"
    )
    if generation is not None and observed is not None and observed < generation:
        return False, f"{said}, but for generation {observed}, not {generation}"
    return ready.get("status") == "True", said


async def wait_until_ready(
    read: Callable[[], Awaitable[Mapping[str, Any] | None]],
    what: str,
    wait: ReadyWait,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Read until `readiness` says Ready; raise NotReadyError after `wait.timeout_seconds`."""
    deadline = clock() + wait.timeout_seconds
    while True:
        ready, why = readiness(await read())
        if ready:
            return
        if clock() >= deadline:
            raise NotReadyError(
                f"{what} is not Ready after {wait.timeout_seconds:g} s: {why}. Ready is set by "
                "the SecondSite operator; without it running, no VPG becomes Ready "
                "(leave wait_for_ready unset until the operator is installed)."
            )
        await sleep(wait.poll_seconds)


def vpg_reader(
    namespace: str, name: str, wait: ReadyWait
) -> Callable[[], Awaitable[Mapping[str, Any] | None]]:
    """Read one VPG with the kubernetes client, in a thread; None while it does not exist."""
    import kubernetes

    # $KUBECONFIG as it is now: the client library reads it once, when first imported.
    config_file = wait.kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    try:
        client = kubernetes.config.new_client_from_config(
            config_file=config_file, context=wait.context
        )
    except kubernetes.config.ConfigException as e:
        raise NotReadyError(
            f"cannot wait for VirtualProtectionGroup {namespace}/{name}: no usable kubeconfig"
            f" ({e}); set ReadyWait.kubeconfig or $KUBECONFIG"
        ) from None
    api = kubernetes.client.CustomObjectsApi(client)

    def get() -> Mapping[str, Any] | None:
        try:
            obj: Mapping[str, Any] = api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, VIRTUAL_PROTECTION_GROUP.plural, name
            )
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    async def read() -> Mapping[str, Any] | None:
        return await asyncio.to_thread(get)

    return read
