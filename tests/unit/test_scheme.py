"""Schemes behind one interface: the placement assigns each planned op to a scheme, and several
schemes can quantize one model together."""

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from quantkit.calibrate.collect import collect
from quantkit.config import QuantConfig
from quantkit.graph import shapes
from quantkit.graph.canonicalize import canonicalize
from quantkit.quantize.dynamic import DynamicScheme
from quantkit.quantize.plan import OpKind, SchemeName
from quantkit.quantize.qdq import StaticScheme
from quantkit.quantize.scheme import Placement, placement_for
from quantkit.quantize.weight_only import WeightOnlyScheme

from models import conv_bn_relu_gemm, run, split_block


def _cnn():
    rng = np.random.default_rng(0)
    proto = conv_bn_relu_gemm(rng)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    shapes.infer(model)
    return proto, model, rng.normal(size=(16, 3, 8, 8)).astype(np.float32)


def test_the_config_picks_one_scheme_per_mode():
    assert [type(s) for s in placement_for(QuantConfig()).schemes] == [StaticScheme]
    assert [type(s) for s in placement_for(QuantConfig(activations="dynamic")).schemes] == [DynamicScheme]
    int4 = QuantConfig(weights="int4", activations="none")
    assert [type(s) for s in placement_for(int4).schemes] == [WeightOnlyScheme]


def test_a_run_that_fine_tunes_gets_no_per_token_alternative():
    """--finetune cannot train per-token int8's MatMulInteger + Round decomposition: the placement does not
    offer it (it exited 4 after a search that picked it); the outlier-channel split, dynamic and weight-only
    int8 stay (tests/e2e/test_finetune_split.py trains a split)."""
    names = [s.name.value for s in placement_for(QuantConfig()).alternates]
    trainable = [s.name.value for s in placement_for(QuantConfig(), trainable=True).alternates]
    assert names == ["split", "dynamic", "per_token", "weight_only"]
    assert trainable == ["split", "dynamic", "weight_only"]
    assert "dynamic" in trainable and "weight_only" in trainable


def test_an_op_no_scheme_takes_stays_float_with_the_reason():
    _, model, _ = _cnn()
    plan = placement_for(QuantConfig(activations="dynamic")).plan(model)
    assert [op.node.op_type for op in plan.ops] == ["Gemm"]
    assert {op.scheme for op in plan.ops} == {SchemeName.DYNAMIC}
    assert all("no fast convolution kernel" in s.reason for s in plan.skipped)
    assert sorted(s.node for s in plan.skipped) == ["conv1", "dwconv"]


def test_two_schemes_in_one_model(tmp_path):
    """Dynamic int8 takes the Gemm, static QDQ the convolutions it refuses: one pass of
    statistics for the static part, one rewrite, and the model still matches fp32."""
    proto, model, x = _cnn()
    config = QuantConfig()
    placement = Placement(config, [DynamicScheme(config), StaticScheme(config)])
    plan = placement.plan(model)
    assert {op.node.name: op.scheme for op in plan.ops} == {
        "conv1": SchemeName.STATIC, "dwconv": SchemeName.STATIC, "fc": SchemeName.DYNAMIC}
    requests = placement.requests(model)
    # only the static ops' tensors need ranges; the Gemm's input is quantized at run time
    assert {r.tensor for r in requests} == {v.name for v in plan.activation_tensors(SchemeName.STATIC)}
    placement.use(collect(model, requests, ({"x": b} for b in np.array_split(x, 4)), tmp_path))
    qmodel, qplan, rw = placement.build(model, set(), "")
    ops = Counter(n.op_type for n in qmodel.graph)
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["Gemm"] == 0
    assert ops["QuantizeLinear"] == 3  # x and both Relu outputs; Flatten -> Gemm is quantized at run time
    assert sorted(rw.quantized_nodes) == ["conv1", "dwconv", "fc"]
    (ref,) = run(proto, {"x": x})
    (got,) = run(ir.serde.serialize_model(qmodel), {"x": x})
    cos = float(ref.ravel() @ got.ravel() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_own_noise_is_weighed_per_channel_so_an_outlier_channel_cannot_hide_it():
    """Uniform rounding noise on an output whose power sits in one outlier channel is small
    against the total power but large against every other channel, which a following
    normalization brings back to unit scale: the per-channel average shows it."""
    from quantkit.quantize.budget import _accumulate_channels, _channel_ratio

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 16))
    ref[:, 0] *= 100.0
    noisy = ref + rng.normal(size=ref.shape) * 0.1
    acc: list = [0.0, 0.0]
    _accumulate_channels(acc, ref, noisy, -1)
    whole = ((noisy - ref) ** 2).sum() / (ref ** 2).sum()
    per_channel = _channel_ratio(acc)
    assert per_channel > 5 * whole
    assert per_channel == pytest.approx(np.mean(((noisy - ref) ** 2).sum(0) / (ref ** 2).sum(0)), rel=1e-9)


