"""How many streamed passes each combination takes, and that sharing them changes nothing but
float rounding: statistics from the shared pass match those measured on the final graph."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from quantkit import runtime
from quantkit.api import Silent
from quantkit.calibrate.collect import RANGE_KINDS, StatRequest, collect
from quantkit.calibrate.data import DataSource
from quantkit.config import QuantConfig
from quantkit.graph import shapes
from quantkit.graph.ir_edit import k_major_weight
from quantkit.load.onnx import input_specs
from quantkit.quantize.gptq import gptq_blockwise
from quantkit.quantize.prepare import CalibrationData, calibrate
from quantkit.quantize.scheme import placement_for

# post-norm block: the LayerNorm output feeds two MatMuls and the residual (SmoothQuant inserts
# a Mul), then a third MatMul after the smoothed ones
TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 8] z, float[N, 16] res) {
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    q = MatMul(h, w1)
    k = MatMul(h, w2)
    s = Add(q, k)
    a = Relu(s)
    z = MatMul(a, w3)
    res = Add(h, x)
}
"""


def _setup(tmp_path):
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(TEXT)
    inits = {"gamma": rng.uniform(0.5, 2, 16), "beta": rng.normal(size=16), "w1": rng.normal(size=(16, 8)),
             "w2": rng.normal(size=(16, 8)), "w3": rng.normal(size=(8, 8))}
    proto.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    model = ir.serde.deserialize_model(proto)
    shapes.infer(model)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    x[:, 3] *= 20  # an outlier channel for SmoothQuant to move
    np.savez(tmp_path / "calib.npz", x=x)
    source = DataSource(tmp_path / "calib.npz", input_specs(model))
    return model, CalibrationData(source, batch=8, fixed=False, limit=None), x


def _run(tmp_path, monkeypatch, gram_budget=None, **config):
    model, data, x = _setup(tmp_path)
    fetched = []
    real_run = runtime.run
    monkeypatch.setattr(runtime, "run", lambda s, names, feed, what: fetched.append(list(names)) or
                        real_run(s, names, feed, what))
    quant = QuantConfig(**config)
    placement = placement_for(quant)
    model = placement.prepare_model(model)
    calibration = calibrate(model, placement, quant, data, tmp_path, lambda s: None, Silent(), gram_budget)
    return model, placement, calibration, fetched, x


def _direct(model, requests, x, tmp_path):
    """The same statistics measured directly on the final (smoothed) graph."""
    return collect(model, requests, ({"x": b} for b in np.array_split(x, 8)), tmp_path)


def test_static_without_smoothquant_is_one_pass(tmp_path, monkeypatch):
    _, _, calibration, fetched, _ = _run(tmp_path, monkeypatch, bias_correction=True, method="auto")
    assert calibration.passes == 1 and len(fetched) == 8 and calibration.samples == 64


def test_static_with_smoothquant_measures_only_the_rescaled_tensors_again(tmp_path, monkeypatch):
    model, placement, calibration, fetched, x = _run(tmp_path, monkeypatch, smoothquant="auto",
                                                     bias_correction=True, method="percentile")
    assert calibration.passes == 2 and calibration.smoothing[0]["applied"].startswith("Mul")
    second = set(fetched[-1])
    assert second == {"h_smoothed"}  # the Mul output: the only tensor whose values changed
    static = placement.schemes[0]
    assert "h" not in static.ranges  # read by SmoothQuant in the first pass, but never given a range
    requests = [r for r in placement.requests(model) if r.kind in RANGE_KINDS]  # not GPTQ's Hessians, split's ranges
    direct = _direct(model, requests, x, tmp_path)
    assert set(static.ranges) == {r.tensor for r in requests}
    for r in requests:
        seen, want = static.observers[r.tensor], direct.get(r.tensor, r.kind)
        np.testing.assert_allclose(seen.range(), want.range(), rtol=1e-5)
        np.testing.assert_allclose(seen.counts, want.counts, rtol=0.01, atol=1)  # same histogram up to rounding
        if r.channel_axis is not None:
            np.testing.assert_allclose(static.channel_means[r.tensor], want.channel_mean(), rtol=1e-4, atol=1e-6)


