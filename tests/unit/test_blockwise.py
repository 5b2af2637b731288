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
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


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
