"""NBD server of the appliance: fixed-newstyle negotiation, structured replies, named exports.

Writes reach the appliance over NBD (QEMU's active mirror, or a workload using the appliance's
export in-path), and point-in-time images are served over it. This package is the protocol layer
only: it calls an :class:`Export` for data and an :class:`ExportProvider` for names.

Public surface: the export interface (``export``), the server (``server``) and two simple exports
(``MemoryExport`` for tests and benchmarks, ``FileExport`` for files and block devices).
"""

from .export import (
    MAX_BLOCK_SIZE,
    BlockSizes,
    BytesLike,
    DictExportProvider,
    Export,
    ExportProvider,
    Extent,
    NBDError,
    UnknownExport,
)
from .file import FileExport
from .memory import MemoryExport
from .server import NBDServer, ServerSettings, new_event_loop, run, serve_tcp, serve_unix

__all__ = [
    "MAX_BLOCK_SIZE",
    "BlockSizes",
    "BytesLike",
    "DictExportProvider",
    "Export",
    "ExportProvider",
    "Extent",
    "FileExport",
    "MemoryExport",
    "NBDError",
    "NBDServer",
    "ServerSettings",
    "UnknownExport",
    "new_event_loop",
    "run",
    "serve_tcp",
    "serve_unix",
]
