"""Per-layer pruning ratios from a sensitivity measure, pure numpy.

Each channel group is pruned alone (with its refit) at a few ratios on probe batches, and the
model's output noise is measured each time: sum over outputs of ||y - y_ref||^2 / ||y_ref||^2.
Noise from independent small perturbations adds up, so spreading a global budget is a knapsack
over the groups' curves: with each curve replaced by its lower convex hull, taking the hull
segments in the order of their noise per unit removed is optimal, and the last segment is taken
in part to land on the budget exactly. The unit is what a group's pruning saves: the
multiply-accumulates of its layers (producers, carriers, consumers), so `ratio` of the prunable
work is removed where it costs the least noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # ratios each group is tried at alone


@dataclass
class Curve:
    """One group's noise when pruned alone: errors[i] at ratios[i] (both starting at 0)."""

    name: str
    size: float  # budget units the whole group holds (pruning ratio r saves r * size)
    ratios: list[float]
    errors: list[float]


def noise(reference: list[np.ndarray], got: list[np.ndarray], masks: list[np.ndarray | None] | None = None) -> float:
    """Sum over outputs of the noise-to-signal power ratio (non-finite outputs: infinite). masks:
    per output, the (batch, sequence) positions to count (real tokens) or None (all)."""
    total = 0.0
    for i, (r, g) in enumerate(zip(reference, got)):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        m = masks[i] if masks else None
        if m is not None:
            r64, g64 = r64[m], g64[m]
        if not np.all(np.isfinite(g64)):
            return float("inf")
        total += float(np.sum((g64 - r64) ** 2) / max(np.sum(r64 ** 2), 1e-30))
    return total


def hull(ratios: list[float], errors: list[float]) -> list[int]:
    """Indices of the lower convex hull of the points (ratio, error), from the first point on;
    an error that is not finite ends the curve."""
    pts = [i for i in range(len(ratios)) if np.isfinite(errors[i])]
    out: list[int] = []
    for i in pts:
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            da, db = (ratios[b] - ratios[a], errors[b] - errors[a]), (ratios[i] - ratios[a], errors[i] - errors[a])
            cross = da[0] * db[1] - da[1] * db[0]
            if cross > 0:
                break
            out.pop()
        out.append(i)
    return out


def allocate(curves: list[Curve], ratio: float) -> list[float]:
    """Each group's ratio such that sum(size * r) = ratio * sum(size), taking the hull segments of
    all curves cheapest first (noise per unit removed). Groups whose curves stop short cap the
    total: the result may then remove less than asked."""
    segments = []
    for gi, c in enumerate(curves):
        idx = hull(c.ratios, c.errors)
        for a, b in zip(idx, idx[1:]):
            units = c.size * (c.ratios[b] - c.ratios[a])
            if units > 0:
                segments.append((max(c.errors[b] - c.errors[a], 0.0) / units, gi, c.ratios[a], c.ratios[b]))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    left = ratio * sum(c.size for c in curves)
    out = [0.0] * len(curves)
    for _, gi, r0, r1 in segments:
        if left <= 0:
            break
        if out[gi] != r0:  # an earlier segment of this group was not fully taken
            continue
        size = curves[gi].size
        step = min(r1 - r0, left / size)
        out[gi] = r0 + step
        left -= step * size
    return out
