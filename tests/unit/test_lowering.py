"""What onnxruntime is given: biases inside the integer MatMul kernels, no inferred intermediate shapes,
and the numpy emulation of the budget's alternatives against what onnxruntime computes for them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit import runtime
from quantkit.calibrate.collect import collect
from quantkit.config import QuantConfig
from quantkit.graph import shapes
from quantkit.graph.ir_edit import Editor, drop_unused
from quantkit.quantize import budget, simulate
from quantkit.quantize.plan import make_plan
from quantkit.quantize.scheme import placement_for

K, N = 32, 24


def _linear_relu(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> MatMul(W) -> Add(b) -> Relu -> MatMul(W2) -> Add(b2) = y: torch's Linear as exported."""
    w, w2 = rng.normal(size=(K, N)).astype(np.float32) * 0.2, rng.normal(size=(N, 8)).astype(np.float32) * 0.2
    b, b2 = rng.normal(size=N).astype(np.float32), rng.normal(size=8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"], name="fc1"),
             helper.make_node("Add", ["b", "h0"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="fc2"),
             helper.make_node("Add", ["h3", "b2"], ["y"], name="fc2_bias")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 8])],
                          [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (b, "b"), (w2, "W2"), (b2, "b2"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return runtime.session(model, None, tag="test").run(None, {"x": x})[0]


@pytest.mark.parametrize("activations", ["uint8", "dynamic"])
def test_the_bias_goes_inside_the_integer_matmul_and_nothing_else_changes(tmp_path, activations):
    rng = np.random.default_rng(0)
    proto = _linear_relu(rng)
    x = rng.normal(size=(16, 5, K)).astype(np.float32)
    model = ir.serde.deserialize_model(proto)
    shapes.infer(model)
    placement = placement_for(QuantConfig(activations=activations))
    placement.use(collect(model, placement.requests(model), ({"x": b} for b in np.array_split(x, 4)), tmp_path))
    plain, _, _ = placement.build(model, set(), "", lower=False)
    lowered, _, _ = placement.build(model, set(), "")
    kernel = "MatMulIntegerToFloat" if activations == "uint8" else "DynamicQuantizeMatMul"
    ops = Counter(n.op_type for n in lowered.graph)
    assert ops[kernel] == 2 and ops["Add"] == 0 and ops["MatMul"] == 0
    assert all(n.inputs[-1].name in ("b", "b2") for n in lowered.graph if n.op_type == kernel)
    assert Counter(n.op_type for n in plain.graph)["Add"] == 2  # the QDQ / unlowered form keeps its Adds
    want, got = _run(plain, x), _run(lowered, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert [o.name for o in lowered.graph.outputs] == ["y"]


def test_qdq_format_is_left_as_plain_qdq(tmp_path):
    rng = np.random.default_rng(1)
    model = ir.serde.deserialize_model(_linear_relu(rng))
    shapes.infer(model)
    placement = placement_for(QuantConfig(format="qdq"))  # --format qdq applies to static int8 too
    x = rng.normal(size=(8, 5, K)).astype(np.float32)
    placement.use(collect(model, placement.requests(model), iter([{"x": x}]), tmp_path))
    ops = Counter(n.op_type for n in placement.build(model, set(), "")[0].graph)
    assert ops["MatMulIntegerToFloat"] == 0 and ops["MatMul"] == 2 and ops["Add"] == 2


def _residual_layernorm() -> onnx.ModelProto:
    h = 16
    # Reshape to the input's own shape, as exporters write: quantkit's shape inference (with data
    # propagation) proves the two residual inputs alike, onnxruntime's own does not
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["x", "s"], ["x2"], name="reshape"),
             helper.make_node("MatMul", ["x2", "W"], ["m"], name="proj"),
             helper.make_node("Add", ["m", "x2"], ["r"], name="residual"),
             helper.make_node("LayerNormalization", ["r", "g", "bt"], ["y"], name="ln", axis=-1, epsilon=1e-12)]
    inits = [numpy_helper.from_array(np.eye(h, dtype=np.float32), "W"),
             numpy_helper.from_array(np.ones(h, np.float32), "g"),
             numpy_helper.from_array(np.zeros(h, np.float32), "bt")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", h])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_inferred_shapes_are_not_written_so_onnxruntime_fuses_as_it_would_the_original(tmp_path):
    """With both residual inputs typed (batch, seq, 16) onnxruntime turns Add + LayerNormalization into
    SkipLayerNormalization (5-6x slower on CPU, benchmarks/ln_fusion.py); written without the
    shapes quantkit inferred, the saved model keeps Add + LayerNormalization as the original does."""
    model = ir.serde.deserialize_model(_residual_layernorm())
    shapes.infer(model)
    inferred = {v.name: v.shape for n in model.graph for v in n.outputs}
    assert inferred["r"] is not None
    runtime.save(model, tmp_path / "m.onnx")
    saved = onnx.load(str(tmp_path / "m.onnx"))
    assert not [v.name for v in saved.graph.value_info if v.name in ("m", "r") and v.type.tensor_type.HasField("shape")]
    assert {v.name: v.shape for n in model.graph for v in n.outputs} == inferred  # restored in memory

    def fused_ops(source) -> set[str]:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}

    assert "SkipLayerNormalization" in fused_ops(ir.serde.serialize_model(model).SerializeToString())
    assert "SkipLayerNormalization" not in fused_ops(str(tmp_path / "m.onnx"))
    sess = runtime.session(model, tmp_path)  # what the speed guard times is what gets written
    assert sess is not None and "SkipLayerNormalization" not in fused_ops(str(tmp_path / "m.onnx"))


def _rewritten(scheme, proto: onnx.ModelProto, config: QuantConfig) -> ir.Model:
    m = ir.serde.deserialize_model(proto)
    plan = make_plan(m, config)
    assert scheme.refuse(plan.ops[0]) is None
    scheme.rewrite(m, plan.ops, Editor(m.graph))
    drop_unused(m)
    return m


def test_the_emulated_alternatives_compute_what_onnxruntime_computes():
    from quantkit.quantize.dynamic import DynamicScheme
    from quantkit.quantize.per_token import PerTokenScheme
    from quantkit.quantize.scheme import WEIGHT_ONLY_INT8_BLOCK
    from quantkit.quantize.weight_only import WeightOnlyScheme

    rng = np.random.default_rng(2)
    k, n = 256, 48
    w = rng.normal(size=(k, n)).astype(np.float32) * 0.1
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7, n])],
                          [numpy_helper.from_array(w, "W")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(3, 7, k)).astype(np.float32)
    x[1, 2] *= 25  # an outlier token
    emulated = simulate.Weights(w).outputs(x.reshape(-1, k))
    blocks = QuantConfig(activations="none", weights="int8", block_size=WEIGHT_ONLY_INT8_BLOCK)
    schemes = {"dynamic": (DynamicScheme(QuantConfig(activations="dynamic")), QuantConfig(activations="dynamic")),
               "per_token": (PerTokenScheme(QuantConfig()), QuantConfig(activations="dynamic")),
               "weight_only": (WeightOnlyScheme(blocks), blocks)}
    exact = x.reshape(-1, k) @ w
    for name, (scheme, config) in schemes.items():
        got = _run(_rewritten(scheme, proto, config), x).reshape(-1, n)
        err = np.abs(got - emulated[name]).max()
        assert err < 2e-3 * np.abs(exact).max(), name  # the same rounding; onnxruntime sums in another order
        assert np.abs(got - exact).max() > 10 * err, name  # and far closer than to the unquantized product


