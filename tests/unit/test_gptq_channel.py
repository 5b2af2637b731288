"""GPTQ on the per-channel int8 grid (quantize/gptq_channel.py) and the convolution patch Hessians it
rounds against (calibrate/patches.py): the im2col rows reproduce onnxruntime's Conv, the codes keep
quantize_weight's scales exactly, lower the layer's output error against rounding to nearest on
correlated (planted) inputs, never raise it, and come out the same on every run."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from quantkit.calibrate.observers import make_observer
from quantkit.calibrate.patches import ConvGeometry, PatchGramObserver, patches, sample_positions
from quantkit.quantize import qparams as qp
from quantkit.quantize.gptq_channel import QMAX, QMIN, round_rows, round_weight

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[2, 6, 9, 11] x, float[4, 3, 3, 2] w) => (float[2, 4, 5, 10] y) {
    y = Conv <pads = [1, 0, 2, 1], strides = [2, 1], dilations = [1, 2], group = 2> (x, w)
}
"""


def _correlated(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Inputs whose channels are strongly correlated (a few latent factors plus a little noise), as
    a convolution's neighbouring taps or a BN-folded layer's channels are: GPTQ's case."""
    latent = rng.normal(size=(rows, 3)).astype(np.float32)
    return (latent @ rng.normal(size=(3, k)).astype(np.float32) + 0.1 * rng.normal(size=(rows, k))).astype(np.float32)


def _onnx_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(onnx.parser.parse_model(CONV).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "w": w})[0]


def _geometry() -> ConvGeometry:
    node = ir.node("Conv", inputs=[], attributes={"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2],
                                                 "group": 2})
    geo = ConvGeometry.of(node, (4, 3, 3, 2))
    assert geo is not None
    return geo


def test_patches_times_the_weight_is_onnxruntimes_convolution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 9, 11)).astype(np.float32)
    w = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    geo = _geometry()
    assert (geo.group, geo.k) == (2, 18)
    p = patches(x, geo)  # (group, N * positions, K)
    rows = w.reshape(2, 2, 18)  # per group: its 2 output channels' rows
    y = np.einsum("gpk,gnk->gnp", p, rows).reshape(4, 2, 5, 10).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(y, _onnx_conv(x, w), rtol=1e-5, atol=1e-5)


def test_patch_gram_observer_sums_over_batches_and_is_made_from_its_kind():
    rng = np.random.default_rng(1)
    geo = _geometry()
    obs = make_observer(geo.key())
    assert isinstance(obs, PatchGramObserver) and obs.geometry == geo
    a, b = rng.normal(size=(2, 6, 9, 11)).astype(np.float32), rng.normal(size=(3, 6, 9, 11)).astype(np.float32)
    obs.update(a)
    obs.update(b)
    p = patches(np.concatenate([a, b]), geo).astype(np.float64)
    expect = 2 * np.matmul(p.transpose(0, 2, 1), p) / p.shape[1]
    assert obs.rows == 5 * 5 * 10  # 5 samples x (5 x 10) output positions
    np.testing.assert_allclose(obs.hessians(), expect, rtol=1e-5, atol=1e-5)  # float32 products


