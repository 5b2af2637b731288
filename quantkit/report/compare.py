"""Streaming comparison of a reference and a quantized model's outputs, batch by batch.

Per output: mean and worst per-sample cosine similarity, SQNR in dB over all elements
(10 log10 of signal power over error power), max abs error, top-1 agreement when the output
looks like class scores (rank 2, at least 2 columns), and accuracy against labels for the first
output when labels are given.

A non-finite value where the reference is finite is the worst possible error: it is counted
(`nonfinite`), its sample scores cosine -1, and SQNR and max error become unbounded (null in JSON,
with `nonfinite` saying why); the gates fail on it. Positions where the reference itself is not
finite are compared only for agreement (both NaN, or the same infinity) and counted apart.
"""

from __future__ import annotations

import math

import numpy as np

from quantkit.errors import InputError


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

    def update(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray | None = None) -> None:
        n = ref.shape[0] if ref.ndim else 1
        self.samples += n
        if not np.issubdtype(ref.dtype, np.floating):
            self.is_float = False
            self.scores = False
            self.exact += int(np.all(ref.reshape(n, -1) == q.reshape(n, -1), axis=1).sum())
            return
        r = ref.reshape(n, -1).astype(np.float64)
        d = q.reshape(n, -1).astype(np.float64)
        ref_ok, q_ok = np.isfinite(r), np.isfinite(d)
        broken = ref_ok & ~q_ok  # the quantized model lost a value the reference has
        self.nonfinite += int(broken.sum())
        self.reference_nonfinite += int((~ref_ok).sum())
        self.disagree_nonfinite += int((~ref_ok & ~((r == d) | (np.isnan(r) & np.isnan(d)))).sum())
        finite = ref_ok & q_ok
        r, d = np.where(finite, r, 0.0), np.where(finite, d, 0.0)
        dot = (r * d).sum(axis=1)
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(d, axis=1)
        both_zero = (np.abs(r).sum(axis=1) == 0) & (np.abs(d).sum(axis=1) == 0)
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
        cos = np.where(broken.any(axis=1), -1.0, cos)
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.signal += float((r * r).sum())
        self.noise += float(((r - d) ** 2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(r - d).max(initial=0.0)))
        self.scores = self.scores and looks_like_scores(ref)
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

    def result(self) -> dict:
        out: dict = {"name": self.name, "samples": self.samples}
        if not self.is_float:
            out["exact_match"] = self.exact / max(self.samples, 1)
            return out
        out["cosine_mean"] = self.cos_sum / max(self.samples, 1)
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
        if self.scores:
            out["top1_agreement"] = self.top1_agree / max(self.samples, 1)
            if self.labelled:
                acc_ref = 100.0 * self.correct_ref / self.labelled
                acc_q = 100.0 * self.correct_q / self.labelled
                out["accuracy_fp32"] = acc_ref
                out["accuracy_quantized"] = acc_q
                out["accuracy_drop_points"] = acc_ref - acc_q
        return out
