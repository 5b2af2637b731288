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
from quantkit.report.compare import padding_mask


def position_weights(batch: dict[str, np.ndarray], x: np.ndarray, axis: int) -> np.ndarray | None:
    """1 for the real tokens and 0 for the padded ones of a (batch, sequence, channels) tensor, in
    Gram.update's row order, when the batch has a 0/1 attention mask that lines up with it; else None.
    Padded positions' outputs are what a masked reader (mean pooling, a masked loss) never uses, and
    their activations are unlike the real tokens': counted, they take the refit's capacity."""
    if x.ndim != 3 or axis % x.ndim != 2:
        return None
    mask = padding_mask(batch, x)
    return None if mask is None else mask.reshape(-1).astype(np.float32)


def grams(model: ir.Model, requests: dict[str, tuple[int, int]], batches: Iterable[dict[str, np.ndarray]],
          workdir: Path, full: bool = True, real_tokens: bool = False) -> dict[str, Gram]:
    """requests: tensor name -> (channels, channel axis). Returns tensor name -> Gram (full=False:
    per-channel sums and squares only; real_tokens: padded positions weigh 0, position_weights)."""
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
            axis = requests[name][1]
            out[name].update(value, axis, position_weights(batch, value, axis) if real_tokens else None)
        seen += 1
    if seen == 0:
        raise ConfigError("pruning needs calibration data: pass --calib with at least one batch")
    return out
