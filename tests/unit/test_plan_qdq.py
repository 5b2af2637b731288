"""Structure and numerics of the QDQ rewrite on tiny inline graphs."""

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from quantkit.calibrate.observers import MinMaxObserver
from quantkit.config import QuantConfig
from quantkit.graph import shapes
from quantkit.graph.canonicalize import canonicalize
from quantkit.quantize.plan import OpKind, make_plan
from quantkit.quantize.qdq import rewrite

from models import conv_bn_relu_gemm, if_with_matmul, mlp_with_attention_matmul, residual_cnn, run, split_block


def _quantize(proto, feed, config=None):
    """Canonicalize, plan, take exact min/max ranges from an fp32 run, rewrite."""
    config = config or QuantConfig()
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    shapes.infer(model)
    plan = make_plan(model, config)
    names = [v.name for v in plan.activation_tensors()]
    ranges = {}
    if names:
        probe = ir.serde.serialize_model(model)
        from onnx import helper

        for n in names:
            if n not in [o.name for o in probe.graph.output]:
                probe.graph.output.append(helper.ValueInfoProto(name=n))
        outs = dict(zip([o.name for o in probe.graph.output], run(probe, feed)))
        for n in names:
            obs = MinMaxObserver()
            obs.update(outs[n])
            ranges[n] = obs.range()
    result = rewrite(model, plan, ranges, config)
    return model, plan, result


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def _ops(model):
    return Counter(n.op_type for n in model.graph)


