"""Sequential channel pruning (prune/sequential.py), the padded-token weighting of the statistics
and the refit towards another model's output (refit.Target): numerics on planted cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from prune_models import padded_sequences

from quantkit.graph.ir_edit import const_array
from quantkit.prune import refit as rf
from quantkit.prune.sensitivity import safe_groups
from quantkit.prune.sequential import residual_input
from quantkit.prune.stats import position_weights
from quantkit.prune.structured import prune_channels

D, H = 8, 32

TWO_BLOCKS = f"""
<ir_version: 8, opset_import: ["" : 17]>
encoder (float[N, T, {D}] x, int64[N, T] attention_mask) => (float[N, T, {D}] y) {{
    h1 = MatMul(x, w1)
    a1 = Add(h1, c1)
    g1 = Relu(a1)
    o1 = MatMul(g1, v1)
    p1 = Add(o1, d1)
    y1 = Add(p1, x)
    h2 = MatMul(y1, w2)
    a2 = Add(h2, c2)
    g2 = Relu(a2)
    o2 = MatMul(g2, v2)
    p2 = Add(o2, d2)
    y2 = Add(p2, y1)
    m = Cast<to = 1>(attention_mask)
    mu = Unsqueeze(m, axes)
    y = Mul(y2, mu)
}}
"""


def _model(rng) -> ir.Model:
    proto = onnx.parser.parse_model(TWO_BLOCKS)
    # hidden units with correlated inputs (a low-rank x), so kept units can stand in for removed ones
    init = {"w1": rng.normal(0, 0.5, (D, H)), "c1": rng.normal(0, 0.3, H), "v1": rng.normal(0, 0.4, (H, D)),
            "d1": rng.normal(0, 0.1, D), "w2": rng.normal(0, 0.5, (D, H)), "c2": rng.normal(0, 0.3, H),
            "v2": rng.normal(0, 0.4, (H, D)), "d2": rng.normal(0, 0.1, D), "axes": np.array([2])}
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v, np.int64 if k == "axes" else
                                                                           np.float32), k) for k, v in init.items())
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _data(rng, n: int, t: int = 12, pad_scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    """Batches of 32 sequences: x from a 3-dimensional subspace plus a little noise; the last
    positions of each sequence padded (mask 0) and, scaled by pad_scale, unlike the real tokens."""
    return padded_sequences(rng, n, D, 3, t, pad_scale)


def _run(model: ir.Model, batches) -> list[np.ndarray]:
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return [sess.run(["y"], b)[0] for b in batches]


def _error(model: ir.Model, ref: list[np.ndarray], batches) -> float:
    """Mean squared error of y over the real tokens (y is 0 at the padded ones in both)."""
    out = _run(model, batches)
    return float(sum(np.sum((a - b) ** 2) for a, b in zip(out, ref)) / sum(b["attention_mask"].sum() for b in batches))


def _pruned(calib, ratio: float, **kw) -> ir.Model:
    model = _model(np.random.default_rng(1))
    prune_channels(model, ratio, lambda: iter(calib), workdir=None, **kw)
    return model


def test_sequential_refit_reduces_the_output_error_against_one_shot():
    rng = np.random.default_rng(0)
    calib, held = _data(rng, 40), _data(rng, 10)
    ref = _run(_model(np.random.default_rng(1)), held)
    one_shot = _pruned(calib, 0.5)
    sequential = _pruned(calib, 0.5, sequential=True)
    for m in (one_shot, sequential):
        assert [const_array(m.graph.initializers[k]).shape for k in ("w1", "v1", "w2", "v2")] == \
            [(D, H // 2), (H // 2, D), (D, H // 2), (H // 2, D)]
    e_one, e_seq = _error(one_shot, ref, held), _error(sequential, ref, held)
    plain = _error(_pruned(calib, 0.5, refit=False), ref, held)
    # measured: plain removal 95, one-shot refit 3.09, sequential 2.76 (seeds 0-2: 0.87-0.90 of one-shot)
    assert e_seq < 0.95 * e_one and e_one < 0.1 * plain, (e_seq, e_one, plain)


def test_the_second_block_is_refit_towards_the_original_output_on_the_pruned_inputs():
    """After sequential pruning, block 2's weights are the ridge least-squares map (ridge towards
    its kept original rows) from its kept hidden units in the pruned model to the original block
    output minus the pruned model's residual: solved here from the tensors themselves."""
    rng = np.random.default_rng(3)
    calib = _data(rng, 30)
    model, orig = _pruned(calib, 0.5, sequential=True), _model(np.random.default_rng(1))
    names = ["g2", "y2", "y1"]
    got, want = _real_rows(model, names, calib), _real_rows(orig, names, calib)
    x = got["g2"]  # the kept hidden units of block 2 in the pruned model
    t = want["y2"] - got["y1"]  # the original block output minus the pruned model's residual
    w2, w2_orig = (const_array(m.graph.initializers["w2"]) for m in (model, orig))
    keep = np.array([int(np.argmin(np.abs(w2_orig - col[:, None]).sum(0))) for col in w2.T])
    np.testing.assert_array_equal(w2, w2_orig[:, keep])  # the producer is sliced, not refit
    xa = np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)
    v2, d2 = (const_array(orig.graph.initializers[k]) for k in ("v2", "d2"))
    start = np.concatenate([v2[keep], d2[None]])
    lam = 0.1 * 128 / (30 * 32) * np.mean(np.sum(xa * xa, 0))
    sol = np.linalg.solve(xa.T @ xa + lam * np.eye(len(start)), xa.T @ t + lam * start)
    np.testing.assert_allclose(const_array(model.graph.initializers["v2"]), sol[:-1], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(const_array(model.graph.initializers["d2"]), sol[-1], rtol=2e-3, atol=2e-3)


def _real_rows(model: ir.Model, names: list[str], batches) -> dict[str, np.ndarray]:
    """The named tensors' rows at the real tokens over all batches."""
    for name in names:
        model.graph.outputs.append(next(n.outputs[0] for n in model.graph if n.outputs[0].name == name))
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    rows = {k: [] for k in names}
    for b in batches:
        real = b["attention_mask"].reshape(-1) > 0
        for name, v in zip(names, sess.run(names, b)):
            rows[name].append(v.reshape(-1, v.shape[-1])[real])
    return {k: np.concatenate(v).astype(np.float64) for k, v in rows.items()}


def test_padded_tokens_weigh_nothing_in_the_statistics():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    weights = position_weights({"x": x, "attention_mask": mask}, x, -1)
    assert weights.tolist() == mask.reshape(-1).tolist()
    masked, real = rf.Gram(3), rf.Gram(3)
    masked.update(x, -1, weights)
    real.update(x[mask > 0][None], -1)
    np.testing.assert_allclose(masked.matrix, real.matrix, rtol=1e-6)
    np.testing.assert_allclose(masked.rms(), real.rms(), rtol=1e-6)
    assert masked.count == 7 and masked.samples == 2
    # no mask input, a mask that masks nothing, or channels not last: no weights
    assert position_weights({"x": x}, x, -1) is None
    assert position_weights({"attention_mask": np.ones((2, 5), np.int64)}, x, -1) is None
    assert position_weights({"attention_mask": mask}, x, 1) is None


def test_padded_tokens_left_out_of_the_statistics_lower_the_error_on_the_real_ones():
    """Padded positions whose inputs are unlike the real tokens' (scale 5) pull a refit that counts
    them away from what the real tokens need."""
    rng = np.random.default_rng(7)
    calib, held = _data(rng, 40, pad_scale=5.0), _data(rng, 10, pad_scale=5.0)
    ref = _run(_model(np.random.default_rng(1)), held)
    masked = _error(_pruned(calib, 0.5), ref, held)
    unmasked_calib = [{"x": b["x"], "attention_mask": b["attention_mask"] * 0 + 1} for b in calib]
    everything = _pruned(unmasked_calib, 0.5)
    assert masked < 0.8 * _error(everything, ref, held)


def test_refit_towards_a_target_is_the_ridge_least_squares_solution():
    rng = np.random.default_rng(8)
    x = rng.normal(0, 1, (400, 6))
    t = x[:, :4] @ rng.normal(0, 1, (4, 2)) + rng.normal(0, 0.1, (400, 2)) + 0.3
    w, b = rng.normal(0, 1, (6, 2)), np.zeros(2)
    gram, target = rf.Gram(6), rf.Target(6, 2)
    target.update(gram.update(x, -1), t)
    keep = np.array([0, 1, 2, 3])
    w_new, b_new = rf.refit(gram, w, b, keep, ridge=0.0, target=target)
    sol = np.linalg.lstsq(np.concatenate([x[:, keep], np.ones((400, 1))], 1), t, rcond=None)[0]
    np.testing.assert_allclose(w_new, sol[:-1], atol=1e-4)
    np.testing.assert_allclose(b_new, sol[-1], atol=1e-4)
    full = rf.target_weights(gram, w, b, target)
    assert full.shape == (6, 2) and np.abs(full[4:]).max() < 0.05  # channels 4, 5 carry nothing of t
    assert sorted(rf.obs_select([(gram, full)], 4).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("samples,ridge", [(16, 0.1), (128, 0.1), (256, 0.05), (1024, 0.0125)])
def test_the_ridge_is_a_fixed_prior_past_128_samples(samples, ridge):
    gram = rf.Gram(2)
    gram.update(np.ones((samples, 3, 2), np.float32), -1)
    assert gram.samples == samples
    assert rf.ridge_for(gram) == pytest.approx(ridge)


def test_residual_input_is_found_through_the_bias_add():
    model = _model(np.random.default_rng(1))
    safe, _ = safe_groups(model)
    assert [residual_input(g.consumers[0]).name for g in safe] == ["x", "y1"]
    first = next(n for n in model.graph if n.outputs[0].name == "h1")
    assert residual_input(first) is None  # MatMul -> bias Add -> Relu: no residual
