"""Pruning before quantization: structured (channels, FFN neurons, attention heads; the
consumers refitted on calibration data) and sparse (unstructured, 2:4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit.config import PruneConfig, PruneMethod, PruneRefit, PruneStructure
from quantkit.errors import UnsupportedModelError
from quantkit.prune.fold import fold_constant_shapes
from quantkit.prune.report import cost, summary

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


def prune(model: ir.Model, cfg: PruneConfig, batches: Batches, feed: dict[str, np.ndarray], workdir: Path,
          cache: dict | None = None, status=lambda s: None, train_batches: Batches | None = None) -> dict:
    """Prune `model` in place as `cfg` says; returns the report section `pruning`. `cache` keeps
    what depends on the model only (statistics, sensitivity curves) across calls on copies of it.
    train_batches: extra data for `--prune-refit train`'s block training only (blocktrain.py)."""
    settings = None
    if cfg.refit.trains:
        from quantkit.prune.blocktrain import require_torch, settings_for

        require_torch(cfg.refit.value)  # before any calibration pass
        settings = settings_for(cfg.train_steps)
    before = cost(model, feed, workdir)
    fold_constant_shapes(model)
    original = model.clone() if cfg.refit == PruneRefit.JOINT else None
    if cfg.structure == PruneStructure.CHANNEL:
        from quantkit.prune.structured import prune_channels

        section = prune_channels(model, cfg.ratio, batches, workdir, allocation=cfg.allocation.value, feed=feed,
                                 cache=cache, status=status, sequential=cfg.refit != PruneRefit.ONE_SHOT,
                                 train=cfg.refit.trains, train_batches=train_batches, train_settings=settings)
        for layer in section["layers"]:
            layer["detail"] = f"{layer['channels_before']} -> {layer['channels_after']} channels"
        if original is not None:
            from quantkit.prune.joint import settings_for as joint_settings
            from quantkit.prune.joint import train_joint

            status("training the pruned blocks together (--prune-refit joint)")
            section["joint"] = train_joint(model, original, section["layers"], batches, workdir,
                                           joint_settings(cfg.joint_steps, cfg.joint_loss and cfg.joint_loss.value))
    elif cfg.structure in (PruneStructure.UNSTRUCTURED, PruneStructure.SEMI):
        from quantkit.prune.sparse import prune_sparse

        method = (cfg.method or PruneMethod.WANDA).value
        section = prune_sparse(model, cfg.ratio, cfg.structure == PruneStructure.SEMI, method, batches, workdir)
        for layer in section["layers"]:
            layer["detail"] = f"{layer['weights']:,} weights, {layer['method']}"
    else:
        from quantkit.graph import shapes
        from quantkit.prune.heads import prune_attention

        section = prune_attention(model, cfg.ratio, batches, workdir)
        shapes.infer(model)
        for layer in section["layers"]:
            layer["detail"] = f"{layer['heads_before']} -> {layer['heads_after']} heads"
        if not section["layers"]:
            why = "; ".join(f"{s['layer']}: {s['reason']}" for s in section["skipped"][:3]) or \
                "no MatMul -> Reshape -> Transpose ... Softmax ... output projection pattern"
            raise UnsupportedModelError(f"--prune-structure head found no attention block it can prune ({why}); "
                                        "use --prune-structure channel")
    section = {"structure": cfg.structure.value, "ratio": cfg.ratio,
               "method": cfg.method.value if cfg.method is not None else None,
               "allocation": cfg.allocation.value,
               **summary(before, cost(model, feed, workdir)), **section, "refit": cfg.refit.value}
    return section


def prune_to_target(model: ir.Model, cfg: PruneConfig, batches: Batches, feed: dict[str, np.ndarray], workdir: Path,
                    target, score, status=lambda s: None,
                    train_batches: Batches | None = None) -> tuple[ir.Model, dict | None]:
    """Prune as much as `target` allows, up to cfg.ratio (prune/target.py). Returns the model to
    quantize (the original when no ratio meets half the target) and the report section."""
    from dataclasses import replace

    from quantkit.prune.target import half_budget, search

    cache: dict = {}  # every trial prunes a copy of the same model: statistics and curves measured once

    def prune_at(ratio: float):
        candidate = model.clone()
        return candidate, prune(candidate, replace(cfg, ratio=ratio), batches, feed, workdir, cache, status,
                                train_batches)

    goal = half_budget(target)
    found = search(cfg.ratio, prune_at, score, goal, status)
    info = {"target": target.describe(), "pruning_target": goal.describe(), "max_ratio": cfg.ratio,
            "chosen_ratio": found.ratio, "trials": found.trials}
    if found.model is None:
        return model, {"structure": cfg.structure.value, "ratio": 0.0, "layers": [], "skipped": [],
                       "search": info, "note": f"no pruning ratio up to {cfg.ratio:g} keeps {goal.describe()}"}
    found.section["search"] = info
    return found.model, found.section
