"""Statistics for one run, in as few streamed passes as the graph edits allow.

Every algorithm declares what it needs (calibrate/collect.py `StatRequest`): SmoothQuant the
per-channel maxima and sampled rows of LayerNorm outputs, the static scheme a histogram (or
min/max) per QDQ tensor with per-channel means for bias correction, GPTQ the Gram matrix of each
layer's input. They share the first pass.

SmoothQuant changes the graph with what that pass found, so what it changes cannot be measured
in it: the smoothed tensors X / s (the MatMul inputs it rescales) get their histograms in a
second pass over the smoothed graph, cut down to the nodes computing them. Min/max ranges, channel
means and Gram matrices need no second pass: min(X / s) is min over channels of min(X_j) / s_j,
mean(X / s) = mean(X) / s and the Gram matrix of X / s is that of X divided by s s^T. Tensors after
the smoothed MatMuls are unchanged (X' W' = X W up to float rounding) and keep their first-pass
statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit.calibrate import cache
from quantkit.calibrate.collect import RANGE_KINDS, Statistics, StatRequest, StatsCache, gather
from quantkit.calibrate.data import DataSource, complete_batches
from quantkit.calibrate.observers import EXTREME, ChannelObserver, ChannelRangeObserver, GramObserver, MinMaxObserver
from quantkit.config import QuantConfig, RunConfig
from quantkit.errors import ConfigError
from quantkit.quantize import smoothquant
from quantkit.quantize.outlier_split import CHANNEL_RANGE
from quantkit.quantize.scheme import Placement


@dataclass
class CalibrationData:
    """Where the statistics passes read their batches from."""

    source: DataSource
    batch: int
    fixed: bool  # the model has a fixed batch size: incomplete batches are dropped
    limit: int | None  # --calib-samples
    stats_cache: StatsCache | None = None

    @property
    def samples(self) -> int:
        return min(self.source.samples, self.limit or self.source.samples)

    def batches(self) -> Iterable[dict[str, np.ndarray]]:
        return complete_batches(self.source, self.batch, self.limit, self.fixed)

    @classmethod
    def of(cls, cfg: RunConfig, source: DataSource | None, batch: int, fixed: bool) -> CalibrationData | None:
        if source is None:
            return None
        key = cache.fingerprint(cfg.model, source.path, cfg.data.calib_samples, batch) if cfg.data.stats_cache else None
        return cls(source, batch, fixed, cfg.data.calib_samples,
                   StatsCache(cfg.data.stats_cache, key) if cfg.data.stats_cache and key else None)


@dataclass
class Calibration:
    """What the statistics step did, for the report."""

    source: str | None = None
    samples: int = 0
    batch: int = 0
    passes: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    smoothing: list[dict] | None = None  # SmoothQuant's choices, None when not asked
    notes: list[str] = field(default_factory=list)
    batch_bytes: int = 0  # the largest batch of tensors a pass held (Statistics.batch_bytes)


def _describe(requests: list[StatRequest]) -> str:
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def _pass(model: ir.Model, requests: list[StatRequest], data: CalibrationData, workdir: Path, status,
          progress) -> Statistics:
    tensors = len({r.tensor for r in requests})
    status(f"calibrating {tensors} tensor(s) ({_describe(requests)}) on {data.samples} sample(s), batch {data.batch}")

    def batches():
        progress.start("calibrating", data.samples)
        yield from data.batches()
        progress.finish()

    stats = gather(model, requests, batches, workdir, data.stats_cache, progress.advance)
    if any(r.kind in RANGE_KINDS for r in requests) and not any(o.count for o in stats.observers.values()):
        raise ConfigError("calibration saw no data: the calibration set is smaller than one batch "
                          f"of the model's fixed batch size {data.batch}")
    return stats


def _gram_groups(model: ir.Model, grams: list[StatRequest], budget: int) -> list[list[StatRequest]]:
    """Gram requests in groups whose K x K float64 matrices fit `budget` bytes together (a Gram
    larger than the budget gets a group of its own)."""
    values = ir.convenience.create_value_mapping(model.graph)
    groups: list[list[StatRequest]] = [[]]
    used = 0
    for r in grams:
        shape = values[r.tensor].shape if r.tensor in values else None
        k = shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None
        size = 8 * k * k if k else budget
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(r)
        used += size
    return groups


def calibrate(model: ir.Model, placement: Placement, quant: QuantConfig, data: CalibrationData | None,
              workdir: Path, status: Callable[[str], None], progress, gram_budget: int | None = None) -> Calibration:
    """Gather every statistic the placement's schemes and SmoothQuant need, apply SmoothQuant,
    and hand the statistics to the schemes. Returns what was done, for the report.

    gram_budget: GPTQ's Gram matrices (K x K each) are gathered a group at a time within this many
    bytes, one extra pass per group; the scheme rounds those layers and drops the Grams before the
    next pass."""
    t0 = time.perf_counter()
    if quant.smoothquant is not None and data is None:
        raise ConfigError("--smoothquant needs --calib: the smoothing factors come from calibration activations")
    groups = smoothquant.find_groups(model) if quant.smoothquant is not None else []
    smoothed = {g.source.name for g in groups}
    # ranges of tensors SmoothQuant may rescale are derived from its statistics or wait for a second pass
    before = _requests(placement, model, smoothed)
    first = [r for r in before if not (r.tensor in smoothed and r.kind in RANGE_KINDS)]
    first += smoothquant.requests(groups, {r.tensor: r.channel_axis for r in before
                                           if r.tensor in smoothed and r.channel_axis is not None})
    later: list[list[StatRequest]] = []
    grams = [r for r in first if r.kind == "gram"]
    if gram_budget is not None and grams and quant.smoothquant is None:
        gram_groups = _gram_groups(model, grams, gram_budget)
        first, later = [r for r in first if r.kind != "gram"] + gram_groups[0], gram_groups[1:]
    result = Calibration(source=str(data.source.path) if data else None, batch=data.batch if data else 0)
    stats = _pass(model, first, data, workdir, status, progress) if first and data else Statistics()
    if quant.smoothquant is not None:
        status(f"smoothquant: choosing the smoothing of {len(groups)} LayerNorm output(s)")
        alpha = None if quant.smoothquant == "auto" else float(quant.smoothquant)
        result.smoothing, scaled = smoothquant.smooth(model, groups, stats, alpha) if groups else ([], {})
        final = _requests(placement, model, smoothed)
        _derive_grams(stats, scaled)
        _derive_minmax(stats, scaled, final)
        _derive_channel_ranges(stats, scaled, final)
        stats.retain({r.tensor for r in final})
        missing = [r for r in final if not stats.satisfies(r)]
        if missing and data is not None:
            stats.merge(_pass(model, missing, data, workdir, status, progress))
    extra = Statistics()
    for group in later if data is not None else []:
        more = _pass(model, group, data, workdir, status, progress)
        result.notes += placement.use(more)  # rounds these layers; their Grams are dropped
        extra.passes += more.passes
        extra.timings = {k: extra.timings.get(k, 0.0) + v for k, v in more.timings.items()}
        extra.batch_bytes = max(extra.batch_bytes, more.batch_bytes)
    stats.merge(extra)
    result.notes = stats.notes + result.notes + placement.use(stats)
    result.samples, result.passes, result.timings = stats.samples, stats.passes, stats.timings
    result.batch_bytes = stats.batch_bytes
    result.seconds = time.perf_counter() - t0
    return result


def _requests(placement: Placement, model: ir.Model, smoothed: set[str]) -> list[StatRequest]:
    """The placement's statistics, except the outlier-channel split's channel ranges of tensors SmoothQuant
    rescales (it flattens them)."""
    return [r for r in placement.requests(model) if not (r.tensor in smoothed and r.kind == CHANNEL_RANGE)]


def _derive_minmax(stats: Statistics, scaled: dict[str, tuple[str, np.ndarray]], requests: list[StatRequest]) -> None:
    """Min/max ranges (and channel means) of X / s from SmoothQuant's per-channel min/max of X: for
    s > 0 the smallest x / s_j is min(X_j) / s_j (computed as x * (1/s_j), as the graph does). Only
    for --method minmax (a histogram of X / s cannot be rebuilt from X's), and only when every value
    is finite and none reaches the mask-like magnitude."""
    wanted = {r.tensor: r for r in requests if r.kind == "minmax"}
    for new, (old, s) in scaled.items():
        r, ch = wanted.get(new), stats.get(old, "channel")
        if r is None or not isinstance(ch, ChannelObserver) or ch.ch_min is None or ch.nonfinite or ch.extreme:
            continue
        inv = (1.0 / s).astype(np.float32)
        lo, hi = float((ch.ch_min * inv).min()), float((ch.ch_max * inv).max())
        mean = ch.channel_mean()
        if max(-lo, hi) >= EXTREME or (r.channel_axis is not None and mean is None):
            continue
        obs = MinMaxObserver()
        obs.lo, obs.hi, obs.count, obs.bulk_absmax = lo, hi, ch.count, max(0.0, -lo, hi)
        if r.channel_axis is not None:
            obs.channel_axis, obs.channel_sum, obs.channel_n = r.channel_axis, ch.channel_sum * inv, ch.channel_n
        stats.observers[(new, "minmax")] = obs


def _derive_channel_ranges(stats: Statistics, scaled: dict[str, tuple[str, np.ndarray]],
                           requests: list[StatRequest]) -> None:
    """Per-channel ranges of X / s (the outlier-channel split's statistic) from SmoothQuant's of X: with
    s > 0, channel j's min and max are X_j's times 1/s_j."""
    wanted = {r.tensor for r in requests if r.kind == CHANNEL_RANGE}
    for new, (old, s) in scaled.items():
        ch = stats.get(old, "channel")
        if new not in wanted or not isinstance(ch, ChannelObserver) or ch.ch_min is None or ch.ch_max is None:
            continue
        inv = (1.0 / s).astype(np.float32)
        obs = ChannelRangeObserver()
        obs.ch_min, obs.ch_max, obs.count, obs.nonfinite = ch.ch_min * inv, ch.ch_max * inv, ch.count, ch.nonfinite
        obs.lo, obs.hi = float(obs.ch_min.min()), float(obs.ch_max.max())
        stats.observers[(new, CHANNEL_RANGE)] = obs


def _derive_grams(stats: Statistics, scaled: dict[str, tuple[str, np.ndarray]]) -> None:
    """Gram matrices of the smoothed MatMul inputs, from those of the tensors they rescale."""
    for new, (old, s) in scaled.items():
        obs = stats.get(old, "gram")
        if isinstance(obs, GramObserver) and obs.gram is not None:
            stats.observers[(new, "gram")] = smoothquant.scaled_gram(obs, s)
