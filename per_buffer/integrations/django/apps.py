"""The Django app config: the default recorder from ``settings.PER_BUFFER`` at start-up."""

from __future__ import annotations

from django.apps import AppConfig
from django.core.exceptions import ImproperlyConfigured

from ...recorder import configure
from . import SETTINGS, recorder_settings


class PerBufferConfig(AppConfig):  # type: ignore[misc]  # django has no type hints
    """``per_buffer.integrations.django`` in ``INSTALLED_APPS`` (label ``per_buffer``)."""

    name = "per_buffer.integrations.django"
    label = "per_buffer"
    verbose_name = "per_buffer"

    def ready(self) -> None:
        """Make a recorder from ``settings.PER_BUFFER`` the default one, if it is set.

        Raises:
            ImproperlyConfigured: a bad or missing setting, naming it.
        """
        options = recorder_settings()
        if options is None:
            return  # the default recorder is built from the environment on first use
        try:
            configure(**options)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.{SETTINGS}: {exc}") from exc
