"""The accuracy figures of benchmarks/real_models.py (benchmarks/_real_metrics.py) on tiny arrays
whose answers are worked out by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _real_metrics as rm


def one_hot(paths, classes=5):
    return np.eye(classes, dtype=np.float32)[np.asarray(paths)]


def test_ctc_greedy_decode_merges_repeats_then_drops_blanks():
    # a a _ a b b _ _ c  ->  a a b c  (the blank between the a's keeps them apart)
    probs = one_hot([[1, 1, 0, 1, 2, 2, 0, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert rm.ctc_greedy_decode(probs) == [(1, 1, 2, 3), ()]
    assert rm.ctc_collapse(np.array([[4, 4, 4, 2, 0, 2]])) == [(4, 2, 2)]


def test_sequence_and_frame_agreement():
    ref = np.array([[1, 1, 0, 2], [3, 0, 3, 3]])
    test = np.array([[1, 0, 1, 2],   # a blank between the 1's: decodes to (1, 1, 2), not (1, 2)
                     [3, 0, 3, 3]])
    assert rm.ctc_collapse(test[:1]) == [(1, 1, 2)]
    assert rm.sequence_agreement(ref, test) == pytest.approx(0.5)
    assert rm.frame_agreement(ref, test) == pytest.approx(6 / 8)
    # same sequence from different frames: the sequence agrees, the frames do not
    same_seq = np.array([[1, 1, 2, 2], [3, 0, 3, 3]])
    assert rm.sequence_agreement(ref, same_seq) == 1.0
    assert rm.frame_agreement(ref, same_seq) == pytest.approx(7 / 8)


def test_masked_mean_pool_ignores_padding():
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    pooled = rm.masked_mean_pool(hidden, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(pooled, [[2.0, 3.0]])
    # changing a padded token changes nothing
    hidden[0, 2] = [-5.0, 7.0]
    np.testing.assert_allclose(rm.masked_mean_pool(hidden, np.array([[1, 1, 0]])), [[2.0, 3.0]])


def test_row_cosine_and_sqnr():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(rm.row_cosine(a, b), [0.0, 1.0], atol=1e-12)
    ref = np.array([3.0, 4.0])  # signal energy 25
    assert rm.sqnr_db(ref, ref + np.array([0.5, 0.0])) == pytest.approx(10 * np.log10(25 / 0.25))
    assert rm.sqnr_db(ref, ref) == float("inf")


def test_token_sqnr_counts_real_tokens_only():
    ref = np.array([[[1.0, 1.0], [9.0, 9.0]]])
    test = np.array([[[1.0, 0.0], [0.0, 0.0]]])  # the padded token is entirely wrong
    assert rm.token_sqnr_db(ref, test, np.array([[1, 0]])) == pytest.approx(10 * np.log10(2 / 1))


def test_topk_agreement():
    ref = np.array([[[0.9, 0.1, 0.8], [0.7, 0.2, 0.3]]])  # top-3 flat positions: 0, 2, 3
    test = np.array([[[0.9, 0.95, 0.1], [0.7, 0.2, 0.3]]])  # top-3: 1, 0, 3
    assert rm.topk_agreement(ref, test, 3) == pytest.approx(2 / 3)
    assert rm.topk_agreement(ref, ref, 3) == 1.0
    # ties resolve to the lower index, so equal maps always agree fully
    flat = np.ones((2, 4, 4))
    np.testing.assert_array_equal(rm.topk_indices(flat, 3), [[0, 1, 2], [0, 1, 2]])


def test_mask_iou():
    ref = np.array([[0.9, 0.5, 0.1, 0.0]])
    test = np.array([[0.9, 0.1, 0.6, 0.0]])
    assert rm.mask_iou(ref, test, 0.3) == pytest.approx(1 / 3)
    assert rm.mask_iou(np.zeros((1, 3)), np.zeros((1, 3)), 0.3) == 1.0
