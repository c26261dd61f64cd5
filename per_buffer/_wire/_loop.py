"""The event loop the delivery process runs on: uvloop when installed, else asyncio's."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable

__all__ = ["accelerator", "new_event_loop"]


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def accelerator() -> str | None:
    """``"uvloop"`` when the optional accelerator is installed (``per-buffer[speedups]``)."""
    return "uvloop" if _uvloop_factory() is not None else None


def new_event_loop(*, accelerate: bool = True) -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when installed and ``accelerate``, else asyncio's default.

    The caller owns the loop (run it in one thread, close it when done). No
    global event loop policy is changed.
    """
    factory = _uvloop_factory() if accelerate else None
    return factory() if factory is not None else asyncio.new_event_loop()
