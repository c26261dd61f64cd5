"""Configuration: keywords, then environment, then defaults; every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from per_buffer import PerClient, Recorder
from per_buffer.config import KNOBS, RecorderConfig, check_token, resolve_base_url


def resolve(**kwargs: object) -> RecorderConfig:
    env = kwargs.pop("environ", {})
    return RecorderConfig.resolve(environ=env, **kwargs)  # type: ignore[arg-type]


def test_defaults() -> None:
    config = resolve(token="t", activity_type_id="login", directory="/tmp/x")
    assert config.durability == "batched"
    assert config.commit_interval == 0.1
    assert config.coalesce_window == 900
    assert config.concurrency == 8
    assert config.max_attempts == 3
    assert config.exit_timeout == 5
    assert config.base_url == "https://api.useper.com"
    assert "token=" not in repr(config)


def test_keywords_beat_environment_which_beats_defaults() -> None:
    env = {
        "PER_ACTIVITY_TOKEN": "env-token",
        "PER_ACTIVITY_TYPE_ID": "env-type",
        "ACTIVITY_TYPE_ID": "quickstart-type",
        "PER_BUFFER_CONCURRENCY": "16",
        "PER_BUFFER_DIR": "/tmp/envdir",
        "PER_BUFFER_COALESCE_WINDOW": "0",
        "PER_BUFFER_DURABILITY": "sync",
    }
    config = resolve(environ=env, concurrency=4)
    assert config.token == "env-token"
    assert config.activity_type_id == "env-type"
    assert config.concurrency == 4
    assert config.coalesce_window == 0
    assert config.durability == "sync"
    assert config.directory == Path("/tmp/envdir")
    del env["PER_ACTIVITY_TYPE_ID"]
    assert resolve(environ=env).activity_type_id == "quickstart-type"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("concurrency", 0),
        ("concurrency", 2.5),
        ("commit_interval", 0),
        ("commit_interval", -1),
        ("coalesce_window", -5),
        ("timeout", float("nan")),
        ("max_attempts", 0),
        ("full_policy", "drop_random"),
        ("durability", "eventually"),
        ("memory_buffer", -1),
        ("backoff_max", 0.1),
        ("enabled", "maybe"),
    ],
)
def test_bad_values_are_named(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        resolve(token="t", activity_type_id="x", directory="/tmp/x", **{name: value})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="PER_BUFFER_TIMEOUT"):
        resolve(token="t", activity_type_id="x", environ={"PER_BUFFER_TIMEOUT": "soon"})


def test_every_knob_is_a_field_with_matching_default() -> None:
    fields = RecorderConfig.__dataclass_fields__
    for knob in KNOBS:
        assert knob.name in fields
        default = fields[knob.name].default
        if knob.default not in (
            "required",
            "per-user cache dir",
            "https://api.useper.com",
            "from the environment",
        ):
            assert str(default).lower() == knob.default.lower() or float(knob.default) == default


# --------------------------------------------------------------------------- token and URL

SECRET = "s3cretPassw0rd"


@pytest.mark.parametrize(
    ("token", "where", "what"),
    [
        ("per_live_secret\u2019value_0123456789", 16, "a non-ASCII"),
        ("per_live_secret\u00a0value", 16, "a non-ASCII"),  # a no-break space
        ("per_live_secret value", 16, "a whitespace or control"),
        ("per_live_secret\tvalue", 16, "a whitespace or control"),
        ("per_live_secret\x7fvalue", 16, "a whitespace or control"),
        ("per_live_secret\n", 16, "a whitespace or control"),
    ],
)
def test_a_token_that_is_not_printable_ascii_is_refused_without_showing_it(
    token: str, where: int, what: str
) -> None:
    with pytest.raises(ValueError) as info:
        check_token(token, "PER_ACTIVITY_TOKEN")
    message = str(info.value)
    assert message.startswith("PER_ACTIVITY_TOKEN must be printable ASCII without whitespace")
    assert f"character {where} of {len(token)} is {what} character" in message
    assert "secret" not in message and "value" not in message


def test_printable_ascii_tokens_are_accepted() -> None:
    token = "".join(chr(code) for code in range(0x21, 0x7F))
    assert check_token(token) == token
    with pytest.raises(TypeError):
        check_token(b"bytes-token")
    with pytest.raises(ValueError, match="empty"):
        check_token("")


def test_a_recorder_refuses_a_non_ascii_token_before_touching_the_disk(tmp_path: Path) -> None:
    token = "per_live_secret\u2019value"
    with pytest.raises(ValueError, match="token must be printable ASCII") as info:
        Recorder(token, "login", directory=tmp_path / "q", base_url="http://127.0.0.1:9")
    assert "secret" not in str(info.value)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="token must be printable ASCII"):
        resolve(activity_type_id="x", environ={"PER_ACTIVITY_TOKEN": token})


@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{SECRET}@api.useper.com:99999",  # a bad port
        f"htps://user:{SECRET}@api.useper.com",  # a typo in the scheme
        f"http://user:{SECRET}@per.internal",  # http on a non-loopback host
        f"https://user:{SECRET}@api.useper.com/?q=1",  # a query
        f"https://user:Tr0ub@dor{SECRET}@api.useper.com",  # '@' in the password
        f"https://user:pa/ss{SECRET}@api.useper.com",  # an unencoded '/' in it
        f"user:{SECRET}@api.useper.com",  # no scheme
    ],
)
def test_a_base_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    for attempt in (
        lambda: resolve_base_url(url),
        lambda: resolve(token="t", activity_type_id="x", base_url=url),
        lambda: PerClient("t", base_url=url),
    ):
        with pytest.raises(ValueError, match="must not carry credentials") as info:
            attempt()
        message = str(info.value)
        assert SECRET not in message and "Tr0ub" not in message and "pa/ss" not in message
        assert "***@" in message  # the rest of the URL is shown


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("https://api.useper.com:99999", "not a valid URL: 'https://api.useper.com:99999'"),
        ("htps://api.useper.com", "must look like https://host[:port], not 'htps://"),
        ("http://per.internal", "must use https"),
        ("https://api.useper.com/?q=1", "must not have a query or fragment"),
    ],
)
def test_other_bad_base_urls_are_still_shown(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="base_url") as info:
        resolve_base_url(url)
    assert complaint in str(info.value)
