"""Sequential channel pruning: the groups are pruned one after another in graph order, each on
statistics gathered from the model pruned so far, and each consumer is refit towards the ORIGINAL
model's output rather than towards its own output on the drifted inputs.

One-shot pruning measures every group on the unpruned model, so each refit only undoes its own
layer's removal; the errors of earlier layers reach later ones uncorrected. Here consumer k is
refit on X_p (its inputs in the model pruned up to k) towards

    T = X_o W + b + (r_o - r_p)

with X_o its inputs in the original model, and, when its output goes (through its bias) into a
residual Add, r_o - r_p the drift of that Add's other input: the block's output after the Add is
then what is matched, so the layer also takes back what the earlier layers moved in the residual
stream (as far as a linear map of its kept inputs can). Selection is the optimal-brain-surgeon rule
on the same problem: rows removed from the best full-width fit to T (refit.target_weights), on the
Gram of X_p. One calibration pass per group, each running the original and the pruned model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.errors import ConfigError
from quantkit.graph.ir_edit import const_array, with_outputs
from quantkit.prune import refit as rf
from quantkit.prune.groups import Group
from quantkit.prune.stats import grams, position_weights


def residual_input(node: ir.Node) -> ir.Value | None:
    """The other input of the residual Add that `node`'s output reaches (through a bias Add with
    a constant), or None."""
    value = node.outputs[0]
    for _ in range(2):
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Add":
            return None
        add = uses[0].node
        other = [v for v in add.inputs if v is not value]
        if len(other) != 1 or other[0] is None:
            return None
        if const_array(other[0]) is None:
            return other[0]
        value = add.outputs[0]  # a bias: follow on to the Add after it
    return None


@dataclass
class Link:
    """One consumer's refit problem: its statistics and the original layer it must reproduce."""

    node: ir.Node
    axis: int  # the channel axis of its input
    out_axis: int  # the channel axis of its output (and of the residual)
    w: np.ndarray  # [C, N] of the original model
    b: np.ndarray | None
    residual: str | None
    gram: rf.Gram
    target: rf.Target

    def target_rows(self, x_o: np.ndarray, r_o: np.ndarray | None, r_p: np.ndarray | None) -> np.ndarray:
        t = rf.rows_of(x_o, self.axis).astype(np.float64) @ self.w
        if self.b is not None:
            t += self.b
        if r_o is not None and r_p is not None and r_o.shape == r_p.shape:
            drift = rf.rows_of(r_o, self.out_axis) - rf.rows_of(r_p, self.out_axis)
            if drift.shape == t.shape:
                t += drift
        return t


def _links(group: Group, consumer_of) -> list[Link]:
    out = []
    for node in group.consumers:
        c = consumer_of(node)
        res = residual_input(node)
        out.append(Link(node, group.axis, 1 if node.op_type == "Conv" else -1,
                        c.w.astype(np.float64), c.bias_array(), res.name if res is not None else None,
                        rf.Gram(group.channels), rf.Target(group.channels, c.w.shape[1])))
    return out


