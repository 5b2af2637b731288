"""Streaming statistics: each observer sees one batch at a time and keeps O(1) state per tensor
(O(bins) for histograms), whatever the number of samples and however shapes vary by batch.

Observers are registered by name. A range method (calibrate/ranges.py) says which observer it
needs; a new statistic is a class with `update(array)` plus whatever its methods read.
"""

from __future__ import annotations

import numpy as np

OBSERVERS: dict[str, type[Observer]] = {}


def register(name: str):
    def wrap(cls):
        OBSERVERS[name] = cls
        cls.name = name
        return cls

    return wrap


def _finite(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The finite values of x (flattened) and how many were not finite. -inf/nan in attention
    masks would otherwise make any range unusable."""
    x = np.asarray(x).reshape(-1)
    if not np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32), 0
    ok = np.isfinite(x)
    if ok.all():
        return x, 0
    return x[ok], int(x.size - ok.sum())


class Observer:
    name = "base"

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.nonfinite = 0
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x, bad = _finite(x)
        self.count += x.size + bad
        self.nonfinite += bad
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            self._update(x)

    def _update(self, x: np.ndarray) -> None:
        pass

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def range(self) -> tuple[float, float]:
        """The exact observed min and max of the finite values."""
        return (self.lo, self.hi) if self.seen else (0.0, 0.0)


@register("minmax")
class MinMaxObserver(Observer):
    """Running min and max over every finite element."""


@register("histogram")
class HistogramObserver(Observer):
    """A fixed number of equal-width bins over a range that grows as batches arrive.

    When a batch falls outside the current range, the bin width is multiplied by a power of two
    and the origin moves by a whole number of old bins, so every old bin lands inside exactly one
    new bin: merging loses resolution but never mass or position.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.origin = 0.0
        self.width = 0.0

    @property
    def edges(self) -> np.ndarray:
        return self.origin + self.width * np.arange(self.bins + 1)

    def _update(self, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.width == 0.0:
            span = hi - lo
            if span <= 0:
                span = max(abs(lo), 1e-8)
            self.origin, self.width = lo, span / self.bins * (1 + 1e-6)
        else:
            self._grow(lo, hi)
        idx = ((x - self.origin) * (1.0 / self.width)).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)  # the top edge itself goes in the last bin
        self.counts += np.bincount(idx, minlength=self.bins)

    def _grow(self, lo: float, hi: float) -> None:
        end = self.origin + self.width * self.bins
        if lo >= self.origin and hi < end:
            return
        shift = int(np.ceil((self.origin - lo) / self.width)) if lo < self.origin else 0
        factor = 1
        new_origin = self.origin - shift * self.width
        # grow until the new bins cover both the batch and every old bin
        while (new_origin + self.width * factor * self.bins <= hi
               or (self.bins - 1 + shift) // factor > self.bins - 1):
            factor *= 2
        # old bin i covers [origin + i w, origin + (i+1) w) = grid cells shift + i of the new origin
        new_idx = (np.arange(self.bins) + shift) // factor
        self.counts = np.bincount(new_idx, weights=self.counts, minlength=self.bins)[: self.bins].astype(np.int64)
        self.origin, self.width = new_origin, self.width * factor

    def state(self) -> dict:
        return {"counts": self.counts, "origin": self.origin, "width": self.width, "lo": self.lo,
                "hi": self.hi, "nonfinite": self.nonfinite, "count": self.count}

    @classmethod
    def from_state(cls, state: dict) -> HistogramObserver:
        obs = cls(bins=len(state["counts"]))
        obs.counts = np.asarray(state["counts"], dtype=np.int64)
        for k in ("origin", "width", "lo", "hi"):
            setattr(obs, k, float(state[k]))
        obs.nonfinite, obs.count = int(state["nonfinite"]), int(state["count"])
        return obs


def make_observer(kind: str) -> Observer:
    return OBSERVERS[kind]()
