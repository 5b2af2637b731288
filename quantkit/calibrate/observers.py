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


def _finite(x: np.ndarray) -> tuple[np.ndarray, int, float, float]:
    """The finite values of x (flattened), how many were not finite, and their min and max.
    -inf/nan in attention masks would otherwise make any range unusable."""
    x = np.asarray(x).reshape(-1)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if x.size == 0:
        return x, 0, np.inf, -np.inf
    lo, hi = float(x.min()), float(x.max())
    if np.isfinite(lo) and np.isfinite(hi):  # a nan or inf anywhere would show here
        return x, 0, lo, hi
    ok = np.isfinite(x)
    x = x[ok]
    if x.size == 0:
        return x, int(ok.size), np.inf, -np.inf
    return x, int(ok.size - x.size), float(x.min()), float(x.max())


# Magnitude from which values count as "mask-like": additive attention masks use -1e4, -1e9,
# float32 min or -inf, far outside any activation a quantizer should spend levels on.
EXTREME = 1e4


class Observer:
    name = "base"

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.nonfinite = 0
        self.count = 0
        self.extreme = 0  # finite values with |x| >= EXTREME
        self.bulk_absmax = 0.0  # max |x| over the other values
        self.channel_axis: int | None = None  # set to also keep per-channel means (bias correction)
        self.channel_sum: np.ndarray | None = None
        self.channel_n = 0

    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None or not self.channel_n else self.channel_sum / self.channel_n

    def _track_channels(self, x: np.ndarray) -> None:
        axis = self.channel_axis % x.ndim
        other = tuple(i for i in range(x.ndim) if i != axis)
        s: np.ndarray = np.asarray(np.sum(x, axis=other, dtype=np.float64))
        self.channel_sum = s if self.channel_sum is None else self.channel_sum + s
        self.channel_n += x.size // max(x.shape[axis], 1)

    def update(self, x: np.ndarray) -> None:
        self.channels = x.shape[-1] if np.ndim(x) else 1
        if self.channel_axis is not None and np.ndim(x):
            self._track_channels(np.asarray(x))
        x, bad, lo, hi = _finite(x)
        self.count += x.size + bad
        self.nonfinite += bad
        if x.size:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
            if lo > -EXTREME and hi < EXTREME:  # the common case costs nothing more
                self.bulk_absmax = max(self.bulk_absmax, -lo, hi)
            else:
                big = np.abs(x) >= EXTREME
                self.extreme += int(big.sum())
                rest = x[~big]
                if rest.size:
                    self.bulk_absmax = max(self.bulk_absmax, float(np.abs(rest).max()))
            self._update(x, lo, hi)

    def update_pair(self, x: np.ndarray, reference: np.ndarray) -> None:
        raise TypeError(f"the {self.name} statistic is not computed against a reference tensor")

    def mask_like(self) -> str | None:
        """Why this tensor's range is unusable for quantization, or None. A few -inf or huge
        values among ordinary ones are the signature of an additive attention mask."""
        if self.nonfinite:
            return f"{self.nonfinite} of {self.count} values are -inf/inf/nan (an attention mask?)"
        if self.extreme and self.bulk_absmax * 100 < max(abs(self.lo), abs(self.hi)):
            return (f"range [{self.lo:.3g}, {self.hi:.3g}] is dominated by {self.extreme} mask-like value(s) "
                    f"of magnitude >= {EXTREME:g}; the other values lie within +-{self.bulk_absmax:.3g}")
        return None

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
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

    # Tensors above this many elements per batch are histogrammed from a strided sample; min and
    # max stay exact. The stride is a prime that does not divide the channel count, so every
    # channel (where outliers live in transformers) is sampled; counts are weighted by the stride.
    SAMPLE_CAP = 1 << 14
    PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.batches = 0
        self.counts = np.zeros(bins, dtype=np.int64)
        self.origin = 0.0
        self.width = 0.0

    @property
    def edges(self) -> np.ndarray:
        return self.origin + self.width * np.arange(self.bins + 1)

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
        if self.width == 0.0:
            span = hi - lo
            if span <= 0:
                span = max(abs(lo), 1e-8)
            self.origin, self.width = lo, span / self.bins * (1 + 1e-6)
        else:
            self._grow(lo, hi)
        weight = 1
        if x.size > self.SAMPLE_CAP:
            need = -(-x.size // self.SAMPLE_CAP)
            weight = next((p for p in self.PRIMES if p >= need and self.channels % p), need)
            x = x[self.batches % weight :: weight]  # a different offset each batch
        self.batches += 1
        y = np.subtract(x, np.float32(self.origin), dtype=np.float32)
        y *= np.float32(1.0 / self.width)
        idx = y.astype(np.intp)
        np.clip(idx, 0, self.bins - 1, out=idx)  # the top edge itself goes in the last bin
        self.counts += np.bincount(idx, minlength=self.bins) * weight

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
                "hi": self.hi, "nonfinite": self.nonfinite, "count": self.count, "extreme": self.extreme,
                "bulk_absmax": self.bulk_absmax,
                "channel_sum": np.zeros(0) if self.channel_sum is None else self.channel_sum,
                "channel_n": self.channel_n, "channel_axis": -1 if self.channel_axis is None else self.channel_axis}

    @classmethod
    def from_state(cls, state: dict) -> HistogramObserver:
        obs = cls(bins=len(state["counts"]))
        obs.counts = np.asarray(state["counts"], dtype=np.int64)
        for k in ("origin", "width", "lo", "hi", "bulk_absmax"):
            setattr(obs, k, float(state[k]))
        obs.nonfinite, obs.count, obs.extreme = int(state["nonfinite"]), int(state["count"]), int(state["extreme"])
        if int(state.get("channel_n", 0)):
            obs.channel_sum, obs.channel_n = np.asarray(state["channel_sum"]), int(state["channel_n"])
            obs.channel_axis = int(state["channel_axis"])
        return obs


