"""Exceptions raised by the journal.

::

    JournalError
     +-- JournalClosedError        the journal was closed, or failed on an I/O error
     +-- JournalIOError            a write or fsync failed; the journal stops accepting appends
     +-- CorruptJournalError       damage that is not a torn tail (e.g. a bad record mid-journal)
     +-- UnknownVolumeError        no volume of that name / id in this journal
     +-- VolumeExistsError         add_volume() with a name already taken, or a different size
     +-- OutOfRangeError           offset/length outside the volume
     +-- UnknownCheckpointError    no checkpoint matches, or it is older than the promoted watermark
     +-- FailoverStateError        the operation is not allowed in the current failover phase
     +-- ImagesOpenError           promote_to() while PIT images are open

Bad input never corrupts the journal: every check happens before a sequence number is assigned.
"""

from __future__ import annotations

__all__ = [
    "CorruptJournalError",
    "FailoverStateError",
    "ImagesOpenError",
    "JournalClosedError",
    "JournalError",
    "JournalIOError",
    "OutOfRangeError",
    "UnknownCheckpointError",
    "UnknownVolumeError",
    "VolumeExistsError",
]


class JournalError(Exception):
    """Base class of every journal error."""


class JournalClosedError(JournalError):
    """The journal is closed (or stopped after an I/O error)."""


class JournalIOError(JournalError):
    """Writing or syncing the journal failed; appends in flight are not acked."""


class CorruptJournalError(JournalError):
    """The journal is damaged in a way a torn tail cannot explain."""


class UnknownVolumeError(JournalError):
    """The volume is not part of this journal."""


class VolumeExistsError(JournalError):
    """The volume already exists (with another size or replica path)."""


class OutOfRangeError(JournalError):
    """An extent reaches past the end of the volume, or has a negative offset/length."""


class UnknownCheckpointError(JournalError):
    """No such checkpoint in the journal's window."""


class FailoverStateError(JournalError):
    """Not allowed in the current failover phase (e.g. appending while promoted to a checkpoint)."""


class ImagesOpenError(JournalError):
    """The operation needs every PIT image of the journal closed."""
