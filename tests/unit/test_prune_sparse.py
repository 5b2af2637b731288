"""Unstructured / 2:4 sparsity (magnitude, Wanda, SparseGPT) and the sparse storage that
onnxruntime rebuilds at load."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prune_models import ffn_block

from quantkit.graph.ir_edit import const_array
from quantkit.prune import sparse, storage
from quantkit.prune.refit import Gram
from quantkit.prune.sparse import prune_sparse


def _ir(proto):
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _run(model, feed, optimized: str | None = None):
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    so = ort.SessionOptions()
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _batches(rng, shape, n=6):
    data = [{"x": rng.normal(0, 1, shape).astype(np.float32) * np.linspace(0.1, 3, shape[-1]).astype(np.float32)}
            for _ in range(n)]
    return lambda: iter(data)


def _weights(model):
    return {n.name: const_array(n.inputs[1]) for n in model.graph if n.op_type == "MatMul"
            and const_array(n.inputs[1]) is not None}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern_holds_exactly(method):
    rng = np.random.default_rng(0)
    model = _ir(ffn_block(rng))
    report = prune_sparse(model, 0.5, True, method, _batches(rng, (4, 6, 16)), None)
    assert {layer["method"] for layer in report["layers"]} == {method}
    for name, w in _weights(model).items():
        groups = (w.T.reshape(w.shape[1], -1, 4) == 0).sum(axis=2)  # along K, per output
        assert (groups == 2).all(), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_zeroes_the_ratio_of_every_output_row(method):
    rng = np.random.default_rng(1)
    model = _ir(ffn_block(rng))
    prune_sparse(model, 0.3, False, method, _batches(rng, (4, 6, 16)), None)
    for w in _weights(model).values():
        per_row = (w == 0).sum(axis=0)
        assert (per_row == round(0.3 * w.shape[0])).all()


def test_wanda_keeps_the_weights_of_loud_inputs_that_magnitude_drops():
    rows = np.array([[1.0, 0.5, 0.9, 0.6]])
    rms = np.array([0.1, 10.0, 0.1, 10.0])
    assert sparse.mask_for(sparse.scores(rows, None, 1), 0.5, False).tolist() == [[False, True, False, True]]
    assert sparse.mask_for(sparse.scores(rows, rms, 1), 0.5, False).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("semi", [False, True])
def test_sparsegpt_leaves_less_output_error_than_wanda(semi):
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, (2000, 8))
    x = np.concatenate([base, base @ rng.normal(0, 1, (8, 24)) + 0.1 * rng.normal(0, 1, (2000, 24))], axis=1)
    w = rng.normal(0, 1, (32, 12))  # MatMul form [K, N]
    gram = Gram(32)
    gram.update(x, axis=-1)
    rows = w.T
    pruned_gpt = sparse.sparsegpt(rows, gram.matrix[:-1, :-1], 0.5, semi)
    wanda = np.where(sparse.mask_for(sparse.scores(rows, gram.rms(), 1), 0.5, semi), 0.0, rows)
    assert np.mean(pruned_gpt == 0) == 0.5

    def err(r):
        return float(np.mean((x @ w - x @ r.T) ** 2))

    assert err(pruned_gpt) < 0.5 * err(wanda)


@pytest.mark.parametrize("dtype,nibbles", [(np.int8, False), (np.float32, False), (np.uint8, True)])
def test_encode_decode_round_trip(dtype, nibbles):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 16 if nibbles else 100, (64, 33)).astype(dtype)
    if nibbles:
        a = (a & 0x0F) | (np.where(rng.random(a.shape) < 0.6, 8, a & 0x0F) << 4)
        a = np.where(rng.random(a.shape) < 0.6, (a & 0xF0) | 8, a).astype(np.uint8)
    else:
        a[rng.random(a.shape) < 0.6] = 0
    e = storage.encode(a, nibbles)
    assert e is not None
    np.testing.assert_array_equal(storage.decode(e, a.shape, a.dtype), a)
    assert e.fill == (8 if nibbles else 0)


def _matmul_model(w: np.ndarray) -> ir.Model:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_stored_sparse_model_loads_runs_identically_and_is_folded_at_load(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (256, 96)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    x = rng.normal(0, 1, (3, 256)).astype(np.float32)
    model = _matmul_model(w)
    (records,) = storage.store_sparse(model)
    # 1 bit per element + the kept float32 values
    assert records["stored_bytes"] == w.size // 8 + 4 * np.count_nonzero(w)
    assert "w" not in model.graph.initializers
    (y,) = _run(model, {"x": x}, optimized=str(tmp_path / "opt.onnx"))
    np.testing.assert_array_equal(y, x @ w)
    # onnxruntime evaluated the decode chain once at load: only the MatMul is left to run
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["MatMul"]


def test_dense_tensors_are_left_alone():
    w = np.random.default_rng(5).normal(0, 1, (128, 64)).astype(np.float32)
    model = _matmul_model(w)
    assert storage.store_sparse(model) == []
    assert "w" in model.graph.initializers


def _two_matmul_model(w1: np.ndarray, w2: np.ndarray) -> ir.Model:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                           helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w1.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w2.shape[1]])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_tensors_of_one_kind_share_one_decode_chain(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    w1, w2 = rng.normal(0, 1, (96, 80)).astype(np.float32), rng.normal(0, 1, (80, 40)).astype(np.float32)
    w1[rng.random(w1.shape) < 0.6] = 0
    w2[rng.random(w2.shape) < 0.5] = 0
    x = rng.normal(0, 1, (3, 96)).astype(np.float32)
    model = _two_matmul_model(w1, w2)
    (dense,) = _run(_two_matmul_model(w1, w2), {"x": x})
    records = storage.store_sparse(model)
    assert [r["tensor"] for r in records] == ["w1", "w2"]
    assert [r["stored_bytes"] for r in records] == [w.size // 8 + 4 * np.count_nonzero(w) for w in (w1, w2)]
    ops = [n.op_type for n in model.graph]
    assert ops.count("Where") == 1 and ops.count("CumSum") == 1  # one chain rebuilds both
    (y,) = _run(model, {"x": x}, optimized=str(tmp_path / "opt.onnx"))
    np.testing.assert_array_equal(y, dense)
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["MatMul", "MatMul"]
    # a chain is capped: with room for one tensor only, each gets its own
    monkeypatch.setattr(storage, "MAX_CODES", w1.size)
    model = _two_matmul_model(w1, w2)
    storage.store_sparse(model)
    assert [n.op_type for n in model.graph].count("Where") == 2
    np.testing.assert_array_equal(_run(model, {"x": x})[0], dense)


def test_scales_on_the_log_grid_change_by_less_than_the_bound():
    rng = np.random.default_rng(7)
    s = np.exp(rng.uniform(np.log(0.01), np.log(0.3), 500)).astype(np.float32)  # a 30x range
    s *= np.where(rng.random(500) < 0.5, -1, 1).astype(np.float32)  # symmetric int4 scales carry a sign
    k, lo, step = storage.log_grid(s)
    back = storage.log_grid_decode(k, lo, step, s < 0)
    rel = np.abs(back / s - 1)
    assert rel.max() <= storage.SCALE_REL_ERROR and rel.max() > storage.SCALE_REL_ERROR / 4
    assert k.dtype == np.uint8 and k.min() == 0 and k.max() == 255
    assert storage.log_grid(np.array([0.001, 1.0], np.float32)) is None  # 1000x: steps too coarse
    assert storage.log_grid(np.array([0.0, 1.0], np.float32)) is None
    k, lo, step = storage.log_grid(np.full(64, 0.5, np.float32))
    np.testing.assert_allclose(storage.log_grid_decode(k, lo, step), 0.5, rtol=1e-6)


def _nbits_model(k: int, n: int, block: int, rng) -> tuple[ir.Model, np.ndarray]:
    blocks = k // block
    q = rng.integers(0, 16, (n, blocks, block // 2)).astype(np.uint8) | (rng.integers(0, 16, (n, blocks, block // 2))
                                                                         .astype(np.uint8) << 4)
    scales = np.exp(rng.uniform(np.log(0.02), np.log(0.2), n * blocks)).astype(np.float32)
    scales *= np.where(rng.random(n * blocks) < 0.5, -1, 1).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", name="mm",
                            K=k, N=n, bits=4, block_size=block)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
                          [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scales, "s")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ir.serde.deserialize_model(proto), scales


def test_int4_scales_stored_as_log_codes_rebuild_the_scales_onnxruntime_uses():
    rng = np.random.default_rng(8)
    model, scales = _nbits_model(128, 32, 32, rng)
    x = rng.normal(0, 1, (4, 128)).astype(np.float32)
    dense = _run(model, {"x": x})[0]
    (record,) = storage.compact_scales(model.graph, storage.Editor(model.graph))
    assert record["stored_bytes"] == scales.size + scales.size // 8 + 8  # 8-bit codes, sign bits, grid
    assert record["dense_bytes"] == 4 * scales.size
    assert "s" not in model.graph.initializers
    k, lo, step = storage.log_grid(scales)
    twin, _ = _nbits_model(128, 32, 32, np.random.default_rng(8))
    twin.graph.initializers["s"].const_value = ir.tensor(storage.log_grid_decode(k, lo, step, scales < 0),
                                                                    name="s")
    (y,) = _run(model, {"x": x})
    np.testing.assert_allclose(y, _run(twin, {"x": x})[0], rtol=1e-5, atol=1e-5)
    # each scale moved by at most SCALE_REL_ERROR, so each output by at most that fraction of sum |x w|
    codes = storage.codes(const_array(twin.graph.initializers["q"]), True).reshape(32, 128).astype(np.float32)
    w_abs = np.abs(codes - 8) * np.repeat(np.abs(scales), 32).reshape(32, 128)
    bound = storage.SCALE_REL_ERROR * (np.abs(x) @ w_abs.T)
    assert np.all(np.abs(y - dense) <= bound + 1e-5) and not np.array_equal(y, dense)