def paired_pass(original: ir.Model, current: ir.Model, links: list[Link], batches, workdir: Path,
                rows=None, inputs: tuple[str, ...] = (), stats: bool = True) -> None:
    """Accumulate every link's Gram of its inputs in `current` and X_p^T T, T from `original`.
    rows (blocktrain.Rows): also keep the rows of the tensors `inputs` in `current` and each
    link's target rows (real tokens only), for training the block; stats=False: only those."""
    names = list(dict.fromkeys([lk.node.inputs[0].name for lk in links]
                               + [lk.residual for lk in links if lk.residual is not None] + list(inputs)))
    sess_o = runtime.session(with_outputs(original, names), workdir, tag="pruning statistics (original)")
    sess_p = runtime.session(with_outputs(current, names), workdir, tag="pruning statistics")
    feeds = {i.name for i in sess_o.get_inputs()}
    seen = 0
    for batch in batches:
        feed = {k: v for k, v in batch.items() if k in feeds}
        got_o = dict(zip(names, runtime.run(sess_o, names, feed, "the calibration data")))
        got_p = dict(zip(names, runtime.run(sess_p, names, feed, "the calibration data")))
        targets = {}
        for lk in links:
            x_p = got_p[lk.node.inputs[0].name]
            weights = position_weights(batch, x_p, lk.axis)
            t = lk.target_rows(got_o[lk.node.inputs[0].name], got_o.get(lk.residual), got_p.get(lk.residual))
            if stats:
                lk.target.update(lk.gram.update(x_p, lk.axis, weights), t)
            targets[lk.node.name] = t
        if rows is not None:
            residuals = {lk.node.name: rf.rows_of(got_p[lk.residual], lk.out_axis) for lk in links
                         if lk.residual is not None}
            residuals = {k: v for k, v in residuals.items() if v.shape == targets[k].shape}
            rows.add({n: rf.rows_of(got_p[n], -1) for n in inputs}, targets, weights, residuals)
        seen += 1
    if seen == 0:
        raise ConfigError("pruning needs calibration data: pass --calib with at least one batch")


def prune_sequential(model: ir.Model, safe: list[Group], ratios: list[float], batches, workdir: Path,
                     train: bool = False, train_batches=None, settings=None) -> list[dict]:
    """Prune the safe groups of `model` in place, in order, each on the statistics of the model
    pruned so far (groups with spatial consumers: the one-shot rule on those statistics; the rest
    refit towards the original model, and with `train` then trained towards it: blocktrain.py,
    on the calibration tokens plus, when given, those of `train_batches()`, which the refit and
    the held-out check do not use; settings: blocktrain.Settings, default its SETTINGS). Returns the
    per-group records."""
    from quantkit.prune import blocktrain
    from quantkit.prune.structured import Consumer, choose, prune_group

    original = model.clone()
    layers = []
    for g, r in zip(safe, ratios):
        n = rf.keep_count(g.channels, r)
        if n == g.channels:
            continue
        rows, why = None, "spatial consumers: not trained"
        if any(Consumer.of(c).spatial for c in g.consumers):
            stats = grams(model, {c.inputs[0].name: (g.channels, g.axis) for c in g.consumers}, batches(),
                          workdir, real_tokens=True)
            keep = choose(g, stats, n)
            records = prune_group(g, keep, stats)
        else:
            links = _links(g, Consumer.of)
            path = blocktrain.path_nodes(model, g) if train else "not asked"
            why = path if isinstance(path, str) else ""
            rows = blocktrain.Rows() if not isinstance(path, str) else None
            inputs = tuple(dict.fromkeys(p.inputs[0].name for p in g.producers)) if rows is not None else ()
            paired_pass(original, model, links, batches(), workdir, rows, inputs)
            if rows is not None and train_batches is not None:
                rows.extra = True
                paired_pass(original, model, links, train_batches(), workdir, rows, inputs, stats=False)
            keep = rf.obs_select([(lk.gram, rf.target_weights(lk.gram, lk.w, lk.b, lk.target)) for lk in links], n)
            records = prune_group(g, keep, {lk.node.inputs[0].name: lk.gram for lk in links},
                                  targets={lk.node.name: lk.target for lk in links})
        layers.append(layer_record(g, keep, records))
        if train:
            layers[-1]["training"] = blocktrain.train_block(model, g, rows, settings) if rows is not None else \
                {"trained": False, "reason": why}
    return layers


def layer_record(g: Group, keep: np.ndarray, records: list[dict]) -> dict:
    return {"layer": g.name, "producers": [p.name for p in g.producers],
            "consumers": records or [{"layer": c.name} for c in g.consumers],
            "weights": [n.inputs[1].name for n in g.producers + g.consumers],  # the initializers (joint.py)
            "channels_before": g.channels, "channels_after": int(len(keep)), "ratio": 1 - len(keep) / g.channels}
