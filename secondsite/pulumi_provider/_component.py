"""ProtectedApplication: an application's volumes and workloads under protection, as one unit.

It is what a Pulumi user declares for "protect this app": a VirtualProtectionGroup over the
application's PVCs (by name or selector) and workloads, with its journal template, plus tagged
Checkpoints (say, one before each upgrade) that depend on the VPG, so they are created after it and
deleted before it. Optionally `pulumi up` waits until the VPG is Ready (see `_readiness`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pulumi

from secondsite.api import VirtualProtectionGroupSpec
from secondsite.pulumi_provider._readiness import ReadyWait, vpg_reader, wait_until_ready
from secondsite.pulumi_provider._resources import Checkpoint, VirtualProtectionGroup
from secondsite.pulumi_provider._validation import InvalidSpecError

TYPE_TOKEN = "secondsite:index:ProtectedApplication"


def checkpoint_object_name(vpg: str, tag: str) -> str:
    """The Checkpoint object of a tag: `<vpg>-<tag>`, with what a name cannot hold as `-`."""
    slug = re.sub(r"[^a-z0-9.-]+", "-", tag.lower()).strip("-.")
    return f"{vpg}-{slug}"[:253].rstrip("-.")


class ProtectedApplication(pulumi.ComponentResource):
    """A VirtualProtectionGroup, its tagged Checkpoints, and optionally a wait until it is Ready.

    `spec` is the VPG's spec (a `VirtualProtectionGroupSpec`, or a mapping of the same fields):
    sites, volumes (PVC names or a selector), workloads, the journal template and the rest. The VPG
    object is called `name` (or `vpg_name`), in `namespace` (None: the provider's default).
    Each tag in `checkpoint_tags` becomes a Checkpoint `<vpg>-<tag>`.
    """

    vpg: VirtualProtectionGroup
    """The VirtualProtectionGroup."""
    checkpoints: dict[str, Checkpoint]
    """The tagged Checkpoints, by tag."""
    ready: pulumi.Output[bool] | None
    """True once the VPG was seen Ready (only with `wait_for_ready`, and never in a preview)."""

    def __init__(
        self,
        name: str,
        spec: VirtualProtectionGroupSpec | Mapping[str, Any],
        *,
        namespace: pulumi.Input[str] | None = None,
        vpg_name: str | None = None,
        labels: Mapping[str, str] | None = None,
        checkpoint_tags: Sequence[str] = (),
        wait_for_ready: ReadyWait | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(TYPE_TOKEN, name, None, opts)
        metadata: dict[str, Any] = {"name": vpg_name or name}
        if namespace is not None:
            metadata["namespace"] = namespace
        if labels:
            metadata["labels"] = dict(labels)
        child = pulumi.ResourceOptions(parent=self)
        self.vpg = VirtualProtectionGroup(name, spec=spec, metadata=metadata, opts=child)

        self.checkpoints = {}
        tags_of: dict[str, str] = {}
        for tag in checkpoint_tags:
            object_name = checkpoint_object_name(self.vpg.object_name, tag)
            if object_name in tags_of:
                raise InvalidSpecError(
                    "Checkpoint",
                    object_name,
                    [f"checkpoint_tags: {tags_of[object_name]!r} and {tag!r} make the same name"],
                )
            tags_of[object_name] = tag
            self.checkpoints[tag] = Checkpoint(
                f"{name}-{object_name.removeprefix(self.vpg.object_name + '-')}",
                # A mapping, so that a bad tag is an InvalidSpecError naming spec.tag.
                spec={"vpg": self.vpg.object_name, "tag": tag},
                metadata={**metadata, "name": object_name},
                # The spec names the VPG as a string, which Pulumi cannot see as a dependency.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.vpg]),
            )

        self.ready = None
        if wait_for_ready is not None and not pulumi.runtime.is_dry_run():
            self.ready = self.vpg.id.apply(lambda id: self._wait(id, wait_for_ready))

        outputs: dict[str, Any] = {
            "vpgName": self.vpg.object_name,
            "checkpointNames": [c.object_name for c in self.checkpoints.values()],
        }
        if self.ready is not None:
            outputs["ready"] = self.ready
        self.register_outputs(outputs)

    async def _wait(self, vpg_id: str, wait: ReadyWait) -> bool:
        # A namespaced object's id is `<namespace>/<name>`, with the namespace the provider chose.
        namespace, _, name = vpg_id.rpartition("/")
        what = f"VirtualProtectionGroup {namespace}/{name}"
        pulumi.log.info(f"waiting up to {wait.timeout_seconds:g} s for {what} to be Ready", self)
        await wait_until_ready(vpg_reader(namespace or "default", name, wait), what, wait)
        return True
