"""The buffered recorder: ``record()`` on the hot path, everything else in the background.

:class:`Recorder` records, commits and accounts (:mod:`._recorder`); who delivers is a
mode (:mod:`._modes`: a thread, a drainer process, or an external drainer); the
module-level API uses a default recorder built from the environment (:mod:`._default`);
:mod:`._reentry` keeps the API safe to call from signal handlers.
"""

from ..stats import RecorderStats
from ._default import configure, flush, get_recorder, record, shutdown
from ._recorder import Recorder

__all__ = [
    "Recorder",
    "RecorderStats",
    "configure",
    "flush",
    "get_recorder",
    "record",
    "shutdown",
]
