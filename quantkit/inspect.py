"""`quantkit inspect`: what quantkit sees in a model before doing anything. The same loading,
canonicalization, mask tracing and plan as `quantize` (read-only use of those modules), without
calibrating or rewriting: inputs and their batch axes, op counts, the placement it would choose
with the reasons for every node left float, weight bytes by op type, and the expected size
after int8 and int4.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit.config import Activations, QuantConfig, RunConfig, Weights
from quantkit.graph import shapes
from quantkit.graph.canonicalize import canonicalize
from quantkit.graph.ir_edit import const_array
from quantkit.graph.masks import mask_tensors
from quantkit.quantize import weight_only
from quantkit.quantize.plan import OpKind
from quantkit.quantize.scheme import placement_for

INT4_BLOCK = 32  # the default --block-size, for the int4 estimate


def _inputs(model: ir.Model) -> list[dict]:
    from quantkit.load.onnx import input_specs

    out = []
    for s in input_specs(model):
        dims = list(s.shape) if s.shape is not None else None
        dynamic_axes = [i for i, d in enumerate(dims or []) if d is None]
        batch = "dynamic (axis 0)" if dims and dims[0] is None else (f"fixed at {dims[0]}" if dims else "unknown rank")
        out.append({"name": s.name, "dtype": str(s.dtype), "shape": dims, "batch": batch, "dynamic_axes": dynamic_axes})
    return out


def _scheme(op, quant: QuantConfig) -> str:
    if op.kind == OpKind.INT8_REGION:
        return f"{quant.activations} in and out (integer kernel, no weight)"
    if not op.weighted:
        return f"{quant.activations} x {quant.activations} (activation x activation)"
    chan = "per-channel" if op.weight_axis is not None else "per-tensor"
    if quant.activations == "none":
        if op.node.op_type in ("Conv", "ConvTranspose"):
            return f"int8 weights {chan} (no int4 convolution kernel)"
        return f"int{weight_only.bits_for(op.node, quant)} weights, blocks of {quant.block_size}"
    if op.kind == OpKind.EMBEDDING:
        return "int8 rows (weight-only)"
    if quant.activations == "dynamic":
        return "int8 weights, activations quantized at run time"
    return f"int8 weights {chan}, {quant.activations} activations"


def _plan(model: ir.Model, quant: QuantConfig):
    """The plan quantize would start from: the schemes' own refusals and the masks found in the
    graph (calibration may add mask-like tensors, and the accuracy budget may move ops)."""
    placement = placement_for(quant)
    placement.float_tensors.update(mask_tensors(model))
    return placement.plan(model)


def _weight_bytes(model: ir.Model) -> dict[str, int]:
    """Bytes of constant inputs, by the op type of the first node reading them."""
    seen: set[str] = set()
    by_op: Counter = Counter()
    for node in model.graph:
        for v in node.inputs:
            arr = const_array(v)
            if arr is not None and v.name not in seen:
                seen.add(v.name)
                by_op[node.op_type] += arr.nbytes
    return dict(by_op.most_common())


def _quantized_bytes(w: np.ndarray, bits: int, channels: int) -> int:
    """Stored size of a float weight at `bits`: packed codes plus float32 scales."""
    if bits == 8:
        return w.size + 4 * channels
    return -(-w.size // 2) + 4 * -(-w.size // INT4_BLOCK)


def _expected_size(model: ir.Model, total: int, quant: QuantConfig) -> int:
    """`total` minus the float bytes of the weights the plan would quantize, plus their packed
    size. An estimate: graph overhead (node and tensor names) is not counted."""
    delta = 0
    for op in _plan(model, quant).ops:
        if not op.weighted:
            continue
        w = const_array(op.node.inputs[op.weight_index])
        conv = op.node.op_type in ("Conv", "ConvTranspose")
        bits = 8 if quant.weights == "int8" or conv else weight_only.bits_for(op.node, quant)
        channels = w.shape[op.weight_axis] if op.weight_axis is not None else 1
        delta += w.nbytes - _quantized_bytes(w, bits, channels)
    return total - delta


def _describe(model: ir.Model, quant: QuantConfig, total: int) -> dict:
    plan = _plan(model, quant)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph)
    return {
        "inputs": _inputs(model),
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": None if v.shape is None else
                     [d if isinstance(d, int) else None for d in v.shape]} for v in model.graph.outputs],
        "opset": model.opset_imports.get("", None),
        "op_counts": dict(ops.most_common()),
        "scheme": {"weights": quant.weights, "activations": quant.activations},
        "nodes": {"quantized": [{"node": op.node.name or "", "op_type": op.node.op_type, "kind": op.kind.label,
                                 "scheme": _scheme(op, quant)} for op in plan.ops],
                  "float": [{"node": s.node, "op_type": s.op_type, "reason": s.reason} for s in plan.skipped]},
        "float_tensors": [{"tensor": k, "reason": v} for k, v in plan.float_tensors.items()],
        "weight_bytes": _weight_bytes(model),
        "bytes": total,
        "expected_bytes": {
            "int8": _expected_size(model, total, QuantConfig()),
            "int4": _expected_size(model, total, QuantConfig(weights=Weights.INT4, activations=Activations.NONE)),
        },
    }


def inspect(cfg: RunConfig, status=lambda s: None) -> dict:
    """Everything above for cfg.model (ONNX, or PyTorch exported first) under cfg.quant."""
    from quantkit.load.onnx import input_specs, load_onnx, model_bytes
    from quantkit.load.source import load_source, open_data

    with tempfile.TemporaryDirectory(prefix="quantkit-") as tmp:
        workdir = Path(tmp)
        source = load_source(cfg, workdir, status)  # ONNX as is; PyTorch exported (needs --calib)
        model = load_onnx(source.onnx_path)
        total = model_bytes(source.onnx_path)
        specs = input_specs(model)
        notes = list(canonicalize(model))
        shapes.infer(model)
        data = None
        if cfg.data.calib is not None:
            src = open_data(cfg.data.calib, specs, cfg.data.preprocess)  # checks names, dtypes, ranks
            data = {"source": str(src.path), "samples": src.samples, "ignored_arrays": list(src.extra_keys)}
            untyped = shapes.untyped_values(model)
            if untyped:
                first = next(src.batches(2))
                shapes.fill_from_run(model, first, workdir)
                notes.append(f"shape inference left {len(untyped)} tensor(s) untyped; typed them from one real run")
        elif shapes.untyped_values(model):
            notes.append(f"shape inference left {len(shapes.untyped_values(model))} tensor(s) untyped; "
                         "pass --calib to type them from one real run (some nodes may be planned differently)")
        notes.append("quantize may keep more tensors float: calibration also finds mask-like observed ranges")
        info = {"model": str(cfg.model), "export": source.export, **_describe(model, cfg.quant, total),
                "data": data, "notes": notes}
    return info


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def render(info: dict) -> str:
    """The findings as text for the terminal."""
    lines = [f"{info['model']}: opset {info['opset']}, {sum(info['op_counts'].values())} nodes, {_kib(info['bytes'])}"]
    if info.get("export"):
        lines.append(f"  exported from PyTorch with the {info['export']['exporter']} exporter")
    lines.append("inputs:")
    for i in info["inputs"]:
        shape = "?" if i["shape"] is None else "[" + ", ".join("?" if d is None else str(d) for d in i["shape"]) + "]"
        lines.append(f"  {i['name']:<20} {i['dtype']}{shape}  batch {i['batch']}")
    lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in info["op_counts"].items()))
    s = info["scheme"]
    q, f = info["nodes"]["quantized"], info["nodes"]["float"]
    lines.append(f"placement for --weights {s['weights']} --activations {s['activations']}: "
                 f"{len(q)} node(s) quantized, {len(f)} kept float")
    lines += [f"  {x['op_type']:<14} {x['node'] or '(unnamed)':<32} {x['scheme']}" for x in q]
    lines += [f"  {x['op_type']:<14} {x['node'] or '(unnamed)':<32} float: {x['reason']}" for x in f]
    lines += [f"  tensor {t['tensor']} stays float: {t['reason']}" for t in info["float_tensors"]]
    lines.append("weight bytes by op type: " + ", ".join(f"{k} {_kib(v)}" for k, v in info["weight_bytes"].items()))
    e = info["expected_bytes"]
    lines.append(f"expected size: fp32 {_kib(info['bytes'])}, int8 ~{_kib(e['int8'])}, int4 ~{_kib(e['int4'])} "
                 "(weights only; before the speed guard)")
    if info["data"]:
        d = info["data"]
        lines.append(f"data: {d['samples']} sample(s) in {d['source']} match the model"
                     + (f"; ignored arrays: {', '.join(d['ignored_arrays'])}" if d["ignored_arrays"] else ""))
    lines += [f"note: {n}" for n in info["notes"]]
    return "\n".join(lines)
