"""The appliance's NBD namespace: capture exports and point-in-time images, by name.

| export name                | what                                                            |
|----------------------------|-----------------------------------------------------------------|
| `<volume>`                 | the volume's capture export (in-path or mirror target)          |
|                            | of a journaled or a protected (replicated) VPG                  |
| `pit/<volume>@<which>`     | read-only image of the volume at a checkpoint                   |
| `test/<volume>@<which>`    | writable image over a scratch overlay, dropped on disconnect    |
| `image/<id>`               | an image created through the control API, open until deleted   |

`<which>` selects the checkpoint: `latest` (the newest consistent one), a checkpoint id (`42`), or
a tag (`tag:before-upgrade`, the newest checkpoint with that tag). Neither kind of image changes the
replica or the journal; replication goes on while they are open. Each client connection gets its
own image (and its own scratch overlay), closed when the connection ends. An `image/<id>` is the
exception: the appliance keeps it open (pinned) until the control API deletes it, and every
connection to it shares it, scratch overlay included.

Images resolve against every journal of the appliance: the journals of local VPGs and those fed by
replication streams.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np

from secondsite.appliance.journal import Checkpoint, JournalError, PitImage
from secondsite.appliance.journal.checkpoints import CheckpointTable
from secondsite.appliance.nbd.export import (
    BlockSizes,
    BytesLike,
    Export,
    ExportProvider,
    NBDError,
    UnknownExport,
)
from secondsite.appliance.vpg import JournaledVpg, VolumeRuntime

if TYPE_CHECKING:
    from secondsite.appliance.protected import ProtectedVpg

__all__ = ["IMAGE_PREFIX", "ApplianceExports", "PitExport", "parse_image_name"]

IMAGE_PREFIX = "image/"
"""Export names of pinned images: `image/<id>`."""


def parse_image_name(name: str) -> tuple[str, str, str] | None:
    """`pit/vol@latest` -> ('pit', 'vol', 'latest'); None when `name` is no image name."""
    kind, slash, rest = name.partition("/")
    if not slash or kind not in ("pit", "test"):
        return None
    volume, at, which = rest.rpartition("@")
    if not at or not volume or not which:
        return None
    return kind, volume, which


class PitExport(Export):
    """A PIT image served over NBD: read-only, or writable through its scratch overlay."""

    def __init__(self, image: PitImage, checkpoint: Checkpoint, *, pinned: bool = False) -> None:
        self.image = image
        self.checkpoint = checkpoint
        self.pinned = pinned
        """Created through the control API: shared by its connections, closed by its owner."""
        self.connections = 0
        """NBD connections using a pinned image right now."""

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def read_only(self) -> bool:
        return not self.image.writable

    @property
    def can_trim(self) -> bool:
        return self.image.writable

    @property
    def can_write_zeroes(self) -> bool:
        return self.image.writable

    @property
    def block_sizes(self) -> BlockSizes:
        return BlockSizes(minimum=1, preferred=4096)

    @property
    def description(self) -> str:
        mode = "scratch overlay" if self.image.writable else "read-only"
        return f"{self.image.volume} at checkpoint {self.checkpoint.id} ({mode})"

    async def read(self, offset: int, length: int) -> BytesLike:
        try:
            return await self.image.read(offset, length)
        except JournalError as e:
            raise NBDError(errno.EIO, f"read: {e}") from e

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        await self.image.write(offset, bytes(data))

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> None:
        await self.image.write_zeroes(offset, length)

    async def trim(self, offset: int, length: int) -> None:
        await self.image.trim(offset, length)

    async def flush(self) -> None:
        # A scratch overlay is discarded on close: there is nothing to make durable.
        return None


class ApplianceExports(ExportProvider):
    """Resolves export names against the appliance's VPGs."""

    def __init__(
        self,
        vpgs: Mapping[str, JournaledVpg],
        pinned: Mapping[str, PitExport] | None = None,
        protected: Mapping[str, ProtectedVpg] | None = None,
    ) -> None:
        self._vpgs = vpgs
        self._pinned: Mapping[str, PitExport] = {} if pinned is None else pinned
        self._protected: Mapping[str, ProtectedVpg] = {} if protected is None else protected

    def _captured(self) -> Iterator[tuple[str, VolumeRuntime]]:
        for vpg in self._vpgs.values():
            yield from vpg.volumes.items()
        for pvpg in self._protected.values():
            yield from pvpg.volumes.items()

    def _owner(self, volume: str) -> JournaledVpg | None:
        for vpg in self._vpgs.values():
            if vpg.has_volume(volume):
                return vpg
        return None

    def list_exports(self) -> list[str]:
        volumes = [name for name, _ in self._captured()]
        return volumes + [IMAGE_PREFIX + image_id for image_id in self._pinned]

    async def open_export(self, name: str) -> Export:
        if name.startswith(IMAGE_PREFIX):
            pinned = self._pinned.get(name.removeprefix(IMAGE_PREFIX))
            if pinned is None:
                raise UnknownExport(name)
            pinned.connections += 1
            return pinned
        parsed = parse_image_name(name)
        if parsed is None:
            for volume, runtime in self._captured():
                if volume == name:
                    return runtime.export
            raise UnknownExport(name)
        kind, volume, which = parsed
        vpg = self._owner(volume)
        if vpg is None or vpg.journal is None:
            raise UnknownExport(name)
        checkpoint = select_checkpoint(vpg.journal.checkpoints, which)
        if checkpoint is None:
            raise UnknownExport(name)
        try:
            image = await vpg.journal.open_image(volume, checkpoint, writable=kind == "test")
        except JournalError as e:
            raise UnknownExport(name) from e
        return PitExport(image, checkpoint)

    async def release_export(self, export: Export) -> None:
        if isinstance(export, PitExport):
            if export.pinned:
                export.connections -= 1
            else:
                export.image.close()


def select_checkpoint(table: CheckpointTable, which: str) -> Checkpoint | None:
    """The checkpoint `which` names (`latest`, `tag:<tag>`, or an id), or None."""
    if which == "latest":
        cols = table.columns()
        consistent = np.flatnonzero(cols["consistent"])
        if len(consistent):
            return table.by_id(int(cols["cid"][consistent[-1]]))
        floor = table.floor
        return floor if floor is not None and floor.consistent else None
    if which.startswith("tag:"):
        tagged = table.by_tag(which[4:])
        return tagged[-1] if tagged else None
    if which.isdigit():
        return table.by_id(int(which))
    return None
