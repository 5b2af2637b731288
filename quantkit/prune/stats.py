"""One streamed onnxruntime pass that accumulates the statistics pruning needs: the Gram matrix
of the channels of each requested tensor (memory: one batch of outputs plus the matrices)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.errors import ConfigError
from quantkit.graph.ir_edit import with_outputs
from quantkit.prune.refit import Gram


def grams(model: ir.Model, requests: dict[str, tuple[int, int]], batches: Iterable[dict[str, np.ndarray]],
          workdir: Path, reference: ir.Model | None = None, full: bool = True) -> dict[str, Gram]:
    """requests: tensor name -> (channels, channel axis). Returns tensor name -> Gram; with a
    reference model (the unpruned original), also the cross statistics against its tensors;
    full=False: per-channel sums and squares only."""
    out = {name: Gram(c, full) for name, (c, _) in requests.items()}
    if not requests:
        return out
    names = list(requests)
    sess = runtime.session(with_outputs(model, names), workdir, tag="pruning statistics")
    ref = runtime.session(with_outputs(reference, names), workdir, tag="pruning reference") \
        if reference is not None else None
    feeds = {i.name for i in sess.get_inputs()}
    seen = 0
    for batch in batches:
        feed = {k: v for k, v in batch.items() if k in feeds}
        values = runtime.run(sess, names, feed, "the calibration data")
        originals = ref.run(names, feed) if ref is not None else [None] * len(names)
        for name, value, original in zip(names, values, originals):
            out[name].update(value, requests[name][1], original)
        seen += 1
    if seen == 0:
        raise ConfigError("pruning needs calibration data: pass --calib with at least one batch")
    return out


def run_outputs(model: ir.Model, names: list[str], feed: dict[str, np.ndarray], workdir: Path) -> list[np.ndarray]:
    """The values of tensors `names` on one feed (for tests and error measurements)."""
    sess = runtime.session(with_outputs(model, names), workdir, tag="pruning probe")
    feeds = {i.name for i in sess.get_inputs()}
    return sess.run(names, {k: v for k, v in feed.items() if k in feeds})
