"""One streamed onnxruntime pass: expose the tensors that need ranges as extra graph outputs,
run the calibration batches, and feed each batch's values straight into observers. Nothing is
kept between batches but the observers' state."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.calibrate import cache
from quantkit.calibrate.observers import Observer, make_observer

# Where the last collect() spent its time: building the session vs streaming the batches. Read by
# the report, so calibration time can be compared with plain inference over the same data.
TIMINGS: dict[str, float] = {}


@contextmanager
def exposed(model: ir.Model, values: list[ir.Value]):
    """Temporarily make `values` graph outputs (onnxruntime infers any missing types)."""
    outputs = model.graph.outputs
    added = [v for v in values if not v.is_graph_output()]
    outputs.extend(added)
    try:
        yield
    finally:
        for v in added:
            outputs.remove(v)


def collect(model: ir.Model, values: list[ir.Value], batches: Iterable[dict[str, np.ndarray]],
            kind: str, workdir: Path, on_batch: Callable[[int], None] | None = None,
            channel_axes: dict[str, int] | None = None) -> tuple[dict[str, Observer], int]:
    """Returns the observers by tensor name and the number of samples seen. Tensors named in
    channel_axes also get per-channel means along that axis."""
    observers = {v.name: make_observer(kind) for v in values}
    for name, axis in (channel_axes or {}).items():
        if name in observers:
            observers[name].channel_axis = axis
    if not values:
        return observers, 0
    samples = 0
    names = [v.name for v in values]
    t0 = time.perf_counter()
    with exposed(model, values):
        sess = runtime.session(model, workdir, tag="calibration")
    feeds = {i.name for i in sess.get_inputs()}
    TIMINGS["session_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    def observe(outs):
        for name, out in zip(names, outs):
            observers[name].update(out)

    # Observers digest batch k on a worker thread while onnxruntime (which releases the GIL)
    # computes batch k+1: at most two batches of outputs are alive at once.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            outs = runtime.run(sess, names, {k: v for k, v in batch.items() if k in feeds}, "the calibration data")
            if pending is not None:
                pending.result()
            pending = pool.submit(observe, outs)
            n = len(next(iter(batch.values())))
            samples += n
            if on_batch is not None:
                on_batch(n)
        if pending is not None:
            pending.result()
    TIMINGS["pass_seconds"] = time.perf_counter() - t0
    return observers, samples


def statistics(model: ir.Model, values: list[ir.Value], batches: Callable[[], Iterable[dict]], kind: str,
               workdir: Path, cache_path: Path | None = None, cache_key: dict | None = None,
               on_batch: Callable[[int], None] | None = None,
               channel_axes: dict[str, int] | None = None) -> tuple[dict[str, Observer], int, list[str]]:
    """Observers for `values`, from the stats cache where it has them, else from one pass over
    `batches()` for the missing ones (which are then added to the cache).
    Returns observers, samples run through the model in this call, and notes for the report."""
    notes: list[str] = []
    cached: dict[str, Observer] = {}
    if cache_path is not None:
        kind = "histogram"  # any method can be applied to cached histograms later
        cached, reason = cache.load(cache_path, cache_key)
        if reason:
            notes.append(reason)
    channel_axes = channel_axes or {}
    missing = [v for v in values if v.name not in cached
               or (v.name in channel_axes and cached[v.name].channel_mean() is None)]
    observers, samples = collect(model, missing, batches(), kind, workdir, on_batch, channel_axes) \
        if missing else ({}, 0)
    if cache_path is not None:
        if values and not missing:
            notes.append(f"activation statistics read from {cache_path}; no forward pass needed")
        elif missing:
            cache.save(cache_path, cache_key, {**cached, **observers})
            notes.append(f"activation statistics for {len(missing)} tensor(s) saved to {cache_path}")
    observers.update({v.name: cached[v.name] for v in values if v.name in cached and v.name not in observers})
    return observers, samples, notes
