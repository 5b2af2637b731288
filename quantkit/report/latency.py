"""Latency of several sessions measured in the same run, interleaved so that machine noise
(another process, frequency changes) hits all alike; the median of each is reported."""

from __future__ import annotations

import statistics
import time

import numpy as np

MIN_RUNS = 5  # rounds a time-bounded timing makes at least


def interleaved_ms(sessions: list, feed: dict[str, np.ndarray], runs: int = 20, warmup: int = 3) -> list[float]:
    """Median milliseconds per run of each session on `feed`, runs interleaved and rotated so
    that none always goes first."""
    return [statistics.median(t) for t in _timed(sessions, feed, runs, warmup, None)]


def _timed(sessions: list, feed: dict[str, np.ndarray], runs: int, warmup: int,
           seconds: float | None) -> list[list[float]]:
    """Each session's milliseconds per timed run; with `seconds`, fewer rounds (at least MIN_RUNS) once the
    timed rounds took that long."""
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for _ in range(warmup):
        for s, n in zip(sessions, names):
            s.run(n, feed)
    times: list[list[float]] = [[] for _ in sessions]
    k = len(sessions)
    start = time.perf_counter()
    for i in range(runs):
        for j in range(k):
            idx = (i + j) % k
            t = time.perf_counter()
            sessions[idx].run(names[idx], feed)
            times[idx].append((time.perf_counter() - t) * 1000.0)
        if seconds is not None and i + 1 >= MIN_RUNS and time.perf_counter() - start >= seconds:
            break
    return times


def compare_latency(ref_sess, q_sess, feed: dict[str, np.ndarray], runs: int = 20, warmup: int = 3,
                    seconds: float | None = None) -> dict:
    """fp32 against quantized, interleaved; with `seconds`, fewer rounds once that much time passed (a
    report's figure on a large model, not a decision): the report gives the runs made."""
    ref_times, q_times = _timed([ref_sess, q_sess], feed, runs, warmup, seconds)
    ref, q = statistics.median(ref_times), statistics.median(q_times)
    return {"fp32_ms": ref, "quantized_ms": q, "speedup": ref / q if q > 0 else None, "runs": len(q_times)}
