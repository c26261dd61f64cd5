"""The flow controller on simulated time: partial failure, probe mode, rate limits, pauses."""

from __future__ import annotations

import math
import random

import pytest

from per_buffer.backoff import Backoff
from per_buffer.flow import FlowController
from per_buffer.outcomes import (
    AUTH,
    NETWORK_ERROR,
    OK,
    RATE_LIMITED,
    REFUSED_BY_PER,
    SERVER_ERROR,
)
from tests.flow_sim import StrayRateLimit, TokenBucketServer, flaky, simulate


def controller(concurrency: int = 8, **kwargs: object) -> FlowController:
    rng = random.Random(7)
    return FlowController(
        concurrency, Backoff(0.5, 300.0, rng=rng.random), rng=rng.random, **kwargs
    )  # type: ignore[arg-type]


def feed(flow: FlowController, now: float, kinds: list[str]) -> float:
    for kind in kinds:
        flow.started(now)
        flow.finished(now + 0.001, now, kind)
        now += 0.002
    return now


# ---------------------------------------------------------------------- partial failure


@pytest.mark.parametrize("failure", [0.1, 0.3, 0.5])
def test_partial_failure_keeps_full_concurrency(failure: float) -> None:
    flow = controller(16)
    rng = random.Random(3)
    now = feed(flow, 0.0, [SERVER_ERROR if rng.random() < failure else OK for _ in range(2000)])
    assert not flow.probing
    assert flow.throttle() < 0.1
    assert flow.limit >= 14
    assert flow.admit(now, 0) == 0.0


def test_nearly_total_failure_ends_in_probe_mode() -> None:
    flow = controller(16)
    rng = random.Random(4)
    feed(flow, 0.0, [OK] * 200)
    feed(flow, 1.0, [NETWORK_ERROR if rng.random() < 0.97 else OK for _ in range(300)])
    assert flow.probing
    assert flow.state(2.0).limit == 1


@pytest.mark.parametrize(("failure", "low", "high"), [(0.7, 0.4, 0.8), (0.85, 0.1, 0.55)])
def test_heavy_failure_lowers_the_limit_in_proportion(
    failure: float, low: float, high: float
) -> None:
    flow = controller(20)
    rng = random.Random(5)
    feed(flow, 0.0, [SERVER_ERROR if rng.random() < failure else OK for _ in range(1000)])
    assert not flow.probing
    assert low * 20 <= flow.limit <= high * 20


def test_probe_mode_sends_one_at_a_time_at_most_5_s_apart() -> None:
    flow = controller(8)
    now = feed(flow, 0.0, [NETWORK_ERROR] * 20)
    assert flow.probing
    assert flow.admit(now, 1) == math.inf
    gaps = []
    for _ in range(12):
        wait = flow.admit(now, 0)
        assert 0.0 <= wait <= 5.0
        gaps.append(wait)
        now += wait
        assert flow.admit(now, 0) == 0.0
        flow.started(now)
        now += 0.01
        flow.finished(now, now - 0.01, NETWORK_ERROR)
    assert gaps[-1] > gaps[1]  # the delay grows ...
    assert max(gaps) <= 5.0  # ... up to 5 s
    flow.started(now + 5)
    flow.finished(now + 5.01, now + 5, OK)
    assert not flow.probing
    assert flow.limit == 2  # climbs back from one (plus this success) ...
    feed(flow, now + 6, [OK] * 20)
    assert flow.limit == 8  # ... doubling per round trip


def test_late_results_of_requests_sent_before_probing_do_not_stretch_probes() -> None:
    flow = controller(8)
    now = feed(flow, 0.0, [NETWORK_ERROR] * 20)
    assert flow.probing
    first = flow.admit(now, 0)
    for _ in range(8):  # stragglers sent long before probe mode began
        flow.finished(now, 0.0, NETWORK_ERROR)
    assert flow.admit(now, 0) == pytest.approx(first)


def test_refusals_by_per_are_answers_not_failures() -> None:
    flow = controller(8)
    feed(flow, 0.0, [REFUSED_BY_PER] * 100)
    assert not flow.probing and flow.limit == 8


# ---------------------------------------------------------------------- pauses


def test_retry_after_is_honoured_exactly_and_never_lengthened() -> None:
    flow = controller(8)
    feed(flow, 0.0, [OK] * 50)
    flow.started(1.0)
    flow.finished(1.0, 1.0, RATE_LIMITED, 2.0)
    assert flow.pause_reason == "rate_limited"
    assert flow.admit(1.0, 0) == pytest.approx(2.0)
    assert flow.admit(2.999, 0) == pytest.approx(0.001)
    assert flow.admit(3.0, 0) == 0.0 or flow.rate is not None
    for _ in range(20):  # more 429s of the same burst do not push it past their own Retry-After
        flow.finished(1.0, 0.99, RATE_LIMITED, 2.0)
    assert flow.paused_until == pytest.approx(3.0)


