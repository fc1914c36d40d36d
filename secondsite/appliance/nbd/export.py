"""What the NBD server serves: exports, and the provider that names and opens them.

An :class:`Export` is a range of ``size`` bytes with a handful of async operations (read, write,
write zeroes, trim, flush, and optionally block status). The server owns the protocol; the export
owns the data. An :class:`ExportProvider` maps the names clients ask for to exports and is told when
a client's connection ends, which is how a per-connection export (a point-in-time image with its
scratch overlay) gets dropped.

Errors: an export method raises :class:`NBDError` with an errno value (``errno.EIO``,
``errno.ENOSPC``, ...) and the server sends it to the client as that request's error. Any other
exception is a bug in the export: the server logs it and answers ``EIO``; the connection and the
server carry on. :class:`UnknownExport` from :meth:`ExportProvider.open_export` is how a provider
says a name does not exist.

Ordering contract (what the journal above relies on): for each connection, the server *starts*
export calls in the order the requests arrive on the wire. A call's synchronous prefix (everything
up to its first ``await`` that actually suspends) runs before that of any later request: the server
either steps the coroutine right away (``Export.eager``) or wraps it in a task at once, and asyncio
runs tasks' first steps in creation order. So an export that must order writes, for example by
giving each one a sequence number, takes that decision synchronously at the top of
:meth:`Export.write` and gets the arrival order. Calls may *complete* in any order; the server
replies as they complete and NBD clients match replies by handle. :meth:`Export.flush` must cover
every write that has completed before it was called.

Exception tree::

    NBDError                  an NBD error reply (errno + message)
    UnknownExport(LookupError) no export by that name
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "MAX_BLOCK_SIZE",
    "BlockSizes",
    "BytesLike",
    "DictExportProvider",
    "Export",
    "ExportProvider",
    "Extent",
    "NBDError",
    "UnknownExport",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""Data handed to and returned by exports. Byte-addressed (``len()`` is the byte count)."""

Extent: TypeAlias = tuple[int, int]
"""One block-status extent: ``(length, flags)`` with ``base:allocation`` flags (1 hole, 2 zero)."""

MAX_BLOCK_SIZE = 32 * 1024 * 1024
"""The largest read or write payload the server accepts (the protocol's interoperable limit)."""


class NBDError(Exception):
    """A request failed; the client gets ``errno_code`` (mapped to the NBD error set).

    ``errno_code`` is a host errno value; values outside the protocol's set are sent as ``EIO``
    except ``EDQUOT``/``EFBIG`` (sent as ``ENOSPC``) and ``EACCES``/``EROFS`` (``EPERM``).
    """

    def __init__(self, errno_code: int, message: str = "") -> None:
        super().__init__(errno_code, message)
        self.errno_code = errno_code
        self.message = message or errno.errorcode.get(errno_code, str(errno_code))

    def __str__(self) -> str:
        return f"{errno.errorcode.get(self.errno_code, self.errno_code)}: {self.message}"


