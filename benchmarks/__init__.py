"""Benchmarks of per_buffer against its baselines and peers (``python -m benchmarks``).

Scenarios, one module each: :mod:`~benchmarks.hot_path`, :mod:`~benchmarks.delivery`,
:mod:`~benchmarks.backlog`, :mod:`~benchmarks.outage`, :mod:`~benchmarks.coalescing`
and :mod:`~benchmarks.startup`; :mod:`~benchmarks.run` drives them.
"""
