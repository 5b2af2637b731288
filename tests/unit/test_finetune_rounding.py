"""Learned rounding (quantkit/finetune/rounding.py): on a small int4 model it lowers each layer's
output reconstruction error below round-to-nearest's, the codes stay in the int4 range, and the
written model still equals the torch graph."""

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from test_finetune_exact import _compare, _encoder, _quantized  # noqa: E402

from quantkit.finetune import rounding  # noqa: E402
from quantkit.finetune.export import write_back  # noqa: E402
from quantkit.finetune.graph import QuantGraph  # noqa: E402


def _inputs(tmp_path):
    """The float model's MatMul weights by output name, and the Gram matrices of the MatMul inputs
    on correlated inputs (what makes rounding choices interact)."""
    fp32 = ir.load(tmp_path / "m.onnx")
    weights = {n.outputs[0].name: n.inputs[1].const_value.numpy() for n in fp32.graph if n.op_type == "MatMul"}
    rng = np.random.default_rng(3)
    grams = {}
    for n in fp32.graph:
        if n.op_type == "MatMul":
            k = n.inputs[1].const_value.shape[0]
            x = rng.normal(0, 1, (512, 8)) @ rng.normal(0, 1, (8, k)) + 0.3 * rng.normal(0, 1, (512, k))
            grams[n.inputs[0].name] = (x.T @ x).astype(np.float32)
    return weights, grams


def _rec(g: QuantGraph, layer: rounding.Layer) -> float:
    with torch.no_grad():
        _, deq = g.fake_weight(layer.name)  # (K, N)
        w = layer.w.reshape(len(layer.w), -1)[:, :deq.shape[0]]
        gram = layer.gram[:deq.shape[0], :deq.shape[0]]
        return float(rounding.reconstruction(deq.t() - w, gram) / rounding.reconstruction(w, gram))


def test_learned_rounding_lowers_layer_error_below_round_to_nearest_and_codes_stay_int4(tmp_path):
    path, data = _quantized(tmp_path, _encoder, weights="int4")
    model = ir.load(path)
    g = QuantGraph(model)
    weights, grams = _inputs(tmp_path)
    layers = rounding.layers_of(g, weights, grams)
    assert len(layers) == 2  # both MatMulNBits; the embedding table has no MatMul to reconstruct
    rtn = {layer.name: _rec(g, layer) for layer in layers}
    results = rounding.learn_rounding(g, layers, iters=300)
    for layer, r in zip(layers, results):
        assert r["before"] == pytest.approx(rtn[layer.name], rel=1e-4)  # what it started from: the RTN codes
        assert r["after"] < 0.9 * r["before"]  # at least 10% less output error than round-to-nearest
        assert _rec(g, layer) == pytest.approx(r["after"], rel=1e-4)  # the graph now computes with those codes
        codes, _ = g.fake_weight(layer.name)
        t = g.trained[layer.name]
        assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, torch.round(codes))
        # the latent weights sit exactly on the codes' grid: end-to-end training starts from them
        scale = g.scale(t.scale)[..., None]
        assert torch.allclose(g.learn.weight(layer.name), (codes - t.zero_point[..., None]) * scale)
    write_back(g, model)
    ir.save(model, tmp_path / "rounded.onnx")
    assert _compare(tmp_path / "rounded.onnx", g, {"ids": data["ids"][:16]}) > 100  # dB: what ships is what was rounded


def test_a_layer_keeps_its_codes_when_learning_cannot_beat_them(tmp_path):
    path, _ = _quantized(tmp_path, _encoder, weights="int4")
    g = QuantGraph(ir.load(path))
    weights, grams = _inputs(tmp_path)
    layer = rounding.layers_of(g, weights, grams)[0]
    before = g.learn.weight(layer.name).detach().clone()
    r = rounding.round_layer(g, layer, iters=0)  # no iteration: the learned codes are the start, not better
    assert r["after"] == r["before"] and torch.equal(g.learn.weight(layer.name), before)
