"""fleet.watch_rates: completions per minute over a sliding window and the ETA, on constructed
completion records (no Redis)."""

from __future__ import annotations

import pytest

from fleet.contract import CompletionRecord
from fleet.watch_rates import eta_s, rate_per_min
from fleet.watch_view import duration

NOW = 1_000_000.0


def record(finished_ago_s: float, duration_s: float, worker: str = "gpu0@h") -> CompletionRecord:
    return CompletionRecord(sample_id="s", experiment="e", kind="touch", group="g", output_path="/o/x",
                            duration_s=duration_s, worker=worker, hostname="h", gpus=[0], attempt=1, deliveries=1,
                            model_loaded=False, model_load_s=0.0, finished_at=NOW - finished_ago_s)


def events(recs: list[CompletionRecord]) -> list[tuple[float, float]]:
    return [(r.finished_at, r.duration_s) for r in recs]


def test_a_steady_worker_over_the_whole_window() -> None:
    # One sample every 10 s for the last 5 minutes (and older ones outside the window).
    recs = [record(10.0 * i, 10.0) for i in range(60)]
    assert rate_per_min(events(recs), NOW, window_s=300) == pytest.approx(6.0, rel=0.04)


def test_work_that_began_inside_the_window_is_not_spread_over_all_of_it() -> None:
    # Two workers started 20 s ago; each made two 10 s samples: 4 in 20 s = 12 per minute.
    recs = [record(10.0, 10.0, "a"), record(0.0, 10.0, "a"), record(10.0, 10.0, "b"), record(0.0, 10.0, "b")]
    assert rate_per_min(events(recs), NOW, window_s=300) == pytest.approx(12.0)


def test_idle_time_since_the_last_completion_lowers_the_rate_and_old_records_leave_it() -> None:
    recs = [record(60.0 + 10.0 * i, 10.0) for i in range(6)]  # 6 samples, then a minute idle
    assert rate_per_min(events(recs), NOW, window_s=300) == pytest.approx(60 * 6 / 120)
    assert rate_per_min(events(recs), NOW, window_s=30) == 0.0
    assert rate_per_min([], NOW) == 0.0


def test_a_single_sample_just_finished_is_one_per_its_duration() -> None:
    assert rate_per_min(events([record(0.0, 30.0)]), NOW, window_s=300) == pytest.approx(2.0)
    # a zero-length sample reported just now is counted over at least a second, never infinite
    assert rate_per_min(events([record(0.0, 0.0)]), NOW) == pytest.approx(60.0)


def test_eta_is_remaining_over_rate() -> None:
    assert eta_s(30, 6.0) == pytest.approx(300.0)
    assert eta_s(0, 0.0) == 0.0  # nothing left: done, whatever the rate
    assert eta_s(5, 0.0) is None  # no completion in the window: unknown


def test_durations_read_as_a_clock() -> None:
    assert [duration(x) for x in (None, 4.4, 185, 7620)] == ["-", "4s", "3m05s", "2h07m"]
