"""Accuracy figures for the real-model benchmark (benchmarks/real_models.py): pure numpy, each
comparing a quantized model's outputs with the fp32 model's on the same inputs."""

from __future__ import annotations

import numpy as np


def masked_mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embedding as sentence-transformers computes it: the mean of the token vectors
    whose attention mask is 1. hidden [N, T, D], mask [N, T] -> [N, D]."""
    m = mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a with the same row of b ([N, D] -> [N])."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-30)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB over all elements: 10 log10(sum ref^2 / sum err^2)."""
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def token_sqnr_db(ref: np.ndarray, test: np.ndarray, mask: np.ndarray) -> float:
    """SQNR over the real tokens only (mask 1): padding positions carry no meaning."""
    keep = mask.astype(bool)
    return sqnr_db(ref[keep], test[keep])


def ctc_collapse(paths: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Best-path CTC decoding of per-frame class ids [N, T] as rapidocr's CTCLabelDecode does it:
    merge repeated labels, then drop the blank."""
    out = []
    for path in np.asarray(paths):
        keep = np.ones(len(path), dtype=bool)
        keep[1:] = path[1:] != path[:-1]
        keep &= path != blank
        out.append(tuple(int(i) for i in path[keep]))
    return out


def ctc_greedy_decode(probs: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy (best-path) decoding of frame scores [N, T, C]: argmax per frame, then collapse."""
    return ctc_collapse(probs.argmax(axis=-1), blank)


def sequence_agreement(ref_paths: np.ndarray, test_paths: np.ndarray, blank: int = 0) -> float:
    """Fraction of samples whose decoded label sequences are identical."""
    return float(np.mean([a == b for a, b in zip(ctc_collapse(ref_paths, blank), ctc_collapse(test_paths, blank))]))


def frame_agreement(ref_paths: np.ndarray, test_paths: np.ndarray) -> float:
    """Fraction of (sample, frame) positions whose class ids (per-frame argmax) are the same."""
    return float((np.asarray(ref_paths) == np.asarray(test_paths)).mean())


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k largest values of each sample ([N, ...] -> [N, k]); ties broken by
    the lower index, so the selection is deterministic."""
    flat = x.reshape(len(x), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    return order[:, :k]


def topk_agreement(ref: np.ndarray, test: np.ndarray, k: int) -> float:
    """Mean over samples of |top-k positions of ref  ∩  top-k positions of test| / k."""
    r, t = topk_indices(ref, k), topk_indices(test, k)
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(r, t)]))


def mask_iou(ref: np.ndarray, test: np.ndarray, threshold: float) -> float:
    """IoU of the thresholded maps (ref > t vs test > t) pooled over all samples; 1.0 when both
    are empty."""
    a, b = ref > threshold, test > threshold
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


# ---------------------------------------------------------------- PicoDet layout detector -----------------

def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def box_iou(boxes: np.ndarray, box: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """IoU of each corner-form box [N, 4] with one box [4], as rapid_layout's iou_of computes it
    (eps in the denominator)."""
    lt, rb = np.maximum(boxes[:, :2], box[:2]), np.minimum(boxes[:, 2:], box[2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(axis=1)
    own = np.clip(box[2:] - box[:2], 0, None).prod()
    return inter / (area + own - inter + eps)


def hard_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, top_k: int, candidates: int = 200) -> np.ndarray:
    """rapid_layout's hard_nms: among the `candidates` best scores, keep the best box, drop the
    rest overlapping it by more than `iou`, repeat; at most top_k. Returns kept indices."""
    order = np.argsort(scores)[-candidates:]
    picked = []
    while len(order):
        cur = order[-1]
        picked.append(int(cur))
        if len(picked) == top_k or len(order) == 1:
            break
        order = order[:-1]
        order = order[box_iou(boxes[order], boxes[cur]) <= iou]
    return np.asarray(picked, dtype=np.int64)


def _level_boxes(score: np.ndarray, dist: np.ndarray, stride: int, hw: tuple[int, int], top: int):
    """One head level: anchor centres ((i + 0.5) * stride), the DFL distributions' expectation
    (softmax over the bins, times the bin index) times the stride as the distances to the four
    sides, the `top` anchors by best class score."""
    bins = dist.shape[-1] // 4
    ww, hh = np.meshgrid(np.arange(hw[1] / stride), np.arange(hw[0] / stride))
    cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
    centre = np.stack([cx, cy, cx, cy], axis=1)
    d = (_softmax(dist.reshape(-1, bins).astype(np.float64), 1) * np.arange(bins)).sum(1).reshape(-1, 4) * stride
    keep = np.argsort(score.max(axis=1))[::-1][:top]
    return centre[keep] + np.array([-1, -1, 1, 1]) * d[keep], score[keep]


def picodet_decode(scores: list[np.ndarray], dists: list[np.ndarray], hw: tuple[int, int] = (800, 608),
                   strides=(8, 16, 32, 64), conf: float = 0.5, iou: float = 0.5,
                   nms_top_k: int = 1000, keep_top_k: int = 100):
    """Detections of one image from a PP-PicoDet GFL head, as rapid_layout 1.2.1's PPPostProcess
    decodes them (its defaults: conf 0.5, IoU 0.5): per level scores [N_l, C] and DFL
    distributions [N_l, 4 * bins]; per class, scores > conf, then hard NMS. Boxes are in input
    pixels (x0, y0, x1, y1), clipped to the image. Returns (boxes [K, 4], scores [K], classes [K])."""
    parts = [_level_boxes(s, d, st, hw, nms_top_k) for s, d, st in zip(scores, dists, strides)]
    boxes = np.concatenate([b for b, _ in parts])
    conf_all = np.concatenate([c for _, c in parts])
    out_b, out_s, out_c = [], [], []
    for c in range(conf_all.shape[1]):
        m = conf_all[:, c] > conf
        if not m.any():
            continue
        kept = hard_nms(boxes[m], conf_all[m, c], iou, keep_top_k)
        out_b.append(boxes[m][kept])
        out_s.append(conf_all[m, c][kept])
        out_c.append(np.full(len(kept), c))
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    b = np.concatenate(out_b)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, hw[1])
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, hw[0])
    return b, np.concatenate(out_s), np.concatenate(out_c).astype(np.int64)


def detection_matches(ref, test, iou: float = 0.5) -> int:
    """Greedy matching of one image's test detections to the reference's, best test score first:
    each test box takes the unmatched reference box of the same class with the highest IoU, if
    that IoU is >= `iou`. Detections are (boxes, scores, classes). Returns the matches."""
    rb, _, rc = ref
    tb, ts, tc = test
    free = np.ones(len(rb), dtype=bool)
    hits = 0
    for i in np.argsort(-ts, kind="stable"):
        cand = np.flatnonzero(free & (rc == tc[i]))
        if not len(cand):
            continue
        ious = box_iou(rb[cand], tb[i])
        j = int(np.argmax(ious))
        if ious[j] >= iou:
            free[cand[j]] = False
            hits += 1
    return hits


def detection_f1(refs: list, tests: list, iou: float = 0.5) -> float:
    """F1 of the test detections against the reference detections over all images (a match: same
    class, IoU >= iou, greedy by score): 2 * matches / (reference boxes + test boxes); 1.0 when
    both have none."""
    hits = sum(detection_matches(r, t, iou) for r, t in zip(refs, tests))
    total = sum(len(r[0]) + len(t[0]) for r, t in zip(refs, tests))
    return 1.0 if total == 0 else 2 * hits / total


def anchor_scores(levels: list[np.ndarray]) -> np.ndarray:
    """One image's anchor scores: each anchor's best class score ([N_l, C] per level -> max over C),
    the levels' anchors one after the other in the order given (stride 8 first)."""
    return np.concatenate([np.asarray(s).max(axis=1) for s in levels])


def top_anchor_agreement(ref: list[list[np.ndarray]], test: list[list[np.ndarray]], k: int = 100) -> float:
    """Mean over images of the share of test's k best-scored anchors (anchor_scores, all levels
    together) that are also among ref's k best; ties go to the lower anchor index (topk_indices),
    as the DB detector's top-100 figure does. ref and test: per image, the score maps per level."""
    return topk_agreement(np.stack([anchor_scores(r) for r in ref]), np.stack([anchor_scores(t) for t in test]), k)


def split_picodet_outputs(flat: np.ndarray, anchors=(7600, 1900, 475, 130), classes: int = 10, bins: int = 32):
    """Per sample, the score maps [N_l, classes] and box distributions [N_l, bins] of each level
    back out of the flattened concatenation [N, sum(N_l) * (classes + bins)] (scores first, as
    the model lists its outputs). Returns (scores, dists), each a list per sample of lists per level."""
    sizes = [a * classes for a in anchors] + [a * bins for a in anchors]
    cuts = np.cumsum(sizes)[:-1]
    scores, dists = [], []
    for row in flat:
        parts = np.split(row, cuts)
        scores.append([p.reshape(a, classes) for p, a in zip(parts[:len(anchors)], anchors)])
        dists.append([p.reshape(a, bins) for p, a in zip(parts[len(anchors):], anchors)])
    return scores, dists


# ---------------------------------------------------------------- YOLOv8 detector ---------------------------

def yolo_decode(out: np.ndarray, conf: float = 0.25, iou: float = 0.45, size: int = 320):
    """Detections of one image from an Ultralytics YOLOv8 output [4 + C, anchors] (rows: box centre
    x, y, width, height in input pixels, then the class scores), as NudeNet 3.4.2 decodes its model:
    each anchor's best class, kept when its score > conf, class-agnostic hard NMS at `iou` over all
    of them (cv2.dnn.NMSBoxes), boxes as corners clipped to the input. Returns (boxes, scores,
    classes) like picodet_decode."""
    o = np.asarray(out, dtype=np.float64).T
    scores = o[:, 4:]
    best, cls = scores.max(axis=1), scores.argmax(axis=1)
    m = best > conf
    if not m.any():
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    cx, cy, w, h = o[m, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).clip(0, size)
    kept = hard_nms(boxes, best[m], iou, top_k=int(m.sum()), candidates=int(m.sum()))
    return boxes[kept], best[m][kept], cls[m][kept].astype(np.int64)


def yolo_top_anchor_agreement(ref: np.ndarray, test: np.ndarray, k: int = 100) -> float:
    """top_anchor_agreement for YOLOv8 outputs [N, 4 + C, anchors]: each anchor's best class score,
    the k best of test among the k best of ref, averaged over images."""
    return topk_agreement(np.asarray(ref)[:, 4:].max(axis=1), np.asarray(test)[:, 4:].max(axis=1), k)
