"""What matters for a language model, measured next to the per-output figures.

An output is taken as next-token logits when it is float, rank 3 ([batch, positions, vocab]) with
a vocabulary axis of at least MIN_VOCAB, and is named like logits (or is the only rank-3 output).
Over every scored position (where an `attention_mask` input is 1, when the data has one):

  top1_agreement   argmax of the quantized logits == argmax of the fp32 logits
  kl_mean          mean KL(p_fp32 || p_quantized) of the next-token distributions, in nats
  perplexity_*     exp(mean negative log-likelihood of the true next token), when the data carries
                   a `targets` array [samples, positions]: the id of the token that should follow
                   each position (already shifted; negative ids are not scored)

All in float64, a chunk of positions at a time so the [positions, vocab] temporaries stay small.
"""

from __future__ import annotations

import math

import numpy as np

from quantkit.calibrate.data import TARGETS

MIN_VOCAB = 16
CHUNK_ELEMENTS = 1 << 22  # positions x vocab per float64 temporary (32 MB)


def logits_index(names: list[str], outputs: list[np.ndarray]) -> int | None:
    cands = [i for i, x in enumerate(outputs)
             if np.issubdtype(np.asarray(x).dtype, np.floating) and np.ndim(x) == 3 and np.shape(x)[-1] >= MIN_VOCAB]
    named = [i for i in cands if "logit" in names[i].lower()]
    if named:
        return named[0]
    return cands[0] if len(cands) == 1 else None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Tracker:
    """Feed it every batch's reference and quantized outputs; it finds the logits on the first."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.index: int | None = None
        self.decided = False
        self.positions = self.agree = self.targets = 0
        self.kl_sum = self.nll_ref = self.nll_q = 0.0
        self.kl_max = 0.0

    def update(self, ref: list[np.ndarray], q: list[np.ndarray], batch: dict[str, np.ndarray]) -> None:
        if not self.decided:
            self.index, self.decided = logits_index(self.names, ref), True
        if self.index is None:
            return
        r, x = np.asarray(ref[self.index]), np.asarray(q[self.index])
        n, s, v = r.shape
        keep = np.ones((n, s), bool)
        mask = batch.get("attention_mask")
        if mask is not None and mask.shape[0] == n and mask.shape[-1] >= s:
            keep = mask[:, -s:] != 0  # with a cache, the mask covers past + new positions
        tgt = batch.get(TARGETS)
        tgt = tgt[:, -s:].reshape(-1) if tgt is not None and tgt.shape[0] == n and tgt.shape[-1] >= s else None
        rows = np.flatnonzero(keep.reshape(-1))
        r2, x2 = r.reshape(n * s, v), x.reshape(n * s, v)
        step = max(1, CHUNK_ELEMENTS // v)
        for i in range(0, len(rows), step):
            idx = rows[i:i + step]
            self._chunk(r2[idx].astype(np.float64), x2[idx].astype(np.float64), None if tgt is None else tgt[idx])

    def _chunk(self, r: np.ndarray, x: np.ndarray, tgt: np.ndarray | None) -> None:
        lr, lx = _log_softmax(r), _log_softmax(x)
        kl = np.maximum((np.exp(lr) * (lr - lx)).sum(axis=-1), 0.0)
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max(initial=0.0)))
        self.agree += int((r.argmax(axis=-1) == x.argmax(axis=-1)).sum())
        self.positions += len(r)
        if tgt is not None:
            ok = (tgt >= 0) & (tgt < r.shape[-1])
            rows = np.flatnonzero(ok)
            self.targets += len(rows)
            self.nll_ref -= float(lr[rows, tgt[rows]].sum())
            self.nll_q -= float(lx[rows, tgt[rows]].sum())

    def result(self) -> dict | None:
        if self.index is None or not self.positions:
            return None
        out = {"output": self.names[self.index], "positions": self.positions,
               "top1_agreement": self.agree / self.positions, "kl_mean": self.kl_sum / self.positions,
               "kl_max": self.kl_max}
        if self.targets:
            out.update(target_positions=self.targets, perplexity_fp32=math.exp(self.nll_ref / self.targets),
                       perplexity_quantized=math.exp(self.nll_q / self.targets))
        return out
