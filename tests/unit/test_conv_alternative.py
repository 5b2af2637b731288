"""A convolution's weight-only alternative is emulated in the sensitivity step (the op recomputed by
onnxruntime with its weight as weight-only int8 stores it), and the search's split sends to the next
level the ops that keep the most noise one level back, not simply the top-ranked ones."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from quantkit.quantize import qparams as qp
from quantkit.quantize.budget import ALONE, FLOAT, WEIGHT_ONLY_ALONE, Target, _alone, search


def _conv_model(w: np.ndarray) -> tuple[ir.Model, ir.Node]:
    x = ir.Value(name="x", shape=ir.Shape([2, w.shape[1], 5, 5]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = ir.Value(name="w", shape=ir.Shape(list(w.shape)), type=ir.TensorType(ir.DataType.FLOAT),
                  const_value=ir.tensor(w, name="w"))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Conv", inputs=[x, wv], outputs=[y], name="conv")
    graph = ir.Graph([x], [y], nodes=[node], initializers=[wv], name="g")
    graph.opset_imports[""] = 17
    return ir.Model(graph, ir_version=8), node


def _run(model: ir.Model, feed: dict) -> dict:
    s = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))


def test_the_alone_model_computes_a_convolution_with_its_weight_only_int8_weight():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(4, 3, 1, 1)) * np.array([1, 10, 0.1, 3])[:, None, None, None]).astype(np.float32)
    model, node = _conv_model(w)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    out = _run(_alone(model, [node], [0]), {"x": x})
    q, scale, zp = qp.quantize_weight(w, 0)
    wq = qp.dequantize(q, scale, zp, 0)
    assert not np.array_equal(wq, w)  # the rounding is real...
    expect_float = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x)
    expect_wo = np.einsum("oc,nchw->nohw", wq[:, :, 0, 0], x)
    np.testing.assert_allclose(out["y" + ALONE], expect_float, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["y" + WEIGHT_ONLY_ALONE], expect_wo, rtol=1e-5, atol=1e-5)
    # ...and per output channel: every channel's relative error is at int8's level, the tiny one's too
    err = np.abs(out["y" + WEIGHT_ONLY_ALONE] - out["y" + ALONE]).max(axis=(0, 2, 3))
    assert np.all(err / np.abs(out["y" + ALONE]).max(axis=(0, 2, 3)) < 2e-2)


def test_per_tensor_weights_are_emulated_per_tensor():
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(2, 2, 1, 1)) * np.array([1, 100])[:, None, None, None]).astype(np.float32)
    model, node = _conv_model(w)
    x = rng.normal(size=(2, 2, 5, 5)).astype(np.float32)
    per_tensor = _run(_alone(model, [node], [None]), {"x": x})["y" + WEIGHT_ONLY_ALONE]
    q, scale, zp = qp.quantize_weight(w, None)
    expect = np.einsum("oc,nchw->nohw", qp.dequantize(q, scale, zp, None)[:, :, 0, 0], x)
    np.testing.assert_allclose(per_tensor, expect, rtol=1e-5, atol=1e-5)


def test_the_split_moves_the_op_left_noisiest_one_level_back():
    """Float level: "conv" ranks first but its weight-only alternative already holds it; "attn" (only
    float) is the one that must go float. The old split moved the top-ranked op first."""
    ranked = [{"node": "conv", "own_noise": 1e-2, "alternatives_own_sqnr_db": {"weight_only": 45.0}},
              {"node": "attn", "own_noise": 5e-3, "alternatives_own_sqnr_db": {}}]
    choices = {"conv": ["weight_only", FLOAT], "attn": [FLOAT]}
    noise = {("conv", None): 1e-2, ("conv", "weight_only"): 3e-5, ("conv", FLOAT): 0.0,
             ("attn", None): 5e-3, ("attn", FLOAT): 0.0}
    probes: list = []

    def evaluate(overrides):
        probes.append(dict(overrides))
        total = 1e-9 + sum(noise[(n, overrides.get(n))] for n in ("conv", "attn"))
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - total, "sqnr_db": -10 * np.log10(total), "top1": None}]

    # no restores: the split alone must find it (restores give back at most a few ops one at a time)
    found = search(ranked, choices, Target(min_sqnr=35.0), evaluate, lambda s: None, max_restores=0)
    assert found.met and found.overrides == {"conv": "weight_only", "attn": FLOAT}
    assert {"conv": FLOAT} in probes  # the bisection at the float level went by rank first