def make_observer(kind: str) -> Observer:
    """An observer by its registered name; "name:arg" passes arg (e.g. a convolution's window)."""
    name, _, arg = kind.partition(":")
    return OBSERVERS[name](arg) if arg else OBSERVERS[name]()  # type: ignore[call-arg]


@register("channel")
class ChannelObserver(Observer):
    """Per-channel min and max over the last axis, plus a uniform sample of up to `rows` rows
    (reservoir sampling), for algorithms that search over real activations (SmoothQuant)."""

    def __init__(self, rows: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.rows = rows
        self.sample: np.ndarray | None = None
        self.seen_rows = 0
        self.ch_min: np.ndarray | None = None
        self.ch_max: np.ndarray | None = None
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        x = np.asarray(x, dtype=np.float32)
        flat = x.reshape(-1, x.shape[-1])
        lo, hi = flat.min(axis=0), flat.max(axis=0)
        self.ch_min = lo if self.ch_min is None else np.minimum(self.ch_min, lo)
        self.ch_max = hi if self.ch_max is None else np.maximum(self.ch_max, hi)
        if self.sample is None:
            self.sample = np.empty((0, flat.shape[1]), np.float32)
        t = self.seen_rows + np.arange(len(flat))
        fill = t < self.rows
        if fill.any():
            self.sample = np.concatenate([self.sample, flat[fill]])
        later = ~fill
        if later.any():
            slot = (self.rng.random(int(later.sum())) * (t[later] + 1)).astype(np.int64)
            take = slot < self.rows
            self.sample[slot[take]] = flat[later][take]
        self.seen_rows += len(flat)

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.ch_min), np.abs(self.ch_max))


@register("channel_range")
class ChannelRangeObserver(Observer):
    """Per-channel min and max over the last axis, nothing else (no sample): what the outlier-channel
    split (quantize/outlier_split.py) reads to pick the channels it keeps in float."""

    def __init__(self) -> None:
        super().__init__()
        self.ch_min: np.ndarray | None = None
        self.ch_max: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0 or x.size == 0:
            return
        flat = x.reshape(-1, x.shape[-1])
        lo, hi = flat.min(axis=0).astype(np.float32), flat.max(axis=0).astype(np.float32)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            self.nonfinite += int((~np.isfinite(flat)).sum())
        self.count += flat.size
        if self.ch_min is not None and self.ch_min.shape != lo.shape:  # channels changed: not one tensor
            self.nonfinite += flat.size
            return
        self.ch_min = lo if self.ch_min is None else np.minimum(self.ch_min, lo)
        self.ch_max = hi if self.ch_max is None else np.maximum(self.ch_max, hi)
        self.lo, self.hi = min(self.lo, float(lo.min())), max(self.hi, float(hi.max()))


@register("gram")
class GramObserver(Observer):
    """X^T X over the rows of the last axis (float64, K x K): the Hessian GPTQ rounds against."""

    def __init__(self) -> None:
        super().__init__()
        self.gram: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        flat = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
        g = flat.T @ flat
        if self.gram is None:
            self.gram = g.astype(np.float64)
        else:  # float32 -> float64 per element inside the add: no float64 temporary of K x K
            np.add(self.gram, g, out=self.gram)
        self.rows += len(flat)

    def hessian(self) -> np.ndarray | None:
        return None if self.gram is None else 2.0 * self.gram / max(self.rows, 1)


@register("output_error")
class OutputErrorObserver(Observer):
    """A paired statistic: squared error of a tensor against a reference tensor of the same
    shape (e.g. a fake-quantized layer output against its float twin), and the reference's
    power, so per-layer SQNR can rank layers without keeping any batch."""

    def __init__(self) -> None:
        super().__init__()
        self.error = 0.0
        self.signal = 0.0

    def update_pair(self, x: np.ndarray, reference: np.ndarray) -> None:
        self.update(x)
        ref = np.asarray(reference, np.float64)
        self.error += float(np.sum((np.asarray(x, np.float64) - ref) ** 2))
        self.signal += float(np.sum(ref**2))

    def sqnr_db(self) -> float | None:
        if not self.count or self.error == 0:
            return None
        return 10.0 * float(np.log10(max(self.signal, 1e-30) / self.error))
