"""Timestamps and ID validation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from per_buffer.models import MAX_ID_LENGTH, format_timestamp, parse_timestamp, validate_id


def test_parse_timestamp_forms() -> None:
    utc = timezone.utc
    assert parse_timestamp("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=utc)
    assert parse_timestamp("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=utc)
    assert parse_timestamp("2024-05-01") == datetime(2024, 5, 1, tzinfo=utc)
    assert parse_timestamp("2018-12-31T23:59:59.999Z").microsecond == 999000
    tz = timezone(timedelta(hours=-5))
    assert parse_timestamp(datetime(2024, 1, 1, 19, tzinfo=tz)) == datetime(2024, 1, 2, tzinfo=utc)


def test_parse_timestamp_refuses_guessing() -> None:
    with pytest.raises(ValueError, match="naive"):
        parse_timestamp(datetime(2024, 1, 1), "start")
    with pytest.raises(ValueError, match="time zone"):
        parse_timestamp("2024-01-01T00:00:00", "start")
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_timestamp("01/02/2024", "start")
    with pytest.raises(TypeError):
        parse_timestamp(1700000000, "start")  # type: ignore[arg-type]


def test_format_timestamp_is_per_format_in_utc() -> None:
    tz = timezone(timedelta(hours=9))
    assert format_timestamp(datetime(2024, 1, 1, 9, 0, 0, 500, tzinfo=tz)) == "2024-01-01T00:00:00Z"


def test_validate_id() -> None:
    assert validate_id("x" * MAX_ID_LENGTH, "user_id") == "x" * MAX_ID_LENGTH
    assert validate_id("zoë 🙂 a&b", "user_id") == "zoë 🙂 a&b"
    for bad in ("", "a\nb", "a\x7fb", "a\x85b", "bad\ud800id", "x" * (MAX_ID_LENGTH + 1)):
        with pytest.raises(ValueError, match="user_id"):
            validate_id(bad, "user_id")
    with pytest.raises(TypeError, match="user_id"):
        validate_id(5, "user_id")


def test_str_subclass_is_normalised() -> None:
    class Name(str):
        pass

    value = validate_id(Name("abc"), "billing_id")
    assert type(value) is str and value == "abc"
