"""``manage.py per_buffer_drain``: ``per-buffer drain`` on the configured queue directory."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from ..._cli import run


class Command(BaseCommand):  # type: ignore[misc]  # django has no type hints
    """Deliver the backlog of the queue directory of ``settings.PER_BUFFER``."""

    help = "Deliver a left-behind backlog to Per (per-buffer drain)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        """``--dir``, ``--timeout`` and ``--concurrency``, as ``per-buffer drain``."""
        parser.add_argument("--dir", default=None, help="queue directory (default: settings)")
        parser.add_argument("--timeout", default=None, help="give up after S seconds")
        parser.add_argument("--concurrency", default=None, help="requests in flight")

    def handle(self, *args: Any, **options: Any) -> None:
        """Run ``per-buffer drain``."""
        extra: list[str] = []
        for name in ("timeout", "concurrency"):
            if options[name] is not None:
                extra += [f"--{name}", str(options[name])]
        run("drain", extra, options["dir"])