def test_retry_after_is_capped_at_backoff_max() -> None:
    rng = random.Random(1)
    flow = FlowController(8, Backoff(0.5, 30.0, rng=rng.random), rng=rng.random)
    flow.started(0.0)
    flow.finished(0.0, 0.0, RATE_LIMITED, 86400.0)
    assert flow.paused_until == pytest.approx(30.0)


def test_429_without_retry_after_pauses_with_backoff() -> None:
    flow = controller(8)
    waits = []
    now = 0.0
    for _ in range(6):
        flow.started(now)
        flow.finished(now, now, RATE_LIMITED, None)
        wait = flow.admit(now, 0)
        waits.append(wait)
        now += wait + 0.001
    assert 0.2 < waits[0] <= 0.5
    assert waits[-1] > waits[0]


def test_auth_holds_then_probes_one_at_a_time_until_accepted() -> None:
    flow = controller(8, auth_interval=60.0)
    flow.started(0.0)
    flow.finished(0.1, 0.0, AUTH)
    assert flow.pause_reason == "auth"
    assert flow.admit(1.0, 0) == pytest.approx(59.1)
    flow.poke(1.0)  # a flush probes now
    assert flow.admit(1.0, 0) == 0.0
    assert flow.admit(1.0, 1) == math.inf
    flow.started(1.0)
    flow.finished(1.1, 1.0, OK)
    assert flow.pause_reason is None
    assert flow.admit(1.1, 0) == 0.0


def test_success_ratio_over_the_last_minute() -> None:
    flow = controller(8)
    assert flow.success_ratio(0.0) is None
    feed(flow, 0.0, [OK, OK, OK, SERVER_ERROR])
    assert flow.success_ratio(1.0) == pytest.approx(0.75)
    assert flow.success_ratio(70.0) is None


# ---------------------------------------------------------------------- simulated servers


@pytest.mark.parametrize("failure", [0.1, 0.3, 0.5])
def test_goodput_under_random_503s_is_healthy_goodput_times_success_ratio(failure: float) -> None:
    healthy = simulate(flaky(0.0, random.Random(1)), items=3000, concurrency=8, latency=0.005)
    assert healthy.finished_at is not None
    ideal = 3000 / healthy.finished_at * (1 - failure)
    run = simulate(flaky(failure, random.Random(2)), items=3000, concurrency=8, latency=0.005)
    assert run.finished_at is not None and run.delivered == 3000
    assert 3000 / run.finished_at >= 0.8 * ideal


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(40.0, 40.0), (400.0, 400.0), (40.0, 1.0), (40.0, 10.0), (400.0, 5.0), (400.0, 40.0)],
)
def test_a_steady_rate_limit_is_met_at_close_to_its_rate(rate: float, burst: float) -> None:
    run = simulate(
        TokenBucketServer(rate, burst), items=100_000, concurrency=16, latency=0.005, horizon=60.0
    )
    goodput = run.goodput(2.0, 60.0)
    assert goodput >= 0.8 * rate, (goodput, run.by_kind)
    assert run.share(RATE_LIMITED, after=2.0) <= 0.2


def test_probe_mode_in_a_simulated_outage_then_quick_recovery() -> None:
    def server(now: float) -> tuple[str, float | None]:
        return (NETWORK_ERROR, None) if 1.0 <= now < 21.0 else (OK, None)

    run = simulate(server, items=200_000, concurrency=8, latency=0.005, horizon=30.0)
    assert run.max_in_flight_probing == 1
    assert run.probe_gaps and max(run.probe_gaps) <= 5.0 + 0.02
    during = [t for t, k in run.timeline if 2.0 <= t < 20.0]
    assert len(during) < 40  # a handful of probes, not a storm
    # the next probe (at most 5 s later) finds Per back, and the limit climbs back at once
    assert run.goodput(26.5, 30.0) >= 0.8 * run.goodput(0.0, 1.0)


def test_one_stray_429_at_start_does_not_throttle_a_healthy_server() -> None:
    healthy = simulate(flaky(0.0, random.Random(1)), items=2000, concurrency=16)
    run = simulate(StrayRateLimit(1), items=2000, concurrency=16, horizon=30.0)
    assert healthy.finished_at is not None and run.finished_at is not None
    assert run.finished_at <= healthy.finished_at + 1.5  # the pause, and nothing more
