"""One streamed onnxruntime pass for every statistic the algorithms asked for.

Algorithms declare what they need as `StatRequest`s: an observer kind from calibrate/observers.py
(minmax or histogram ranges, SmoothQuant's per-channel maxima and sampled rows, GPTQ's Gram
matrices; a new kind, e.g. per-layer output errors, is one registered observer) on a named
tensor, optionally with per-channel means (bias correction). `collect` exposes every requested
tensor as an output of a copy of the model cut down to what computes them, runs the calibration
batches once, and feeds each batch's values straight into all the observers of that tensor.
Nothing is kept between batches but the observers' state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.calibrate import cache
from quantkit.calibrate.observers import HistogramObserver, Observer, make_observer
from quantkit.graph.ir_edit import with_outputs

RANGE_KINDS = ("minmax", "histogram")


@dataclass(frozen=True)
class StatRequest:
    tensor: str
    kind: str  # an observer name registered in calibrate/observers.py
    channel_axis: int | None = None  # also keep per-channel means along this axis
    # Paired statistics: the observer also receives this tensor's values of the same batch
    # (`update_pair(x, reference)`), e.g. a layer's output error against its float twin.
    reference: str | None = None


@dataclass
class Statistics:
    """Observers by (tensor, kind), how many samples went through the model, and where the time
    went (session creation vs the streamed passes), summed over passes."""

    observers: dict[tuple[str, str], Observer] = field(default_factory=dict)
    samples: int = 0
    passes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    batch_bytes: int = 0  # the largest batch of exposed tensors a pass held (it holds up to two at once)

    def get(self, tensor: str, kind: str) -> Observer | None:
        return self.observers.get((tensor, kind))

    def satisfies(self, r: StatRequest) -> bool:
        obs = self.get(r.tensor, r.kind)
        return obs is not None and (r.channel_axis is None or obs.channel_mean() is not None)

    def of_kind(self, kind: str) -> dict[str, Observer]:
        return {t: o for (t, k), o in self.observers.items() if k == kind}

    def retain(self, tensors: set[str]) -> None:
        """Forget the statistics of tensors no longer needed (e.g. before SmoothQuant rescaled them)."""
        self.observers = {key: o for key, o in self.observers.items() if key[0] in tensors}

    def merge(self, other: Statistics) -> None:
        self.observers.update(other.observers)
        self.samples = max(self.samples, other.samples)
        self.batch_bytes = max(self.batch_bytes, other.batch_bytes)
        self.passes += other.passes
        for k, v in other.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        self.notes += other.notes


def _observers(requests: list[StatRequest]) -> dict[tuple[str, str], Observer]:
    observers: dict[tuple[str, str], Observer] = {}
    for r in requests:
        obs = observers.setdefault((r.tensor, r.kind), make_observer(r.kind))
        if r.channel_axis is not None:
            obs.channel_axis = r.channel_axis
    return observers


def collect(model: ir.Model, requests: list[StatRequest], batches: Iterable[dict[str, np.ndarray]],
            workdir: Path, on_batch: Callable[[int], None] | None = None) -> Statistics:
    """Run `batches` through the model once and compute every requested statistic."""
    stats = Statistics(_observers(requests))
    if not requests:
        return stats
    names = list(dict.fromkeys([r.tensor for r in requests] + [r.reference for r in requests if r.reference]))
    readers = {n: [o for (t, _), o in stats.observers.items() if t == n] for n in names}
    pairs = [(stats.observers[(r.tensor, r.kind)], r.tensor, r.reference) for r in requests if r.reference]
    t0 = time.perf_counter()
    sess = runtime.session(with_outputs(model, names), workdir, tag="calibration")
    feeds = {i.name for i in sess.get_inputs()}
    stats.timings["session_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    def observe(outs):
        values = dict(zip(names, outs))
        for name, out in values.items():
            for obs in readers[name]:
                if not any(obs is o for o, _, _ in pairs):
                    obs.update(out)
        for obs, name, ref in pairs:
            obs.update_pair(values[name], values[ref])

    # Observers digest batch k on a worker thread while onnxruntime (which releases the GIL)
    # computes batch k+1: at most two batches of outputs are alive at once.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            outs = runtime.run(sess, names, {k: v for k, v in batch.items() if k in feeds}, "the calibration data")
            stats.batch_bytes = max(stats.batch_bytes, sum(getattr(o, "nbytes", 0) for o in outs))
            if pending is not None:
                pending.result()
            pending = pool.submit(observe, outs)
            n = len(next(iter(batch.values())))
            stats.samples += n
            if on_batch is not None:
                on_batch(n)
        if pending is not None:
            pending.result()
    stats.timings["pass_seconds"] = time.perf_counter() - t0
    stats.passes = 1
    return stats


@dataclass(frozen=True)
class StatsCache:
    """--stats-cache: range histograms saved after a pass and reused by a rerun on the same
    model file and data (any range method can be applied to a cached histogram)."""

    path: Path
    key: dict


def gather(model: ir.Model, requests: list[StatRequest], batches: Callable[[], Iterable[dict]], workdir: Path,
           stats_cache: StatsCache | None = None, on_batch: Callable[[int], None] | None = None) -> Statistics:
    """Every requested statistic: from the stats cache where it has it, else from one pass over
    `batches()` (the pass is skipped when nothing is missing)."""
    if stats_cache is None:
        return collect(model, requests, batches(), workdir, on_batch) if requests else Statistics()
    requests = [StatRequest(r.tensor, "histogram", r.channel_axis) if r.kind in RANGE_KINDS else r
                for r in requests]
    cached, reason = cache.load(stats_cache.path, stats_cache.key)
    have = Statistics({(t, "histogram"): o for t, o in cached.items()})
    missing = [r for r in requests if not have.satisfies(r)]
    stats = collect(model, missing, batches(), workdir, on_batch) if missing else Statistics()
    stats.notes += [reason] if reason else []
    ranges = [r for r in requests if r.kind == "histogram"]
    if ranges and stats.passes and not any(r.kind == "histogram" for r in missing):
        kinds = ", ".join(sorted({r.kind.partition(":")[0] for r in missing}))
        stats.notes.append(f"activation histograms read from {stats_cache.path}; the cache holds no other statistic, "
                           f"so one pass gathered the rest ({kinds})")
    if ranges and not stats.passes:
        stats.notes.append(f"activation statistics read from {stats_cache.path}; no forward pass needed")
    elif any(r.kind == "histogram" for r in missing):
        new = {t: o for t, o in stats.of_kind("histogram").items() if isinstance(o, HistogramObserver)}
        cache.save(stats_cache.path, stats_cache.key, {**cached, **new})
        stats.notes.append(f"activation statistics for {sum(r.kind == 'histogram' for r in missing)} tensor(s) "
                           f"saved to {stats_cache.path}")
    for r in ranges:
        if (r.tensor, "histogram") not in stats.observers:
            stats.observers[(r.tensor, "histogram")] = cached[r.tensor]
    return stats
