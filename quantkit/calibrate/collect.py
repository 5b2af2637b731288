"""One streamed onnxruntime pass: expose the tensors that need ranges as extra graph outputs,
run the calibration batches, and feed each batch's values straight into observers. Nothing is
kept between batches but the observers' state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.calibrate.observers import Observer, make_observer


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
            method: str, workdir: Path,
            on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, Observer], int]:
    """Returns the observers by tensor name and the number of samples seen."""
    observers = {v.name: make_observer(method) for v in values}
    if not values:
        return observers, 0
    samples = 0
    names = [v.name for v in values]
    with exposed(model, values):
        sess = runtime.session(model, workdir, tag="calibration")
    feeds = {i.name for i in sess.get_inputs()}
    for batch in batches:
        outs = sess.run(names, {k: v for k, v in batch.items() if k in feeds})
        for name, out in zip(names, outs):
            observers[name].update(out)
        n = len(next(iter(batch.values())))
        samples += n
        if on_batch is not None:
            on_batch(n)
    return observers, samples
