"""Find tensors that carry additive attention masks: values like float32 min, -1e9, -1e4 or -inf
added to attention scores. Quantizing any of them spends every level on the mask and none on the
scores, which is how static int8 wrecks exported transformers.

Seeds are small constants holding such values; the mask flows forward through elementwise and
shape ops (Sub, Mul, Add, Where, Expand, Cast, Unsqueeze, ...) and stops at Softmax, whose
output is an ordinary [0, 1] tensor again.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import const_array, const_spec

MASK_VALUE = -1e4  # HF's older BERTs use -10000.0; newer ones float32 min
CARRIERS = {"Add", "Sub", "Mul", "Where", "Expand", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Transpose",
            "Concat", "Slice", "Max", "Min", "Neg", "Tile", "Gather", "Identity", "Div"}


def _mask_constant(v: ir.Value) -> float | None:
    spec = const_spec(v)  # weights (large, maybe on disk) are never read: only small float constants
    if spec is None or spec.size > 16 or not np.issubdtype(spec.dtype, np.floating):
        return None
    arr = const_array(v)
    low = float(np.min(arr)) if arr.size else 0.0
    return low if low <= MASK_VALUE else None


def _seeds(graph: ir.Graph):
    for v in graph.initializers.values():
        low = _mask_constant(v)
        if low is not None:
            yield v, low
    for node in graph:
        if node.op_type == "ConstantOfShape" and "value" in node.attributes:
            arr = node.attributes["value"].as_tensor().numpy()
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.min()) <= MASK_VALUE:
                yield node.outputs[0], float(arr.min())


def mask_tensors(model: ir.Model) -> dict[str, str]:
    """Tensor name -> why it stays float, for every tensor downstream of a mask constant."""
    found: dict[str, str] = {}
    queue: deque = deque()
    for value, low in _seeds(model.graph):
        queue.append((value, f"carries an additive attention mask (constant {low:.3g} in '{value.name}')"))
    while queue:
        value, why = queue.popleft()
        for use in value.uses():
            node = use.node
            if node.graph is not model.graph or node.op_type not in CARRIERS or node.domain != "":
                continue
            for out in node.outputs:
                if out.name and out.name not in found:
                    found[out.name] = why
                    queue.append((out, why))
    return found
