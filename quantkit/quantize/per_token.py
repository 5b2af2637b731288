"""Per-token dynamic int8 for MatMuls whose input has a few tokens with huge values (the GELU
output before an encoder's FFN down-projection: one neuron reaches 20x the rest on ~1% of tokens).
Per-tensor dynamic int8 lets those tokens set the step for every token; here each row (token) of
the input gets its own scale, computed at run time with standard ops:

    s   = max(|x|, over the last axis) / 127              (one scale per token)
    x_q = uint8(round(x / s) + 128)                       (symmetric, zero point 128)
    y   = float(MatMulInteger(x_q, W_int8, 128)) * s * w_scale

onnxruntime runs the uint8 x int8 MatMulInteger on its fast integer GEMM; the elementwise steps
cost a few passes over the input. Used by the accuracy budget as an alternative between
per-tensor dynamic int8 and weight-only int8; the weight is stored int8 per output column.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import Editor
from quantkit.quantize.plan import QuantizedOp, SchemeName
from quantkit.quantize.scheme import RewriteResult, Scheme

TINY = 1e-12  # floor of a token's scale: an all-zero row quantizes to zeros, not NaN


class PerTokenScheme(Scheme):
    name = SchemeName.PER_TOKEN

    def refuse(self, op: QuantizedOp) -> str | None:
        node = op.node
        # judged from the plan, not the node: the accuracy search asks about ops already rewritten to
        # static int8, whose weight input is then a DequantizeLinear (planned MatMul weights are 2-D)
        if not op.weighted or node.op_type != "MatMul":
            return "per-token int8 rewrites MatMuls with a constant 2-D weight"
        return None

    def rewrite(self, model: ir.Model, ops: list[QuantizedOp], edit: Editor) -> RewriteResult:
        result = RewriteResult()
        shared = {
            "axis": edit.initializer("per_token_axis", np.array([-1], dtype=np.int64)),
            "inv": edit.initializer("per_token_inv127", np.float32(1 / 127)),
            "tiny": edit.initializer("per_token_tiny", np.float32(TINY)),
            "offset": edit.initializer("per_token_offset", np.float32(128)),
            "zp": edit.initializer("per_token_zero_point", np.uint8(128)),
        }
        weights: dict[str, tuple[ir.Value, ir.Value]] = {}
        new_reduce = model.opset_imports.get("", 1) >= 18  # ReduceMax takes its axes as an input from opset 18
        for op in ops:
            self._matmul(edit, op, shared, weights, new_reduce)
            result.quantized_nodes.append(op.key)
        return result

    def _matmul(self, edit: Editor, op: QuantizedOp, shared: dict[str, ir.Value],
                weights: dict[str, tuple[ir.Value, ir.Value]], new_reduce: bool) -> None:
        node, w_in = op.node, op.node.inputs[1]
        if w_in.name not in weights:
            q, scale, _ = self.memo.quantize(w_in.const_value, 1)
            weights[w_in.name] = (edit.initializer(f"{w_in.name}_quantized", q),
                                  edit.initializer(f"{w_in.name}_scale", scale.astype(np.float32)))
        wq, ws = weights[w_in.name]
        base = op.key
        chain: list[ir.Node] = []

        def step(op_type: str, inputs: list, attrs: dict | None = None) -> ir.Value:
            n = edit.node(op_type, inputs, attrs, name=f"{base}_per_token_{op_type}")
            chain.append(n)
            return n.outputs[0]

        x = node.inputs[0]
        magnitude = step("Abs", [x])
        amax = (step("ReduceMax", [magnitude, shared["axis"]], {"keepdims": 1}) if new_reduce
                else step("ReduceMax", [magnitude], {"axes": [-1], "keepdims": 1}))
        token_scale = step("Max", [step("Mul", [amax, shared["inv"]]), shared["tiny"]])
        codes = step("Add", [step("Round", [step("Div", [x, token_scale])]), shared["offset"]])
        xq = step("Cast", [codes], {"to": ir.DataType.UINT8})
        acc = step("MatMulInteger", [xq, wq, shared["zp"]])
        wide = step("Cast", [acc], {"to": ir.DataType.FLOAT})
        # the token scale first, the column scale last: onnxruntime's MatMulIntegerToFloat fusion takes
        # MatMulInteger -> Cast -> Mul(Mul(a_scale, b_scale)) for a per-tensor a_scale and would drop the
        # per-token axis of ours
        per_token = step("Mul", [wide, token_scale])
        edit.graph.insert_before(node, chain)
        edit.replace_node(node, edit.node("Mul", [per_token, ws], name=f"{base}_per_token_int8"))
