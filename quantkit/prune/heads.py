"""Attention-head pruning: whole heads removed from Q, K, V (their output columns and biases) and
from the output projection (its input rows, refitted by least squares on the kept heads).

The pattern is the one torch.onnx exports for a BERT-style self-attention:

    x -> MatMul(Wq) [-> Add bq] -> Reshape [B, T, H|-1, d] -> Transpose -> \\
    x -> MatMul(Wk) [-> Add bk] -> Reshape ...                 -> Transpose -> MatMul -> (scale, mask) -> Softmax
    x -> MatMul(Wv) [-> Add bv] -> Reshape ...                 -> Transpose ------------------------------> MatMul
      -> Transpose -> Reshape [B, T, H*d|-1] -> MatMul(Wo) -> ...

A Reshape whose shape names the head count (or H*d) explicitly gets that entry rewritten; -1 and 0
entries need nothing. Anything else on the way (a shared projection, a mask with a head axis) leaves
the block whole, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import Editor, const_array
from quantkit.prune import refit as rf
from quantkit.prune.structured import Consumer, set_const

PASS_THROUGH = ("Transpose", "Mul", "Div", "Cast")


@dataclass
class Projection:
    matmul: ir.Node
    bias: ir.Value | None
    split: ir.Node  # the Reshape to [B, T, H, d]


@dataclass
class Attention:
    q: Projection
    k: Projection
    v: Projection
    merge: ir.Node  # the Reshape back to [B, T, H*d]
    out: ir.Node  # the output projection MatMul
    heads: int
    dim: int  # per head

    @property
    def name(self) -> str:
        return self.out.name


def _single(value: ir.Value | None) -> ir.Node | None:
    """The only reader of `value`, or None."""
    uses = list(value.uses()) if value is not None else []
    return uses[0].node if len(uses) == 1 else None


def _back(value: ir.Value, op: str) -> ir.Node | None:
    """The `op` node producing `value`, through Transposes and scalar scalings."""
    node = value.producer()
    while node is not None and node.op_type in PASS_THROUGH and node.op_type != op:
        scale = const_array(node.inputs[1]) if node.op_type in ("Mul", "Div") else None
        if node.op_type in ("Mul", "Div") and (scale is None or scale.size != 1):
            return None
        node = node.inputs[0].producer()
    return node if node is not None and node.op_type == op else None


def shape_entries(shape: ir.Value) -> list[tuple[ir.Value, int] | None] | None:
    """Where each entry of a Reshape's shape comes from: (initializer, index in it) for constant
    entries, None for computed ones. The shape is one initializer or a Concat of pieces."""
    arr = const_array(shape)
    if arr is not None:
        return [(shape, i) for i in range(arr.size)]
    node = shape.producer()
    if node is None or node.op_type != "Concat":
        return None
    out: list[tuple[ir.Value, int] | None] = []
    for piece in node.inputs:
        a = const_array(piece)
        if a is not None:
            out += [(piece, i) for i in range(a.size)]
        else:
            size = piece.shape[0] if piece.shape is not None and len(piece.shape) == 1 else None
            if not isinstance(size, int):
                return None
            out += [None] * size
    return out


def _entry(e: tuple[ir.Value, int] | None) -> int | None:
    return None if e is None else int(const_array(e[0]).reshape(-1)[e[1]])


def _scores(value: ir.Value, depth: int) -> ir.Node | None:
    """The Q K^T MatMul behind the Softmax input, through the scaling and the additive mask."""
    node = value.producer()
    if node is None or depth == 0:
        return None
    if node.op_type == "MatMul" and all(const_array(v) is None for v in node.inputs):
        return node
    if node.op_type not in ("Add", "Sub", "Mul", "Div", "Cast", "Where"):
        return None
    for v in node.inputs:
        if v is not None and const_array(v) is None:
            found = _scores(v, depth - 1)
            if found is not None:
                return found
    return None


def _projection(value: ir.Value) -> Projection | str:
    split = _back(value, "Reshape")
    if split is None:
        return "no Reshape splitting heads before the attention MatMul"
    src = split.inputs[0].producer()
    bias = None
    if src is not None and src.op_type == "Add":
        consts = [v for v in src.inputs if const_array(v) is not None]
        bias = consts[0] if len(consts) == 1 and const_array(consts[0]).ndim == 1 else None
        if bias is None:
            return f"Add {src.name} before the head split is not a bias"
        src = next(v for v in src.inputs if v is not bias).producer()
    if src is None or src.op_type != "MatMul" or const_array(src.inputs[1]) is None:
        return "the head split is not fed by a projection with constant weights"
    if _single(src.outputs[0]) is None or (bias is not None and _single(split.inputs[0]) is not split):
        return f"projection {src.name} has other readers"
    return Projection(src, bias, split)


def find_attention(out: ir.Node) -> Attention | str | None:
    """The attention block whose output projection is `out`; a reason when the pattern is there
    but cannot be pruned; None when `out` is no attention output projection."""
    if out.op_type != "MatMul" or const_array(out.inputs[1]) is None:
        return None
    merge = out.inputs[0].producer()
    if merge is None or merge.op_type != "Reshape":
        return None
    ctx = _back(merge.inputs[0], "MatMul")
    if ctx is None or any(const_array(v) is not None for v in ctx.inputs):
        return None
    softmax = _back(ctx.inputs[0], "Softmax")
    scores = _scores(softmax.inputs[0], 6) if softmax is not None else None
    if scores is None:
        return None
    parts = [_projection(v) for v in (scores.inputs[0], scores.inputs[1], ctx.inputs[1])]
    bad = next((p for p in parts if isinstance(p, str)), None)
    if bad is not None:
        return bad
    q, k, v = (p for p in parts if not isinstance(p, str))
    return _sizes(q, k, v, merge, out)


def _sizes(q: Projection, k: Projection, v: Projection, merge: ir.Node, out: ir.Node) -> Attention | str:
    entries = [shape_entries(p.split.inputs[1]) for p in (q, k, v)]
    if any(e is None or len(e) != 4 for e in entries):
        return "head split shape is not a 4-entry shape"
    dims = {_entry(e[3]) for e in entries}
    if len(dims) != 1 or None in dims or min(dims) <= 0:
        return "head size is not a constant shared by Q, K and V"
    (dim,) = dims
    widths = {const_array(p.matmul.inputs[1]).shape[1] for p in (q, k, v)}
    if len(widths) != 1 or next(iter(widths)) % dim or const_array(out.inputs[1]).shape[0] != next(iter(widths)):
        return "Q, K, V and output widths disagree"
    heads = next(iter(widths)) // dim
    if any(_entry(e[2]) not in (-1, heads) for e in entries):
        return "head count entry of the split shape is computed at run time"
    merged = shape_entries(merge.inputs[1])
    if merged is None or _entry(merged[-1]) not in (-1, heads * dim):
        return "merge shape's last entry is computed at run time"
    return Attention(q, k, v, merge, out, heads, dim)


def _fix_entry(editor: Editor, entry: tuple[ir.Value, int], reader: ir.Node, value: int) -> None:
    """Set one constant entry of a shape; a constant other nodes also read is copied first."""
    const, i = entry
    arr = const_array(const).copy()
    flat = arr.reshape(-1)
    if int(flat[i]) in (-1, 0) or int(flat[i]) == value:
        return
    flat[i] = value
    if len(const.uses()) == 1:
        set_const(const, arr)
        return
    fresh = editor.initializer(f"{const.name}_pruned", arr)
    for index, v in enumerate(reader.inputs):
        if v is const:
            reader.replace_input_with(index, fresh)


def _reader(shape: ir.Value, reshape: ir.Node, const: ir.Value) -> ir.Node:
    return reshape if const is shape else shape.producer()


def _forget_shapes(block: Attention) -> None:
    """The activations between the projections and the output projection change width: their
    recorded shapes are dropped (types kept) for shape inference to fill again."""
    todo = [p.matmul.outputs[0] for p in (block.q, block.k, block.v)]
    seen: set[int] = set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        v.shape = None
        todo += [o for use in v.uses() if use.node is not block.out for o in use.node.outputs]


def prune_heads(block: Attention, keep: np.ndarray, gram: rf.Gram, editor: Editor) -> dict:
    """Keep heads `keep` of the block: Q/K/V columns and biases sliced, the output projection
    refitted on the kept heads' context, explicit head counts in the Reshape shapes rewritten."""
    d = block.dim
    cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in keep])
    record = Consumer.of(block.out).write(cols, gram)
    for p in (block.q, block.k, block.v):
        set_const(p.matmul.inputs[1], const_array(p.matmul.inputs[1])[:, cols])
        if p.bias is not None:
            set_const(p.bias, const_array(p.bias)[cols])
        shape = p.split.inputs[1]
        entry = shape_entries(shape)[2]
        _fix_entry(editor, entry, _reader(shape, p.split, entry[0]), len(keep))
    shape = block.merge.inputs[1]
    entry = shape_entries(shape)[-1]
    _fix_entry(editor, entry, _reader(shape, block.merge, entry[0]), len(keep) * d)
    _forget_shapes(block)
    return record


