"""Per-group pruning ratios measured on the model (--prune-allocation sensitivity): every safe
channel group is pruned alone, refit included, at the ratios of allocate.GRID; the model's output
noise on a few calibration batches gives each group's curve, and allocate.allocate spreads the
budget over the curves. The curves depend on the model and data only, so a ratio search (an
accuracy target) measures them once and re-allocates for each ratio it tries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.prune import refit as rf
from quantkit.prune.allocate import GRID, Curve, noise
from quantkit.prune.groups import Group, find_groups
from quantkit.prune.report import node_macs
from quantkit.report.compare import padding_mask

PROBE_SAMPLES = 32  # calibration samples the curves are measured on
STOP = 1.0  # a group's curve ends once its noise reaches the signal's power


def safe_groups(model: ir.Model) -> tuple[list[Group], list[Group]]:
    """(the groups that can be pruned, all groups), in graph order."""
    groups = find_groups(model)
    return [g for g in groups if g.reason is None and g.consumers], groups


def group_size(group: Group, macs: dict[str, int] | None) -> float:
    """The work pruning the whole group would remove: the MACs of its layers (weight elements
    when MACs are unknown). A layer shared by two groups counts in both (first order)."""
    nodes = [*group.producers, *group.carriers, *group.consumers]
    if macs:
        return float(sum(macs.get(n.name, 0) for n in nodes)) or 1.0
    return float(sum(n.inputs[1].const_value.size for n in nodes if n.inputs[1].const_value is not None)) or 1.0


class Probe:
    """A few calibration batches and the unpruned model's outputs on them."""

    def __init__(self, model: ir.Model, batches, workdir: Path):
        self.workdir = workdir
        sess = runtime.session(model, workdir, tag="pruning sensitivity")
        names = {i.name for i in sess.get_inputs()}
        self.feeds, n = [], 0
        for b in batches:
            self.feeds.append({k: v for k, v in b.items() if k in names})
            n += len(next(iter(b.values())))
            if n >= PROBE_SAMPLES:
                break
        self.samples = n
        self.reference = [sess.run(None, f) for f in self.feeds]
        # outputs laid out (batch, sequence, ...) with an attention mask: only the real tokens count
        self.masks = [[padding_mask(f, y) for y in ref] for f, ref in zip(self.feeds, self.reference)]

    def noise(self, model: ir.Model) -> float:
        sess = runtime.session(model, self.workdir, tag="pruning sensitivity")
        return float(np.mean([noise(r, sess.run(None, f), m)
                              for r, f, m in zip(self.reference, self.feeds, self.masks)]))


def _alone(model: ir.Model, index: int, keep: int, stats, choose, prune_group) -> ir.Model:
    """A copy of `model` with only safe group `index` pruned to `keep` channels (refit included)."""
    copy = model.clone()
    group = safe_groups(copy)[0][index]
    prune_group(group, choose(group, stats, keep), stats)
    return copy


def curves(model: ir.Model, safe: list[Group], stats, batches, feed, workdir: Path,
           status=lambda s: None) -> list[Curve]:
    """Each safe group's output noise when pruned alone at the GRID ratios."""
    from quantkit.prune.structured import choose, prune_group

    probe = Probe(model, batches(), workdir)
    macs = node_macs(model, feed, workdir)
    out = []
    for i, g in enumerate(safe):
        status(f"pruning sensitivity: group {i + 1} of {len(safe)}")
        ratios, errors = [0.0], [0.0]
        for keep in sorted({rf.keep_count(g.channels, r) for r in GRID} - {g.channels}, reverse=True):
            e = probe.noise(_alone(model, i, keep, stats, choose, prune_group))
            ratios.append(1 - keep / g.channels)
            errors.append(e)
            if not e < STOP:
                break
        out.append(Curve(g.name, group_size(g, macs), ratios, errors))
    return out


def section(found: list[Curve], ratios: list[float]) -> dict:
    """The report's view of the allocation."""
    return {"method": "sensitivity", "grid": list(GRID), "probe_samples": PROBE_SAMPLES,
            "curves": [{"group": c.name, "macs": c.size, "ratios": [round(r, 4) for r in c.ratios],
                        "noise": [float(f"{e:.4g}") for e in c.errors], "chosen": round(r, 4)}
                       for c, r in zip(found, ratios)]}