def test_minmax_with_smoothquant_is_one_pass_with_the_same_ranges(tmp_path, monkeypatch):
    """min/max of X / s come from SmoothQuant's per-channel min/max: x * (1/s) is what the Mul
    computes, element by element, so the range is the one a second pass would observe."""
    model, placement, calibration, fetched, x = _run(tmp_path, monkeypatch, smoothquant="auto",
                                                     bias_correction=True, method="minmax")
    assert calibration.passes == 1 and len(fetched) == 8
    assert calibration.smoothing[0]["applied"].startswith("Mul")
    static = placement.schemes[0]
    requests = placement.requests(model)
    direct = _direct(model, requests, x, tmp_path)
    assert static.ranges["h_smoothed"] == direct.get("h_smoothed", "minmax").range()
    for r in requests:
        np.testing.assert_allclose(static.ranges[r.tensor], direct.get(r.tensor, "minmax").range(), rtol=1e-5)
    np.testing.assert_allclose(static.channel_means["h_smoothed"], direct.get("h_smoothed", "minmax").channel_mean(),
                               rtol=1e-4, atol=1e-6)


def test_gptq_with_smoothquant_shares_one_pass_and_derives_the_smoothed_hessians(tmp_path, monkeypatch):
    model, placement, calibration, fetched, x = _run(tmp_path, monkeypatch, smoothquant=0.5, weights="int4",
                                                     activations="none", algorithm="gptq", block_size=16)
    assert calibration.passes == 1 and len(fetched) == 8
    scheme = placement.schemes[0]
    # each layer was rounded as its Gram arrived (and the Gram dropped): against the Hessians of
    # the smoothed inputs measured directly, GPTQ gives the same codes
    assert set(scheme.consumers) == {"h_smoothed", "a"}
    direct = _direct(model, [StatRequest(n, "gram") for n in scheme.consumers], x, tmp_path)
    assert len(scheme.rounded) == sum(len(ops) for ops in scheme.consumers.values())
    for name, ops in scheme.consumers.items():
        for op in ops:
            want = gptq_blockwise(k_major_weight(op.node), direct.get(name, "gram").hessian(), 4, 16, True)
            got, _ = scheme.rounded[(op.node.inputs[1].name, 4)]
            assert (got.q == want.q).mean() > 0.99
            np.testing.assert_allclose(got.scales, want.scales, rtol=1e-3)


def test_smoothquant_without_data_is_a_config_error(tmp_path):
    from quantkit.errors import ConfigError

    model, _, _ = _setup(tmp_path)
    quant = QuantConfig(smoothquant="auto", activations="dynamic")
    with pytest.raises(ConfigError, match="--smoothquant needs --calib"):
        calibrate(model, placement_for(quant), quant, None, tmp_path, lambda s: None, Silent())


def test_gptq_grams_in_groups_within_a_budget_round_the_same(tmp_path, monkeypatch):
    """A budget smaller than one Gram: one pass per Gram, each dropped once its layers are rounded;
    the rounded layers are those of the single pass."""
    kw = dict(weights="int4", activations="none", algorithm="gptq", block_size=16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, one, cal1, _, _ = _run(tmp_path / "a", monkeypatch, **kw)
    _, grouped, cal2, fetched, _ = _run(tmp_path / "b", monkeypatch, gram_budget=1, **kw)
    grams = len(grouped.schemes[0].consumers)
    assert grams >= 2 and cal1.passes == 1 and cal2.passes == grams
    assert all(len(names) == 1 for names in fetched)  # one Gram's tensor per pass
    a, b = one.schemes[0].rounded, grouped.schemes[0].rounded
    assert a.keys() == b.keys() and len(a) >= 2
    for k in a:
        np.testing.assert_array_equal(a[k][0].q, b[k][0].q)


def test_channel_ranges_of_a_rescaled_tensor_come_from_smoothquants_statistics():
    """The outlier-channel split's per-channel ranges of X / s need no second pass: for s > 0 channel j
    spans [min X_j / s_j, max X_j / s_j], computed as x * (1/s) like the graph."""
    from quantkit.calibrate.collect import Statistics
    from quantkit.calibrate.observers import ChannelObserver
    from quantkit.quantize.outlier_split import CHANNEL_RANGE
    from quantkit.quantize.prepare import _derive_channel_ranges

    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 6)).astype(np.float32) * np.array([1, 1, 30, 1, 1, 1], np.float32)
    s = rng.uniform(0.5, 4, 6).astype(np.float32)
    obs = ChannelObserver()
    obs.update(x)
    stats = Statistics()
    stats.observers[("x", "channel")] = obs
    _derive_channel_ranges(stats, {"x_smoothed": ("x", s)}, [StatRequest("x_smoothed", CHANNEL_RANGE)])
    derived = stats.get("x_smoothed", CHANNEL_RANGE)
    scaled = x * (1 / s)
    np.testing.assert_array_equal(derived.ch_min, scaled.min(axis=0))
    np.testing.assert_array_equal(derived.ch_max, scaled.max(axis=0))
    # a tensor nobody asked channel ranges of gets none
    _derive_channel_ranges(stats, {"other": ("x", s)}, [])
    assert stats.get("other", CHANNEL_RANGE) is None
