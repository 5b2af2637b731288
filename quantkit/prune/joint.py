"""The joint final phase of `--prune-refit joint`: after the sequential refit and the block-wise
training (blocktrain.py), the kept parameters of EVERY pruned block (each producer's and consumer's
weights and biases) are trained together, distilled from the ORIGINAL model's graph outputs.

Block-wise training matches each block's output given the blocks before it; errors the later
blocks could take back, or that only show in what the model outputs, are out of its reach. Here
the pruned float graph runs in torch (finetune/graph.py interprets it; no second interpreter),
every parameter but the pruned blocks' stays frozen, and the loss is on the graph's float outputs:

    outputs (default): per sample, 1 - cosine of the output over its real positions (padding
        masked: what report/compare.py reads), plus the squared error over the teacher's square
        (finetune/loop.py's, padded positions at ~0)
    pooled: also 1 - cosine of the mask-aware mean over the real positions of a (batch, sequence,
        hidden) output: the sentence vector a sentence-transformers user reads (on MiniLM it added
        nothing to the default: pooled cosine 0.99068 against 0.99073; BENCHMARKS.md issue 14, stop 26)

Every HOLDOUT-th calibration batch is held out (never trained on); the best held-out state is
kept (the block-trained start when training never beats it). Batches of a model that masks its
padding are regrouped by real length and cut after their last real token (finetune/trim.py),
training only. torch runs seeded on THREADS thread(s), so the same command writes the same bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.errors import UnsupportedModelError
from quantkit.graph.ir_edit import const_array


@dataclass(frozen=True)
class Settings:
    steps: int = 1500  # Adam steps at most (MiniLM, 30% FFN: 12 min on one thread, still improving at 1,500)
    lr: float = 1e-4  # decayed to 0 by a cosine over `steps`
    batch: int = 32  # samples per step (regrouped from the calibration batches)
    every: int = 100  # steps between held-out checks
    holdout: int = 8  # every holdout-th calibration batch is held out
    seed: int = 0
    pooled: bool = False  # --prune-joint-loss pooled
    threads: int = 1  # torch threads during the phase (deterministic bytes)


SETTINGS = Settings()  # module level so a benchmark or test can set it


def settings_for(steps: int | None, loss: str | None) -> Settings:
    """SETTINGS with --prune-joint-steps / --prune-joint-loss (None: its own)."""
    s = SETTINGS if steps is None else replace(SETTINGS, steps=steps)
    return s if loss is None else replace(s, pooled=loss == "pooled")


def parameter_names(model: ir.Model, layers: list[dict]) -> list[str]:
    """The float initializers the phase trains: of every pruned layer's producers and consumers
    (`layers[i]["weights"]`: their weight initializers), the weight, a Gemm's or Conv's bias input
    and the bias an Add adds to a MatMul's output."""
    from quantkit.prune.structured import _matmul_bias

    inits, names = model.graph.initializers, []
    for layer in layers:
        for weight in layer.get("weights", []):
            value = inits.get(weight)
            nodes = [u.node for u in value.uses()] if value is not None else []
            if len(nodes) != 1 or nodes[0].op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            node = nodes[0]
            values = [v for v in node.inputs[1:] if v is not None]
            w = const_array(node.inputs[1])
            if node.op_type == "MatMul" and w is not None and w.ndim == 2:
                values.append(_matmul_bias(node, w.shape[1]))
            names += [v.name for v in values if v is not None and v.name in inits
                      and const_array(v) is not None and const_array(v).dtype.kind == "f"]
    return list(dict.fromkeys(names))


def _samples(feeds: list[dict[str, np.ndarray]], mask: str) -> dict[str, np.ndarray] | None:
    """All samples of `feeds` stacked, or None when they differ in shape or an array does not
    stack its samples on axis 0 (as many rows as the padding mask `mask`)."""
    first = feeds[0]
    for f in feeds:
        rows = len(f[mask])
        if set(f) != set(first) or any(np.ndim(v) == 0 or len(v) != rows or v.shape[1:] != first[k].shape[1:]
                                       for k, v in f.items()):
            return None
    return {k: np.concatenate([f[k] for f in feeds]) for k in first}


