"""The outlier-channel split: which channels it keeps float, the graph it writes (checked against
onnxruntime and against its numpy emulation), what it refuses, and where the search puts it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from quantkit.calibrate.collect import Statistics
from quantkit.calibrate.observers import ChannelRangeObserver
from quantkit.config import QuantConfig
from quantkit.graph.ir_edit import Editor
from quantkit.quantize import budget
from quantkit.quantize import qparams as qp
from quantkit.quantize.outlier_split import CHANNEL_RANGE, SplitScheme, choose, split_weight
from quantkit.quantize.plan import make_plan
from quantkit.quantize.simulate import Weights

K, N = 64, 24


def _inputs(rng, rows=200, outliers=(3, 40), factor=50.0):
    x = rng.normal(size=(rows, K)).astype(np.float32)
    x[:, list(outliers)] *= factor
    return x


def _model(w: np.ndarray, bias: np.ndarray | None, shared: bool = False) -> ir.Model:
    """x[R, K] -> MatMul(w) [-> Add(bias)] -> y; `shared`: x is also read by a second MatMul (output z)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["R", K]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="g")
    edit = Editor(graph)
    mm = edit.node("MatMul", [x, edit.initializer("w", w)], name="mm", output="h" if bias is not None else "y")
    graph.append(mm)
    out = mm.outputs[0]
    if bias is not None:
        add = edit.node("Add", [out, edit.initializer("b", bias)], name="add", output="y")
        graph.append(add)
        out = add.outputs[0]
    out.type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(out)
    if shared:
        other = edit.node("MatMul", [x, edit.initializer("w2", w)], name="mm2", output="z")
        other.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.append(other)
        graph.outputs.append(other.outputs[0])
    return ir.Model(graph, ir_version=9)


def _calibrated(model: ir.Model, x: np.ndarray) -> tuple[SplitScheme, list]:
    scheme = SplitScheme(QuantConfig())
    plan = make_plan(model, QuantConfig())
    requests = scheme.requests(plan)
    stats = Statistics()
    for r in requests:
        obs = ChannelRangeObserver()
        for batch in np.array_split(x, 4):  # streamed a batch at a time, as the calibration pass does
            obs.update(batch)
        stats.observers[(r.tensor, r.kind)] = obs
    scheme.use(stats)
    return scheme, plan.ops


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def test_choose_takes_the_planted_channels_and_the_range_of_the_rest():
    rng = np.random.default_rng(0)
    x = _inputs(rng)
    found = choose(x.min(axis=0), x.max(axis=0))
    assert found is not None and found.channels.tolist() == [3, 40]
    rest = np.delete(x, [3, 40], axis=1)
    assert found.range == (pytest.approx(float(rest.min())), pytest.approx(float(rest.max())))
    flat = rng.normal(size=(200, K)).astype(np.float32)
    assert choose(flat.min(axis=0), flat.max(axis=0)) is None  # no channel stands out: nothing to split


def test_choose_keeps_at_most_an_eighth_of_the_channels_largest_first():
    magnitude = np.ones(32, np.float32)
    magnitude[:10] = np.arange(10, 0, -1) * 100.0  # ten outliers, 32 // 8 = 4 may go float
    found = choose(-magnitude, magnitude)
    assert found is not None and found.channels.tolist() == [0, 1, 2, 3]


def test_split_weight_zeroes_exactly_the_kept_rows():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    rest, kept = split_weight(w, np.array([1, 3]))
    assert rest.tolist() == [[0, 1, 2], [0, 0, 0], [6, 7, 8], [0, 0, 0]]
    assert kept.tolist() == [[3, 4, 5], [9, 10, 11]]
    assert w[1, 0] == 3  # the original is untouched


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_written_graph_matches_its_emulation_and_beats_plain_static(with_bias):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32) if with_bias else None
    x = _inputs(rng)
    model = _model(w, bias)
    scheme, ops = _calibrated(model, x)
    assert scheme.refuse(ops[0]) is None
    result = scheme.rewrite(model, ops, Editor(model.graph))
    assert result.quantized_nodes == ["mm"] and "2 outlier input channel(s)" in result.notes[0]
    got = _run(model, x)
    exact = x @ w + (bias if bias is not None else 0)
    emulated = Weights(w, scheme.emulation("x")).outputs(x)["split"] + (bias if bias is not None else 0)
    np.testing.assert_allclose(got, emulated, rtol=1e-4, atol=1e-3)

    def sqnr(y):
        return 10 * np.log10(np.sum(exact ** 2) / np.sum((y - exact) ** 2))

    scale, zp = qp.qparams(float(x.min()), float(x.max()), qp.UINT8, symmetric=False)
    q, ws, wz = qp.quantize_weight(w, 1)
    static = qp.dequantize(qp.quantize(x, scale, zp, qp.UINT8), scale, zp) @ qp.dequantize(q, ws, wz, 1)
    static = static + (bias if bias is not None else 0)
    assert sqnr(got) > sqnr(static) + 20  # the two 50x channels no longer set the step of all 64
    assert [n.op_type for n in model.graph].count("Gather") == 1
    assert model.graph.outputs[0].name == "y"  # the graph output keeps its name, now on the sum


def test_an_input_with_other_readers_or_no_outliers_is_refused():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    scheme, ops = _calibrated(_model(w, None, shared=True), _inputs(rng))
    assert scheme.splits == {} and all("other readers" in (scheme.refuse(op) or "") for op in ops)
    scheme, ops = _calibrated(_model(w, None), rng.normal(size=(200, K)).astype(np.float32))
    assert scheme.refuse(ops[0]) == "its input has no outlier channels"
    assert scheme.emulation("x") is None


def test_channel_range_observer_keeps_per_channel_extremes_over_batches():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 10, 6)).astype(np.float32)
    obs = ChannelRangeObserver()
    for batch in x:
        obs.update(batch[None])
    np.testing.assert_array_equal(obs.ch_min, x.reshape(-1, 6).min(axis=0))
    np.testing.assert_array_equal(obs.ch_max, x.reshape(-1, 6).max(axis=0))
    assert obs.name == CHANNEL_RANGE and obs.nonfinite == 0
    obs.update(np.full((2, 6), np.nan, np.float32))
    assert obs.nonfinite == 12  # then use() takes no split from it


def test_attention_matmuls_go_float_from_the_first_level():
    choices = {"down": ["split", "dynamic", budget.FLOAT], "attn": [budget.FLOAT], "emb": [budget.FLOAT]}
    levels = budget.Levels(choices, frozenset({"attn"}))
    assert levels.at(0, 3, ["down", "attn", "emb"]) == {"down": "split", "attn": budget.FLOAT}
    assert levels.at(1, 3, ["down", "attn", "emb"]) == {"down": "dynamic", "attn": budget.FLOAT}
    assert levels.at(2, 3, ["down", "attn", "emb"]) == {n: budget.FLOAT for n in choices}
    # without the free-float set an attention MatMul waits for the last level, as embedding tables do
    assert budget.Levels(choices).at(1, 3, ["down", "attn", "emb"]) == {"down": "dynamic"}
