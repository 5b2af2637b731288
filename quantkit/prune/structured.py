"""Structured channel pruning: choose the channels of each safe group from calibration
statistics, slice every producer, carrier and per-channel constant, and refit the consumers by
least squares (refit.py) so each block's output is preserved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import const_array
from quantkit.prune import refit as rf
from quantkit.prune.allocate import allocate
from quantkit.prune.groups import Group
from quantkit.prune.stats import grams


def set_const(value: ir.Value, array: np.ndarray) -> None:
    """Replace an initializer's data (and its declared shape)."""
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _take(value: ir.Value | None, keep: np.ndarray, axis: int) -> None:
    arr = const_array(value)
    if arr is not None and arr.ndim >= (-axis if axis < 0 else axis + 1):
        set_const(value, np.take(arr, keep, axis=axis))


@dataclass
class Consumer:
    """A consumer layer in the form y = x w + b: w [C, N] (for spatial kernels, the kernel summed
    over its taps), the bias initializer if the layer has one."""

    node: ir.Node
    w: np.ndarray
    bias: ir.Value | None
    spatial: bool

    @staticmethod
    def of(node: ir.Node) -> Consumer:
        w = const_array(node.inputs[1])
        if node.op_type == "Conv":
            bias = node.inputs[2] if len(node.inputs) > 2 and const_array(node.inputs[2]) is not None else None
            spatial = any(k != 1 for k in w.shape[2:])
            w_kn = w.sum(axis=tuple(range(2, w.ndim))).T
            return Consumer(node, w_kn, bias, spatial)
        if node.op_type == "Gemm":
            w_kn = w.T if node.attributes.get_int("transB", 0) == 1 else w
            c = node.inputs[2] if len(node.inputs) > 2 else None
            bias = c if const_array(c) is not None and const_array(c).size == w_kn.shape[1] else None
            return Consumer(node, w_kn, bias, False)
        return Consumer(node, w, _matmul_bias(node, w.shape[1]), False)

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else const_array(self.bias).reshape(-1)

    def write(self, keep: np.ndarray, gram: rf.Gram, target: rf.Target | None = None) -> dict:
        """Prune the consumer's input channels to `keep`, refitting its weights (towards its own
        output, or towards `target`: sequential.py); returns the consumer's output error (mean
        squared, on the calibration statistics, against its own output) before/after refit."""
        b = self.bias_array()
        w = const_array(self.node.inputs[1])
        plain = rf.output_error(gram, self.w, b, keep, self.w[keep], b) if not self.spatial else None
        if self.spatial:
            b_new = rf.removal_bias(gram, self.w, b, keep) if b is not None else None
            set_const(self.node.inputs[1], np.take(w, keep, axis=1))
            refitted = None
        else:
            w_new, b_new = rf.refit(gram, self.w, b, keep, target=target)
            refitted = rf.output_error(gram, self.w, b, keep, w_new, b_new)
            set_const(self.node.inputs[1], self._layout(w_new, w))
        if b_new is not None:
            set_const(self.bias, b_new.astype(const_array(self.bias).dtype).reshape(const_array(self.bias).shape))
        return {"node": self.node.name, "op_type": self.node.op_type,
                "mse_removed": plain, "mse_refit": refitted}

    def _layout(self, w_new: np.ndarray, w_old: np.ndarray) -> np.ndarray:
        if self.node.op_type == "Conv":
            return w_new.T.reshape((w_old.shape[0], len(w_new), *w_old.shape[2:])).astype(w_old.dtype)
        if self.node.op_type == "Gemm" and self.node.attributes.get_int("transB", 0) == 1:
            return w_new.T.astype(w_old.dtype)
        return w_new.astype(w_old.dtype)


def _matmul_bias(node: ir.Node, n: int) -> ir.Value | None:
    """The constant of an `Add` that is the MatMul output's only reader, when it is a bias [N]."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    for v in uses[0].node.inputs:
        arr = const_array(v)
        if arr is not None and arr.size == n and arr.shape[-1] == n and len(v.uses()) == 1:
            return v
    return None


def _prune_producer(node: ir.Node, keep: np.ndarray) -> None:
    if node.op_type == "Conv":
        _take(node.inputs[1], keep, 0)
        if len(node.inputs) > 2:
            _take(node.inputs[2], keep, 0)
    elif node.op_type == "Gemm":
        _take(node.inputs[1], keep, 0 if node.attributes.get_int("transB", 0) == 1 else 1)
        c = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if c is not None and c.size > 1:
            _take(node.inputs[2], keep, -1)
    else:
        _take(node.inputs[1], keep, 1)


def _prune_carrier(node: ir.Node, keep: np.ndarray) -> None:
    if node.op_type == "BatchNormalization":
        for v in node.inputs[1:5]:
            _take(v, keep, 0)
        return
    _take(node.inputs[1], keep, 0)  # depthwise Conv: one filter per channel
    if len(node.inputs) > 2:
        _take(node.inputs[2], keep, 0)
    node.attributes["group"] = ir.AttrInt64("group", len(keep))


def _reshape_tensors(group: Group, n: int) -> None:
    for v in group.tensors:
        if v.shape is not None and len(v.shape) >= -group.axis:
            dims = list(v.shape.dims)
            dims[group.axis] = n
            v.shape = ir.Shape(dims)


def channel_score(group: Group, stats: dict[str, rf.Gram]) -> np.ndarray:
    """Sum over the group's consumers of activation RMS x outgoing weight norm."""
    score = np.zeros(group.channels)
    for node in group.consumers:
        c = Consumer.of(node)
        w = const_array(node.inputs[1])
        rows = np.moveaxis(w, 1, 0) if node.op_type == "Conv" else c.w
        score += rf.importance(stats[node.inputs[0].name].rms(), rows)
    return score


