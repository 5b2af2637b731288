"""Distillation: the fake-quantized graph learns to reproduce the fp32 model's outputs.

Loss per batch: the mean over float outputs of the squared error normalized by the teacher's mean
square (scale-free across outputs), plus the same mean over block outputs when the batch carries
the teacher's (`taps`: training batches only, so held-out losses and the kept step are about the
outputs alone), optionally mixed with cross-entropy on labels:
    loss = (1 - w) * distill + w * CE(first output, labels)
Adam on latent and float weights (lr), activation log-scales (10 x lr) and weight log-scales
(0.1 x lr), cosine decay to zero over the steps. The held-out batches are scored before training
and every `every` steps; the best parameters (lowest held-out loss) are what the run keeps, also
when it is interrupted with Ctrl-C.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantkit.finetune.graph import QuantGraph

SCALE_LR_FACTOR = 10.0  # activation ranges
# weight scales train slowly: the latent weights already move the codes, and an Adam step on one scale
# moves every code of its block (32 int4 weights) at once; at 10x they undid what the weights learned on
# MiniLM int4 (BENCHMARKS.md, issue 16)
WEIGHT_SCALE_LR_FACTOR = 0.1
EVALS = 20  # held-out evaluations over a run
# padded positions weigh this much, not 0: with exactly zero gradients on whole rows the backward pass's
# matrix products ran 5.7x slower on MiniLM (10.5 vs 1.85 CPU s per step, measured; flushing
# denormals did not help), and 1e-3 of ~60% of the positions leaves the loss what the real tokens make it
PADDING_WEIGHT = 1e-3


@dataclass
class Batch:
    inputs: list[torch.Tensor]
    teacher: list[torch.Tensor]  # fp32 outputs (float outputs only; None for the others)
    labels: torch.Tensor | None = None
    taps: list[torch.Tensor] = field(default_factory=list)  # fp32 block outputs (QuantGraph.taps), maybe float16
    positions: torch.Tensor | None = None  # (batch, sequence) 1 where a token is real, 0 for padding
    # per output (teacher's, then taps): laid out (batch, sequence, ...), so `positions` apply; None: an
    # output is per token when its leading axes have the mask's shape (a cut batch says it instead:
    # a (batch, classes) output could match a shorter sequence)
    tokens: list[bool] | None = None


@dataclass
class Trained:
    steps_done: int = 0
    interrupted: bool = False
    best_step: int = 0
    heldout_before: float = math.nan
    heldout_best: float = math.nan
    curve: list[dict] = field(default_factory=list)  # {step, train_loss, heldout_loss}
    seconds: float = 0.0


def _nmse(o: torch.Tensor, t: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error over the teacher's square; with `positions` ((batch, sequence) 0/1) over the
    real tokens of an output whose leading axes are (batch, sequence) (padded ones at PADDING_WEIGHT):
    padded positions' outputs are what no user reads (a mean-pooled sentence embedding masks them out)."""
    t = t.float()
    if positions is None or tuple(o.shape[:2]) != tuple(positions.shape):
        return torch.mean((o - t) ** 2) / torch.clamp(torch.mean(t**2), min=1e-12)
    m = positions.to(o.dtype).reshape(*positions.shape, *([1] * (o.dim() - 2)))
    m = m * (1 - PADDING_WEIGHT) + PADDING_WEIGHT
    return torch.sum(m * (o - t) ** 2) / torch.clamp(torch.sum(m * t**2), min=1e-12)


def loss_of(outs: list[torch.Tensor], b: Batch, labels_weight: float) -> torch.Tensor:
    """`outs`: the graph's outputs, then its taps (ignored when the batch has no teacher for them)."""
    n = len(b.teacher)
    m = [b.positions if b.tokens is None or b.tokens[i] else None for i in range(len(outs))]
    distill = torch.stack([_nmse(o, t, p) for o, t, p in zip(outs[:n], b.teacher, m) if t is not None]).mean()
    if b.taps:
        distill = distill + torch.stack([_nmse(o, t, p) for o, t, p in zip(outs[n:], b.taps, m[n:])]).mean()
    if labels_weight > 0 and b.labels is not None:
        ce = torch.nn.functional.cross_entropy(outs[0].reshape(len(b.labels), -1), b.labels)
        return (1 - labels_weight) * distill + labels_weight * ce
    return distill


def heldout_loss(g: QuantGraph, batches: list[Batch], labels_weight: float) -> float:
    with torch.no_grad():
        return sum(float(loss_of(g(*b.inputs), b, labels_weight)) for b in batches) / len(batches)


def _interrupted_by_user(e: KeyboardInterrupt) -> bool:
    """Ctrl-C stops training early; SIGTERM/SIGHUP (the CLI raises them as KeyboardInterrupt
    subclasses with a signal name) still abort the run."""
    return getattr(e, "name", "SIGINT") == "SIGINT"


def train(g: QuantGraph, train_set: list[Batch], heldout: list[Batch], steps: int, lr: float,
          labels_weight: float = 0.0, on_step: Callable[[int, float, float | None], None] = lambda *a: None) -> Trained:
    t0 = time.perf_counter()
    opt = torch.optim.Adam(g.learn.param_groups(lr, lr * SCALE_LR_FACTOR, lr * WEIGHT_SCALE_LR_FACTOR))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    every = max(1, steps // EVALS)
    out = Trained()
    out.heldout_before = out.heldout_best = heldout_loss(g, heldout, labels_weight)
    out.curve.append({"step": 0, "train_loss": None, "heldout_loss": out.heldout_before})
    best, running = g.learn.snapshot(), None
    g.train()
    try:
        for step in range(1, steps + 1):
            b = train_set[(step - 1) % len(train_set)]
            opt.zero_grad(set_to_none=True)
            loss = loss_of(g(*b.inputs), b, labels_weight)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            running = value if running is None else 0.9 * running + 0.1 * value
            out.steps_done = step
            held = None
            if step % every == 0 or step == steps:
                held = heldout_loss(g, heldout, labels_weight)
                out.curve.append({"step": step, "train_loss": running, "heldout_loss": held})
                if held < out.heldout_best:
                    out.heldout_best, out.best_step, best = held, step, g.learn.snapshot()
            on_step(step, running, held)
    except KeyboardInterrupt as e:
        if not _interrupted_by_user(e):
            raise
        out.interrupted = True
    g.eval()
    g.learn.restore(best)
    out.seconds = time.perf_counter() - t0
    return out