def head_groups(heads: int, dim: int) -> list[np.ndarray]:
    return [np.arange(h * dim, (h + 1) * dim) for h in range(heads)]


def prune_attention(model: ir.Model, ratio: float, batches, workdir) -> dict:
    """Remove `ratio` of the heads of every attention block found; returns the report records."""
    from quantkit.prune.stats import grams

    blocks, skipped = [], []
    for node in list(model.graph):
        found = find_attention(node)
        if isinstance(found, Attention):
            blocks.append(found)
        elif isinstance(found, str):
            skipped.append({"layer": node.name, "reason": found})
    requests = {b.out.inputs[0].name: (b.heads * b.dim, -1) for b in blocks}
    stats = grams(model, requests, batches(), workdir)
    editor, layers = Editor(model.graph), []
    for b in blocks:
        gram = stats[b.out.inputs[0].name]
        keep_n = max(1, b.heads - int(round(b.heads * ratio)))
        keep = rf.obs_select_groups(gram, Consumer.of(b.out).w, head_groups(b.heads, b.dim), keep_n)
        record = prune_heads(b, keep, gram, editor)
        layers.append({"layer": b.name, "heads_before": b.heads, "heads_after": int(len(keep)),
                       "kept_heads": keep.tolist(), "ratio": 1 - len(keep) / b.heads, "consumers": [record]})
    return {"layers": layers, "skipped": skipped}
