"""What the management commands share: run ``per-buffer`` on the configured queue directory."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError

from ...config import RecorderConfig, env_names
from ...recorder import shutdown
from . import SETTINGS, recorder_settings

_ENV_OF = {name: env_names(name)[0] for name in ("token", "base_url")}


def run(command: str, args: Sequence[str], directory: str | None) -> None:
    """Run ``per-buffer <command> --dir <directory> <args>`` with the settings' token and URL.

    This process's default recorder is closed first (without waiting: what it holds stays
    on disk), so that only the command reads or delivers the directory.

    ``directory`` None means ``settings.PER_BUFFER``'s directory (given, or the default
    derived from its token), else what the CLI finds (``PER_BUFFER_DIR``, the token's).

    Raises:
        CommandError: the command failed (it has printed why), or the settings are bad.
    """
    from ...cli import main  # noqa: PLC0415

    # the recorder the app built at start-up must not deliver alongside (or under) the command
    shutdown(timeout=0)
    options = recorder_settings() or {}
    if directory is None and options:
        try:
            directory = str(RecorderConfig.resolve(**options).directory)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.{SETTINGS}: {exc}") from exc
    argv = [command, *(["--dir", directory] if directory is not None else []), *args]
    with _environment({_ENV_OF[k]: str(v) for k, v in options.items() if k in _ENV_OF}):
        code = main(argv)
    if code:
        raise CommandError(f"per-buffer {command} exited with status {code}", returncode=code)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the CLI (never on a command line), then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
