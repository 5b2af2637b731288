"""Attention masks: found in the graph, found in observed ranges, and kept float."""

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from quantkit.calibrate.observers import HistogramObserver, MinMaxObserver
from quantkit.config import QuantConfig
from quantkit.graph import shapes
from quantkit.graph.canonicalize import canonicalize
from quantkit.graph.masks import mask_tensors
from quantkit.quantize.plan import make_plan

F32_MIN = np.finfo(np.float32).min


def masked_attention_model(mask_into_matmul: bool = False):
    """scores = x @ W; ext = (1 - mask) * f32min; probs = Softmax(scores + ext); y = probs @ W2.
    With mask_into_matmul the masked scores also feed a weighted MatMul directly."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"], name="qk"),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "fmin"], ["ext"]),
        helper.make_node("Add", ["scores", "ext"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "w2"], ["y"], name="pv"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]
    if mask_into_matmul:
        nodes.append(helper.make_node("MatMul", ["masked", "w2"], ["z"], name="leaky"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8]))
    graph = helper.make_graph(
        nodes, "att",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 8])],
        outputs,
        [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w2"),
         numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.float32(F32_MIN), "fmin")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_mask_tensors_are_traced_from_the_constant_to_softmax():
    model = ir.serde.deserialize_model(masked_attention_model())
    found = mask_tensors(model)
    assert set(found) == {"ext", "masked"}  # probs (after Softmax) is ordinary again
    assert "-3.4e+38" in found["ext"]


def test_ops_reading_a_mask_tensor_stay_float_with_the_reason():
    model = ir.serde.deserialize_model(masked_attention_model(mask_into_matmul=True))
    canonicalize(model)
    shapes.infer(model)
    plan = make_plan(model, QuantConfig())
    plan.keep_float(mask_tensors(model))
    assert sorted(op.node.name for op in plan.ops) == ["pv", "qk"]
    (leaky,) = [s for s in plan.skipped if s.node == "leaky"]
    assert "input 'masked' stays float: carries an additive attention mask" in leaky.reason


def test_observer_flags_mask_dominated_ranges_but_not_ordinary_ones():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 8)).astype(np.float32)
    masked = scores.copy()
    masked[:, 6:] += F32_MIN
    for cls in (MinMaxObserver, HistogramObserver):
        obs = cls()
        obs.update(masked)
        assert "mask-like" in obs.mask_like()
        plain = cls()
        plain.update(scores * 1000)  # large but ordinary
        assert plain.mask_like() is None
    inf = MinMaxObserver()
    inf.update(np.where(np.arange(8) > 5, -np.inf, 1.0))
    assert "-inf" in inf.mask_like()
