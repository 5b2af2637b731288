"""The report's latency: interleaved medians, and fewer rounds once a time budget is spent."""

from __future__ import annotations

import numpy as np

from quantkit.report.latency import compare_latency, interleaved_ms


class _Session:
    """A stand-in for an onnxruntime session whose run takes `ms` milliseconds of a fake clock."""

    def __init__(self, clock: list[float], ms: float) -> None:
        self.clock, self.ms, self.calls = clock, ms, 0

    def get_outputs(self):
        class _Out:
            name = "y"
        return [_Out()]

    def run(self, names, feed):
        self.calls += 1
        self.clock[0] += self.ms / 1000.0
        return [np.zeros(1)]


def _fake_clock(monkeypatch) -> list[float]:
    import quantkit.report.latency as latency

    clock = [0.0]
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    return clock


def test_all_rounds_without_a_budget_and_medians_per_session(monkeypatch):
    clock = _fake_clock(monkeypatch)
    a, b = _Session(clock, 30.0), _Session(clock, 10.0)
    ms = interleaved_ms([a, b], {}, runs=20, warmup=3)
    assert a.calls == b.calls == 23
    assert np.allclose(ms, [30.0, 10.0])


def test_a_time_budget_stops_after_the_round_that_spends_it_but_never_before_min_runs(monkeypatch):
    clock = _fake_clock(monkeypatch)
    ref, q = _Session(clock, 300.0), _Session(clock, 100.0)  # 0.4 s a round: 2.6 s spent after the 7th round
    out = compare_latency(ref, q, {}, runs=20, warmup=3, seconds=2.5)
    assert out["runs"] == 7 and ref.calls == q.calls == 10
    assert np.isclose(out["speedup"], 3.0)
    ref, q = _Session(clock, 300.0), _Session(clock, 100.0)
    out = compare_latency(ref, q, {}, runs=20, warmup=3, seconds=0.0)  # spent at once: still 5 rounds
    assert out["runs"] == 5
    ref, q = _Session(clock, 30.0), _Session(clock, 10.0)  # 0.04 s a round: all 20 fit in 2 s
    assert compare_latency(ref, q, {}, runs=20, warmup=3, seconds=2.0)["runs"] == 20
