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


# ---- PP-PicoDet decoding (rapid_layout's post-processing) and detection F1 on a 32x32 image ----------------
# two levels: stride 8 (a 4x4 grid of anchors) and stride 16 (2x2); 2 classes; 8 DFL bins per side

def picodet_outputs(peaks):
    """Score maps and box distributions where each (level, anchor, class, score, bin) in peaks is a
    detection whose four side distances are all `bin` bins (the distribution's logits are one-hot)."""
    scores = [np.zeros((16, 2)), np.zeros((4, 2))]
    dists = [np.zeros((16, 32)), np.zeros((4, 32))]
    for level, anchor, cls, score, b in peaks:
        scores[level][anchor, cls] = score
        dists[level][anchor] = np.tile(np.eye(8)[b] * 40.0, 4)
    return scores, dists


def decode(peaks):
    s, d = picodet_outputs(peaks)
    return rm.picodet_decode(s, d, hw=(32, 32), strides=(8, 16))


def test_picodet_decode_puts_the_box_around_the_anchor_centre():
    # anchor 5 of stride 8: row 1, column 1, centre (12, 12); 1 bin = 8 px on each side
    boxes, scores, classes = decode([(0, 5, 1, 0.9, 1)])
    np.testing.assert_allclose(boxes, [[4, 4, 20, 20]], atol=1e-6)
    np.testing.assert_allclose(scores, [0.9])
    np.testing.assert_array_equal(classes, [1])
    # stride 16, anchor 3: centre (24, 24), 2 bins = 32 px: clipped to the 32x32 image
    boxes, _, _ = decode([(1, 3, 0, 0.8, 2)])
    np.testing.assert_allclose(boxes, [[0, 0, 32, 32]], atol=1e-6)


def test_picodet_decode_thresholds_then_suppresses_per_class():
    # at 0.5 (not above the threshold) nothing is kept
    assert len(decode([(0, 5, 0, 0.5, 1)])[0]) == 0
    # anchors 5 and 6 (centres (12, 12) and (20, 12), boxes 16 px wide: IoU 1/3) both survive NMS at 0.5;
    # with 2-bin boxes (32 px wide: IoU 0.6) only the higher score survives
    assert len(decode([(0, 5, 0, 0.9, 1), (0, 6, 0, 0.8, 1)])[0]) == 2
    boxes, scores, _ = decode([(0, 5, 0, 0.7, 2), (0, 6, 0, 0.8, 2)])
    np.testing.assert_allclose(scores, [0.8])
    np.testing.assert_allclose(boxes, [[4, 0, 32, 28]], atol=1e-6)  # (4, -4, 36, 28) clipped
    # the same overlap in two classes: both kept
    assert sorted(decode([(0, 5, 0, 0.7, 2), (0, 6, 1, 0.8, 2)])[2].tolist()) == [0, 1]


def test_detection_f1_identical_shifted_and_wrong_class():
    ref = decode([(0, 5, 1, 0.9, 1), (0, 15, 0, 0.8, 1)])
    assert rm.detection_f1([ref], [ref]) == 1.0
    # the first box moves to anchor 10 (centre (20, 20)): IoU 64 / 448 with the reference, a miss
    shifted = decode([(0, 10, 1, 0.9, 1), (0, 15, 0, 0.8, 1)])
    assert rm.detection_matches(ref, shifted) == 1
    assert rm.detection_f1([ref], [shifted]) == pytest.approx(2 * 1 / (2 + 2))
    # the same boxes with the class of the first one changed: a miss too
    wrong = decode([(0, 5, 0, 0.9, 1), (0, 15, 0, 0.8, 1)])
    assert rm.detection_f1([ref], [wrong]) == pytest.approx(0.5)
    # an extra box costs precision only: 2 matches, 2 + 3 boxes
    extra = decode([(0, 5, 1, 0.9, 1), (0, 15, 0, 0.8, 1), (1, 0, 1, 0.6, 1)])
    assert rm.detection_f1([ref], [extra]) == pytest.approx(4 / 5)
    # pooled over images; no boxes anywhere is full agreement
    none = decode([])
    assert rm.detection_f1([ref, none], [ref, none]) == 1.0
    assert rm.detection_f1([none], [none]) == 1.0
    assert rm.detection_f1([ref], [none]) == 0.0


def test_detection_matching_is_greedy_by_score_one_to_one():
    # two test boxes on one reference box: only the higher-scored one matches
    ref = decode([(0, 5, 0, 0.9, 1)])
    test = (np.array([[4.0, 4, 20, 20], [5, 5, 20, 20]]), np.array([0.6, 0.7]), np.array([0, 0]))
    assert rm.detection_matches(ref, test) == 1
    assert rm.box_iou(test[0][:1], np.array([6.0, 4, 22, 20]))[0] == pytest.approx(14 * 16 / (2 * 256 - 14 * 16),
                                                                                  rel=1e-6)


