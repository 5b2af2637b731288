"""The maths of structured pruning, pure numpy: channel statistics, importance, and the
least-squares refit of a consumer layer.

A consumer computes y = x W + b with x the C channels of the pruned group (a MatMul's K, a 1x1
Conv's input channels). The statistics are the Gram matrix of [x, 1] over every calibration
position, accumulated batch by batch (memory: one batch plus a (C+1)^2 matrix). Removing the
channels outside S, the kept weights are re-solved so the block output is preserved:

    min_{W', b'} ||X_S W' + b' - (X W + b)||^2 + lam ||W' - W_S||^2

whose normal equations only need the Gram: (G_SS + lam I) [W'; b'] = G_S,all [W; b] + lam [W_S; b].
The ridge pulls towards plain removal (W' = W_S), not towards zero, so a small calibration set
cannot drive the refit far from the trained weights. Its weight shrinks as the calibration set
grows (ridge_for): it stands for a fixed amount of prior evidence, not a fixed share of the data.

Positions can be weighted (0 for padded tokens, whose outputs no reader uses), and the target can
be another model's output (sequential pruning, sequential.py): with T the target rows and X the
pruned model's inputs, the normal equations need G = X^T X and X^T T only (Target below).
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-1  # lam as a fraction of the mean diagonal of G_SS, up to RIDGE_SAMPLES calibration samples
# beyond them lam stays the evidence of RIDGE_SAMPLES samples (its share falls as 1/samples): on MiniLM
# the best fraction was 0.1 at 128 sentences and 0.003-0.01 at 1,024 (BENCHMARKS.md, issue 14)
RIDGE_SAMPLES = 128


def rows_of(x: np.ndarray, axis: int) -> np.ndarray:
    """[positions, channels]: the channels on `axis`, every other axis a position (in order)."""
    return np.moveaxis(np.asarray(x, np.float32), axis, -1).reshape(-1, x.shape[axis])


def _augmented(x: np.ndarray, axis: int) -> np.ndarray:
    rows = rows_of(x, axis)
    return np.concatenate([rows, np.ones((len(rows), 1), np.float32)], axis=1)


class Gram:
    """Sum of [x, 1]^T [x, 1] over all positions of the channels of one tensor (per-batch products
    in float32, summed in float64), each position weighted (padded tokens: 0); with full=False only
    the per-channel sums and squares. `count` is the total weight, `samples` the batch items seen."""

    def __init__(self, channels: int, full: bool = True):
        self.matrix = np.zeros((channels + 1, channels + 1)) if full else None
        self.sq, self.sum = np.zeros(channels), np.zeros(channels)
        self.count = 0.0
        self.samples = 0

    def update(self, x: np.ndarray, axis: int, weights: np.ndarray | None = None) -> np.ndarray:
        """x holds the channels on `axis`; every other axis is a position. `weights`: one per
        position (in rows_of order) or None (all 1). Returns the weighted augmented rows."""
        aug = _augmented(x, axis)
        wa = aug if weights is None else aug * np.asarray(weights, np.float32).reshape(-1, 1)
        rows, wrows = aug[:, :-1].astype(np.float64), wa[:, :-1].astype(np.float64)
        self.sq += np.sum(wrows * rows, axis=0)
        self.sum += np.sum(wrows, axis=0)
        self.count += float(len(aug) if weights is None else np.sum(weights))
        self.samples += x.shape[0] if axis % x.ndim != 0 else 1
        if self.matrix is not None:
            self.matrix += wa.T @ aug
        return wa

    @property
    def channels(self) -> int:
        return len(self.sq)

    def rms(self) -> np.ndarray:
        """Root mean square of each channel over the positions."""
        return np.sqrt(self.sq / max(self.count, 1))

    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)


class Target:
    """X^T T for a refit towards target rows T ([positions, N]) on inputs X: the right-hand side
    of the normal equations when the target is not the pruned layer's own output."""

    def __init__(self, channels: int, outputs: int):
        self.matrix = np.zeros((channels + 1, outputs))

    def update(self, weighted_rows: np.ndarray, target_rows: np.ndarray) -> None:
        """weighted_rows: what Gram.update returned for the same positions."""
        self.matrix += weighted_rows.T @ np.asarray(target_rows, np.float32)


