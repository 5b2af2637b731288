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
          workdir: Path, full: bool = True) -> dict[str, Gram]:
    """requests: tensor name -> (channels, channel axis). Returns tensor name -> Gram (full=False:
    per-channel sums and squares only)."""
    out = {name: Gram(c, full) for name, (c, _) in requests.items()}
    if not requests:
        return out
    names = list(requests)
    sess = runtime.session(with_outputs(model, names), workdir, tag="pruning statistics")
    feeds = {i.name for i in sess.get_inputs()}
    seen = 0
    for batch in batches:
        feed = {k: v for k, v in batch.items() if k in feeds}
        for name, value in zip(names, runtime.run(sess, names, feed, "the calibration data")):
            out[name].update(value, requests[name][1])
        seen += 1
    if seen == 0:
        raise ConfigError("pruning needs calibration data: pass --calib with at least one batch")
    return out