def test_split_picodet_outputs_round_trips_the_flattened_outputs():
    rng = np.random.default_rng(0)
    anchors = (6, 2)
    maps = [rng.random((2, a, 3)) for a in anchors] + [rng.random((2, a, 8)) for a in anchors]
    flat = np.concatenate([m.reshape(2, -1) for m in maps], axis=1)
    scores, dists = rm.split_picodet_outputs(flat, anchors, classes=3, bins=8)
    for i in range(2):
        for level in range(2):
            np.testing.assert_array_equal(scores[i][level], maps[level][i])
            np.testing.assert_array_equal(dists[i][level], maps[2 + level][i])


def test_top_anchor_agreement_takes_each_anchors_best_class_over_all_levels():
    # two images, two levels (4 and 2 anchors), 2 classes; k = 2
    ref = [[np.array([[0.1, 0.9], [0.2, 0.1], [0.0, 0.3], [0.05, 0.0]]), np.array([[0.8, 0.0], [0.1, 0.2]])],
           [np.array([[0.5, 0.0], [0.0, 0.6], [0.1, 0.1], [0.0, 0.0]]), np.array([[0.0, 0.0], [0.7, 0.0]])]]
    # anchor scores: image 0 [0.9, 0.2, 0.3, 0.05 | 0.8, 0.2] -> top 2: anchors 0 and 4 (a level-2 anchor)
    np.testing.assert_allclose(rm.anchor_scores(ref[0]), [0.9, 0.2, 0.3, 0.05, 0.8, 0.2])
    assert rm.top_anchor_agreement(ref, ref, 2) == 1.0
    # image 0: anchor 4's best class drops to 0.25, anchor 2 (0.3) enters: 1 of 2 kept;
    # image 1 (top: anchors 5 and 1): a class swap at anchor 1 (0.6 moves to the other class) changes nothing
    test = [[ref[0][0], np.array([[0.25, 0.0], [0.1, 0.2]])],
            [np.array([[0.5, 0.0], [0.6, 0.0], [0.1, 0.1], [0.0, 0.0]]), ref[1][1]]]
    assert rm.top_anchor_agreement(ref, test, 2) == pytest.approx((1 / 2 + 1) / 2)
    # a tie at the cut goes to the lower index: all scores equal -> anchors 0 and 1 on both sides
    flat = [[np.full((4, 2), 0.5), np.full((2, 2), 0.5)]]
    lifted = [[np.full((4, 2), 0.5), np.array([[0.5, 0.5], [0.5, 0.51]])]]  # anchor 5 now first
    assert rm.top_anchor_agreement(flat, flat, 2) == 1.0
    assert rm.top_anchor_agreement(flat, lifted, 2) == pytest.approx(1 / 2)


def yolo_output(rows):
    """A YOLOv8 output [4 + 2, anchors]: per anchor (cx, cy, w, h, score class 0, score class 1)."""
    return np.asarray(rows, dtype=np.float32).T


def test_yolo_decode_best_class_threshold_class_agnostic_nms_and_clipping():
    out = yolo_output([(10, 10, 8, 8, 0.9, 0.1),     # box (6, 6, 14, 14), class 0
                       (11, 10, 8, 8, 0.1, 0.8),     # IoU 56 / 72 with the first: suppressed, though class 1
                       (100, 100, 8, 8, 0.25, 0.0),  # at the threshold, not above: dropped
                       (318, 5, 10, 10, 0.3, 0.6)])  # (313, 0, 323, 10) clipped to the 320 input
    boxes, scores, classes = rm.yolo_decode(out)
    np.testing.assert_allclose(boxes, [[6, 6, 14, 14], [313, 0, 320, 10]], atol=1e-6)
    np.testing.assert_allclose(scores, [0.9, 0.6], atol=1e-6)
    np.testing.assert_array_equal(classes, [0, 1])
    # further apart (IoU 16 / 112 at x + 6): both kept, best first
    apart = rm.yolo_decode(yolo_output([(10, 10, 8, 8, 0.9, 0.1), (16, 10, 8, 8, 0.1, 0.8)]))
    np.testing.assert_allclose(apart[1], [0.9, 0.8], atol=1e-6)
    # nothing above the threshold: no boxes; decoded detections feed detection_f1 like PicoDet's
    none = rm.yolo_decode(yolo_output([(10, 10, 8, 8, 0.2, 0.1)]))
    assert len(none[0]) == 0
    assert rm.detection_f1([apart], [apart]) == 1.0
    assert rm.detection_f1([apart], [none]) == 0.0
    assert rm.detection_f1([apart], [rm.yolo_decode(out)]) == pytest.approx(2 * 1 / (2 + 2))


def test_yolo_top_anchor_agreement_uses_the_score_rows_only():
    # 1 image, 3 anchors; box rows are large and must not count; k = 1
    ref = yolo_output([(300, 300, 300, 300, 0.1, 0.9), (1, 1, 1, 1, 0.5, 0.0), (1, 1, 1, 1, 0.0, 0.2)])[None]
    assert rm.yolo_top_anchor_agreement(ref, ref, 1) == 1.0
    test = ref.copy()
    test[0, 4, 1] = 0.95  # anchor 1's class 0 now beats anchor 0's best
    assert rm.yolo_top_anchor_agreement(ref, test, 1) == 0.0
    assert rm.yolo_top_anchor_agreement(ref, test, 2) == 1.0
