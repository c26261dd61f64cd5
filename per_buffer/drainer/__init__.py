"""The drainer: delivery in its own process, one per queue directory.

Recorders in the ``process`` delivery mode only record and commit; the drainer they
start (or ``per-buffer drain --follow``, in the ``external`` mode) delivers what
every process commits to the directory, with host-wide coalescing. See
:mod:`per_buffer.drainer._process` for its life cycle and
:mod:`per_buffer.drainer._locks` for its election.
"""

from ._locks import DRAINER_LOCK, FLUSH_REQUEST, RECORDERS_LOCK, FileLock, supported
from ._process import BUSY, IDENTITY, DrainerOptions, main, read_identity, run
from ._spawn import drainer_running, interpreter, spawn

__all__ = [
    "BUSY",
    "DRAINER_LOCK",
    "FLUSH_REQUEST",
    "IDENTITY",
    "RECORDERS_LOCK",
    "DrainerOptions",
    "FileLock",
    "drainer_running",
    "interpreter",
    "main",
    "read_identity",
    "run",
    "spawn",
    "supported",
]