def test_an_alternative_is_kept_only_when_it_clearly_beats_every_cheaper_choice():
    options = ["dynamic", "per_token", "weight_only", budget.FLOAT]
    row = {"own_sqnr_db": 13.0, "alternatives_own_sqnr_db": {"dynamic": 13.2, "per_token": 22.0, "weight_only": 37.0}}
    assert budget.ladder(options, row) == ["per_token", "weight_only", budget.FLOAT]
    row = {"own_sqnr_db": 35.0, "alternatives_own_sqnr_db": {"dynamic": 30.0, "per_token": 34.5, "weight_only": 45.0}}
    assert budget.ladder(options, row) == ["weight_only", budget.FLOAT]
    exact = {"own_sqnr_db": 20.0, "alternatives_own_sqnr_db": {"dynamic": 19.0, "per_token": None, "weight_only": 40.0}}
    assert budget.ladder(options, exact) == ["per_token", budget.FLOAT]  # None: no noise at all
    assert budget.ladder(options, None) == options  # never measured: every alternative stays
    assert budget.ladder([budget.FLOAT], {"own_sqnr_db": 10.0, "alternatives_own_sqnr_db": {}}) == [budget.FLOAT]


def test_per_token_is_offered_for_an_op_already_rewritten_to_static_int8(tmp_path):
    """The search asks about the ops of the fully quantized model, whose weights sit behind a
    DequantizeLinear: that must not hide the per-token alternative."""
    rng = np.random.default_rng(3)
    model = ir.serde.deserialize_model(_linear_relu(rng))
    shapes.infer(model)
    placement = placement_for(QuantConfig())
    x = rng.normal(size=(8, 5, K)).astype(np.float32)
    placement.use(collect(model, placement.requests(model), iter([{"x": x}]), tmp_path))
    _, plan, _ = placement.build(model, set(), "", lower=False)
    refusals = {s.name.value: s.refuse for s in placement.alternates}
    assert all(budget.alternatives(op, refusals) == ["dynamic", "per_token", "weight_only", budget.FLOAT]
               for op in plan.ops)


