"""Masking secrets in text: whole, in any case, cut short; and URLs without user information."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from token_echo import TOKEN, assert_clean, leaked

from per_buffer._masking import FRAGMENT, MASK, mask, without_userinfo


@pytest.mark.parametrize(
    ("echo", "why"),
    [
        (TOKEN, "whole"),
        (TOKEN.lower(), "lower-cased"),
        (TOKEN.upper(), "upper-cased"),
        (TOKEN[:60], "cut at the end"),
        (TOKEN[-33:], "cut at the start"),
        (TOKEN[20:28], "a middle run of 8"),
        (TOKEN.lower()[5:38], "cut and lower-cased"),
        (TOKEN[:30] + TOKEN[40:], "two runs"),
    ],
)
def test_every_echo_of_8_or_more_characters_is_masked(echo: str, why: str) -> None:
    text = f"bad Content-Length b'bearer {echo}' in answer"
    clean = mask(text, [TOKEN])
    assert_clean(clean, why)
    assert clean.startswith("bad Content-Length b'bearer <token>")
    assert clean.endswith("' in answer")


def test_short_runs_and_other_text_are_kept() -> None:
    text = f"HTTP 403 {TOKEN[:7]} with 9 bytes of text/html"
    assert mask(text, [TOKEN]) == text
    assert mask("", [TOKEN]) == ""
    assert mask(text, ["", ""]) == text


def test_a_secret_shorter_than_a_fragment_is_masked_whole_in_any_case() -> None:
    assert mask("Key=abcDEF, key=ABCdef, abc", ["abcdef"]) == "Key=<token>, key=<token>, abc"
    assert FRAGMENT == 8 and MASK == "<token>"


def test_overlapping_echoes_of_several_secrets_become_one_mask() -> None:
    other = "zz_other_secret_value_42"
    text = f"a {TOKEN}{other} b {other.upper()[3:15]} c"
    assert mask(text, [TOKEN, other], "***") == "a *** b *** c"


def test_without_fragments_only_whole_secrets_are_masked() -> None:
    text = f"activity_type_not_found {TOKEN.lower()} {TOKEN[:20]}"
    clean = mask(text, [TOKEN, "test-activity-token"], fragments=False)
    assert clean == f"activity_type_not_found <token> {TOKEN[:20]}"


def test_non_ascii_text_keeps_its_positions() -> None:
    """Only ASCII letters are lower-cased: text whose length lower() changes still lines up."""
    text = f"\u0130\u0130 {TOKEN[:12]} \u0130"
    assert mask(text, [TOKEN]) == "\u0130\u0130 <token> \u0130"


_ALPHABET = string.ascii_letters + string.digits + "_-."


@settings(max_examples=200, deadline=None)
@given(
    token=st.text(_ALPHABET, min_size=FRAGMENT, max_size=80),
    before=st.text(st.characters(max_codepoint=255), max_size=40),  # as Latin-1 decoding gives
    after=st.text(st.characters(max_codepoint=255), max_size=40),
    cut=st.tuples(st.integers(0, 80), st.integers(0, 80)),
    lower=st.booleans(),
)
def test_no_piece_of_8_survives(
    token: str, before: str, after: str, cut: tuple[int, int], lower: bool
) -> None:
    start, stop = sorted(cut)
    echo = token[start:stop]
    text = before + (echo.lower() if lower else echo) + after
    assert leaked(mask(text, [token]), token) == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:s3cret@api.useper.com:99999", "https://***@api.useper.com:99999"),
        ("http://proxyuser:Tr0ub4dor@3xYz9QkL@127.0.0.1:9", "http://***@127.0.0.1:9"),
        ("https://user:pa/ss@host/path", "https://***@host/path"),  # an unencoded '/'
        ("https://u:a://b@host", "https://***@host"),
        ("user:s3cret@host:3128", "***@host:3128"),  # no scheme
        ("https://api.useper.com/v1", "https://api.useper.com/v1"),
        ("https://api.useper.com", "https://api.useper.com"),
    ],
)
def test_without_userinfo_hides_up_to_the_last_at(url: str, shown: str) -> None:
    assert without_userinfo(url) == shown
