"""Range methods against brute-force references on synthetic distributions."""

import numpy as np
import pytest

from quantkit.calibrate.observers import HistogramObserver
from quantkit.calibrate.ranges import (
    Levels,
    entropy_range,
    expected_sq_error,
    mse_range,
    percentile_range,
    select_range,
)
from quantkit.quantize import qparams as qp

UINT8 = Levels(255, False)
INT8 = Levels(254, True)


def _hist(x, bins=2048, batches=8):
    h = HistogramObserver(bins=bins)
    for part in np.array_split(x, batches):
        h.update(part)
    return h


def _gauss_with_outliers(seed=0, n=200_000, outliers=20, at=40.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n).astype(np.float32)
    x[rng.choice(n, outliers, replace=False)] = at
    return x


def _fake_quant_mse(x, lo, hi, qtype, symmetric):
    scale, zp = qp.qparams(lo, hi, qtype, symmetric)
    return float(np.mean((qp.dequantize(qp.quantize(x, scale, zp, qtype), scale, zp) - x) ** 2))


def test_percentile_matches_numpy_percentile_within_a_bin():
    x = np.random.default_rng(1).standard_t(3, 100_000).astype(np.float32)
    h = _hist(x)
    lo, hi = percentile_range(h, UINT8, percentile=99.0)
    assert lo == pytest.approx(np.percentile(x, 0.5), abs=2 * h.width)
    assert hi == pytest.approx(np.percentile(x, 99.5), abs=2 * h.width)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_percentile_and_entropy_clip_planted_outliers_minmax_does_not(method):
    # 5 outliers in 200k: fewer than the 10 values each 99.99% tail gives up
    x = _gauss_with_outliers(outliers=5)
    h = _hist(x)
    (lo, hi), _ = select_range(h, "minmax", UINT8)
    assert hi == 40.0
    (lo, hi), _ = select_range(h, method, UINT8)
    assert 2.5 < hi < 8.0 and -8.0 < lo < -2.5


def _entropy_reference(hist, quant_bins):
    """TensorRT's calibration written out with plain loops, for small histograms."""
    best, best_i = np.inf, None
    for i in range(quant_bins, len(hist) + 1):
        p = [float(v) for v in hist[:i]]
        p[-1] += float(sum(hist[i:]))
        q = [0.0] * i
        for g in range(quant_bins):
            members = [j for j in range(i) if (j * quant_bins) // i == g]
            nz = [j for j in members if hist[j] > 0]
            for j in nz:
                q[j] = sum(hist[m] for m in members) / len(nz)
        ps, qs = sum(p), sum(q)
        kl = sum((a / ps) * np.log((a / ps) / (b / qs if b > 0 else 1e-12)) for a, b in zip(p, q) if a > 0)
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_entropy_threshold_matches_the_reference_search():
    x = np.abs(np.random.default_rng(2).laplace(0, 1, 20_000)).astype(np.float32)
    h = _hist(x, bins=64, batches=1)  # non-negative data: |x| histogram == histogram
    from quantkit.calibrate.ranges import _abs_histogram

    hist, width = _abs_histogram(h)
    i_ref = _entropy_reference(hist, 16)
    levels = Levels(15, False)  # 16 quantization bins for a non-negative tensor
    _, hi = entropy_range(h, levels, max_candidates=10_000)
    assert hi == pytest.approx(min(i_ref * width, h.hi), rel=1e-9)


def test_expected_error_formula_matches_fake_quantization_on_samples():
    x = _gauss_with_outliers(outliers=200, at=6.0)
    h = _hist(x)
    for lo, hi in [(-4.0, 4.0), (-2.0, 3.0), (float(x.min()), 6.0)]:
        formula = float(expected_sq_error(h, [lo], [hi], UINT8)[0])
        actual = _fake_quant_mse(x, lo, hi, qp.UINT8, symmetric=False)
        assert formula == pytest.approx(actual, rel=0.1)


@pytest.mark.parametrize("levels,qtype,symmetric", [(UINT8, qp.UINT8, False), (INT8, qp.INT8, True)])
def test_mse_range_is_near_the_brute_force_optimum(levels, qtype, symmetric):
    x = _gauss_with_outliers(n=50_000, outliers=12, at=12.0)
    h = _hist(x)
    lo, hi = mse_range(h, levels)
    got = _fake_quant_mse(x, lo, hi, qtype, symmetric)
    grid = np.linspace(0.02, 1.0, 40)
    brute = min(_fake_quant_mse(x, x.min() * a, x.max() * b, qtype, symmetric) for a in grid for b in grid)
    assert got <= brute * 1.05
    assert got < _fake_quant_mse(x, x.min(), x.max(), qtype, symmetric)


def test_auto_picks_the_candidate_with_least_expected_error_and_names_it():
    x = _gauss_with_outliers()
    h = _hist(x)
    (lo, hi), name = select_range(h, "auto", UINT8)
    assert name in {"minmax", "entropy", "mse", "percentile 99.9", "percentile 99.99", "percentile 99.999"}
    chosen = expected_sq_error(h, [lo], [hi], UINT8)[0]
    for m in ("minmax", "percentile", "entropy", "mse"):
        (a, b), _ = select_range(h, m, UINT8)
        assert chosen <= expected_sq_error(h, [a], [b], UINT8)[0] + 1e-15


def test_relu_like_tensor_keeps_zero_as_its_lower_end():
    x = np.maximum(np.random.default_rng(3).normal(size=50_000), 0).astype(np.float32)
    h = _hist(x)
    for m in ("minmax", "percentile", "entropy", "mse", "auto"):
        (lo, hi), _ = select_range(h, m, UINT8)
        assert lo == 0.0 and 1.0 < hi <= x.max()
