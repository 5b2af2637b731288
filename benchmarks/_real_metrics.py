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
