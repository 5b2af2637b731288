"""Which encoding each tensor gets.

Float tensors of at least MIN_LOSSY elements (`--exact-below`) take a lossy encoding of their delta; everything
else (integer weights and scales of quantized models, biases, norms, small convolutions) goes
bit-exact, which costs little since those tensors are small or change little.

`--method auto`: every lossy tensor gets a menu of encodings (sign, top-k at several densities,
low rank at several ranks, int4, int8, exact), each with its estimated compressed size and its
relative error ||d - d^|| / ||d||. One knob `tau` picks, for every tensor, the cheapest entry
whose error is at most tau; the knob is searched (bisection over a fixed ladder, a handful of
onnxruntime evaluations) for the largest tau whose reconstructed model still meets the target on
the eval data. tau = 0 is the exact update, which meets any target, so the search always ends.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantkit.delta import encodings as enc

MIN_LOSSY = 1024
DENSITIES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
RANKS = (1, 2, 4, 8, 16, 32, 64)
TAUS = (0.95, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2, 0.12, 0.06, 0.03, 0.01, 0.0)


def lossy_eligible(a: np.ndarray, exact_below: int = MIN_LOSSY) -> bool:
    return a.dtype in (np.float16, np.float32, np.float64) and a.size >= max(exact_below, 1)


@dataclass
class Candidate:
    encoded: enc.Encoded
    cost: int  # estimated bytes after the lossless stage
    error: float  # ||d - decoded|| / ||d||


def estimated_bytes(e: enc.Encoded) -> int:
    """Deflate at its fastest level over the arrays: ranks encodings as the final xz stage would."""
    return len(zlib.compress(b"".join(np.ascontiguousarray(a).tobytes() for a in e.arrays.values()), 1))


def relative_error(d: np.ndarray, e: enc.Encoded) -> float:
    norm = float(np.linalg.norm(d))
    return float(np.linalg.norm(d - enc.decode(e, d.shape))) / norm if norm else 0.0


def encode_fixed(d: np.ndarray, method: str, density: float, rank: int, values: str = "fp32") -> enc.Encoded:
    if not np.any(d):
        return enc.Encoded("unchanged")
    if method == "lowrank" and d.ndim < 2:
        return enc.encode(d, "int8")  # a vector has no rank to cut: int8 blocks instead
    return enc.encode(d, method, density=density, rank=rank, values=values)


def menu(d: np.ndarray, base: np.ndarray, new: np.ndarray | None) -> list[Candidate]:
    """The Pareto front (cost up, error down) of the encodings tried for one tensor's delta.
    `new` is None when a residual is folded into d: then no bit-exact NEW is on the menu."""
    if not np.any(d):
        return [Candidate(enc.Encoded("unchanged"), 0, 0.0)]
    tried = [enc.encode(d, "sign"), enc.encode(d, "int4"), enc.encode(d, "int8")]
    tried += [enc.encode(d, "topk", density=p, values=v) for p in DENSITIES for v in ("int8", "fp32")]
    rows, cols = enc.as_matrix(d.shape)
    ranks = [r for r in RANKS if r * (rows + cols) < rows * cols // 4] if d.ndim >= 2 else []
    if ranks:
        factors = enc.top_singular(d.reshape(rows, cols), max(ranks))
        tried += [enc.encode_lowrank(d, r, factors) for r in ranks]
    cands = [Candidate(e, estimated_bytes(e), relative_error(d, e)) for e in tried]
    if new is not None:
        exact = enc.encode_exact(base, new)
        cands.append(Candidate(exact, estimated_bytes(exact), 0.0))
    else:  # a residual is folded in: the float64 delta itself is the lossless fallback
        dense = enc.Encoded("topk", {"k": d.size, "density": 1.0}, enc.encode_topk(d, 1.0).arrays)
        cands.append(Candidate(dense, estimated_bytes(dense), relative_error(d, dense)))
    cands.sort(key=lambda c: (c.cost, c.error))
    front, best = [], np.inf
    for c in cands:
        if c.error < best:
            front.append(c)
            best = c.error
    return front


def pick(front: list[Candidate], tau: float) -> Candidate:
    """The cheapest entry within tau; the most accurate one when none is."""
    for c in front:
        if c.error <= tau:
            return c
    return front[-1]


def search(menus: dict[str, list[Candidate]],
           passes: Callable[[dict[str, enc.Encoded]], tuple[bool, list[dict]]],
           status: Callable[[str], None] = lambda s: None):
    """The largest tau on the ladder whose choices pass; returns (choices, outputs, log)."""
    def at(i: int) -> dict[str, enc.Encoded]:
        return {n: pick(m, TAUS[i]).encoded for n, m in menus.items()}

    def cost(i: int) -> int:
        return sum(pick(m, TAUS[i]).cost for m in menus.values())

    log, results = [], {}
    lo, hi = 0, len(TAUS) - 1  # TAUS[hi] = 0 is the exact update and passes any target
    while lo < hi:
        mid = (lo + hi) // 2
        ok, outputs = passes(at(mid))
        results[mid] = outputs
        log.append({"tau": TAUS[mid], "estimated_bytes": cost(mid), "passed": ok})
        status(f"auto: tau {TAUS[mid]:g}, ~{cost(mid)} bytes: {'meets' if ok else 'misses'} the target")
        if ok:
            hi = mid
        else:
            lo = mid + 1
    return at(hi), results.get(hi), log