def test_a_one_group_convolution_gives_one_hessian_and_many_positions_are_sampled_evenly():
    rng = np.random.default_rng(6)
    node = ir.node("Conv", inputs=[], attributes={"pads": [1, 1, 1, 1]})
    geo = ConvGeometry.of(node, (5, 4, 3, 3))
    assert geo is not None and (geo.group, geo.k) == (1, 36)
    obs = PatchGramObserver(geo.key().partition(":")[2])
    x = rng.normal(size=(3, 4, 30, 40)).astype(np.float32)  # 3 x 1200 output positions
    obs.update(x)
    rows = obs.rows_per_batch()
    assert rows == 288 and obs.rows == rows  # 8 K rows of the batch's 3600, not all of them
    # spread over the image: an early layer's 8 x 24 x 160 positions, 256 taken, reach most columns and rows
    # (a fixed stride of 120 would visit 4 columns)
    idx = sample_positions(8 * 24 * 160, 256)
    assert len(idx) == 256 and len(np.unique(idx % 160)) > 80 and len(np.unique(idx // 160 % 24)) == 24
    p = patches(x, geo)[0].astype(np.float64)
    picked = p[sample_positions(len(p), rows)]
    np.testing.assert_allclose(obs.hessians(), (2 * picked.T @ picked / rows)[None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_codes_lower_the_output_error_on_the_same_per_channel_grid(seed):
    rng = np.random.default_rng(seed)
    x = _correlated(rng, 2000, 48)
    w = rng.normal(size=(48, 24)).astype(np.float32)  # MatMul (K, N)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    r = round_weight(w, h[None], "kn")
    q_rtn, s_rtn, zp_rtn = qp.quantize_weight(w, 1)
    assert np.array_equal(r.scale, s_rtn) and np.array_equal(r.zero_point, zp_rtn)  # the grid is unchanged
    assert r.q.dtype == np.int8 and r.q.shape == w.shape and r.q.min() >= QMIN and r.q.max() <= QMAX
    assert not np.array_equal(r.q, q_rtn)  # the codes really move
    out = lambda q: float(np.sum((x @ (w - qp.dequantize(q, r.scale, r.zero_point, 1))) ** 2))  # noqa: E731
    assert out(r.q) < 0.7 * out(q_rtn)
    # the reported errors are the d^T H d of each rounding (H = 2 X^T X / n)
    assert r.error == pytest.approx(2 * out(r.q) / len(x), rel=1e-4)
    assert r.error_rtn == pytest.approx(2 * out(q_rtn) / len(x), rel=1e-4)


def test_a_depthwise_convolution_is_rounded_per_channel_against_its_own_patches():
    rng = np.random.default_rng(3)
    c = 8
    node = ir.node("Conv", inputs=[], attributes={"pads": [1, 1, 1, 1], "group": c})
    geo = ConvGeometry.of(node, (c, 1, 3, 3))
    assert geo is not None and (geo.group, geo.k) == (c, 9)
    # smooth images: neighbouring taps are correlated
    x = np.cumsum(np.cumsum(rng.normal(size=(4, c, 12, 12)), axis=2), axis=3).astype(np.float32)
    w = rng.normal(size=(c, 1, 3, 3)).astype(np.float32)
    obs = PatchGramObserver(geo.key().partition(":")[2])
    obs.update(x)
    r = round_weight(w, obs.hessians(), "conv")
    q_rtn, scale, _ = qp.quantize_weight(w, 0)
    assert np.array_equal(r.scale, scale)
    p = patches(x, geo)

    def err(q: np.ndarray) -> np.ndarray:  # per channel: output error power
        d = (w - qp.dequantize(q, scale, np.zeros(c, np.int8), 0)).reshape(c, 1, 9)
        return np.sum(np.matmul(p, d.transpose(0, 2, 1)) ** 2, axis=(1, 2))

    assert np.all(err(r.q) <= err(q_rtn) * (1 + 1e-6))  # never worse, channel by channel
    assert err(r.q).sum() < 0.8 * err(q_rtn).sum()


def test_a_row_where_gptq_would_lose_keeps_rounding_to_nearest_and_runs_are_identical():
    rng = np.random.default_rng(4)
    k = 16
    w = rng.normal(size=(1, 6, k)).astype(np.float32)
    h = np.eye(k)[None] * 2.0  # uncorrelated inputs: RTN is optimal, GPTQ's codes can only tie or lose
    codes, scale, e_rtn, e = round_rows(w, h)
    rtn = np.clip(np.rint(w / scale[:, :, None]), QMIN, QMAX)
    assert np.array_equal(codes, rtn) and np.array_equal(e, e_rtn)
    x = _correlated(rng, 500, k)
    h2 = (2 * x.T.astype(np.float64) @ x / len(x))[None]
    first, again = round_rows(w, h2), round_rows(w.copy(), h2.copy())
    for a, b in zip(first, again):
        assert np.array_equal(a, b)


def test_a_hessian_with_non_finite_values_leaves_rounding_to_nearest():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(1, 4, 8)).astype(np.float32)
    h = np.eye(8)[None].copy()
    h[0, 2, 3] = np.nan
    codes, scale, _, _ = round_rows(w, h)
    assert np.array_equal(codes, np.clip(np.rint(w / scale[:, :, None]), QMIN, QMAX))


def test_dead_input_channels_round_to_nearest():
    rng = np.random.default_rng(5)
    x = _correlated(rng, 400, 12)
    x[:, 3] = 0.0  # an input that is always zero: its weights cannot matter on the data, they stay RTN
    w = rng.normal(size=(12, 5)).astype(np.float32)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    r = round_weight(w, h[None], "kn")
    q_rtn, _, _ = qp.quantize_weight(w, 1)
    assert np.array_equal(r.q[3], q_rtn[3])
