"""Latency of two sessions measured in the same run, interleaved so that machine noise
(another process, frequency changes) hits both alike; the median of each is reported."""

from __future__ import annotations

import statistics
import time

import numpy as np


def compare_latency(ref_sess, q_sess, feed: dict[str, np.ndarray], runs: int = 20, warmup: int = 3):
    def once(sess, names):
        t = time.perf_counter()
        sess.run(names, feed)
        return (time.perf_counter() - t) * 1000.0

    ref_names = [o.name for o in ref_sess.get_outputs()]
    q_names = [o.name for o in q_sess.get_outputs()]
    for _ in range(warmup):
        once(ref_sess, ref_names)
        once(q_sess, q_names)
    ref_ms, q_ms = [], []
    for i in range(runs):
        # alternate which goes first so neither always runs on a warmer cache
        if i % 2:
            ref_ms.append(once(ref_sess, ref_names))
            q_ms.append(once(q_sess, q_names))
        else:
            q_ms.append(once(q_sess, q_names))
            ref_ms.append(once(ref_sess, ref_names))
    ref, q = statistics.median(ref_ms), statistics.median(q_ms)
    return {"fp32_ms": ref, "quantized_ms": q, "speedup": ref / q if q > 0 else None, "runs": runs}
