"""How much to prune when the run has an accuracy target (--min-cosine, --min-sqnr,
--max-accuracy-drop): the largest ratio up to --prune whose pruned (still float) model meets half
of the target's error budget on the probe batches, found by bisection. The other half is left to
quantization, whose own placement search then holds the whole target on the pruned model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from quantkit.quantize.budget import Target

STEPS = 4  # bisection steps after the first trial at the largest ratio


def half_budget(target: Target) -> Target:
    """Half the error the target allows: cosine distance halved, noise power halved (+3 dB),
    half the top-1 disagreement."""
    return Target(None if target.min_cosine is None else 1 - (1 - target.min_cosine) / 2,
                  None if target.min_sqnr is None else target.min_sqnr + 10 * math.log10(2),
                  None if target.max_disagreement is None else target.max_disagreement / 2)


@dataclass
class Found:
    ratio: float
    model: ir.Model | None  # the pruned model at `ratio` (None: pruning nothing met the target)
    section: dict | None
    trials: list[dict]


def search(max_ratio: float, prune_at: Callable[[float], tuple[ir.Model, dict]],
           score: Callable[[ir.Model], list[dict]], target: Target, status=lambda s: None) -> Found:
    """The largest ratio in (0, max_ratio] (to a 1/2^STEPS resolution) whose pruned model meets
    `target` on the probe, by bisection."""
    trials: list[dict] = []
    best = Found(0.0, None, None, trials)

    def attempt(ratio: float) -> bool:
        nonlocal best
        status(f"pruning: trying {ratio:.1%}")
        model, section = prune_at(ratio)
        figures = score(model)
        why = target.shortfall(figures)
        trials.append({"ratio": ratio, "met": why is None, "shortfall": why,
                       "figures": [{k: f.get(k) for k in ("name", "cosine", "sqnr_db", "top1")} for f in figures]})
        if why is None and ratio > best.ratio:
            best = Found(ratio, model, section, trials)
        return why is None

    if attempt(max_ratio):
        return best
    lo, hi = 0.0, max_ratio
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return best
