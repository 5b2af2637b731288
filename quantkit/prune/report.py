"""What pruning changed: parameters and multiply-accumulates before/after, and the text lines."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def cost(model: ir.Model, feed: dict[str, np.ndarray]) -> dict:
    """Parameters (elements of every float initializer) and multiply-accumulates of the Conv /
    MatMul / Gemm nodes for one sample of `feed`'s shapes (shapes inferred by onnx with the
    inputs fixed to those shapes)."""
    params = sum(int(np.prod(v.const_value.shape.numpy())) for v in model.graph.initializers.values()
                 if v.const_value is not None and v.const_value.dtype.is_floating_point())
    proto = ir.serde.serialize_model(model)
    for t in proto.graph.initializer:  # shapes need no weights: keep the copy small
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.DEFAULT
        t.ClearField("external_data")
    del proto.graph.value_info[:]
    for i in proto.graph.input:
        if i.name in feed:
            dims = i.type.tensor_type.shape.dim
            for d, n in zip(dims, (1, *feed[i.name].shape[1:])):
                d.Clear()
                d.dim_value = int(n)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # onnx raises several types; the cost is then reported as unknown
        return {"params": params, "macs": None}
    return {"params": params, "macs": _macs(inferred)}


def _dims(vi) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None if any(d is None for d in dims) else dims


def _macs(proto: onnx.ModelProto) -> int | None:
    shapes = {vi.name: _dims(vi) for vi in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    shapes.update({t.name: list(t.dims) for t in proto.graph.initializer})
    total = 0
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
        a = shapes.get(node.input[0])
        if out is None or w is None or a is None:
            return None
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            total += int(np.prod(out)) * a[0 if trans_a else -1]
        else:
            total += int(np.prod(out)) * a[-1]
    return total


def summary(before: dict, after: dict) -> dict:
    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    return {"params_before": before["params"], "params_after": after["params"],
            "macs_before": before["macs"], "macs_after": after["macs"],
            "params_ratio": ratio(after["params"], before["params"]),
            "macs_ratio": ratio(after["macs"], before["macs"])}


def render_lines(section: dict | None) -> list[str]:
    """The pruning block of the text report."""
    if not section:
        return []
    lines = [f"  pruning   {section['structure']} {section['ratio']:.0%}"
             + (f" ({section['method']})" if section.get("method") else "")
             + f": params {section['params_before']:,} -> {section['params_after']:,}"]
    if section.get("macs_before") and section.get("macs_after"):
        lines.append(f"            MACs/sample {section['macs_before']:,} -> {section['macs_after']:,} "
                     f"({section['macs_after'] / section['macs_before']:.2f}x)")
    for layer in section["layers"]:
        lines.append(f"    {layer['layer']:<44} {layer.get('before', '')} -> {layer.get('after', '')}"
                     f"  ({layer['ratio']:.0%} pruned)")
    for s in section["skipped"]:
        lines.append(f"    left whole: {s['layer']}: {s['reason']}")
    return lines
