import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.quantize import qparams as qp

from models import run


def test_asymmetric_uint8_maps_range_ends_onto_0_and_255():
    scale, zp = qp.qparams(-1.0, 3.0, qp.UINT8, symmetric=False)
    assert scale == pytest.approx(4.0 / 255)
    assert zp == 64  # round(1 / (4/255)) = round(63.75)
    q = qp.quantize(np.array([-1.0, 0.0, 3.0]), scale, zp, qp.UINT8)
    assert q.tolist() == [0, 64, 255]


def test_range_is_widened_to_include_zero_so_zero_is_exact():
    scale, zp = qp.qparams(2.0, 5.0, qp.UINT8, symmetric=False)
    assert zp == 0 and scale == pytest.approx(5.0 / 255)
    assert qp.dequantize(qp.quantize(np.zeros(3), scale, zp, qp.UINT8), scale, zp).tolist() == [0, 0, 0]


def test_symmetric_int8_is_odd_and_has_zero_zero_point():
    scale, zp = qp.qparams(-0.5, 2.0, qp.INT8, symmetric=True)
    assert zp == 0 and scale == pytest.approx(2.0 / 127)
    x = np.linspace(-2, 2, 101, dtype=np.float32)
    q = qp.quantize(x, scale, zp, qp.INT8)
    np.testing.assert_array_equal(qp.quantize(-x, scale, zp, qp.INT8), -q)
    assert q.min() >= -127 and q.max() <= 127


def test_roundtrip_error_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 10_000).astype(np.float32)
    scale, zp = qp.qparams(x.min(), x.max(), qp.UINT8, symmetric=False)
    err = np.abs(qp.dequantize(qp.quantize(x, scale, zp, qp.UINT8), scale, zp) - x)
    assert err.max() <= scale / 2 * (1 + 1e-5)


def test_all_zero_tensor_gets_a_finite_scale():
    scale, zp = qp.qparams(0.0, 0.0, qp.INT8, symmetric=True)
    assert np.isfinite(scale) and scale > 0 and zp == 0
    assert qp.quantize(np.zeros(4), scale, zp, qp.INT8).tolist() == [0, 0, 0, 0]


def test_per_channel_matches_per_tensor_on_each_channel():
    rng = np.random.default_rng(1)
    w = (rng.normal(0, 1, (4, 3, 2, 2)).astype(np.float32)
         * np.array([0.01, 0.1, 1, 10], np.float32)[:, None, None, None])
    lo, hi = qp.weight_ranges(w, axis=0)
    scale, zp = qp.qparams(lo, hi, qp.INT8, symmetric=True)
    q = qp.quantize(w, scale, zp, qp.INT8, axis=0)
    for c in range(4):
        s_c, z_c = qp.qparams(w[c].min(), w[c].max(), qp.INT8, symmetric=True)
        np.testing.assert_array_equal(q[c], qp.quantize(w[c], s_c, z_c, qp.INT8))
    # every channel uses its full range: the small channels are not crushed to zero
    assert np.all(np.abs(q).reshape(4, -1).max(axis=1) == 127)


def test_weight_ranges_per_axis_1():
    w = np.array([[1.0, -3.0], [2.0, 0.5]], np.float32)
    lo, hi = qp.weight_ranges(w, axis=1)
    assert lo.tolist() == [0.0, -3.0] and hi.tolist() == [2.0, 0.5]


def test_bias_uses_product_of_scales_and_refuses_overflow():
    b = np.array([0.5, -0.25], np.float32)
    q, scale = qp.quantize_bias(b, 0.01, np.array([0.1, 0.2], np.float32))
    np.testing.assert_allclose(scale, [0.001, 0.002], rtol=1e-6)
    assert q.dtype == np.int32 and q.tolist() == [500, -125]
    assert qp.quantize_bias(np.array([1e6], np.float32), 1e-6, np.array([1e-6], np.float32)) is None


@pytest.mark.parametrize("qtype,symmetric", [(qp.UINT8, False), (qp.INT8, True)])
def test_numpy_quantize_matches_onnxruntime_bit_for_bit(qtype, symmetric):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, 1000), np.arange(-40, 40) * 0.5]).astype(np.float32)
    scale, zp = qp.qparams(-2.0, 3.0, qtype, symmetric=symmetric)
    elem = TensorProto.UINT8 if qtype is qp.UINT8 else TensorProto.INT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", elem, [None])],
        [numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(np.asarray(zp), "z")],
    )
    (ours_ort,) = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), {"x": x})
    ours = qp.quantize(x, scale, zp, qtype)
    # ORT saturates int8 to -128; our symmetric grid never produces -128 except by saturation
    np.testing.assert_array_equal(np.maximum(ours_ort.astype(np.int32), qtype.qmin), ours.astype(np.int32))


def test_weight_memo_quantizes_each_tensor_once_per_axis_and_layout():
    import onnx_ir as ir

    from quantkit.quantize.qparams import WeightMemo, quantize_weight

    w = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    tensor = ir.tensor(w)
    memo = WeightMemo()
    first = memo.quantize(tensor, 1)
    assert memo.quantize(tensor, 1) is first  # the same arrays again, not a second quantization
    for got, want in zip(first, quantize_weight(w, 1)):
        np.testing.assert_array_equal(got, want)
    transposed = memo.quantize(tensor, 1, transposed=True)  # a Gemm weight read as (K, N)
    for got, want in zip(transposed, quantize_weight(np.ascontiguousarray(w.T), 1)):
        np.testing.assert_array_equal(got, want)
    assert memo.quantize(tensor, None)[1].size == 1  # per tensor: a different entry
    other = ir.tensor(w.copy())  # equal values, another tensor: quantized on its own
    assert memo.quantize(other, 1) is not first