def _matmul_model(opset: int, k: int = 16, n: int = 8):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, n])],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), w


@pytest.mark.parametrize("opset", [17, 18])
def test_per_token_int8_gives_each_token_its_own_scale(opset):
    """One token 30x larger than the rest: per-tensor dynamic int8 lets it set everyone's step,
    per-token int8 does not. The result survives onnxruntime's full graph optimization (its
    MatMulIntegerToFloat fusion assumes one activation scale)."""
    import onnxruntime as ort

    from quantkit.graph.ir_edit import Editor, drop_unused
    from quantkit.quantize.per_token import PerTokenScheme
    from quantkit.quantize.plan import make_plan

    proto, w = _matmul_model(opset)
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
    x[0, 1] *= 30
    ref = x @ w

    def sqnr(scheme):
        m = ir.serde.deserialize_model(proto)
        plan = make_plan(m, QuantConfig(activations="dynamic"))
        assert scheme.refuse(plan.ops[0]) is None
        scheme.rewrite(m, plan.ops, Editor(m.graph))
        drop_unused(m)
        y = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return 10 * np.log10((ref ** 2).sum() / ((y - ref) ** 2).sum()), [n.op_type for n in m.graph]

    per_token, ops = sqnr(PerTokenScheme(QuantConfig()))
    per_tensor, _ = sqnr(DynamicScheme(QuantConfig(activations="dynamic")))
    assert "MatMulInteger" in ops and "MatMul" not in ops
    assert per_token > 38 and per_token > per_tensor + 8


def test_the_speed_guard_drops_int8_kernels_but_keeps_the_budgets_weight_only_ops(tmp_path):
    """A group the speed guard leaves float loses its static int8 ops; an op of that group the accuracy budget
    moved to weight-only int8 keeps its int8 weight (compression, which timing never undoes)."""
    proto, model, x = _cnn()
    placement = placement_for(QuantConfig())
    placement.use(collect(model, placement.requests(model), ({"x": b} for b in np.array_split(x, 4)), tmp_path))
    placement.overrides = {"conv1": SchemeName.WEIGHT_ONLY.value}
    drop = {OpKind.CONV, OpKind.DEPTHWISE_CONV}
    qmodel, plan, rw = placement.build(model, drop, "the model ran faster without")
    assert {op.node.name: op.scheme for op in plan.ops} == {"conv1": SchemeName.WEIGHT_ONLY, "fc": SchemeName.STATIC}
    assert [(s.node, s.reason) for s in plan.skipped] == [("dwconv", "the model ran faster without")]
    ops = Counter(n.op_type for n in qmodel.graph)
    assert ops["Conv"] == 2 and ops["QLinearConv"] == 0  # conv1 float compute on its int8 weight, dwconv float
    # conv1's weight is stored int8 (decoded by Cast and Mul in front of the float Conv), dwconv's stays float
    stored = {v.name: v.const_value.dtype for v in qmodel.graph.initializers.values()}
    assert stored["w1_bnfolded_quantized"] == ir.DataType.INT8 and stored["wd"] == ir.DataType.FLOAT
    (ref,) = run(proto, {"x": x})
    (got,) = run(ir.serde.serialize_model(qmodel), {"x": x})
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
    # without the budget's choice the same drop leaves both convolutions float
    placement.overrides = {}
    _, plan, _ = placement.build(model, drop, "the model ran faster without")
    assert sorted(s.node for s in plan.skipped) == ["conv1", "dwconv"]


def test_region_ops_leave_static_int8_once_the_ops_feeding_them_do(tmp_path):
    """The int8 region (Split, Concat... without weights) holds only where every input comes out of an op static
    int8 writes: when the accuracy budget moves the convolution feeding a Split to weight-only int8, the Split and
    the Concat reading one of its parts leave too, instead of quantizing float tensors for one integer kernel."""
    rng = np.random.default_rng(4)
    proto = split_block(rng)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    shapes.infer(model)
    x = rng.normal(size=(8, 4, 8, 8)).astype(np.float32)
    placement = placement_for(QuantConfig())
    placement.use(collect(model, placement.requests(model), ({"x": b} for b in np.array_split(x, 4)), tmp_path))
    regions = {op.node.name for op in placement.plan(model.clone()).ops if op.kind == OpKind.INT8_REGION}
    assert regions == {"split", "concat"}
    placement.overrides = {"conv0": SchemeName.WEIGHT_ONLY.value}
    qmodel, plan, _ = placement.build(model, set(), "")
    assert {op.node.name: op.scheme for op in plan.ops} == {"conv0": SchemeName.WEIGHT_ONLY,
                                                            "conv1": SchemeName.STATIC, "conv2": SchemeName.STATIC}
    assert {s.node: s.reason for s in plan.skipped} == {n: "its inputs left static int8 (accuracy budget)"
                                                        for n in ("split", "concat")}
    (ref,) = run(proto, {"x": x})
    (got,) = run(ir.serde.serialize_model(qmodel), {"x": x})
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
