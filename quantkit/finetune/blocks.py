"""Block outputs for distillation: intermediate values the quantized graph and the fp32 model both
compute under the same name, which the loss also matches (loop.py), so every block gets a direct
signal instead of only what reaches it back through the later ones.

Chosen: the outputs of LayerNormalization nodes, the ends of a transformer's sublayers (their names
survive quantization, and pruning FFN neurons or heads leaves their width). Models without them
(CNNs) train on the outputs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime

Teacher = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def block_outputs(qmodel: ir.Model, fp32_path: Path, workdir: Path,
                  threads: int | None = None) -> tuple[list[str], Teacher | None]:
    """The names of the block outputs and a function giving the fp32 model's values of them (the
    unpruned model's with --prune: `fp32_path` is the model as loaded, before any edit)."""
    ours = {n.outputs[0].name for n in qmodel.graph if n.op_type == "LayerNormalization"}
    if not ours:
        return [], None
    fp32 = ir.load(fp32_path)
    values = [n.outputs[0] for n in fp32.graph if n.op_type == "LayerNormalization" and n.outputs[0].name in ours]
    if not values:
        return [], None
    fp32.graph.outputs.clear()
    fp32.graph.outputs.extend(values)
    sess = runtime.session(fp32, workdir, tag="fp32 block outputs", threads=threads)
    names = [v.name for v in values]
    return names, lambda feed: sess.run(names, feed)