def _masked_attention(opset: int) -> onnx.ModelProto:
    """scores + (1 - mask) * float32 min -> Softmax, as torch.onnx exports BERT's attention; and a plain
    Softmax of a classifier head that carries no mask."""
    nodes = [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "maskf"], ["inv"]),
             helper.make_node("Mul", ["inv", "fmin"], ["additive"]),
             helper.make_node("Add", ["scores", "additive"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["probs"], name="attn_softmax", axis=-1),
             helper.make_node("Softmax", ["logits"], ["classes"], name="head_softmax", axis=-1)]
    inits = [numpy_helper.from_array(np.float32(1.0), "one"),
             numpy_helper.from_array(np.float32(np.finfo(np.float32).min), "fmin")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", 2, 6, 6]),
                                       helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", 1, 1, 6]),
                                       helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", 2, 6, 6]),
                           helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["b", 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 18])
def test_masked_softmax_gets_a_floor_that_changes_nothing(opset):
    from quantkit.quantize.lower import floor_masked_softmax

    rng = np.random.default_rng(4)
    feed = {"scores": (rng.normal(size=(3, 2, 6, 6)) * 4).astype(np.float32),
            "mask": np.array([1, 1, 1, 1, 0, 0] * 3, np.int64).reshape(3, 1, 1, 6),
            "logits": rng.normal(size=(3, 5)).astype(np.float32)}
    feed["mask"][2] = 0  # a sequence that is all padding: the row max is float32 min itself
    proto = _masked_attention(opset)
    model = ir.serde.deserialize_model(proto)
    assert floor_masked_softmax(model) == 1  # the attention softmax only
    ops = [n.op_type for n in model.graph]
    assert ops.count("Max") == 1 and ops.count("ReduceMax") == 1 and ops.count("Softmax") == 2
    head = next(n for n in model.graph if n.name == "head_softmax")
    assert head.inputs[0].name == "logits"
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    got = _run_all(model, feed)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-30)


def _run_all(model: ir.Model, feed: dict) -> list:
    return runtime.session(model, None, tag="test").run(None, feed)


def _conv_relu_conv(rng: np.random.Generator) -> onnx.ModelProto:
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = (rng.normal(size=(4, 8, 1, 1)) * np.array([1, 5, 0.2, 2])[:, None, None, None]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6, 6])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_weight_only_conv_weights_are_decoded_by_ops_onnxruntime_folds(tmp_path):
    """Weight-only convolutions (int8 weights, float inputs): the written model decodes the int8 codes with
    Cast/Mul, which onnxruntime folds at load, not with a DequantizeLinear it runs (and cannot prepack) on
    every call; the numbers are the DequantizeLinear's. Static int8 convolutions keep their QDQ."""
    rng = np.random.default_rng(3)
    model = ir.serde.deserialize_model(_conv_relu_conv(rng))
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    placement = placement_for(QuantConfig(weights="int4", activations="none"))  # convs: int8 weights behind a DQ
    plain, _, _ = placement.build(model, set(), "", lower=False)
    lowered, _, _ = placement.build(model, set(), "")
    weight_only = Counter(n.op_type for n in plain.graph)["DequantizeLinear"]
    assert weight_only >= 1
    ops = Counter(n.op_type for n in lowered.graph)
    assert ops["DequantizeLinear"] == 0 and ops["Cast"] == ops["Mul"] == weight_only and ops["Conv"] == 2
    codes = [i for i in lowered.graph.initializers.values() if i.const_value.dtype == ir.DataType.INT8]
    assert len(codes) == weight_only  # the file still holds int8 codes
    np.testing.assert_allclose(_run(lowered, x), _run(plain, x), rtol=1e-5, atol=1e-5)  # conv algorithms differ

    static = placement_for(QuantConfig())
    static.use(collect(model, static.requests(model), ({"x": b} for b in np.array_split(x, 2)), tmp_path))
    q, _, _ = static.build(model, set(), "")
    assert Counter(n.op_type for n in q.graph)["Cast"] == 0  # DQ -> Conv <- DQ stays for QLinearConv


