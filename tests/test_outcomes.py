"""Error classes: every kind of answer a proxy, WAF or Per itself can give."""

from __future__ import annotations

import email.utils

import pytest
from token_echo import TOKEN, assert_clean

from per_buffer.outcomes import (
    AUTH,
    NETWORK_ERROR,
    NOT_PER_RESPONSE,
    OK,
    RATE_LIMITED,
    REFUSED_BY_PER,
    SERVER_ERROR,
    TOO_LARGE,
    judge,
    judge_fault,
    parse_retry_after,
    redact,
)

HTML = b"<html><body><h1>403 Forbidden</h1></body></html>"


def headers(**values: str):  # type: ignore[no-untyped-def]
    lowered = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return lambda name: lowered.get(name.lower())


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (200, b'{"ok":true,"result":{"transactionId":"t1"}}', OK),
        (200, b'{ "ok" : true }', OK),
        (201, b'{"ok": true}', OK),
        (200, b'{"ok":false,"message":"unknown_activity_type"}', REFUSED_BY_PER),
        (400, b'{"ok":false,"message":"missing_parameter"}', REFUSED_BY_PER),
        (200, b'{"ok":false,"message":"invalid_auth_token"}', AUTH),
        (401, b'{"ok":false,"message":"invalid_auth_token"}', AUTH),
        (403, b'{"ok":false,"message":"invalid_auth_token"}', AUTH),
        (401, HTML, NOT_PER_RESPONSE),  # a proxy's login page is not Per refusing the token
        (403, HTML, NOT_PER_RESPONSE),  # a WAF
        (404, HTML, NOT_PER_RESPONSE),  # a misrouted ingress
        (404, b"", NOT_PER_RESPONSE),
        (200, HTML, NOT_PER_RESPONSE),  # a maintenance page with status 200
        (200, b"", NOT_PER_RESPONSE),
        (200, b'{"ok":"yes"}', NOT_PER_RESPONSE),
        (200, b"[1, 2]", NOT_PER_RESPONSE),
        (200, b'{"ok":true,"result":{"transactionId":"t', NOT_PER_RESPONSE),  # truncated
        (301, b'{"ok":true}', NOT_PER_RESPONSE),  # a redirect is never Per's answer
        (404, b'{"ok":true}', NOT_PER_RESPONSE),
        (429, b"", RATE_LIMITED),
        (429, HTML, RATE_LIMITED),
        (413, HTML, TOO_LARGE),
        (414, b"", TOO_LARGE),
        (500, b'{"ok":false,"message":"internal"}', SERVER_ERROR),
        (502, HTML, SERVER_ERROR),
        (503, b"", SERVER_ERROR),
        (408, b"", SERVER_ERROR),
        (425, b"", SERVER_ERROR),
    ],
)
def test_every_answer_has_one_class(status: int, body: bytes, kind: str) -> None:
    verdict = judge(status, body, headers(content_type="text/html"))
    assert verdict.kind == kind
    assert verdict.status == status
    assert "\n" not in verdict.detail


def test_per_codes_are_kept_and_bodies_are_not_echoed() -> None:
    verdict = judge(200, b'{"ok":false,"message":"unknown_activity_type"}', headers())
    assert verdict.message == "unknown_activity_type"
    assert "unknown_activity_type" in verdict.detail
    html = judge(403, b"<html>secret-token-abc</html>", headers(content_type="text/html"))
    assert "secret" not in html.detail and "text/html" in html.detail


def test_retry_after_both_forms() -> None:
    now = 1_700_000_000.0
    assert judge(429, b"", headers(retry_after="7"), now).retry_after == 7.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert judge(429, b"", headers(retry_after=date), now).retry_after == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("1.5") == 1.5
    for bad in (None, "", "soon", "-3", "nan", "inf"):
        assert parse_retry_after(bad, now) is None
    assert judge(429, b"", headers()).retry_after is None


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("connect", NETWORK_ERROR),
        ("timeout", NETWORK_ERROR),
        ("closed", NETWORK_ERROR),
        ("protocol", NOT_PER_RESPONSE),
        ("too_large", NOT_PER_RESPONSE),
    ],
)
def test_faults_without_an_answer(kind: str, expected: str) -> None:
    assert judge_fault(kind, "detail").kind == expected


# --------------------------------------------------------------------------- echoed tokens


@pytest.mark.parametrize(
    "detail",
    [  # what the lean channel and judge say about answers that echo the header
        f"malformed response head (first line b'HTTP/1.1 400 Bearer {TOKEN[:52]}')",
        f"bad Content-Length b'bearer {TOKEN.lower()[:33]}'",
        f"HTTP 403 with 9 bytes of bearer {TOKEN.lower()[:53]}, not Per's JSON",
        f"request failed (RemoteProtocolError: illegal header line: b'Bearer {TOKEN}')",
        f"cut in the middle {TOKEN[17:26]} of a run",
    ],
)
def test_redact_masks_cut_and_lowercased_echoes(detail: str) -> None:
    verdict = redact(judge_fault("protocol", detail), TOKEN)
    assert_clean(verdict.detail, "the detail")
    assert "<token>" in verdict.detail


def test_redact_masks_a_token_in_pers_code_and_drops_the_payload() -> None:
    body = f'{{"ok":false,"message":"bearer {TOKEN.lower()}"}}'.encode()
    verdict = judge(200, body, headers())
    assert verdict.payload is not None and TOKEN.lower() in (verdict.message or "")
    clean = redact(verdict, "other-secret-value", TOKEN)
    assert clean.message == "bearer <token>"
    assert clean.detail == "HTTP 200: bearer <token>"
    assert clean.payload is None and clean.kind == REFUSED_BY_PER


def test_redact_keeps_pers_code_readable_when_the_token_holds_a_word_of_it() -> None:
    """PerServer's default token ``test-activity-token`` holds ``activity``."""
    verdict = judge(200, b'{"ok":false,"message":"activity_type_not_found"}', headers())
    assert redact(verdict, "test-activity-token") is verdict


def test_redact_leaves_a_verdict_without_an_echo_alone() -> None:
    verdict = judge(503, b"", headers())
    assert redact(verdict, TOKEN) is verdict
    assert redact(verdict) is verdict


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("text/html; charset=utf-8", "text/html"),
        ("Application/Problem+JSON", "application/problem+json"),
        (None, "unlabelled data"),
        (f"Bearer {TOKEN}", "data with a malformed Content-Type"),
        (TOKEN, "data with a malformed Content-Type"),
        ("text/" + "x" * 60, "data with a malformed Content-Type"),
    ],
)
def test_only_a_well_formed_media_type_is_quoted(content_type: str | None, shown: str) -> None:
    detail = judge(403, b"forbidden", headers(content_type=content_type or "")).detail
    assert detail == f"HTTP 403 with 9 bytes of {shown}, not Per's JSON"