def test_cnn_gets_qdq_around_every_weighted_op_and_stays_close():
    rng = np.random.default_rng(0)
    proto = conv_bn_relu_gemm(rng)
    x = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    model, plan, result = _quantize(proto, {"x": x})
    ops = _ops(model)
    assert len(plan.ops) == 3 and not plan.skipped
    # activations: x, relu1 out, relu2 out (Relu fused into the output QDQ), flatten out; logits stay float
    assert ops["QuantizeLinear"] == 4
    # 4 activation DQs + 3 weight DQs + 2 bias DQs (the depthwise conv has no bias)
    assert ops["DequantizeLinear"] == 9
    assert "logits" not in result.activations
    q_proto = ir.serde.serialize_model(model)
    inits = {t.name: t for t in q_proto.graph.initializer}
    weights = [n.input[1] for n in q_proto.graph.node if n.op_type in ("Conv", "Gemm")]
    dq_inputs = {n.output[0]: n for n in q_proto.graph.node if n.op_type == "DequantizeLinear"}
    for w in weights:
        dq = dq_inputs[w]
        assert inits[dq.input[0]].data_type == 3  # INT8
        assert next(a.i for a in dq.attribute if a.name == "axis") in (0, 1)
    assert not [t for t in q_proto.graph.initializer if t.data_type == 1 and t.name in ("w1", "wd", "wg")]
    (ref,) = run(proto, {"x": x})
    (got,) = run(q_proto, {"x": x})
    assert _cos(ref, got) > 0.999
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_per_tensor_weights_have_scalar_scales():
    rng = np.random.default_rng(0)
    model, _, _ = _quantize(conv_bn_relu_gemm(rng), {"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)},
                            QuantConfig(per_channel=False))
    for n in model.graph:
        if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT8:
            assert n.inputs[1].const_value.numpy().ndim == 0


def test_int8_activations_are_symmetric():
    rng = np.random.default_rng(0)
    _, _, result = _quantize(conv_bn_relu_gemm(rng), {"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)},
                             QuantConfig(activations="int8"))
    assert all(a.zero_point == 0 and a.qtype == "int8" for a in result.activations.values())


def test_activation_x_activation_matmul_gets_qdq_on_both_inputs():
    rng = np.random.default_rng(0)
    proto = mlp_with_attention_matmul(rng)
    x = rng.normal(size=(3, 4, 16)).astype(np.float32)
    model, plan, result = _quantize(proto, {"x": x})
    assert [(op.node.name, op.kind) for op in plan.ops] == [("proj", OpKind.MATMUL),
                                                            ("scores", OpKind.ATTENTION_MATMUL)]
    assert plan.ops[1].kind.label == "MatMul (activation x activation)"
    scores = next(n for n in model.graph if n.name == "scores")
    assert [i.producer().op_type for i in scores.inputs] == ["DequantizeLinear", "DequantizeLinear"]
    (ref,) = run(proto, {"x": x})
    (got,) = run(ir.serde.serialize_model(model), {"x": x})
    assert _cos(ref, got) > 0.999


def test_activation_x_activation_matmul_can_be_left_float_with_reason():
    rng = np.random.default_rng(0)
    proto = mlp_with_attention_matmul(rng)
    x = rng.normal(size=(3, 4, 16)).astype(np.float32)
    model, plan, _ = _quantize(proto, {"x": x}, QuantConfig(attention_matmuls=False))
    assert [op.node.name for op in plan.ops] == ["proj"]
    assert [(s.node, s.reason) for s in plan.skipped] == [
        ("scores", "both inputs are computed at run time (activation x activation)")]
    (ref,) = run(proto, {"x": x})
    (got,) = run(ir.serde.serialize_model(model), {"x": x})
    assert _cos(ref, got) > 0.999


@pytest.mark.parametrize("pattern,left", [("Gemm", {"fc"}), ("conv*", {"conv1"}), ("dw*,fc", {"dwconv", "fc"})])
def test_exclude_by_op_type_or_node_name_glob(pattern, left):
    rng = np.random.default_rng(0)
    config = QuantConfig(exclude=tuple(pattern.split(",")))
    _, plan, _ = _quantize(conv_bn_relu_gemm(rng), {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}, config)
    assert {s.node for s in plan.skipped} == left
    assert all(s.reason.startswith("excluded by --exclude") for s in plan.skipped)


def test_matmul_inside_if_subgraph_stays_float_and_model_still_runs():
    rng = np.random.default_rng(0)
    proto = if_with_matmul(rng)
    x = np.abs(rng.normal(size=(5, 8))).astype(np.float32)
    model, plan, _ = _quantize(proto, {"x": x})
    assert [op.node.name for op in plan.ops] == ["outer_mm"]
    assert [(s.node, s.reason) for s in plan.skipped] == [("inner_mm", "inside a If subgraph; kept float")]
    (ref,) = run(proto, {"x": x})
    (got,) = run(ir.serde.serialize_model(model), {"x": x})
    assert _cos(ref, got) > 0.999


def test_weight_also_read_by_a_float_node_keeps_its_float_copy():
    rng = np.random.default_rng(0)
    model, _, _ = _quantize(if_with_matmul(rng), {"x": np.abs(rng.normal(size=(5, 8))).astype(np.float32)})
    assert "w_quantized" in model.graph.initializers
    assert "w" in model.graph.initializers  # the If branch still reads it


def test_shared_weight_is_quantized_once():
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2")], "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    model, plan, _ = _quantize(proto, {"x": x})
    assert len(plan.ops) == 2
    assert [k for k in model.graph.initializers if k.endswith("_quantized")] == ["w_quantized"]
    assert "w" not in model.graph.initializers
    (ref,) = run(proto, {"x": x})
    (got,) = run(ir.serde.serialize_model(model), {"x": x})
    assert _cos(ref, got) > 0.999


def test_weight_error_shift_matches_the_measured_mean_output_error():
    from quantkit.quantize import qparams as qp
    from quantkit.quantize.qdq import weight_error_shift

    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)  # grouped conv: 3 groups of 2 input channels
    lo, hi = qp.weight_ranges(w, 0)
    scale, zp = qp.qparams(lo, hi, qp.INT8, True)
    w_dq = qp.dequantize(qp.quantize(w, scale, zp, qp.INT8, axis=0), scale, zp, axis=0)
    x = rng.normal(loc=2.0, size=(64, 6, 5, 5)).astype(np.float32)  # non-zero mean input
    from onnx import TensorProto, helper, numpy_helper

    def conv(weights):
        g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=3)], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights, "w")])
        return run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})[0]

    measured = (conv(w_dq) - conv(w)).mean(axis=(0, 2, 3))
    node = ir.node("Conv", [], {"group": 3})
    predicted = weight_error_shift(node, w, w_dq, x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(predicted, measured, rtol=0.05, atol=1e-4)


def test_bias_correction_removes_the_mean_output_shift():
    rng = np.random.default_rng(0)
    proto = conv_bn_relu_gemm(rng)
    x = (rng.normal(size=(64, 3, 8, 8)) + 1.5).astype(np.float32)
    plain, _, _ = _quantize(proto, {"x": x}, QuantConfig(activations="int8"))
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    shapes.infer(model)
    config = QuantConfig(activations="int8", bias_correction=True)
    plan = make_plan(model, config)
    means = {op.inputs[0].name: x.mean(axis=(0, 2, 3)) for op in plan.ops if op.inputs[0].name == "x"}
    ranges = {}
    probe = ir.serde.serialize_model(model)
    from onnx import helper

    names = [v.name for v in plan.activation_tensors()]
    for n in names:
        if n not in [o.name for o in probe.graph.output]:
            probe.graph.output.append(helper.ValueInfoProto(name=n))
    outs = dict(zip([o.name for o in probe.graph.output], run(probe, {"x": x})))
    for n in names:
        obs = MinMaxObserver()
        obs.update(outs[n])
        ranges[n] = obs.range()
    result = rewrite(model, plan, ranges, config, channel_means=means)
    assert result.bias_corrected == ["conv1"]
    (ref,) = run(proto, {"x": x})
    (without,) = run(ir.serde.serialize_model(plain), {"x": x})
    (with_bc,) = run(ir.serde.serialize_model(model), {"x": x})
    assert np.abs((with_bc - ref).mean(axis=0)).mean() < np.abs((without - ref).mean(axis=0)).mean()


def test_matmul_output_stays_float_and_its_float_consumer_reads_it_unrounded():
    """No QDQ on a MatMul's output: onnxruntime runs DQ -> MatMul as MatMulIntegerToFloat, and a
    float consumer (the residual Add of an encoder) reads the exact product."""
    rng = np.random.default_rng(0)
    proto = mlp_with_attention_matmul(rng)
    x = rng.normal(size=(3, 4, 16)).astype(np.float32)
    model, plan, _ = _quantize(proto, {"x": x})
    assert all(op.output is None for op in plan.ops if op.node.op_type == "MatMul")
    proj = next(n for n in model.graph if n.name == "proj")
    assert {u.node.op_type for u in proj.outputs[0].uses()} != {"QuantizeLinear"}
    assert proj.outputs[0].name not in {v.name for v in plan.activation_tensors()} - {i.name for op in plan.ops
                                                                                      for i in op.inputs}


def _embedding_model(rng, vocab=5000, dim=8):
    from onnx import TensorProto, helper, numpy_helper

    table = rng.normal(size=(vocab, dim)).astype(np.float32) * rng.uniform(0.01, 3, size=(vocab, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, dim])],
                          [numpy_helper.from_array(table, "table")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), table


