"""What pruning changed: parameters and multiply-accumulates before/after, and the text lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.errors import QuantkitError
from quantkit.graph.ir_edit import with_outputs

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def cost(model: ir.Model, feed: dict[str, np.ndarray], workdir: Path | None = None) -> dict:
    """Parameters (elements of every float initializer; and how many are not zero) and the
    multiply-accumulates of the Conv / MatMul / Gemm nodes for one sample of `feed`, their
    shapes taken from one onnxruntime run on that sample."""
    floats = [v.const_value.numpy() for v in model.graph.initializers.values()
              if v.const_value is not None and v.const_value.dtype.is_floating_point()]
    params = sum(int(a.size) for a in floats)
    nonzero = sum(int(np.count_nonzero(a)) for a in floats)
    return {"params": params, "nonzero": nonzero, "macs": _macs(model, feed, workdir)}


def _macs(model: ir.Model, feed: dict[str, np.ndarray], workdir: Path | None) -> int | None:
    per_node = node_macs(model, feed, workdir)
    return None if per_node is None else sum(per_node.values())


def node_macs(model: ir.Model, feed: dict[str, np.ndarray], workdir: Path | None,
              one_sample: bool = False) -> dict[str, int] | None:
    """Multiply-accumulates per sample of each Conv / MatMul / Gemm node with a constant weight
    (None when the shapes cannot be measured). `feed`: a batch stacked on axis 0, or with `one_sample`
    one sample already (whatever its inputs' batch axes)."""
    nodes = [n for n in model.graph if n.op_type in WEIGHT_OPS and n.domain in ("", "ai.onnx")
             and n.inputs[1] is not None and n.inputs[1].const_value is not None]
    if not nodes:
        return {}
    names = list(dict.fromkeys(v.name for n in nodes for v in (n.inputs[0], n.outputs[0])))
    one = feed if one_sample else {k: v[:1] for k, v in feed.items()}
    try:
        sess = runtime.session(with_outputs(model, names), workdir or Path("."), tag="cost")
        shapes = dict(zip(names, (o.shape for o in runtime.run(sess, names, one, "one sample"))))
    except QuantkitError:
        return None
    out = {}
    for n in nodes:
        y, a = shapes[n.outputs[0].name], shapes[n.inputs[0].name]
        w = n.inputs[1].const_value.shape.numpy()
        if n.op_type == "Conv":
            out[n.name] = int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            out[n.name] = int(np.prod(y)) * int(a[0 if n.attributes.get_int("transA", 0) else -1])
        else:
            out[n.name] = int(np.prod(y)) * int(a[-1])
    return out


def summary(before: dict, after: dict) -> dict:
    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    return {"params_before": before["params"], "params_after": after["params"],
            "nonzero_before": before["nonzero"], "nonzero_after": after["nonzero"],
            "macs_before": before["macs"], "macs_after": after["macs"],
            "params_ratio": ratio(after["params"], before["params"]),
            "macs_ratio": ratio(after["macs"], before["macs"])}


def render_lines(section: dict | None) -> list[str]:
    """The pruning block of the text report."""
    if not section:
        return []
    search = section.get("search")
    if search and not section["layers"]:
        return [f"  pruning   none: {section['note']}"]
    lines = [f"  pruning   {section['structure']} {section['ratio']:.0%}"
             + (f" ({section['method']})" if section.get("method") else "")
             + f": params {section['params_before']:,} -> {section['params_after']:,}"
             + (f", nonzero {section['nonzero_before']:,} -> {section['nonzero_after']:,}"
                if section["nonzero_after"] != section["params_after"] else "")]
    if section.get("macs_before") and section.get("macs_after"):
        lines.append(f"            MACs/sample {section['macs_before']:,} -> {section['macs_after']:,} "
                     f"({section['macs_after'] / section['macs_before']:.2f}x)")
    sens = section.get("sensitivity")
    if sens:
        whole = sum(1 for c in sens["curves"] if c["chosen"] == 0)
        lines.append(f"            per-layer ratios from each group's output noise pruned alone ({len(sens['curves'])} "
                     f"groups, {sens['probe_samples']} probe samples); {whole} group(s) left whole by the allocation")
    if section.get("fixed"):
        lines.append("            ratio as given (--prune-fixed): accuracy targets hold on quantization, against the "
                     "pruned float model")
    if search:
        lines.append(f"            ratio {search['chosen_ratio']:.1%} of at most {search['max_ratio']:.0%}: "
                     f"the largest keeping {search['pruning_target']} ({len(search['trials'])} trials; "
                     f"quantization gets the rest of {search['target']})")
    joint = section.get("joint")
    if joint:
        lines.append("            joint phase: " + (
            f"{joint['tensors']} tensors trained together ({joint['loss']} loss), best at step {joint['best_step']} "
            f"of {joint['steps']}; held-out cosine {joint['held_out_cosine_start']:.4f} -> "
            f"{joint['held_out_cosine_best']:.4f}" if joint["trained"] else f"not run: {joint['reason']}"))
    st = section.get("storage")
    if st and st["tensors"]:
        lines.append(f"            stored sparse: {st['tensors']} tensor(s), {st['dense_bytes']:,} -> "
                     f"{st['stored_bytes']:,} bytes (bitmask + kept values)")
    for layer in section["layers"]:
        lines.append(f"    {layer['layer']:<44} {layer['detail']}  ({layer['ratio']:.0%} pruned)")
    for s in section["skipped"]:
        lines.append(f"    left whole: {s['layer']}: {s['reason']}")
    return lines