def regroup(feeds: list[dict[str, np.ndarray]], size: int, cut: list[str], seed: int) -> list[dict[str, np.ndarray]]:
    """`feeds` as batches of `size` samples sorted by real length, each cut after its last real
    position (`cut`: the arrays cut with the padding mask), in an order drawn with `seed`. Without
    `cut` (no padding mask, or one the model does not honour), or when the feeds cannot be
    restacked, they stay the calibration batches they are."""
    from quantkit.finetune import trim

    samples = _samples(feeds, trim.PADDING_MASK) if cut else None
    if samples is None:
        return feeds
    order = np.argsort(trim.real_lengths(samples[trim.PADDING_MASK]), kind="stable")
    out = [trim.cut_batch({k: v[order[i:i + size]] for k, v in samples.items()}, cut)
           for i in range(0, len(order), size)]
    return [out[i] for i in np.random.default_rng(seed).permutation(len(out))]


def _cut_plan(teacher, feed: dict[str, np.ndarray]) -> list[str]:
    """The arrays cut with the padding mask, or [] when the original model's outputs at the real
    tokens change when the padding is cut (or it cannot run a shorter sequence)."""
    from quantkit.finetune import trim

    m = feed.get(trim.PADDING_MASK)
    if not trim.is_padding_mask(m):
        return []
    cut = [k for k, v in feed.items() if np.ndim(v) >= 2 and v.shape[:2] == m.shape]
    db, _ = trim.probe(teacher, feed, cut)
    return cut if db >= trim.PROBE_DB else []


@dataclass
class Batch:
    inputs: list  # torch tensors, in the graph's input order
    teacher: list  # the original model's outputs (None where not float)
    mask: Any  # (batch, sequence) float tensor, 1 at real positions, 0 at padding; or None


def _batch(feed: dict[str, np.ndarray], names: list[str], teacher) -> Batch:
    import torch

    from quantkit.finetune import trim

    m = feed.get(trim.PADDING_MASK)
    mask = torch.from_numpy(np.asarray(m, np.float32)) if trim.is_padding_mask(m) else None
    ref = [np.asarray(r) for r in teacher(feed)]
    return Batch([torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names],
                 [torch.from_numpy(r.astype(np.float32)) if r.dtype.kind == "f" else None for r in ref], mask)


def _along(mask, o):
    """`mask` shaped to broadcast over `o` when `o` is laid out (batch, sequence, ...), else None."""
    if mask is None or o.dim() < 2 or tuple(o.shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(*mask.shape, *([1] * (o.dim() - 2)))


def cosine_error(o, t, w):
    """Per sample, 1 - cosine of `o` and `t` over the positions `w` weighs (None: all), averaged."""
    import torch

    if o.dim() == 0:
        return torch.zeros(())
    if w is not None:
        o, t = o * w, t * w
    o, t = o.reshape(len(o), -1), t.reshape(len(t), -1)
    cos = (o * t).sum(1) / torch.sqrt((o * o).sum(1) * (t * t).sum(1)).clamp_min(1e-12)
    return (1 - cos).mean()


def pooled_error(o, t, w):
    """1 - cosine of the mask-aware mean over the real positions of (batch, sequence, hidden) outputs."""
    import torch

    n = w.sum(1).clamp_min(1)
    return (1 - torch.nn.functional.cosine_similarity((o * w).sum(1) / n, (t * w).sum(1) / n, dim=-1)).mean()


def loss_of(outs: list, b: Batch, pooled: bool):
    """The mean over float outputs of the cosine error over real positions (padded ones at
    loop.PADDING_WEIGHT: exact zeros slow the backward pass) plus the token error, plus with
    `pooled` the pooled vector's cosine error."""
    import torch

    from quantkit.finetune.loop import PADDING_WEIGHT, _nmse

    terms = []
    for o, t in zip(outs, b.teacher):
        if t is None:
            continue
        w = _along(b.mask, o)
        floor = None if w is None else w * (1 - PADDING_WEIGHT) + PADDING_WEIGHT
        term = cosine_error(o, t, floor) + _nmse(o, t, b.mask if w is not None else None)
        if pooled and w is not None and o.dim() == 3:
            term = term + pooled_error(o, t, w)
        terms.append(term)
    return torch.stack(terms).mean()


def held_out(g, held: list[Batch], pooled: bool) -> tuple[float, float]:
    """(mean loss, mean per-sample cosine of the first float output over real positions) on `held`."""
    import torch

    losses, cos, n = [], 0.0, 0
    with torch.no_grad():
        for b in held:
            outs = g(*b.inputs)
            losses.append(float(loss_of(outs, b, pooled)))
            i = next(i for i, t in enumerate(b.teacher) if t is not None)
            cos += float(1 - cosine_error(outs[i], b.teacher[i], _along(b.mask, outs[i]))) * len(outs[i])
            n += len(outs[i])
    return float(np.mean(losses)), cos / max(n, 1)


def _fit(g, params: list, train: list[Batch], held: list[Batch], s: Settings) -> dict:
    """Adam with a cosine decay over `params`; the best held-out state is restored. The record."""
    import torch

    opt = torch.optim.Adam(params, lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, s.steps) / s.steps)))
    rng, order = np.random.default_rng(s.seed), list[int]()
    start = best = held_out(g, held, s.pooled)
    best_state, best_step = [p.detach().clone() for p in params], 0
    for step in range(1, s.steps + 1):
        if not order:
            order = list(rng.permutation(len(train)))
        b = train[order.pop()]
        opt.zero_grad(set_to_none=True)
        loss_of(g(*b.inputs), b, s.pooled).backward()
        opt.step()
        sched.step()
        if step % s.every and step != s.steps:
            continue
        got = held_out(g, held, s.pooled)
        if got[0] < best[0]:
            best, best_step, best_state = got, step, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
    return {"steps": s.steps, "best_step": best_step, "held_out_loss_start": start[0], "held_out_loss_best": best[0],
            "held_out_cosine_start": start[1], "held_out_cosine_best": best[1]}


