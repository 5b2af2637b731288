"""Types and shapes of intermediate tensors: ONNX shape inference first, then, for whatever it
could not type, one real onnxruntime run on a calibration batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from quantkit import runtime
from quantkit.graph.ir_edit import with_outputs


def untyped_values(model: ir.Model) -> list[ir.Value]:
    return [o for node in model.graph for o in node.outputs if o.name and o.type is None]


# ops whose outputs are sequences of tensors; shape inference may type them as plain tensors
SEQUENCE_OPS = {"SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase"}


def infer(model: ir.Model) -> None:
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    for node in model.graph:
        if node.op_type in SEQUENCE_OPS and node.domain in ("", "ai.onnx"):
            for out in node.outputs:
                if isinstance(out.type, ir.TensorType):
                    out.type, out.shape = ir.SequenceType(out.type), None


def fill_from_run(model: ir.Model, batch: dict[str, np.ndarray], workdir: Path) -> int:
    """Run one batch with every untyped tensor exposed and record the dtype and rank observed.
    Returns how many tensors were typed this way."""
    missing = untyped_values(model)
    if not missing:
        return 0
    sess = runtime.session(with_outputs(model, [v.name for v in missing]), workdir, tag="shape-probe")
    feeds = {i.name for i in sess.get_inputs()}
    outs = runtime.run(sess, [v.name for v in missing], {k: v for k, v in batch.items() if k in feeds},
                       "a calibration batch")
    for v, out in zip(missing, outs):
        if isinstance(out, list):  # a sequence (SplitToSequence...): typed by its elements, no shape
            elem = np.asarray(out[0]).dtype if out else np.dtype(np.float32)
            v.type = ir.SequenceType(ir.TensorType(ir.DataType.from_numpy(elem)))
            continue
        out = np.asarray(out)
        v.type = ir.TensorType(ir.DataType.from_numpy(out.dtype))
        # the batch dimension is data-dependent; keep only the rank and the other dims
        v.shape = ir.Shape([None, *out.shape[1:]] if out.ndim else [])
    return len(missing)

