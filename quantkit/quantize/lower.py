"""Lowering for onnxruntime (`--format ort`, the default): rewrites that keep the model's numbers and
make onnxruntime's CPU kernels faster. `lower(model)` applies all three.

1. A MatMul's bias goes inside its integer kernel.

onnxruntime runs `DequantizeLinear -> MatMul` (static int8) as `MatMulIntegerToFloat` and our dynamic int8
as `DynamicQuantizeMatMul`, but it leaves the bias `Add` that torch's Linear exports after the MatMul as a
node of its own: one more pass over the output, and a `BiasGelu` in front of the encoders' GELU where a
plain `Gelu` would do. Both kernels take the bias as an input, so it is folded into them here:

  DynamicQuantizeMatMul(A, Wq, s, zp) -> Add(bias)       =>  DynamicQuantizeMatMul(A, Wq, s, zp, bias)
  DQ(Aq) -> MatMul <- DQ(Wq); -> Add(bias)               =>  MatMulIntegerToFloat(Aq, Wq, sa, sw, za, zw, bias)

`MatMulIntegerToFloat` computes (Aq - za)(Wq - zw) * sa * sw + bias, which is what the QDQ graph means.
2. Softmax over additively masked scores gets a floor. Exported encoders add float32-min (or -1e4) to the
   scores of padding keys; onnxruntime's Softmax then computes exp() of values far below -87, whose
   underflow runs through the CPU's slow denormal path: a (8, 12, 50, 50) batch with 30 padding keys per
   row takes 35x as long as unmasked, 5x as long as with the floor below (benchmarks/softmax_mask.py),
   and Softmax was the costliest op of a quantized MiniLM. Raising every score to at
   least its row's max - 80 changes no probability by more than e^-80 (1.8e-35, a normal float) and keeps
   every exp() out of the denormal range:

     Softmax(x)  =>  Softmax(Max(x, ReduceMax(x, last axis) - 80))

3. A weight-only convolution's weight is decoded by Cast and Mul instead of DequantizeLinear.
   onnxruntime's constant folding leaves every DequantizeLinear in place (it keeps QDQ groups for
   its fusions), so `DequantizeLinear(int8 weight) -> Conv` with a float input dequantizes the
   weight on every run and, worse, runs the convolution without the weight prepacking a constant
   weight gets: 1.89x as long as the float model on a stack of 3x3 convolutions (`python
   benchmarks/conv_weight_decode.py`: 170 ms against 90 ms, Cast/Mul 91 ms, load 10). Cast and
   Mul of initializers are folded when the session is created, so the file keeps int8 codes and
   the convolution runs at float speed, on the same float weights (q - zp) * scale:

     DequantizeLinear(Wq, s, zp) -> Conv   =>   Mul(Cast(Wq) - Cast(zp), s) -> Conv

   Only where the convolution's data input is not itself dequantized (that is static int8, which
   onnxruntime fuses into QLinearConv).

With `--format qdq` nothing is lowered (the file stays portable QDQ).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import Editor, bias_add, const_array, drop_unused
from quantkit.graph.masks import mask_tensors

MS_DOMAIN = "com.microsoft"
SOFTMAX_FLOOR = 80.0  # below the row max: e^-80 is still a normal float32


def lower(model: ir.Model) -> None:
    fold_biases(model)
    floor_masked_softmax(model)
    foldable_conv_weights(model)


CONV_OPS = ("Conv", "ConvTranspose")


def foldable_conv_weights(model: ir.Model) -> int:
    """Rewrite the DequantizeLinear of every weight-only convolution weight as Cast/Sub/Mul of
    initializers, which onnxruntime folds into a float weight when it loads the model; returns how many."""
    edit = Editor(model.graph)
    done = 0
    for node in list(model.graph):
        codes = _weight_only_conv_codes(node)
        if codes is None:
            continue
        q, scale, zp = codes
        axis = node.attributes.get_int("axis", 1) % q.ndim if scale.ndim == 1 else 0
        shape = [1] * q.ndim
        if scale.ndim == 1:
            shape[axis] = -1
        base = node.name or node.outputs[0].name
        cast = edit.node("Cast", [node.inputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_cast")
        steps = [cast]
        if zp is not None and np.any(zp != 0):
            steps.append(edit.node("Sub", [steps[-1].outputs[0], edit.initializer(
                f"{base}_zero", zp.astype(np.float32).reshape(shape))], name=f"{base}_centre"))
        steps.append(edit.node("Mul", [steps[-1].outputs[0], edit.initializer(
            f"{base}_step", scale.astype(np.float32).reshape(shape))], name=f"{base}_scaled"))
        model.graph.insert_before(node, steps)
        out = node.outputs[0]
        steps[-1].outputs[0].type, steps[-1].outputs[0].shape = out.type, out.shape
        out.replace_all_uses_with(steps[-1].outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        done += 1
    if done:
        drop_unused(model)
    return done


def _weight_only_conv_codes(node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(codes, scale, zero point) of a DequantizeLinear of initializers read only as the weight of
    convolutions whose data input is float (not dequantized); None for anything else."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if node.attributes.get_int("block_size", 0) or node.outputs[0].is_graph_output():
        return None
    q, scale = const_array(node.inputs[0]), const_array(node.inputs[1])
    zp = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if q is None or scale is None or q.dtype not in (np.int8, np.uint8) or scale.ndim > 1:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and zp is None:
        return None
    uses = list(node.outputs[0].uses())
    if not uses or any(u.node.op_type not in CONV_OPS or u.idx != 1 or _dq(u.node.inputs[0]) is not None
                       for u in uses):
        return None
    return q, scale, zp


def floor_masked_softmax(model: ir.Model) -> int:
    """Give every Softmax over the last axis of a mask-carrying tensor (graph/masks.py) its floor;
    returns how many."""
    masked = mask_tensors(model)
    edit = Editor(model.graph)
    new_reduce = model.opset_imports.get("", 1) >= 18  # ReduceMax takes its axes as an input from opset 18
    done = 0
    for node in list(model.graph):
        x = node.inputs[0] if node.op_type == "Softmax" and node.domain in ("", "ai.onnx") else None
        if x is None or x.name not in masked or not _last_axis(node, x, model.opset_imports.get("", 1)):
            continue
        if x.dtype not in (None, ir.DataType.FLOAT):
            continue
        base = node.name or x.name
        axes = edit.initializer(f"{base}_floor_axes", np.array([-1], np.int64))
        row_max = edit.node("ReduceMax", [x, axes] if new_reduce else [x],
                            {"keepdims": 1} if new_reduce else {"axes": [-1], "keepdims": 1}, name=f"{base}_row_max")
        floor = edit.node("Sub", [row_max.outputs[0], edit.initializer(f"{base}_floor", np.float32(SOFTMAX_FLOOR))],
                          name=f"{base}_floor")
        raised = edit.node("Max", [x, floor.outputs[0]], name=f"{base}_floored")
        model.graph.insert_before(node, [row_max, floor, raised])
        node.replace_input_with(0, raised.outputs[0])
        done += 1
    return done


def _last_axis(node: ir.Node, x: ir.Value, opset: int) -> bool:
    """Softmax normalizes over the last axis only (before opset 13 it flattens from `axis` on, so
    only an axis that is the last one qualifies)."""
    axis = node.attributes.get_int("axis", -1 if opset >= 13 else 1)
    if axis == -1:
        return True
    rank = len(x.shape) if x.shape is not None else None
    return rank is not None and axis == rank - 1


def fold_biases(model: ir.Model) -> int:
    """Fold every constant bias Add into the integer MatMul before it; returns how many were folded."""
    folded = 0
    for node in list(model.graph):
        found = _bias_of(node)
        if found is None:
            continue
        add, bias = found
        if node.op_type == "DynamicQuantizeMatMul":
            inputs = [*node.inputs, *[None] * (4 - len(node.inputs))][:4]
        else:
            inputs = _static_inputs(node)
        new = ir.node(node.op_type if node.op_type == "DynamicQuantizeMatMul" else "MatMulIntegerToFloat",
                      [*inputs, bias], domain=MS_DOMAIN, name=node.name)
        model.graph.insert_after(add, new)
        out = add.outputs[0]
        new.outputs[0].type, new.outputs[0].shape = out.type, out.shape
        out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        name = out.name
        model.graph.remove([add, node], safe=True)
        new.outputs[0].name = name
        folded += 1
    if folded:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        drop_unused(model)
    return folded


def _bias_of(node: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """The Add right after an integer MatMul that adds a constant float32 vector of its width."""
    if (node.domain, node.op_type) not in (("", "MatMul"), (MS_DOMAIN, "DynamicQuantizeMatMul")):
        return None
    if node.op_type == "DynamicQuantizeMatMul" and len(node.inputs) > 4:
        return None  # already has a bias
    found = bias_add(node)
    if found is None or found[0].domain not in ("", "ai.onnx"):
        return None
    add, idx = found
    b = const_array(add.inputs[idx])
    weight = const_array(node.inputs[1]) if node.op_type == "DynamicQuantizeMatMul" else _weight_codes(node)
    if b is None or b.dtype != np.float32 or weight is None or weight.ndim != 2 or weight.shape[1] != b.shape[0]:
        return None
    return add, add.inputs[idx]


def _dq(value: ir.Value | None) -> ir.Node | None:
    src = value.producer() if value is not None else None
    return src if src is not None and src.op_type == "DequantizeLinear" and src.domain in ("", "ai.onnx") else None


def _weight_codes(node: ir.Node) -> np.ndarray | None:
    """A MatMul's int8/uint8 (K, N) weight behind a per-tensor or per-column DequantizeLinear."""
    dq_a, dq_w = _dq(node.inputs[0]), _dq(node.inputs[1])
    if dq_a is None or dq_w is None or dq_w.attributes.get_int("block_size", 0) != 0:
        return None
    codes = const_array(dq_w.inputs[0])
    if codes is None or codes.ndim != 2 or codes.dtype not in (np.int8, np.uint8):
        return None
    scale = const_array(dq_w.inputs[1])
    if scale is None or (scale.ndim == 1 and dq_w.attributes.get_int("axis", 1) % 2 != 1) or scale.ndim > 1:
        return None
    a_scale = const_array(dq_a.inputs[1])
    if a_scale is None or a_scale.size != 1 or dq_a.inputs[0].dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        return None
    return codes


def _static_inputs(node: ir.Node) -> list[ir.Value | None]:
    """MatMulIntegerToFloat's A, B, a_scale, b_scale, a_zero_point, b_zero_point, from the two DequantizeLinear."""
    dq_a, dq_w = _dq(node.inputs[0]), _dq(node.inputs[1])
    assert dq_a is not None and dq_w is not None  # checked by _bias_of
    a_zp = dq_a.inputs[2] if len(dq_a.inputs) > 2 else None
    w_zp = dq_w.inputs[2] if len(dq_w.inputs) > 2 else None
    return [dq_a.inputs[0], dq_w.inputs[0], dq_a.inputs[1], dq_w.inputs[1], a_zp, w_zp]
