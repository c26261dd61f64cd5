"""Plain data: the activity triple, ID validation, timestamps and the report model."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

__all__ = [
    "MAX_ID_LENGTH",
    "Activity",
    "Report",
    "ReportRow",
    "format_timestamp",
    "parse_timestamp",
    "validate_id",
]

#: The longest billing, user or activity type ID accepted, in characters.
#: Per documents no limit; 1024 keeps one request line well under proxy limits.
MAX_ID_LENGTH = 1024

# control characters, and lone surrogates (not encodable, so never sendable or storable)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class Activity(NamedTuple):
    """One billable activity: who (user) did what (activity type) for which customer."""

    billing_id: str
    user_id: str
    activity_type_id: str


def validate_id(value: object, name: str) -> str:
    """Return ``value`` if it is a valid Per ID, else raise naming the parameter.

    A valid ID is a non-empty ``str`` of at most :data:`MAX_ID_LENGTH` characters
    with no control characters.

    Raises:
        TypeError: ``value`` is not a ``str``.
        ValueError: it is empty, too long or holds a control character.
    """
    if type(value) is not str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        value = str(value)
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{name} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    if _CONTROL.search(value) is not None:
        raise ValueError(f"{name} must not contain control characters or lone surrogates")
    return value


def _ensure_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(
            f"{name} is a naive datetime; pass an aware one, e.g. "
            "datetime(..., tzinfo=timezone.utc), so no local time zone is guessed"
        )
    return value.astimezone(timezone.utc)


def parse_timestamp(value: datetime | str, name: str = "timestamp") -> datetime:
    """Turn an aware ``datetime`` or an ISO 8601 string into an aware UTC datetime.

    A string needs an explicit offset or ``Z``; a date alone (``2024-05-01``)
    means midnight UTC.

    Raises:
        TypeError: neither a datetime nor a str.
        ValueError: a naive datetime, a string without offset, or not ISO 8601.
    """
    if isinstance(value, datetime):
        return _ensure_aware(value, name)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a datetime or an ISO 8601 str, not {type(value).__name__}")
    text = value.strip()
    if len(text) == 10:
        text += "T00:00:00+00:00"
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{name} is not an ISO 8601 timestamp: {value!r} (expected e.g. 2024-05-01T00:00:00Z)"
        ) from None
    if parsed.tzinfo is None:
        raise ValueError(f"{name} has no time zone: {value!r}; add 'Z' for UTC or an offset")
    return parsed.astimezone(timezone.utc)


def format_timestamp(value: datetime) -> str:
    """Format an aware datetime the way Per's query parameters want it: ``YYYY-MM-DDTHH:MM:SSZ``."""
    return _ensure_aware(value, "timestamp").strftime("%Y-%m-%dT%H:%M:%SZ")


class ReportRow(NamedTuple):
    """One line of a report: distinct active users of one type for one billing ID."""

    activity_type_id: str
    billing_id: str
    unique: int


@dataclass(frozen=True)
class Report:
    """A Per usage report.

    Attributes:
        start: first instant covered (aware, UTC).
        end: last instant covered (aware, UTC), or None when Per gave none.
        raw: the ``result`` object exactly as Per sent it.
    """

    start: datetime | None
    end: datetime | None
    raw: Mapping[str, Any] = field(repr=False)
    _counts: Mapping[tuple[str, str], int] = field(repr=False, compare=False)

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> Report:
        """Build a report from the ``result`` of ``reports.get``.

        Raises:
            ValueError: the object does not have the documented shape.
        """
        if not isinstance(result, Mapping):
            raise ValueError("report result is not a JSON object")
        start = _optional_time(result.get("start"), "start")
        end = _optional_time(result.get("end"), "end")
        counts: dict[tuple[str, str], int] = {}
        types = result.get("activityTypes", {})
        if types is None:
            types = {}
        if not isinstance(types, Mapping):
            raise ValueError("report activityTypes is not a JSON object")
        for type_id, body in types.items():
            billing = body.get("billingIds", {}) if isinstance(body, Mapping) else None
            if not isinstance(billing, Mapping):
                raise ValueError(f"report activity type {type_id!r} has no billingIds object")
            for billing_id, entry in billing.items():
                unique = entry.get("unique") if isinstance(entry, Mapping) else None
                if isinstance(unique, bool) or not isinstance(unique, int) or unique < 0:
                    raise ValueError(
                        f"report entry {type_id!r}/{billing_id!r} has no non-negative 'unique'"
                    )
                counts[(str(type_id), str(billing_id))] = unique
        return cls(start=start, end=end, raw=result, _counts=counts)

    def unique(self, activity_type_id: str, billing_id: str) -> int:
        """Distinct active users of ``activity_type_id`` for ``billing_id`` (0 when absent)."""
        return self._counts.get((activity_type_id, billing_id), 0)

    def __iter__(self) -> Iterator[ReportRow]:
        """Rows ``(activity_type_id, billing_id, unique)``, sorted by type then billing ID."""
        for (type_id, billing_id), unique in sorted(self._counts.items()):
            yield ReportRow(type_id, billing_id, unique)

    def __len__(self) -> int:
        """The number of (activity type, billing ID) rows."""
        return len(self._counts)

    @property
    def activity_types(self) -> list[str]:
        """The activity type IDs present, sorted."""
        return sorted({type_id for type_id, _ in self._counts})

    def totals(self) -> dict[str, int]:
        """Sum of unique users over all billing IDs, per activity type."""
        out: dict[str, int] = {}
        for (type_id, _), unique in self._counts.items():
            out[type_id] = out.get(type_id, 0) + unique
        return out

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{activity_type_id: {billing_id: unique}}``, handy for comparisons."""
        out: dict[str, dict[str, int]] = {}
        for (type_id, billing_id), unique in self._counts.items():
            out.setdefault(type_id, {})[billing_id] = unique
        return out


def _optional_time(value: object, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"report {name} is not a string")
    return parse_timestamp(value, name)
