"""Blockwise int4/int8 maths, and the packed layouts checked against onnxruntime's kernels."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.quantize import blockwise as bw

from models import run


def test_pack_unpack_roundtrip_odd_length():
    codes = np.random.default_rng(0).integers(0, 16, size=(3, 5, 7)).astype(np.uint8)
    packed = bw.pack(codes, 4)
    assert packed.shape == (3, 5, 4)
    np.testing.assert_array_equal(bw.unpack(packed, 4, 7), codes)
    assert bw.pack(np.array([1, 2], np.uint8), 4).tolist() == [0x21]  # low nibble first


@pytest.mark.parametrize("symmetric", [True, False])
def test_blockwise_error_is_within_half_a_step_per_block(symmetric):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(100, 12)).astype(np.float32)  # K not a multiple of the block
    qb = bw.quantize_blockwise(w, bits=4, block=32, symmetric=symmetric)
    assert qb.q.shape == (12, 4, 32) and qb.scales.shape == (12, 4)
    err = np.abs(qb.dequantize() - w)
    step = np.abs(np.repeat(qb.scales.T, 32, axis=0)[:100])
    # symmetric: values opposite to the block's extreme may sit one step past the last code
    assert np.all(err <= (step if symmetric else step / 2) + 1e-6)
    assert np.mean(err <= step / 2 + 1e-6) > 0.99
    if symmetric:
        assert np.all(qb.zero_points == 8)


def _matmul_nbits_model(qb: bw.Blockwise, n: int, with_zp: bool):
    inits = [numpy_helper.from_array(bw.pack(qb.q, qb.bits), "B"),
             numpy_helper.from_array(qb.scales.reshape(-1), "scales")]
    inputs = ["A", "B", "scales"]
    if with_zp:
        zp = bw.pack(qb.zero_points, qb.bits).reshape(-1)
        inits.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=qb.k, N=n, bits=qb.bits,
                            block_size=qb.block)
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, qb.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits,symmetric,block", [(4, True, 32), (4, False, 16), (4, False, 64), (8, False, 32)])
def test_matmul_nbits_in_onnxruntime_computes_a_times_our_dequantized_weight(bits, symmetric, block):
    rng = np.random.default_rng(2)
    k, n = 96, 40
    w = rng.normal(size=(k, n)).astype(np.float32)
    qb = bw.quantize_blockwise(w, bits=bits, block=block, symmetric=symmetric)
    a = rng.normal(size=(5, k)).astype(np.float32)
    (y,) = run(_matmul_nbits_model(qb, n, with_zp=not symmetric), {"A": a})
    np.testing.assert_allclose(y, a @ qb.dequantize(), rtol=1e-4, atol=1e-3)


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    from quantkit.quantize.gptq import gptq_blockwise

    rng = np.random.default_rng(3)
    k, n = 128, 64
    # correlated inputs with uneven channel scales, as real activations have
    mix = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    x = (rng.normal(size=(2048, k)) @ mix * rng.uniform(0.2, 3.0, size=k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    h = 2.0 * (x.astype(np.float64).T @ x) / len(x)
    ref = x @ w
    rtn = bw.quantize_blockwise(w, 4, 32, symmetric=True)
    gq = gptq_blockwise(w, h, 4, 32, symmetric=True)
    err_rtn = np.mean((x @ rtn.dequantize() - ref) ** 2)
    err_gptq = np.mean((x @ gq.dequantize() - ref) ** 2)
    assert err_gptq < 0.8 * err_rtn
    assert gq.q.max() <= 15 and np.all(gq.zero_points == 8)


def _reference_blocks(w: np.ndarray, bits: int, block: int, symmetric: bool):
    """Scalar loops, one block at a time (no tiles, no threads): codes (N, kb, block), scales, zero points."""
    k, n = w.shape
    kb, qmax, mid = -(-k // block), 2**bits - 1, 2 ** (bits - 1)
    pad = np.zeros((kb * block, n), np.float32)
    pad[:k] = w
    codes, scales, zps = np.zeros((n, kb, block), np.uint8), np.zeros((n, kb), np.float32), np.zeros((n, kb), np.uint8)
    for j in range(n):
        for b in range(kb):
            x = pad[b * block:(b + 1) * block, j]
            if symmetric:  # onnxruntime's rule: |max| > |min| ? max : min
                s, zp = (x.max() if x.max() > -x.min() else x.min()) / np.float32(-mid), mid
            else:
                lo, hi = min(x.min(), np.float32(0)), max(x.max(), np.float32(0))
                s = (hi - lo) / np.float32(qmax)
                zp = int(np.clip(np.round(-lo / (s if s > 0 else np.float32(1))), 0, qmax))
            s = np.float32(s if s != 0 else 1)
            codes[j, b] = np.clip(np.rint(x / s) + np.float32(zp), 0, qmax).astype(np.uint8)
            scales[j, b], zps[j, b] = s, zp
    return codes, scales, zps


@pytest.mark.parametrize("bits,symmetric,block", [(4, True, 16), (4, False, 32), (8, True, 16), (8, False, 16)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_tiled_threaded_rounding_equals_a_block_by_block_reference(monkeypatch, bits, symmetric, block, order):
    """Tiles of a few block rows and columns, transposed through small cache blocks on two threads:
    the same codes, scales and zero points as rounding each block on its own; row-major weights and
    column-major ones (an embedding table's transpose); K not a multiple of the block; ties."""
    monkeypatch.setattr(bw, "CHUNK_ELEMENTS", 3 * block * 8)
    monkeypatch.setattr(bw, "TILE_COLUMNS", 8)
    monkeypatch.setattr(bw, "COPY_BLOCK", 4)
    monkeypatch.setattr(bw, "WORKERS", 2)
    rng = np.random.default_rng(7)
    w = rng.normal(size=(block * 5 + 3, 37)).astype(np.float32)
    w[::5, ::3] = np.round(w[::5, ::3] * 2)  # many +a/-a ties inside blocks
    w[:block, 0] = 0  # an all-zero block
    w = np.asfortranarray(w) if order == "F" else w
    assert len(bw._tiles(*w.shape, block)) > 6
    qb, err = bw.quantize_measured(w, bits, block, symmetric)
    codes, scales, zps = _reference_blocks(np.ascontiguousarray(w), bits, block, symmetric)
    np.testing.assert_array_equal(qb.q, codes)
    np.testing.assert_array_equal(qb.scales, scales)
    np.testing.assert_array_equal(qb.zero_points, zps)
    monkeypatch.setattr(bw, "WORKERS", 1)
    np.testing.assert_array_equal(bw.quantize_blockwise(w, bits, block, symmetric).q, codes)
    # the error measured in the same pass is the one of the dequantized weight, summed in float64
    deq = qb.dequantize().astype(np.float64)
    want_err, want_sig = np.sum((w.astype(np.float64) - deq) ** 2), np.sum(w.astype(np.float64) ** 2)
    assert err.error == pytest.approx(want_err, rel=1e-6) and err.signal == pytest.approx(want_sig, rel=1e-6)
    assert err.count == w.size
    again = bw.rounding_error(w, qb)  # the same figure for codes rounded elsewhere (GPTQ)
    assert (again.error, again.signal, again.count) == pytest.approx((err.error, err.signal, err.count), rel=1e-6)


def test_symmetric_ties_round_like_onnxruntimes_own_quantizer(tmp_path):
    """onnxruntime's MatMulNBits quantizer on the same weight writes the same packed codes and scales,
    also for blocks whose largest magnitude is both +a and -a."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    rng = np.random.default_rng(4)
    k, n = 64, 48
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[3, :24], w[20, :24] = 4.0, -4.0  # ties, + first
    w[40, 24:], w[50, 24:] = -4.0, 4.0  # ties, - first
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = mnq.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True,
                                 algo_config=mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True))
    q.process()
    inits = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    packed = next(v for name, v in inits.items() if v.dtype == np.uint8 and v.ndim == 3)
    ort_scales = next(v for name, v in inits.items() if v.dtype == np.float32).reshape(n, -1)
    ours = bw.quantize_blockwise(w, 4, 32, symmetric=True)
    np.testing.assert_array_equal(ours.scales, ort_scales)
    np.testing.assert_array_equal(bw.pack(ours.q, 4), packed)
    assert np.all(ours.scales[:24, 0] == 0.5) and np.all(ours.scales[24:, 1] == 0.5)  # -4 won both kinds of tie


def test_gptq_of_layers_sharing_an_input_equals_each_on_its_own():
    from quantkit.quantize.gptq import gptq_blockwise, gptq_many, upper_factor_of_inverse

    rng = np.random.default_rng(5)
    k = 200
    x = rng.normal(size=(300, k)).astype(np.float32)
    h = 2.0 * (x.astype(np.float64).T @ x) / len(x)
    h[np.diag_indices_from(h)] += 0.01 * np.mean(np.diag(h))
    u = upper_factor_of_inverse(h)
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=0, atol=1e-10 * np.abs(u).max())
    assert np.array_equal(u, np.triu(u))
    ws = [rng.normal(size=(k, m)).astype(np.float32) for m in (24, 8, 40)]
    for w, got in zip(ws, gptq_many(ws, h, 4, 32, True)):
        want = gptq_blockwise(w, h, 4, 32, True)
        assert got.q.shape == want.q.shape and got.k == k
        np.testing.assert_array_equal(got.q, want.q)
        np.testing.assert_array_equal(got.scales, want.scales)