def test_embedding_rows_are_gathered_int8_then_scaled_exactly():
    """The table is stored int8 with one scale per row and only the looked-up rows are turned back
    into float (no DequantizeLinear over the whole table on every run); negative ids work."""
    rng = np.random.default_rng(1)
    proto, table = _embedding_model(rng)
    ids = np.array([[0, 17, 4999], [-1, 3, 17]], dtype=np.int64)
    model, plan, _ = _quantize(proto, {"ids": ids})
    assert [op.kind for op in plan.ops] == [OpKind.EMBEDDING]
    assert _ops(model)["DequantizeLinear"] == 0
    gathers = [n for n in model.graph if n.op_type == "Gather"]
    assert sorted(n.inputs[0].const_value.dtype.name for n in gathers) == ["FLOAT", "INT8"]
    scales = next(n.inputs[0].const_value.numpy() for n in gathers if n.inputs[0].const_value.dtype.name == "FLOAT")
    assert scales.shape == (5000, 1)
    (got,) = run(ir.serde.serialize_model(model), {"ids": ids})
    # each row within half a step of its own scale: per-row, not per-table, resolution
    rows = table[ids]
    step = np.abs(table).max(1)[ids] / 127
    assert np.all(np.abs(got - rows) <= step[..., None] * 0.5 + 1e-7)
    assert not np.array_equal(got, rows)


def _optimized(quantized, tmp_path):
    """The graph onnxruntime runs (its optimized model, fused kernels and layout changes included)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(quantized.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph


def _read_without_dequantize(graph, nodes) -> bool:
    """Whether each of `nodes` (of the optimized graph) reads an integer tensor, not a DequantizeLinear's output."""
    producers = {o: n.op_type for n in graph.node for o in n.output}
    return bool(nodes) and all(producers.get(n.input[0]) != "DequantizeLinear" for n in nodes)


