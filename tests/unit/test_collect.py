"""One streamed pass computes every requested statistic, each equal to its numpy definition."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from quantkit import runtime
from quantkit.calibrate.collect import StatRequest, collect
from quantkit.graph.ir_edit import with_outputs

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
    h = MatMul(x, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}
"""


def _model(rng):
    proto = onnx.parser.parse_model(TEXT)
    proto.graph.initializer.extend([numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w1"),
                                    numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "w2")])
    return ir.serde.deserialize_model(proto)


def test_every_kind_of_statistic_from_a_single_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    model = _model(rng)
    batches = [{"x": rng.normal(size=(5, 4)).astype(np.float32)} for _ in range(4)]
    runs = []
    real_run = runtime.run

    def counting_run(sess, names, feed, what):
        runs.append(tuple(names))
        return real_run(sess, names, feed, what)

    monkeypatch.setattr(runtime, "run", counting_run)
    requests = [StatRequest("x", "minmax"), StatRequest("x", "gram"), StatRequest("h", "histogram", channel_axis=-1),
                StatRequest("r", "channel"), StatRequest("r", "gram")]
    stats = collect(model, requests, iter(batches), tmp_path)
    assert len(runs) == len(batches) and stats.passes == 1 and stats.samples == 20
    assert set(runs[0]) == {"x", "h", "r"}  # each tensor fetched once, whatever it feeds

    x = np.concatenate([b["x"] for b in batches])
    w1 = model.graph.initializers["w1"].const_value.numpy()
    h = x @ w1
    r = np.maximum(h, 0)
    assert stats.get("x", "minmax").range() == (float(x.min()), float(x.max()))
    np.testing.assert_allclose(stats.get("x", "gram").hessian(), 2 * x.T.astype(np.float64) @ x / len(x), rtol=1e-5)
    hist = stats.get("h", "histogram")
    assert hist.counts.sum() == h.size
    np.testing.assert_allclose(hist.channel_mean(), h.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.get("r", "channel").ch_max, r.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.get("r", "gram").hessian(), 2 * r.T.astype(np.float64) @ r / len(r),
                               rtol=1e-4, atol=1e-6)


def test_paired_statistics_see_both_tensors_of_each_batch(tmp_path):
    """The hook for per-layer output errors: an observer fed a tensor and its reference."""
    rng = np.random.default_rng(1)
    model = _model(rng)
    batches = [{"x": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(3)]
    stats = collect(model, [StatRequest("r", "output_error", reference="h"), StatRequest("h", "minmax")],
                    iter(batches), tmp_path)
    w1 = model.graph.initializers["w1"].const_value.numpy()
    h = np.concatenate([b["x"] for b in batches]).astype(np.float64) @ w1
    obs = stats.get("r", "output_error")
    np.testing.assert_allclose(obs.error, np.sum(np.minimum(h, 0) ** 2), rtol=1e-5)  # Relu(h) - h = -min(h, 0)
    np.testing.assert_allclose(obs.signal, np.sum(h**2), rtol=1e-5)
    assert obs.sqnr_db() == pytest.approx(10 * np.log10(np.sum(h**2) / np.sum(np.minimum(h, 0) ** 2)), rel=1e-5)
    assert stats.get("h", "minmax").range() == pytest.approx((h.min(), h.max()), rel=1e-5)


def test_the_probe_model_keeps_only_what_computes_the_requested_tensors():
    model = _model(np.random.default_rng(0))
    probe = with_outputs(model, ["h"])
    assert [n.op_type for n in probe.graph] == ["MatMul"]
    assert [o.name for o in probe.graph.outputs] == ["h"]
    assert set(probe.graph.initializers) == {"w1"}
    # the original is untouched
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu", "MatMul"]
    assert [o.name for o in model.graph.outputs] == ["y"]


def test_no_requests_runs_nothing(tmp_path):
    stats = collect(_model(np.random.default_rng(0)), [], iter([]), tmp_path)
    assert stats.passes == 0 and not stats.observers
