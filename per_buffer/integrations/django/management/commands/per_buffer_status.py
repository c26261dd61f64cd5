"""``manage.py per_buffer_status``: ``per-buffer status`` on the configured queue directory."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from ..._cli import run


class Command(BaseCommand):  # type: ignore[misc]  # django has no type hints
    """Show what the queue directory of ``settings.PER_BUFFER`` holds."""

    help = "Show what the per_buffer queue directory holds (per-buffer status)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        """``--dir`` and ``--json``, as ``per-buffer status``."""
        parser.add_argument("--dir", default=None, help="queue directory (default: settings)")
        parser.add_argument("--json", action="store_true", help="JSON on stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        """Run ``per-buffer status``."""
        run("status", ["--json"] if options["json"] else [], options["dir"])
