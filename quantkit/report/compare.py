"""Streaming comparison of a reference and a quantized model's outputs, batch by batch.

Per output: mean and worst per-sample cosine similarity, SQNR in dB over all elements
(10 log10 of signal power over error power), max abs error, top-1 agreement when the output
looks like class scores (rank 2, at least 2 columns), and accuracy against labels for the first
output when labels are given.

A non-finite value where the reference is finite is the worst possible error: it is counted
(`nonfinite`), its sample scores cosine -1, and SQNR and max error become unbounded (null in JSON,
with `nonfinite` saying why); the gates fail on it. Positions where the reference itself is not
finite are compared only for agreement (both NaN, or the same infinity) and counted apart.

Padding is not compared: when the batch feeds a 0/1 attention mask of shape (batch, sequence) and an
output starts with those two axes, the positions the mask zeroes (padding tokens, which every consumer
of the output ignores) are left out of every figure and counted in `padding_positions_excluded`.
"""

from __future__ import annotations

import math

import numpy as np

from quantkit.errors import InputError

MASK_INPUTS = ("attention_mask", "input_mask", "padding_mask")


def zero_one_mask(m) -> bool:
    """A (batch, sequence) array of integer 0s and 1s: the shape and values of a padding mask."""
    return m is not None and np.ndim(m) == 2 and np.asarray(m).dtype.kind in "biu" and bool(np.isin(m, (0, 1)).all())


def padding_mask(feed: dict[str, np.ndarray] | None, out: np.ndarray) -> np.ndarray | None:
    """The (batch, sequence) positions of `out` that hold real tokens, from a 0/1 attention-mask
    input (by its name); None when there is no such input, it does not line up with `out`, or
    it masks nothing."""
    for name, m in (feed or {}).items():
        if not any(name.lower().endswith(k) for k in MASK_INPUTS):
            continue
        m = np.asarray(m)
        if out.ndim >= 2 and tuple(out.shape[:2]) == m.shape and zero_one_mask(m) and not m.all():
            return m.astype(bool)
    return None


def per_position_probabilities(x: np.ndarray) -> bool:
    """(batch, positions, classes) with every row a probability distribution: a CTC recognizer's or
    a tagger's output, whose reader takes each position's top class."""
    if not np.issubdtype(x.dtype, np.floating) or x.ndim != 3 or x.shape[-1] < 2 or x.size == 0:
        return False
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        return False
    return bool(np.all(np.abs(x.sum(axis=-1, dtype=np.float64) - 1.0) < 1e-3))


BLANK_SHARE = 0.5  # a per-position output whose commonest top class holds this share of positions is read as CTC


def ctc_blank(top: np.ndarray) -> int | None:
    """The blank class of a CTC output, from its reference top classes (batch, positions): CTC
    emits blank at most positions, so the commonest top class is blank when it holds at least
    BLANK_SHARE of them; None when none does (a tagger's output: no decoding applies)."""
    counts = np.bincount(top.reshape(-1))
    return int(counts.argmax()) if counts.size and counts.max() >= BLANK_SHARE * top.size else None


