"""The stored formats of the queue: keys, entry rows, counters, leases, failure log rows.

Everything is compact JSON text in diskcache rows (never pickle); the layout is described
in :mod:`per_buffer.queue`. These functions encode and validate; they raise
:class:`~per_buffer.queue._health.CorruptData` for anything malformed, which the storage
treats like a damaged database. Reads and writes go through ``cache.get``/``cache.set``
of a diskcache ``Cache`` or of a read-only view with the same methods.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from ..models import Activity
from ._health import CorruptData
from ._layout import Totals
from ._types import Entry, QueueStats

META_KEY: Final = "meta:counters"
LEASES_KEY: Final = "meta:leases"
DELIVERY_KEY: Final = "meta:delivery"
LEASE_PREFIX: Final = "lease:"
MAIN: Final = "q"
RETRY: Final = "r"
MAIN_FORMAT: Final = "q-{:015d}"
DEAD_FORMAT: Final = "d-{:015d}"
DEAD_PREFIX: Final = "d-"
FAILURE_PREFIX: Final = "f-"
FAILURE_FORMAT: Final = "f-{:015d}"

CHUNK_ITEMS: Final = 512  # entries per stored main-queue chunk or retry group row
CHUNK_BYTES: Final = 256 * 1024  # payload bytes per chunk row (values stay far below 16 MiB)
ENTRY_OVERHEAD: Final = 32
MAX_TEXT: Final = 1000  # longest stored last_error / dead-letter reason, in characters
MAX_NOT_BEFORE_MS: Final = 999_999_999_999_998

#: A failure log row holding this marker instead of keys means "too many keys to list".
FORGET_ALL: Final = "*"

dumps = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, check_circular=False, allow_nan=False
).encode


def loads(raw: object, what: str) -> Any:
    """Decode a stored JSON text; CorruptData if it is not one."""
    if not isinstance(raw, (str, bytes)):
        raise CorruptData(f"{what}: unexpected stored type {type(raw).__name__}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CorruptData(f"{what}: not valid JSON ({exc})") from exc


# --------------------------------------------------------------------------- entry rows
#
# An entry row is [id, billing_id, user_id, activity_type_id, recorded_at, attempts,
# last_error] (version 0.1), optionally followed by failures and then by coalescing. The
# 8th field, failures, is written only when it differs from attempts or when a 9th
# follows, so a row that never failed and carries no coalescing is byte-for-byte a 0.1
# row and a 7-field row reads as failures == attempts. The 9th field, [window, margin],
# is the coalescing its recorder used (0.2): the delivery side acknowledges an entry
# without a request only under that rule, whoever started the drainer.


def entry_rows(raw: object, what: str) -> list[list[Any]]:
    """The rows of a main-queue chunk or a retry group."""
    rows = loads(raw, what)
    if type(rows) is not list or not rows:
        raise CorruptData(f"{what}: not a non-empty list of entries")
    return check_rows(rows, what)


def record_rows(record: Any, what: str) -> list[list[Any]]:
    """The rows of a lease or dead-letter record (a JSON object with an "e" list)."""
    try:
        rows = record["e"]
    except (KeyError, TypeError) as exc:
        raise CorruptData(f"{what}: malformed record") from exc
    if type(rows) is not list:  # its rows are checked where they are used (hot path)
        raise CorruptData(f"{what}: malformed record")
    return rows


def check_rows(rows: list[Any], what: str) -> list[list[Any]]:
    """``rows`` if every one is shaped like an entry row, else CorruptData."""
    for row in rows:
        if type(row) is not list or len(row) not in (7, 8, 9) or type(row[0]) is not int:
            raise CorruptData(f"{what}: malformed entry")
    return rows


def new_row(
    billing_id: str,
    user_id: str,
    activity_type_id: str,
    stamp: float,
    coalescing: list[float] | None = None,
) -> list[Any]:
    """A fresh row (id assigned when stored); ``coalescing`` is ``[window, margin]``."""
    if coalescing is None:
        return [0, billing_id, user_id, activity_type_id, stamp, 0, None]
    return [0, billing_id, user_id, activity_type_id, stamp, 0, None, 0, coalescing]


def row_failures(row: list[Any]) -> int:
    """The failures count of a row (the attempts count for a 7-field row)."""
    return int(row[7] if len(row) > 7 else row[5])


def row_coalescing(row: list[Any]) -> tuple[float, float] | None:
    """The ``(window, margin)`` a row was recorded under, None for a row without one."""
    if len(row) < 9:
        return None
    value = row[8]
    try:
        window, margin = float(value[0]), float(value[1])
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"malformed coalescing {value!r:.100}") from exc
    if not (math.isfinite(window) and math.isfinite(margin) and window >= 0 and margin >= 0):
        raise CorruptData(f"malformed coalescing {value!r:.100}")
    return window, margin


def count_attempt(row: list[Any], *, refused: bool, failed: bool) -> None:
    """Add one to attempts (``refused``) and to failures (``failed``), in place."""
    failures = row_failures(row) + (1 if failed else 0)
    if refused:
        row[5] += 1
    if len(row) > 8:
        row[7] = failures  # kept in place: the coalescing follows it
    elif failures == row[5]:
        del row[7:]
    elif len(row) > 7:
        row[7] = failures
    else:
        row.append(failures)


def row_key(row: list[Any]) -> tuple[str, str, str]:
    """The activity key (billing_id, user_id, activity_type_id) of a row."""
    return row[1], row[2], row[3]


def payload_size(billing_id: str, user_id: str, activity_type_id: str) -> int:
    """Payload bytes counted against ``max_bytes`` for one entry.

    Only what ``put`` admits is counted: a ``last_error`` added by ``release`` (at most
    ``MAX_TEXT`` characters) is not, because a leased entry can never be refused for
    lack of room, so counting it would let ``bytes`` exceed ``max_bytes``.
    """
    text = billing_id + user_id + activity_type_id  # one check instead of three: per row
    return ENTRY_OVERHEAD + (
        len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    )


def row_size(row: list[Any]) -> int:
    """Payload bytes of a stored row."""
    return payload_size(row[1], row[2], row[3])


def rows_size(rows: list[list[Any]]) -> int:
    """Payload bytes of stored rows."""
    return sum(payload_size(row[1], row[2], row[3]) for row in rows)


def to_entry(row: list[Any]) -> Entry:
    """The public :class:`Entry` of a row."""
    try:
        attempts = int(row[5])
        return Entry(
            int(row[0]),
            Activity(str(row[1]), str(row[2]), str(row[3])),
            float(row[4]),
            attempts,
            None if row[6] is None else str(row[6]),
            int(row[7]) if len(row) > 7 else attempts,
            row_coalescing(row),
        )
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"malformed entry {row!r:.200}") from exc


def from_entry(entry: Entry) -> list[Any]:
    """A row (id 0, assigned when stored) keeping an entry's counts, error and coalescing."""
    billing_id, user_id, activity_type_id = entry.activity
    row = [0, billing_id, user_id, activity_type_id, float(entry.recorded_at)]
    row += [int(entry.attempts), None if entry.last_error is None else entry.last_error[:MAX_TEXT]]
    if entry.coalescing is not None:
        row += [int(entry.failures), [float(entry.coalescing[0]), float(entry.coalescing[1])]]
    elif entry.failures != entry.attempts:
        row.append(int(entry.failures))
    return row


