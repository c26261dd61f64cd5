"""Coalescing on the delivery side, against a raw Per: what a copy in flight stands for,
and whose window rule judges an entry (see per_buffer.coalesce)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from delivery_helpers import TOKEN
from raw_per import Hit, RawPer, Reply, ok

from per_buffer import Recorder
from per_buffer.models import Activity
from per_buffer.queue import DurableQueue

SLOW = 1.5  # seconds before the first request for u1 is answered (a 503)


def test_a_repeat_recorded_while_its_copy_is_in_flight_gets_its_own_request(
    raw: RawPer, recorder: Callable[..., Recorder]
) -> None:
    """The copy in flight may have been stamped before the repeat was recorded, and may
    fail (here: a slow 503) where the repeat's own request succeeds: the repeat is sent
    at once, not held for that answer nor acknowledged with it."""
    first: list[Hit] = []

    def script(hit: Hit) -> Reply:
        if hit.user == "u1" and not first:
            first.append(hit)
            return Reply(status=503, body=b"busy", content_type="text/plain", delay=SLOW)
        return ok()

    raw.script = script
    rec = recorder(raw.url, coalesce_window=900, coalesce_margin=0)
    rec.record("acme", "u1")
    assert raw.wait_for(lambda server: bool(first), timeout=10)  # A is in flight
    rec.record("acme", "u1")  # B: recorded after A was sent
    assert raw.wait_for(lambda server: "u1" in server.accepted, timeout=10)
    accepted_at = dict(raw.accepted_at)["u1"]
    assert accepted_at < first[0].at + SLOW, "B waited for A's answer"
    assert rec.flush(timeout=10)


def test_entries_queued_before_a_request_ride_on_it(
    raw: RawPer, recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    """Copies of one key already waiting when its request goes out share its answer: one
    request for all of them (a backlog after an outage costs one request per key)."""
    directory = tmp_path / "q"
    with DurableQueue(directory) as queue:
        queue.put([(Activity("acme", "u1", "login"), 1000.0 + i) for i in range(50)])
        queue.put([(Activity("acme", "u2", "login"), 1000.0)])
    rec = recorder(raw.url, coalesce_window=0)  # the constructor finds the backlog
    assert rec.drain(timeout=10)
    assert sorted(hit.user for hit in raw.hits) == ["u1", "u2"]
    with DurableQueue(directory) as queue:
        assert queue.counts() == (0, 0)


def test_a_shared_drainer_judges_each_entry_under_its_recorders_window(
    raw: RawPer, tmp_path: Path
) -> None:
    """The drainer was started by a recorder coalescing over 900 s; a recorder with
    coalescing off on the same directory still has every call sent."""
    directory = tmp_path / "q"
    options = {"base_url": raw.url, "poll_interval": 0.05, "delivery": "process"}
    wide = Recorder(TOKEN, "login", directory=directory, coalesce_window=900, **options)
    off = Recorder(TOKEN, "login", directory=directory, coalesce_window=0, **options)
    try:
        wide.record("acme", "u1")
        assert wide.flush(timeout=20)  # the drainer (900 s) saw Per acknowledge u1
        for _ in range(3):
            off.record("acme", "u1")
            assert off.flush(timeout=20)
        assert [hit.user for hit in raw.hits].count("u1") == 4
        started = time.time()
        wide.record("acme", "u1")  # the 900 s recorder's repeat: covered (no request)
        assert wide.flush(timeout=20)
        same_window = started // 900 == time.time() // 900 and 30 <= started % 900 < 870
        if same_window:  # not in the uncertain zone of a 900 s window (margin 30 s)
            assert [hit.user for hit in raw.hits].count("u1") == 4
    finally:
        off.close()
        wide.close()
