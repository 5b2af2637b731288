"""The output comparison leaves out padding positions named by an attention mask."""

from __future__ import annotations

import numpy as np

from quantkit.report.compare import OutputComparison, padding_mask


def _batch(rng: np.random.Generator):
    ref = rng.normal(size=(4, 6, 8)).astype(np.float32)
    mask = np.ones((4, 6), np.int64)
    mask[:, 4:] = 0  # the last two positions of every sequence are padding
    got = ref + 0.01 * rng.normal(size=ref.shape).astype(np.float32)
    got[:, 4:] = rng.normal(size=(4, 2, 8))  # garbage where nobody reads
    return ref, got, mask


def test_padding_positions_do_not_count():
    rng = np.random.default_rng(0)
    ref, got, mask = _batch(rng)
    with_mask, without = OutputComparison("y"), OutputComparison("y")
    with_mask.update(ref, got, feed={"input_ids": np.zeros((4, 6), np.int64), "attention_mask": mask})
    without.update(ref, got)
    a, b = with_mask.result(), without.result()
    assert a["padding_positions_excluded"] == 8 and "padding_positions_excluded" not in b
    assert a["cosine_mean"] > 0.999 > b["cosine_mean"]
    # exactly the comparison of the real positions alone
    alone = OutputComparison("y")
    alone.update(ref[:, :4], got[:, :4])
    assert a["cosine_mean"] == alone.result()["cosine_mean"]
    assert a["sqnr_db"] == alone.result()["sqnr_db"]


def test_a_mask_is_used_only_when_it_lines_up_and_is_zero_one():
    out = np.zeros((2, 5, 3), np.float32)
    m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert padding_mask({"attention_mask": m}, out).sum() == 8
    assert padding_mask({"attention_mask": m}, np.zeros((2, 3), np.float32)) is None  # pooled output
    assert padding_mask({"attention_mask": np.ones((2, 5), np.int64)}, out) is None  # masks nothing
    assert padding_mask({"attention_mask": m * 3}, out) is None  # not 0/1
    assert padding_mask({"token_type_ids": m}, out) is None  # not a mask by name
    assert padding_mask({"attention_mask": m.astype(np.float32)}, out) is None  # additive float masks differ


def test_per_position_class_probabilities_get_a_top1_agreement_per_position():
    from quantkit.report.compare import per_position_probabilities

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 10, 7))
    ref = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    got = ref.copy()
    got[0, 3] = got[0, 3][::-1]  # one position's classes reversed: its top class changes
    c = OutputComparison("probs")
    c.update(ref, got)
    assert per_position_probabilities(ref)
    assert c.result()["position_top1_agreement"] == (40 - 1) / 40
    assert "top1_agreement" not in c.result()  # not a (batch, classes) output
    hidden = OutputComparison("hidden")  # features, not probabilities: no such figure
    hidden.update(logits.astype(np.float32), logits.astype(np.float32))
    assert "position_top1_agreement" not in hidden.result()