def _data(g, original: ir.Model, batches, workdir, s: Settings) -> tuple[list[Batch], list[Batch], bool] | str:
    """Training and held-out batches with the original model's outputs, whether they were cut to
    their real tokens; or why there is too little data."""
    feeds = [{k: np.asarray(b[k]) for k in g.inputs} for b in batches()]
    if len(feeds) < 2:
        return f"too few calibration batches ({len(feeds)}) to hold some out"
    held_at = {i for i in range(len(feeds)) if i % s.holdout == s.holdout - 1} or {len(feeds) - 1}
    sess = runtime.session(original, workdir, tag="joint phase (original model)")

    def teacher(feed):
        return runtime.run(sess, g.outputs, feed, "the calibration data")

    cut = _cut_plan(teacher, feeds[0])
    sets = [[f for i, f in enumerate(feeds) if (i in held_at) == held] for held in (False, True)]
    train, held = ([_batch(f, g.inputs, teacher) for f in regroup(fs, s.batch, cut, s.seed)] for fs in sets)
    return train, held, bool(cut)


def train_joint(model: ir.Model, original: ir.Model, layers: list[dict], batches, workdir,
                settings: Settings | None = None) -> dict:
    """Train the pruned blocks of `model` (`layers`: prune_channels' records) together towards
    `original`'s outputs on the calibration batches, in place; the report's record."""
    import torch

    from quantkit.finetune.graph import QuantGraph
    from quantkit.prune.structured import set_const

    s = settings or SETTINGS
    names = parameter_names(model, layers)
    if not names:
        return {"trained": False, "reason": "no pruned layer has float weights to train"}
    threads, t0 = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(s.threads)
    try:
        torch.manual_seed(s.seed)
        try:
            g = QuantGraph(model)
        except UnsupportedModelError as e:
            return {"trained": False, "reason": str(e)}
        data = _data(g, original, batches, workdir, s)
        if isinstance(data, str):
            return {"trained": False, "reason": data}
        train, held, trimmed = data
        g.learn.requires_grad_(False)
        names = [n for n in names if n in g.learn.floats]
        params = [g.learn.plain(n).requires_grad_(True) for n in names]
        record = _fit(g, params, train, held, s)
    finally:
        torch.set_num_threads(threads)
    for n, param in zip(names, params):
        old = const_array(model.graph.initializers[n])
        set_const(model.graph.initializers[n], param.detach().numpy().astype(old.dtype).reshape(old.shape))
    return {"trained": True, "loss": "pooled" if s.pooled else "outputs", "tensors": len(names),
            "parameters": int(sum(p.numel() for p in params)), "lr": s.lr, "trimmed": trimmed,
            "train_batches": len(train), "held_out_batches": len(held), **record,
            "seconds": round(time.perf_counter() - t0, 1)}
