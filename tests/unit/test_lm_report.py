"""report/lm.py against a direct float64 computation of the same figures."""

from __future__ import annotations

import math

import numpy as np

from quantkit.report import lm


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_agreement_kl_and_perplexity_match_a_direct_computation(monkeypatch):
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 3 * 40)  # several chunks per batch
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (2, 5, 40)).astype(np.float32)
    q = (ref + rng.normal(0, 0.5, ref.shape)).astype(np.float32)
    targets = rng.integers(0, 40, (2, 5))
    targets[1, 2] = -100  # not scored
    mask = np.ones((2, 7), np.int64)
    mask[0, -1] = 0  # the last new position of sample 0 is padding
    t = lm.Tracker(["hidden", "logits"])
    t.update([np.zeros((2, 4)), ref], [np.zeros((2, 4)), q], {"targets": targets, "attention_mask": mask})
    r = t.result()
    keep = mask[:, -5:].astype(bool)
    p, pq = _softmax(ref.astype(np.float64))[keep], _softmax(q.astype(np.float64))[keep]
    kl = (p * (np.log(p) - np.log(pq))).sum(-1)
    assert r["output"] == "logits" and r["positions"] == 9
    assert math.isclose(r["kl_mean"], kl.mean(), rel_tol=1e-9)
    assert r["top1_agreement"] == (ref.argmax(-1) == q.argmax(-1))[keep].mean()
    scored = keep & (targets >= 0)
    nll = -np.log(_softmax(ref.astype(np.float64))[scored, targets[scored]]).mean()
    nll_q = -np.log(_softmax(q.astype(np.float64))[scored, targets[scored]]).mean()
    assert r["target_positions"] == 8
    assert math.isclose(r["perplexity_fp32"], math.exp(nll), rel_tol=1e-9)
    assert math.isclose(r["perplexity_quantized"], math.exp(nll_q), rel_tol=1e-9)


def test_no_logits_output_means_no_language_model_section():
    t = lm.Tracker(["scores"])
    x = np.ones((2, 10), np.float32)
    t.update([x], [x], {})
    assert t.result() is None
    assert lm.logits_index(["a", "b"], [np.zeros((1, 2, 32)), np.zeros((1, 2, 32))]) is None
    assert lm.logits_index(["a", "lm_logits"], [np.zeros((1, 2, 32)), np.zeros((1, 2, 32))]) == 1
