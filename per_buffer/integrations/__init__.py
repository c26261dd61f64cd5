"""Framework integrations: one small module per framework, each importing it only when used.

``import per_buffer`` imports none of these; import the one you use:

* :mod:`per_buffer.integrations.asgi`: lifespan shutdown and per-request recording for any
  ASGI app (FastAPI, Starlette, Django's ASGI handler, a plain ASGI callable);
* :mod:`per_buffer.integrations.wsgi` and :mod:`per_buffer.integrations.flask`;
* :mod:`per_buffer.integrations.django`: an app for ``INSTALLED_APPS``, a middleware and the
  ``per_buffer_status``/``per_buffer_drain`` management commands;
* :mod:`per_buffer.integrations.gunicorn` and :mod:`per_buffer.integrations.celery`: exit hooks;
* :mod:`per_buffer.integrations.prometheus` and :mod:`per_buffer.integrations.opentelemetry`:
  ``stats()`` as metrics (names in :data:`per_buffer.metrics.METRICS`).
"""
