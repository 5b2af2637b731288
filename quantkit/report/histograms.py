"""Compact activation histograms for the report: the calibration observer's histogram cut down
to a few dozen bins, with the range the quantizer chose, so a report file alone can show where
the ranges were clipped.

Only histogram observers (--method percentile/entropy/mse/auto) keep a distribution; minmax runs
keep none, and the report then has no histograms.
"""

from __future__ import annotations

import numpy as np

MAX_TENSORS = 12
BINS = 64


def _clipped_share(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float) -> float:
    """Share of the observed values in bins lying wholly outside [lo, hi] (bin resolution)."""
    outside = (edges[1:] <= lo) | (edges[:-1] >= hi)
    total = counts.sum()
    return float(counts[outside].sum() / total) if total else 0.0


def compact(counts: np.ndarray, edges: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """The occupied span of a fine histogram, merged into at most `bins` groups of whole bins.
    Counts are summed, never interpolated, so mass is kept exactly."""
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return np.zeros(0, np.int64), edges[:1]
    first, last = int(nz[0]), int(nz[-1]) + 1
    cuts = np.unique(np.linspace(first, last, min(bins, last - first) + 1).round().astype(int))
    merged = np.add.reduceat(counts[first:last], cuts[:-1] - first)
    return merged.astype(np.int64), edges[cuts]


def histograms(observers: dict, activations: dict, limit: int = MAX_TENSORS, bins: int = BINS) -> list[dict]:
    """For up to `limit` quantized activation tensors with a histogram: counts, bin edges, the
    observed and chosen ranges. The tensors whose chosen range cuts off the largest part of the
    observed span come first: that is where clipping is a decision worth looking at."""
    rows = []
    for name, act in activations.items():
        obs = observers.get(name)
        if obs is None or not hasattr(obs, "counts") or not obs.seen:
            continue
        lo, hi = (float(v) for v in act["range"])
        olo, ohi = obs.range()
        span = max(ohi - olo, 1e-30)
        kept = max(0.0, min(hi, ohi) - max(lo, olo))
        counts, edges = compact(np.asarray(obs.counts), np.asarray(obs.edges), bins)
        rows.append({"tensor": name, "method": act.get("method"), "range": [lo, hi], "observed": [olo, ohi],
                     "clipped_span": 1.0 - kept / span,
                     "clipped_share": _clipped_share(np.asarray(obs.counts), np.asarray(obs.edges), lo, hi),
                     "edges": [float(e) for e in edges], "counts": [int(c) for c in counts]})
    rows.sort(key=lambda r: -r["clipped_span"])
    return rows[:limit]