def test_ops_between_int8_ops_join_the_int8_region_and_run_on_integer_kernels(tmp_path):
    """Add, Mul, Sigmoid, MaxPool, AveragePool and Concat whose inputs all come out of int8 ops
    get a QDQ on their output; onnxruntime then runs them as QLinear* kernels. An Add reading a
    constant stays float."""
    rng = np.random.default_rng(3)
    proto = residual_cnn(rng)
    x = rng.normal(size=(4, 8, 8, 8)).astype(np.float32)
    model, plan, _ = _quantize(proto, {"x": x})
    region = [op.node.name for op in plan.ops if op.kind == OpKind.INT8_REGION]
    assert region == ["add", "maxpool", "sigmoid", "gate", "avgpool", "concat"]
    quantized = ir.serde.serialize_model(model)
    fused = Counter(n.op_type for n in _optimized(quantized, tmp_path).node)
    assert fused["QLinearAdd"] == 1 and fused["QLinearMul"] == 1 and fused["QLinearSigmoid"] == 1
    assert fused["QLinearConcat"] == 1 and fused["QLinearAveragePool"] == 1 and fused["Add"] == 1
    (ref,) = run(proto, {"x": x})
    (got,) = run(quantized, {"x": x})
    assert _cos(ref, got) > 0.995


def _conv_pool_conv(rng):
    """x -> Conv (outputs of both signs) -> MaxPool 2x2 -> Conv -> y: pooling raises the minimum."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 8, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_maxpool_output_takes_its_input_scale_so_onnxruntime_pools_the_int8_tensor(tmp_path):
    """MaxPool picks input values: its output QDQ reuses the input's scale and zero point (no new rounding,
    every output value already on the input's grid), and onnxruntime then drops the pair and pools the
    uint8 tensor itself. With a calibrated range of its own (narrower: the pooled minimum is higher) the
    parameters differed and onnxruntime kept MaxPool float between a DequantizeLinear and a QuantizeLinear."""
    rng = np.random.default_rng(3)
    proto = _conv_pool_conv(rng)
    x = rng.normal(size=(4, 4, 8, 8)).astype(np.float32)
    model, plan, result = _quantize(proto, {"x": x})
    pool = next(op for op in plan.ops if op.node.op_type == "MaxPool")
    assert pool.output is not None
    before, after = result.activations[pool.inputs[0].name], result.activations[pool.output.name]
    assert (after.scale, after.zero_point) == (before.scale, before.zero_point) and before.range[0] < 0
    quantized = ir.serde.serialize_model(model)
    graph = _optimized(quantized, tmp_path)
    assert _read_without_dequantize(graph, [n for n in graph.node if "MaxPool" in n.op_type])
    (ref,) = run(proto, {"x": x})
    (got,) = run(quantized, {"x": x})
    assert _cos(ref, got) > 0.995


def test_a_split_of_an_int8_tensor_joins_the_region_with_every_part_on_the_input_grid(tmp_path):
    """x -> Conv -> Split in two -> (Conv, Conv) -> Concat (a YOLOv8 C2f block's shape): the Split joins the
    int8 region with a QDQ on each part at the input's scale and zero point, onnxruntime splits the int8
    tensor, and the Concat after it (both inputs now int8) joins the region too."""
    rng = np.random.default_rng(4)
    proto = split_block(rng)
    x = rng.normal(size=(4, 4, 8, 8)).astype(np.float32)
    model, plan, result = _quantize(proto, {"x": x})
    region = {op.node.name: op for op in plan.ops if op.kind == OpKind.INT8_REGION}
    assert set(region) == {"split", "concat"}
    split = region["split"]
    grid = (result.activations[split.inputs[0].name].scale, result.activations[split.inputs[0].name].zero_point)
    for part in (split.output, *split.more_outputs):
        assert part is not None and (result.activations[part.name].scale,
                                     result.activations[part.name].zero_point) == grid
    quantized = ir.serde.serialize_model(model)
    graph = _optimized(quantized, tmp_path)
    assert _read_without_dequantize(graph, [n for n in graph.node if n.op_type == "Split"])
    assert Counter(n.op_type for n in graph.node)["QLinearConcat"] == 1
    (ref,) = run(proto, {"x": x})
    (got,) = run(quantized, {"x": x})
    assert _cos(ref, got) > 0.995