def test_weights_handed_as_arrays_give_the_serialized_models_session_and_leave_the_model_alone():
    """runtime.session passes the larger weights to onnxruntime as arrays (add_external_initializers):
    float, int8 behind a DequantizeLinear, while a Reshape's shape stays inline; the outputs are those
    of the fully serialized model, bit for bit, and the model's tensors are its own again after."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 64)).astype(np.float32)
    q = rng.integers(-127, 128, size=(64, 64)).astype(np.int8)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("DequantizeLinear", ["Q", "s"], ["Wq"], name="dq"),
             helper.make_node("MatMul", ["h", "Wq"], ["h2"], name="fcq"),
             helper.make_node("Reshape", ["h2", "shape"], ["y"], name="flat")]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(q, "Q"),
             numpy_helper.from_array(np.float32(0.01), "s"),
             numpy_helper.from_array(np.array([-1, 128], np.int64), "shape")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 128])], inits)
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    before = {name: v.const_value for name, v in model.graph.initializers.items()}

    _, arrays = runtime._without_weights(model)
    assert sorted(arrays) == ["Q", "W"]  # the 8-byte scale and the 16-byte shape stay inline
    x = rng.normal(size=(4, 64)).astype(np.float32)
    handed = runtime.session(model, workdir=None).run(["y"], {"x": x})[0]
    serialized = ort.InferenceSession(runtime._serialized(model), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(handed, serialized.run(["y"], {"x": x})[0])
    exact = ((x @ w) @ (q.astype(np.float32) * 0.01)).reshape(2, 128)
    # onnxruntime runs DequantizeLinear -> MatMul as an integer MatMul on the activation rounded to int8
    assert np.linalg.norm(handed - exact) / np.linalg.norm(exact) < 0.02
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == before
    assert not any(isinstance(t, ir.ExternalTensor) for t in before.values())


def test_model_bytes_counts_external_data_and_sees_a_file_written_again(tmp_path):
    """The external data files a model references are parsed once per version of the file: writing
    the model again (other weights, other data file) gives the new size, not the remembered one."""
    from quantkit.load.onnx import model_bytes

    path = tmp_path / "m.onnx"
    for n in (64, 256):
        w = numpy_helper.from_array(np.ones((n, n), np.float32), "W")
        g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
        onnx.save(helper.make_model(g), str(path), save_as_external_data=True, location=f"w{n}.bin",
                  size_threshold=0)
        assert model_bytes(path) == path.stat().st_size + n * n * 4


def test_a_weight_an_if_branch_reads_or_nothing_reads_stays_inline():
    """onnxruntime cannot put a handed weight in place where an If body reads it from the outer graph, nor
    one nothing reads (it drops those first): either failed the load. Such weights are serialized as before,
    the others still handed."""
    rng = np.random.default_rng(4)
    w, w2 = (rng.normal(size=(64, 64)).astype(np.float32) for _ in range(2))
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "W_if"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4, 64])])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
                           helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="if")],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64]),
                                helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w2, "W_if"),
                           numpy_helper.from_array(w2, "W_unread")])  # left over, as pruning can leave one
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    _, arrays = runtime._without_weights(model)
    assert sorted(arrays) == ["W"]
    x = rng.normal(size=(4, 64)).astype(np.float32)
    got = runtime.session(model, workdir=None).run(["y"], {"x": x, "c": np.array(True)})[0]
    np.testing.assert_allclose(got, (x @ w) @ w2, rtol=1e-4, atol=1e-3)
