"""Fixtures of the delivery tests: a raw Per responder, recorders closed at teardown,
and no proxy inherited from the machine's environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import close_all, make
from raw_per import RawPer

from per_buffer import Recorder

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "per_buffer_proxy")


@pytest.fixture(autouse=True)
def _no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.lower() in _PROXY_VARS or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)


@pytest.fixture
def raw() -> Iterator[RawPer]:
    """A raw Per responder answering Per's success until the test sets a script."""
    with RawPer() as server:
        yield server


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Callable[..., Recorder]]:
    """``recorder(url, name="q", **options)``: a fast recorder, closed at teardown."""
    made: list[Recorder] = []

    def factory(url: str, name: str = "q", **options: Any) -> Recorder:
        rec = make(url, tmp_path / name, **options)
        made.append(rec)
        return rec

    yield factory
    close_all(made)
