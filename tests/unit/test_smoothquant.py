import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from quantkit.calibrate.observers import ChannelObserver
from quantkit.quantize import smoothquant

from models import run


def _ln_model(extra_reader: bool):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["y1"], name="q"),
             helper.make_node("MatMul", ["h", "w2"], ["y2"], name="k")]
    outputs = ["y1", "y2"]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["h", "x"], ["res"], name="residual"))
        outputs.append("res")
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "g"),
         numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b"),
         numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _outlier_rows(n=512):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x[:, 3] *= 30  # one outlier channel
    return x


def test_smoothing_is_exact_in_float_both_when_folded_and_when_a_mul_is_inserted():
    x = _outlier_rows(32)
    for extra in (False, True):
        proto = _ln_model(extra)
        model = ir.serde.deserialize_model(proto)
        (group,) = smoothquant.find_groups(model)
        assert [n.name for n in group.consumers] == ["q", "k"]
        s = np.linspace(0.5, 4, 16).astype(np.float32)
        how = smoothquant.apply(model, group, s)
        assert how.startswith("Mul" if extra else "folded")
        for ref, got in zip(run(proto, {"x": x}), run(ir.serde.serialize_model(model), {"x": x})):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_alpha_search_beats_no_smoothing_on_an_outlier_channel():
    x = _outlier_rows()
    obs = ChannelObserver(rows=256)
    for part in np.array_split(x, 4):
        obs.update(part)
    assert obs.sample.shape == (256, 16)
    np.testing.assert_array_equal(obs.ch_max, x.max(axis=0))
    w = np.random.default_rng(2).normal(size=(16, 8)).astype(np.float32)
    s, alpha, err = smoothquant.choose_scales(obs, [w], None)
    xs = obs.sample
    base = smoothquant._fake_quant_error(xs, float(obs.ch_min.min()), float(obs.ch_max.max()), [w], [xs @ w])
    assert s is not None and alpha in smoothquant.ALPHAS
    assert s[3] == s.max()  # the outlier channel is scaled down the most
    assert err < base