def ridge_for(gram: Gram) -> float:
    """The ridge fraction for a refit on `gram`'s data: RIDGE up to RIDGE_SAMPLES samples, then
    shrinking as 1/samples (a fixed prior weight against a growing amount of evidence)."""
    return RIDGE * min(1.0, RIDGE_SAMPLES / max(gram.samples, 1))


def importance(rms: np.ndarray, w_rows: np.ndarray) -> np.ndarray:
    """Channel importance for one consumer: activation RMS x the norm of the weights it feeds
    (the expected size of the channel's contribution to the consumer's output). w_rows [C, ...]."""
    return rms * np.linalg.norm(w_rows.reshape(len(w_rows), -1), axis=1)


def keep_count(channels: int, ratio: float) -> int:
    """Channels kept when pruning `ratio` of them: at least one; wide layers keep a multiple of 8
    (the nearest) so the pruned GEMMs stay on the kernels' vector widths."""
    keep = channels - int(round(channels * ratio))
    if channels >= 64:
        keep = min(channels, max(8, int(round(keep / 8)) * 8))
    return max(1, keep)


def select(score: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the `keep` highest scores, in channel order (ties: the lower index)."""
    order = np.argsort(-score, kind="stable")[:keep]
    return np.sort(order)


def ridge_solve(g: np.ndarray, rhs: np.ndarray, start: np.ndarray, idx: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_v ||X_idx v - T||^2 + lam ||v - start||^2 from G = X^T X and rhs = X^T T (all rows;
    idx selects), lam = ridge x the mean diagonal of G_idx,idx. start [len(idx), N]."""
    a = g[np.ix_(idx, idx)]
    lam = ridge * max(float(np.mean(np.diag(a))), 1e-12)
    lhs, right = a + lam * np.eye(len(idx)), rhs[idx] + lam * start
    try:
        return np.linalg.solve(lhs, right)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, right, rcond=None)[0]


