"""Latency of several sessions measured in the same run, interleaved so that machine noise
(another process, frequency changes) hits all alike; the median of each is reported."""

from __future__ import annotations

import statistics
import time

import numpy as np


def interleaved_ms(sessions: list, feed: dict[str, np.ndarray], runs: int = 20, warmup: int = 3) -> list[float]:
    """Median milliseconds per run of each session on `feed`, runs interleaved and rotated so
    that none always goes first."""
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for _ in range(warmup):
        for s, n in zip(sessions, names):
            s.run(n, feed)
    times: list[list[float]] = [[] for _ in sessions]
    k = len(sessions)
    for i in range(runs):
        for j in range(k):
            idx = (i + j) % k
            t = time.perf_counter()
            sessions[idx].run(names[idx], feed)
            times[idx].append((time.perf_counter() - t) * 1000.0)
    return [statistics.median(t) for t in times]


def compare_latency(ref_sess, q_sess, feed: dict[str, np.ndarray], runs: int = 20, warmup: int = 3) -> dict:
    ref, q = interleaved_ms([ref_sess, q_sess], feed, runs, warmup)
    return {"fp32_ms": ref, "quantized_ms": q, "speedup": ref / q if q > 0 else None, "runs": runs}
