"""Configuration: keywords, then environment, then defaults; every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from per_buffer.config import KNOBS, RecorderConfig


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