def choose(group: Group, stats: dict[str, rf.Gram], keep: int) -> np.ndarray:
    """The channels to keep: by the optimal-brain-surgeon cost when every consumer is a plain
    y = x w + b (MatMul, Gemm, 1x1 Conv), else by activation RMS x weight norm."""
    consumers = [Consumer.of(n) for n in group.consumers]
    if any(c.spatial for c in consumers):
        return rf.select(channel_score(group, stats), keep)
    return rf.obs_select([(stats[c.node.inputs[0].name], c.w) for c in consumers], keep)


def prune_group(group: Group, keep: np.ndarray, stats: dict[str, rf.Gram], refit: bool = True,
                targets: dict[str, rf.Target] | None = None) -> list[dict]:
    """Remove every channel of `group` outside `keep`; returns the consumers' error records.
    `targets`: per consumer node name, the refit's target (sequential.py) instead of its own output."""
    records = []
    for node in group.consumers:
        consumer = Consumer.of(node)
        gram = stats[node.inputs[0].name]
        if refit:
            records.append(consumer.write(keep, gram, (targets or {}).get(node.name)))
        else:
            _take(node.inputs[1], keep, 1 if node.op_type == "Conv" or node.op_type == "Gemm"
                  and node.attributes.get_int("transB", 0) == 1 else 0)
    for node in group.producers:
        _prune_producer(node, keep)
    for node in group.carriers:
        _prune_carrier(node, keep)
    for v in group.constants:
        _take(v, keep, group.axis)
    _reshape_tensors(group, len(keep))
    return records


def requests(groups: list[Group]) -> dict[str, tuple[int, int]]:
    return {n.inputs[0].name: (g.channels, g.axis) for g in groups for n in g.consumers}


def prune_channels(model: ir.Model, ratio: float, batches, workdir: Path, refit: bool = True,
                   allocation: str = "uniform", feed: dict | None = None, cache: dict | None = None,
                   status=lambda s: None, sequential: bool = False, train: bool = False,
                   train_batches=None, train_settings=None) -> dict:
    """Prune channels of every safe group in place (`batches()` yields the calibration batches;
    refit=False: plain removal, for comparison): `ratio` of each group's channels (uniform), or
    per group as the sensitivity curves allocate `ratio` of the groups' MACs (sensitivity.py).
    sequential: group after group on the pruned model's statistics, refit towards the original
    model (sequential.py); train: each block then trained towards it (blocktrain.py; train_batches:
    extra tokens for that training only; train_settings: blocktrain.Settings, default its SETTINGS). `cache`
    keeps the one-shot statistics and the curves of this model for later calls. Returns the records."""
    from quantkit.prune.sensitivity import curves, safe_groups, section
    from quantkit.prune.sequential import layer_record, prune_sequential

    cache = {} if cache is None else cache
    safe, groups = safe_groups(model)
    ratios, alloc = [ratio] * len(safe), None
    sequential = sequential and refit  # plain removal has nothing to refit towards the original
    if (not sequential or allocation == "sensitivity") and "stats" not in cache:
        cache["stats"] = grams(model, requests(safe), batches(), workdir, real_tokens=True)
    if allocation == "sensitivity" and safe:
        if "curves" not in cache:
            cache["curves"] = curves(model, safe, cache["stats"], batches, feed, workdir, status)
        ratios = allocate(cache["curves"], ratio)
        alloc = section(cache["curves"], ratios)
    skipped = [{"layer": g.name, "channels": g.channels, "reason": g.reason} for g in groups if g.reason is not None]
    if sequential:
        layers = prune_sequential(model, safe, ratios, batches, workdir, train, train_batches, train_settings)
    else:
        layers = []
        for g, r in zip(safe, ratios):
            n = rf.keep_count(g.channels, r)
            if n == g.channels:
                continue
            keep = choose(g, cache["stats"], n)
            layers.append(layer_record(g, keep, prune_group(g, keep, cache["stats"], refit)))
    return {"structure": "channel", "refit": ("train" if train else "sequential") if sequential else "one-shot",
            "layers": layers, "skipped": skipped, **({"sensitivity": alloc} if alloc is not None else {})}