class UnknownExport(LookupError):
    """The provider has no export by this name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no export named {self.name!r}"


@dataclass(frozen=True, slots=True)
class BlockSizes:
    """Block size constraints an export advertises (NBD_INFO_BLOCK_SIZE) and the server enforces."""

    minimum: int = 1
    """Alignment of every offset and length; a power of two, 1 to 64 KiB. Misaligned: EINVAL."""
    preferred: int = 4096
    """Size at which aligned I/O is efficient; a power of two, at least max(minimum, 512)."""
    maximum: int = MAX_BLOCK_SIZE
    """Largest read/write payload; the server caps it at 32 MiB. Larger requests: EINVAL."""

    def validate(self) -> None:
        """Raise ValueError unless the constraints are what the protocol allows."""
        if not (1 <= self.minimum <= 65536 and self.minimum & (self.minimum - 1) == 0):
            raise ValueError(f"minimum block size {self.minimum} is not a power of two <= 64 KiB")
        if self.preferred < max(self.minimum, 512) or self.preferred & (self.preferred - 1):
            raise ValueError(f"preferred block size {self.preferred} is invalid")
        if self.maximum < self.preferred or self.maximum % self.minimum:
            raise ValueError(f"maximum block size {self.maximum} is invalid")


class Export(abc.ABC):
    """A block device as the NBD server sees it.

    Subclasses implement the abstract members; the capability properties default to a writable
    export without trim, zeroing or multi-connection consistency. The server reads ``size``,
    the capabilities and ``block_sizes`` once, when a client selects the export, and checks every
    request against them (bounds, alignment, maximum length, read-only) before calling a method:
    a method is never called with an out-of-range or misaligned request, nor a write-type method
    on a read-only export, nor ``trim``/``write_zeroes`` unless advertised.
    """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes."""

    @property
    def read_only(self) -> bool:
        """Whether writes, trims and zeroing are refused (NBD_FLAG_READ_ONLY)."""
        return False

    @property
    def can_trim(self) -> bool:
        """Whether :meth:`trim` is implemented (NBD_FLAG_SEND_TRIM)."""
        return False

    @property
    def can_write_zeroes(self) -> bool:
        """Whether :meth:`write_zeroes` is implemented (NBD_FLAG_SEND_WRITE_ZEROES)."""
        return False

    @property
    def can_multi_conn(self) -> bool:
        """Whether flush/FUA on one connection covers writes made through every connection to this
        export (NBD_FLAG_CAN_MULTI_CONN): true when there is no per-connection cache."""
        return False

    @property
    def block_sizes(self) -> BlockSizes:
        """Block size constraints; the defaults suit byte-addressable backends."""
        return BlockSizes()

    @property
    def eager(self) -> bool:
        """Whether the server may step calls directly in its receive callback instead of starting
        a task for each (as asyncio's eager tasks do): cheaper for exports whose calls usually
        complete without suspending. The code before a call's first suspension then runs with no
        current task, so it must not use ``asyncio.timeout()``, ``TaskGroup`` or
        ``current_task()``. The order in which calls start is the same either way."""
        return False

    @property
    def description(self) -> str:
        """Human readable text for NBD_INFO_DESCRIPTION (empty: none)."""
        return ""

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> BytesLike:
        """Return exactly ``length`` bytes at ``offset``; the server never mutates the result,
        and the export must not mutate it afterwards either (it may still be queued for sending)."""

    @abc.abstractmethod
    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        """Write ``data`` at ``offset``. ``data`` belongs to the export from now on (the server
        never reuses it). With ``fua``, return only once the data is durable."""

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes.

        ``may_trim``: the range may be deallocated (the client did not set NBD_CMD_FLAG_NO_HOLE).
        ``fast``: the client asked for NBD_CMD_FLAG_FAST_ZERO; if zeroing would be no faster than
        writing zeroes, raise ``NBDError(errno.ENOTSUP)`` at once without changing anything.
        """
        raise NBDError(errno.EINVAL, "write zeroes is not supported by this export")

    async def trim(self, offset: int, length: int) -> None:
        """Hint that the range is no longer needed; its content is undefined afterwards.

        A trim with NBD_CMD_FLAG_FUA is followed by :meth:`flush` before the server replies."""
        raise NBDError(errno.EINVAL, "trim is not supported by this export")

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write that has completed so far durable."""

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Describe allocation from ``offset`` on as ``(length, flags)`` extents, with
        ``base:allocation`` flags (1 = hole, 2 = reads as zeroes). They may cover less than
        ``length`` (at least one byte) or run past it; the server clips them. The default,
        ``[(length, 0)]`` ("allocated, content unknown"), is always correct."""
        return [(length, 0)]


class ExportProvider(abc.ABC):
    """Names exports and opens them for client connections."""

    @abc.abstractmethod
    def list_exports(self) -> list[str]:
        """Names shown to NBD_OPT_LIST (an export may be openable without being listed)."""

    @abc.abstractmethod
    async def open_export(self, name: str) -> Export:
        """Return the export a client asked for by ``name`` ('' is the default export).

        Raise :class:`UnknownExport` if there is none. Called once per NBD_OPT_GO or
        NBD_OPT_EXPORT_NAME, and for NBD_OPT_INFO (released again right away).
        """

    async def release_export(self, export: Export) -> None:  # noqa: B027 - optional hook
        """Called once for every export :meth:`open_export` returned, when the client no longer
        uses it (connection closed and its requests finished, or after answering NBD_OPT_INFO).
        The default does nothing."""


class DictExportProvider(ExportProvider):
    """A fixed set of shared exports by name; ``default`` names the export '' refers to."""

    def __init__(self, exports: Mapping[str, Export], *, default: str | None = None) -> None:
        if default is not None and default not in exports:
            raise ValueError(f"default export {default!r} is not among the exports")
        self._exports = dict(exports)
        self._default = default

    def list_exports(self) -> list[str]:
        return list(self._exports)

    async def open_export(self, name: str) -> Export:
        if name == "" and self._default is not None:
            name = self._default
        try:
            return self._exports[name]
        except KeyError:
            raise UnknownExport(name) from None