def ctc_decode(top: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of each row of top classes: repeats collapsed, blanks removed."""
    keep = np.ones(top.shape, bool)
    keep[:, 1:] = top[:, 1:] != top[:, :-1]
    keep &= top != blank
    return [tuple(row[k].tolist()) for row, k in zip(top, keep)]


def looks_like_scores(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating) and x.ndim == 2 and x.shape[1] >= 2


class OutputComparison:
    def __init__(self, name: str):
        self.name = name
        self.samples = 0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.exact = 0  # non-float outputs: samples that match exactly
        self.is_float = True
        self.scores = True
        self.top1_agree = 0
        self.labelled = 0
        self.correct_ref = 0
        self.correct_q = 0
        self.nonfinite = 0  # values non-finite in the quantized output where the reference is finite
        self.reference_nonfinite = 0  # reference values that are not finite themselves
        self.disagree_nonfinite = 0  # of those, positions where the quantized output differs
        self.padding = 0  # (batch, sequence) positions left out: padding by the attention mask
        self.positions = 0  # per-position class probabilities: positions compared...
        self.position_agree = 0  # ...and where the top class is the same
        self.per_position = True
        self.blank: int | None = None  # CTC blank class, from the first batch of per-position probabilities
        self.sequence_agree = 0  # samples whose CTC-decoded sequences are the same

    @property
    def ctc(self) -> bool:
        """Whether the output is read as CTC: per-position class probabilities with a blank class."""
        return self.per_position and self.blank is not None

    def update(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray | None = None,
               feed: dict[str, np.ndarray] | None = None) -> None:
        """One batch; `feed` (the batch's inputs) lets padding positions be left out."""
        n = ref.shape[0] if ref.ndim else 1
        keep = padding_mask(feed, ref) if np.issubdtype(ref.dtype, np.floating) else None
        if keep is not None:
            self.padding += int((~keep).sum())
            shape = keep.shape + (1,) * (ref.ndim - 2)
            ref, q = np.where(keep.reshape(shape), ref, 0), np.where(keep.reshape(shape), q, 0)
        self.samples += n
        if not np.issubdtype(ref.dtype, np.floating):
            self.is_float = False
            self.scores = False
            self.exact += int(np.all(ref.reshape(n, -1) == q.reshape(n, -1), axis=1).sum())
            return
        r = ref.reshape(n, -1).astype(np.float64)
        d = q.reshape(n, -1).astype(np.float64)
        broken_rows = None
        if not (np.isfinite(ref).all() and np.isfinite(q).all()):
            r, d, broken_rows = self._finite_part(r, d)
        # row sums of products in one pass each (einsum), no temporaries the size of the batch
        rr, dd, rd = (np.einsum("ij,ij->i", a, b) for a, b in ((r, r), (d, d), (r, d)))
        diff = r - d
        norms = np.sqrt(rr) * np.sqrt(dd)
        both_zero = (rr == 0) & (dd == 0)
        if both_zero.any() or ((norms == 0) & ~both_zero).any():  # squares that underflow: test the values
            both_zero = (np.abs(r).sum(axis=1) == 0) & (np.abs(d).sum(axis=1) == 0)
        cos = np.where(norms > 0, rd / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
        cos = np.where(broken_rows, -1.0, cos) if broken_rows is not None else cos
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.signal += float(rr.sum())
        self.noise += float(np.einsum("ij,ij->", diff, diff))
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))
        self.scores = self.scores and looks_like_scores(ref)
        self.per_position = self.per_position and per_position_probabilities(ref)
        if self.per_position:
            top_r, top_q = ref.argmax(axis=-1), q.argmax(axis=-1)
            self.positions += ref.shape[0] * ref.shape[1]
            self.position_agree += int((top_r == top_q).sum())
            if self.samples == n:  # the first batch says whether this is a CTC output
                self.blank = ctc_blank(top_r)
            if self.blank is not None:
                self.sequence_agree += sum(a == b for a, b in zip(ctc_decode(top_r, self.blank),
                                                                 ctc_decode(top_q, self.blank)))
        if self.scores:
            top_r, top_q = ref.argmax(axis=1), q.argmax(axis=1)
            self.top1_agree += int((top_r == top_q).sum())
            if labels is not None:
                labels = np.asarray(labels).reshape(-1)
                if labels.size and labels.max() >= ref.shape[1]:
                    raise InputError(f"labels hold class id {int(labels.max())}, but output '{self.name}' has "
                                     f"only {ref.shape[1]} classes (ids 0..{ref.shape[1] - 1})")
                self.labelled += n
                self.correct_ref += int((top_r == labels).sum())
                self.correct_q += int((top_q == labels).sum())

    def _finite_part(self, r: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts the batch's non-finite values and returns both with them zeroed; marks the rows
        where the quantized model lost a value the reference has (they score cosine -1)."""
        ref_ok, q_ok = np.isfinite(r), np.isfinite(d)
        broken = ref_ok & ~q_ok  # the quantized model lost a value the reference has
        self.nonfinite += int(broken.sum())
        self.reference_nonfinite += int((~ref_ok).sum())
        self.disagree_nonfinite += int((~ref_ok & ~((r == d) | (np.isnan(r) & np.isnan(d)))).sum())
        finite = ref_ok & q_ok
        return np.where(finite, r, 0.0), np.where(finite, d, 0.0), broken.any(axis=1)

    def result(self) -> dict:
        out: dict = {"name": self.name, "samples": self.samples}
        if not self.is_float:
            out["exact_match"] = self.exact / max(self.samples, 1)
            return out
        out["cosine_mean"] = self.cos_sum / max(self.samples, 1)
        if self.padding:
            out["padding_positions_excluded"] = self.padding
        out["cosine_min"] = self.cos_min if self.samples else None
        out["nonfinite"] = self.nonfinite
        if self.reference_nonfinite:
            out["reference_nonfinite"] = self.reference_nonfinite
            out["reference_nonfinite_disagree"] = self.disagree_nonfinite
        if self.nonfinite:
            out["sqnr_db"] = None  # unbounded error; `nonfinite` says why
        elif self.noise == 0:
            out["sqnr_db"] = None  # identical outputs: infinite SQNR, which JSON cannot hold
        else:
            out["sqnr_db"] = 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)
        out["max_abs_error"] = None if self.nonfinite else self.max_abs
        if self.per_position and self.positions:
            out["position_top1_agreement"] = self.position_agree / self.positions
            if self.blank is not None:
                out["ctc_blank"] = self.blank
                out["ctc_sequence_agreement"] = self.sequence_agree / max(self.samples, 1)
        if self.scores:
            out["top1_agreement"] = self.top1_agree / max(self.samples, 1)
            if self.labelled:
                acc_ref = 100.0 * self.correct_ref / self.labelled
                acc_q = 100.0 * self.correct_q / self.labelled
                out["accuracy_fp32"] = acc_ref
                out["accuracy_quantized"] = acc_q
                out["accuracy_drop_points"] = acc_ref - acc_q
        return out