# --------------------------------------------------------------------------- retry keys
#
# r-<not_before ms:015d>-<sequence:015d>-<smallest id in the group:015d>. Version 0.1
# wrote the first two parts only: the smallest id of such a group is read from its rows.


def retry_key(not_before_ms: int, seq: int, rows: list[list[Any]]) -> str:
    """The key of a retry group holding ``rows``."""
    return f"{RETRY}-{not_before_ms:015d}-{seq:015d}-{min(row[0] for row in rows):015d}"


def retry_key_ms(key: str) -> int:
    """The ``not_before`` in milliseconds of a retry key."""
    try:
        return int(key[2:17])
    except ValueError as exc:
        raise CorruptData(f"malformed retry key {key!r}") from exc


def retry_key_seq(key: str) -> int:
    """The sequence number of a retry key."""
    try:
        return int(key[18:33])
    except ValueError as exc:
        raise CorruptData(f"malformed retry key {key!r}") from exc


def retry_key_min_id(key: str) -> int | None:
    """The smallest id of a retry group from its key, None for a 0.1 key."""
    if len(key) < 49:
        return None
    try:
        return int(key[34:49])
    except ValueError as exc:
        raise CorruptData(f"malformed retry key {key!r}") from exc


def not_before_ms(not_before: float) -> int:
    """A unix time as the whole milliseconds of a retry key (0: ready at once)."""
    if math.isnan(not_before) or not_before <= 0:
        return 0
    if not_before * 1000 >= MAX_NOT_BEFORE_MS:
        return MAX_NOT_BEFORE_MS
    return math.ceil(not_before * 1000)


# --------------------------------------------------------------------------- counters