def _stacked(w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return np.concatenate([w, (b if b is not None else np.zeros(w.shape[1]))[None, :]], axis=0).astype(np.float64)


def refit(gram: Gram, w: np.ndarray, b: np.ndarray | None, keep: np.ndarray, ridge: float | None = None,
          target: Target | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares weights for the kept input channels of y = x w + b (w [C, N], b [N] or None:
    then no bias is fitted), towards the layer's own output (target None) or towards `target`'s rows
    (ridge still towards plain removal). Returns (w' [len(keep), N], b' or None)."""
    full = _stacked(w, b)
    idx = np.concatenate([keep, [gram.channels]]) if b is not None else keep
    rhs = gram.matrix @ full if target is None else target.matrix
    sol = ridge_solve(gram.matrix, rhs, full[idx], idx, ridge_for(gram) if ridge is None else ridge)
    if b is not None:
        return sol[:-1].astype(w.dtype), sol[-1].astype(b.dtype)
    return sol.astype(w.dtype), None


def target_weights(gram: Gram, w: np.ndarray, b: np.ndarray | None, target: Target) -> np.ndarray:
    """The weights [C, N] that best give `target` from every input channel (ridge towards w): the
    layer an optimal-brain-surgeon selection then removes rows from (the target's least-squares
    error splits into this fit's residual plus the removal cost measured on the Gram)."""
    idx = np.arange(gram.channels + 1)
    return ridge_solve(gram.matrix, target.matrix, _stacked(w, b), idx, ridge_for(gram))[:-1]


def removal_bias(gram: Gram, w_sum: np.ndarray, b: np.ndarray | None, keep: np.ndarray) -> np.ndarray:
    """The bias that makes up for the mean of the removed channels under plain removal, for
    spatial kernels where the full refit does not apply: b + sum_removed mean_c * w_c, with
    w_sum [C, N] each channel's kernel summed over its taps (exact away from the padded border)."""
    removed = np.setdiff1d(np.arange(gram.channels), keep)
    base = np.zeros(w_sum.shape[1]) if b is None else b.astype(np.float64)
    return base + gram.mean()[removed] @ w_sum[removed].astype(np.float64)


def output_error(gram: Gram, w: np.ndarray, b: np.ndarray | None, keep: np.ndarray,
                 w_new: np.ndarray, b_new: np.ndarray | None) -> float:
    """Mean squared error of the consumer output after pruning, from the Gram alone:
    E||[x, 1] (full - new)||^2, with `new` the kept rows replaced by the new weights (zero elsewhere)."""
    c = gram.channels
    zero = np.zeros(w.shape[1])
    full = np.concatenate([w, (b if b is not None else zero)[None, :]], axis=0).astype(np.float64)
    new = np.zeros_like(full)
    new[keep] = w_new
    new[c] = b_new if b_new is not None else (b if b is not None else zero)
    d = full - new
    return float(np.einsum("in,ij,jn->", d, gram.matrix, d) / max(gram.count, 1) / w.shape[1])


def obs_select(layers: list[tuple[Gram, np.ndarray]], keep: int, damp: float = 0.01) -> np.ndarray:
    """Channels to keep, removed one at a time by the optimal-brain-surgeon rule for whole input
    rows (as in ZipLM): with H = G + damp*mean(diag) I over [x, 1] and its inverse Hinv, removing
    channel c and re-solving the others costs sum_n w[c, n]^2 / Hinv[c, c] of output error; after
    each removal w and Hinv get the rank-one updates of the re-solved problem. `layers` is every
    consumer of the group as (Gram, w [C, N]); their costs add up. The bias row is never removed."""
    state = []
    for gram, w in layers:
        h = gram.matrix.copy()
        h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
        full = np.concatenate([w, np.zeros((1, w.shape[1]))], axis=0).astype(np.float64)
        state.append([np.linalg.inv(h), full])
    channels = layers[0][0].channels
    alive = np.ones(channels, dtype=bool)
    removals = channels - keep
    step = max(1, removals // 32)  # wide layers: several channels per update (each costs ~ C^2 N)
    while removals > 0:
        cost = np.zeros(channels)
        for hinv, w in state:
            d = np.maximum(np.diag(hinv)[:channels], 1e-30)
            cost += np.sum(w[:channels] ** 2, axis=1) / d
        cost[~alive] = np.inf
        q = np.argsort(cost, kind="stable")[:min(step, removals)]
        alive[q] = False
        removals -= len(q)
        for item in state:  # the block form of the rank-one updates: remove all of q at once
            hinv, w = item
            cols = hinv[:, q] @ np.linalg.inv(hinv[np.ix_(q, q)])
            item[1] = w - cols @ w[q]
            item[0] = hinv - cols @ hinv[q]
    return np.flatnonzero(alive)


def obs_select_groups(gram: Gram, w: np.ndarray, groups: list[np.ndarray], keep: int,
                      damp: float = 0.01) -> np.ndarray:
    """Which of the row `groups` (e.g. attention heads) to keep: removed one group at a time by
    the block optimal-brain-surgeon cost sum_n w_g,n^T (Hinv_gg)^-1 w_g,n, with the updates of
    w and Hinv after each removal. Returns the indices of the kept groups."""
    h = gram.matrix.copy()
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    hinv = np.linalg.inv(h)
    w = np.concatenate([w, np.zeros((1, w.shape[1]))], axis=0).astype(np.float64)
    alive = list(range(len(groups)))
    while len(alive) > keep:
        costs = []
        for g in alive:
            q = groups[g]
            block = np.linalg.inv(hinv[np.ix_(q, q)])
            costs.append(float(np.einsum("in,ij,jn->", w[q], block, w[q])))
        q = groups[alive.pop(int(np.argmin(costs)))]
        cols = hinv[:, q] @ np.linalg.inv(hinv[np.ix_(q, q)])
        w = w - cols @ w[q]
        hinv = hinv - cols @ hinv[q]
    return np.array(alive, dtype=np.int64)
