"""Range selection: turn collected statistics into the [lo, hi] an activation is quantized over.

Pure numpy on a histogram (counts over equal-width bins) plus the exact observed min/max.

  minmax      the observed range: no clipping, so one outlier can waste most of the 256 levels
  percentile  keep the central p% of values: each tail loses (100 - p) / 2 %
  entropy     TensorRT's KL-divergence search: the clipping threshold whose quantized histogram
              is closest, in KL divergence, to the original one (done on |x|)
  mse         the clipping range that minimizes the expected squared quantization error
  auto        per tensor, whichever of the above (and a few percentiles) gives the smallest
              expected squared error on the tensor's own histogram; the report says which won
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from quantkit.calibrate.observers import HistogramObserver, Observer


@dataclass(frozen=True)
class Levels:
    """What the range will be quantized to: number of steps and whether it is symmetric."""

    steps: int  # qmax - qmin: 255 for uint8, 254 for symmetric int8
    symmetric: bool


def _centers(h: HistogramObserver) -> np.ndarray:
    return h.origin + h.width * (np.arange(h.bins) + 0.5)


def _widen(lo: float, hi: float) -> tuple[float, float]:
    return min(lo, 0.0), max(hi, 0.0)


def minmax_range(obs: Observer, levels: Levels, **_) -> tuple[float, float]:
    return obs.range()


def percentile_range(h: HistogramObserver, levels: Levels, percentile: float = 99.99, **_) -> tuple[float, float]:
    total = h.counts.sum()
    if total == 0:
        return h.range()
    tail = (100.0 - percentile) / 200.0 * total
    cdf = np.cumsum(h.counts)
    edges = h.edges
    lo_bin = int(np.searchsorted(cdf, tail, side="right"))
    hi_bin = int(np.searchsorted(cdf, total - tail, side="left"))
    lo = max(h.lo, float(edges[lo_bin]))
    hi = min(h.hi, float(edges[min(hi_bin + 1, h.bins)]))
    return lo, hi


def expected_sq_error(h: HistogramObserver, lo, hi, levels: Levels) -> np.ndarray:
    """Expected squared error of quantizing values drawn from the histogram (each bin's mass at
    its centre) to [lo, hi] with the given number of steps, for arrays of candidate ranges.
    Values inside a range get the uniform rounding error step^2 / 12; values outside are clipped
    to the nearer end. Prefix sums of mass, mass*x and mass*x^2 make each candidate O(log bins)."""
    lo, hi = np.minimum(np.asarray(lo, np.float64), 0.0), np.maximum(np.asarray(hi, np.float64), 0.0)
    if levels.symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    c = _centers(h)
    p = h.counts / max(h.counts.sum(), 1)
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(p * c**k)]) for k in (0, 1, 2))
    i = np.searchsorted(c, lo, side="left")  # bins wholly below lo
    j = np.searchsorted(c, hi, side="right")  # bins at or below hi
    below = s2[i] - 2 * lo * s1[i] + lo**2 * s0[i]
    above_mass = s0[-1] - s0[j]
    above = (s2[-1] - s2[j]) - 2 * hi * (s1[-1] - s1[j]) + hi**2 * above_mass
    inside = np.maximum(s0[-1] - s0[i] - above_mass, 0.0)
    step = (hi - lo) / levels.steps
    return below + above + inside * step**2 / 12.0


def mse_range(h: HistogramObserver, levels: Levels, candidates: int = 200, **_) -> tuple[float, float]:
    """Search clipping ranges that shrink both ends of the observed range independently."""
    lo0, hi0 = _widen(*h.range())
    fr = np.linspace(0.02, 1.0, candidates)
    if lo0 < 0 and hi0 > 0 and not levels.symmetric:
        f_lo, f_hi = (g.ravel() for g in np.meshgrid(fr, fr))
    else:
        f_lo = f_hi = fr
    err = expected_sq_error(h, lo0 * f_lo, hi0 * f_hi, levels)
    best = int(np.argmin(err))
    return float(lo0 * f_lo[best]), float(hi0 * f_hi[best])


def _abs_histogram(h: HistogramObserver) -> tuple[np.ndarray, float]:
    """Fold the signed histogram onto |x|: bins of the same width from 0 to max |x|."""
    amax = max(abs(h.lo), abs(h.hi), 1e-12)
    n = max(int(np.ceil(amax / h.width)), 1)
    idx = np.minimum((np.abs(_centers(h)) / h.width).astype(np.int64), n - 1)
    return np.bincount(idx, weights=h.counts, minlength=n), h.width


def _kl_thresholds(hist: np.ndarray, quant_bins: int, candidates: np.ndarray) -> np.ndarray:
    """KL(P || Q) for each candidate threshold index i (TensorRT's procedure): P is hist[:i] with
    the clipped tail added to its last bin; Q is hist[:i] merged into `quant_bins` groups and
    spread back evenly over each group's non-empty bins."""
    out = np.empty(len(candidates))
    for k, i in enumerate(candidates):  # one vectorized evaluation per candidate threshold
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        group = (np.arange(i) * quant_bins) // i
        nonzero = hist[:i] > 0
        g_sum = np.bincount(group, weights=hist[:i], minlength=quant_bins)
        g_cnt = np.bincount(group, weights=nonzero, minlength=quant_bins)
        q = np.where(nonzero, g_sum[group] / np.maximum(g_cnt[group], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            out[k] = np.inf
            continue
        p, q = p / ps, q / qs
        m = p > 0
        with np.errstate(divide="ignore"):
            out[k] = np.sum(p[m] * np.log(p[m] / np.where(q[m] > 0, q[m], 1e-12)))
    return out


def entropy_range(h: HistogramObserver, levels: Levels, max_candidates: int = 256, **_) -> tuple[float, float]:
    hist, width = _abs_histogram(h)
    quant_bins = (levels.steps + 1) // 2 if levels.symmetric or h.lo < 0 else levels.steps + 1
    n = len(hist)
    if n <= quant_bins:
        return h.range()
    step = max(1, (n - quant_bins) // max_candidates)
    candidates = np.arange(quant_bins, n + 1, step)
    if candidates[-1] != n:
        candidates = np.append(candidates, n)
    kl = _kl_thresholds(hist, quant_bins, candidates)
    threshold = (candidates[int(np.argmin(kl))]) * width
    return max(h.lo, -threshold), min(h.hi, threshold)


METHODS: dict[str, tuple[str, Callable[..., tuple[float, float]]]] = {
    "minmax": ("minmax", minmax_range),
    "percentile": ("histogram", percentile_range),
    "entropy": ("histogram", entropy_range),
    "mse": ("histogram", mse_range),
}
AUTO_PERCENTILES = (99.9, 99.99, 99.999)


def observer_kind(method: str) -> str:
    return "minmax" if method == "minmax" else "histogram"


def auto_range(h: HistogramObserver, levels: Levels, **_) -> tuple[tuple[float, float], str]:
    """The candidate with the smallest expected squared error, and its name."""
    cands = {"minmax": minmax_range(h, levels), "entropy": entropy_range(h, levels),
             "mse": mse_range(h, levels)}
    for p in AUTO_PERCENTILES:
        cands[f"percentile {p:g}"] = percentile_range(h, levels, percentile=p)
    names = list(cands)
    err = expected_sq_error(h, [cands[n][0] for n in names], [cands[n][1] for n in names], levels)
    best = names[int(np.argmin(err))]
    return cands[best], best


def select_range(obs: Observer, method: str, levels: Levels,
                 percentile: float = 99.99) -> tuple[tuple[float, float], str]:
    """(lo, hi) for one tensor under `method`, and the name of the method that produced it."""
    if not obs.seen:
        return (0.0, 0.0), method
    if method == "auto":
        return auto_range(cast(HistogramObserver, obs), levels)
    _, fn = METHODS[method]
    return fn(obs, levels, percentile=percentile), method