@dataclass
class Counters:
    """The ``meta:counters`` row, rewritten in the transaction of every change it counts.

    Fields written by version 0.1 are required; later ones default when absent
    (``dead_total`` to the dead letters present, the failure log to empty).
    """

    pending: int = 0
    inflight: int = 0
    dead: int = 0
    bytes: int = 0
    next_id: int = 1
    seq: int = 1
    dfirst: int = 1
    dnext: int = 1
    delivered: int = 0
    coalesced: int = 0
    dead_total: int = 0
    fseq: int = 0
    ffirst: int = 1
    fkeys: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    _REQUIRED = ("pending", "inflight", "dead", "bytes", "next_id", "seq", "dfirst", "dnext")
    _LATER = ("delivered", "coalesced", "dead_total", "fseq", "ffirst", "fkeys")
    _INTS = _REQUIRED + _LATER

    @classmethod
    def fresh(cls, first_id: int) -> Counters:
        """The counters of an empty database whose ids start at ``first_id``.

        Failure log sequence numbers start where ids do, so that a number from another
        database of the directory is never taken for one of this database.
        """
        return cls(next_id=first_id, fseq=first_id - 1, ffirst=first_id)

    @classmethod
    def load(cls, cache: Any, first_id: int = 1) -> Counters:
        """Read the row (fresh counters when it is absent)."""
        raw = cache.get(META_KEY)
        if raw is None:
            return cls.fresh(first_id)
        return cls.decode(raw)

    @classmethod
    def decode(cls, raw: object) -> Counters:
        """Decode a stored counters row (fields it does not know are kept and saved)."""
        data = loads(raw, META_KEY)
        if type(data) is not dict:
            raise CorruptData(f"{META_KEY} is malformed")
        meta = cls.__new__(cls)
        values = meta.__dict__  # read and written whole: this row is in every transaction
        try:
            next_id = data["next_id"]
            values.update(delivered=0, coalesced=0, fkeys=0, dead_total=data["dead"])
            values.update(fseq=next_id - 1, ffirst=next_id)
            values.update(data)
            dropped = values["dropped"]
            if (
                any(type(values[name]) is not int for name in cls._INTS)
                or type(dropped) is not dict
                or any(type(count) is not int for count in dropped.values())
            ):
                raise CorruptData(f"{META_KEY} is malformed")
        except (KeyError, TypeError) as exc:
            raise CorruptData(f"{META_KEY} is malformed") from exc
        return meta

    def save(self, cache: Any) -> None:
        """Write the row."""
        cache.set(META_KEY, dumps(self.__dict__))

    def drop(self, reason: str, count: int) -> None:
        """Count ``count`` entries dropped for ``reason``."""
        if count > 0:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    @property
    def stored(self) -> int:
        """Entries stored: pending, in flight and dead."""
        return self.pending + self.inflight + self.dead

    def stats(
        self,
        totals: Totals,
        *,
        oldest_pending_age: float | None,
        bytes_on_disk: int,
        quarantined: int,
        generation: int,
        delivery_state: Mapping[str, Any] | None,
    ) -> QueueStats:
        """The :class:`QueueStats` of these counters, the directory's ``totals`` and the rest."""
        return QueueStats(
            pending=self.pending,
            in_flight=self.inflight,
            dead_lettered=self.dead,
            oldest_pending_age=oldest_pending_age,
            bytes_on_disk=bytes_on_disk,
            dropped=MappingProxyType(dict(self.dropped)),
            quarantined=quarantined,
            delivered=self.delivered,
            coalesced=self.coalesced,
            dead_lettered_total=self.dead_total,
            quarantines=totals.quarantines,
            quarantined_entries=totals.quarantined_entries,
            quarantines_uncounted=totals.quarantines_uncounted,
            salvaged_entries=totals.salvaged_entries,
            generation=generation,
            failure_seq=self.fseq,
            delivery_state=delivery_state,
        )


# --------------------------------------------------------------------------- lease index
#
# meta:leases maps lease id -> [expires_at, host, pid, start ticks, oldest recorded_at,
# smallest id]; version 0.1 wrote the first five (the smallest id is then read from the
# lease row).


def load_leases(cache: Any) -> dict[str, list[Any]]:
    """The lease index."""
    raw = cache.get(LEASES_KEY)
    if raw is None:
        return {}
    leases = loads(raw, LEASES_KEY)
    if type(leases) is not dict or any(
        type(info) is not list or len(info) not in (5, 6) for info in leases.values()
    ):
        raise CorruptData(f"{LEASES_KEY} is malformed")
    return leases


def save_leases(cache: Any, leases: dict[str, list[Any]]) -> None:
    """Write the lease index."""
    cache.set(LEASES_KEY, dumps(leases))
