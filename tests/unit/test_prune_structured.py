"""Structured channel pruning: which groups are safe, that pruned graphs stay valid and run, and
that the least-squares refit preserves the block output better than plain removal."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from prune_models import ffn_block, se_residual_cnn

from quantkit.graph.ir_edit import const_array, with_outputs
from quantkit.prune import refit as rf
from quantkit.prune.groups import find_groups
from quantkit.prune.structured import prune_channels


def _ir(proto: onnx.ModelProto) -> ir.Model:
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    return model


def _session(model: ir.Model, outputs: list[str] | None = None) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(with_outputs(model, outputs) if outputs else model)
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _batches(rng, shape, n=6):
    data = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]
    return lambda: iter(data)


def _group(groups, producer):
    return next(g for g in groups if g.name == producer)


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def test_groups_follow_channels_through_bn_depthwise_and_se_gate_and_stop_at_residuals():
    groups = find_groups(_ir(se_residual_cnn(np.random.default_rng(0))))
    g = _group(groups, "conv1")
    assert g.reason is None
    assert {p.name for p in g.producers} == {"conv1", "se2"}  # the gate's producer is pruned alongside
    assert {c.name for c in g.consumers} == {"se1", "conv2"}
    assert {c.name for c in g.carriers} == {"bn1", "dwconv"}
    assert "residual Add residual" in _group(groups, "conv2").reason
    assert "residual" in _group(groups, "conv3").reason
    assert "graph output" in _group(groups, "fc").reason
    assert _group(groups, "se1").reason is None  # the 4 squeeze channels: se1 -> Relu -> se2


def test_ffn_neurons_are_a_group_and_attention_projections_are_not():
    groups = find_groups(_ir(ffn_block(np.random.default_rng(0))))
    ffn = _group(groups, "ffn_in")
    assert ffn.reason is None and [c.name for c in ffn.consumers] == ["ffn_out"]
    assert ffn.channels == 64 and len(ffn.constants) == 1  # the bias b1 (the GELU scalars broadcast)
    assert "Reshape split_heads" in _group(groups, "query").reason
    assert "residual" in _group(groups, "ffn_out").reason


def test_pruned_cnn_is_valid_runs_and_has_the_pruned_shapes():
    rng = np.random.default_rng(1)
    original = _ir(se_residual_cnn(rng))
    model = _ir(se_residual_cnn(np.random.default_rng(1)))
    report = prune_channels(model, 0.5, _batches(rng, (8, 4, 8, 8)), workdir=None)
    assert {layer["layer"] for layer in report["layers"]} == {"conv1", "se1"}
    assert const_array(_node(model, "conv1").inputs[1]).shape == (8, 4, 3, 3)
    assert const_array(_node(model, "se2").inputs[1]).shape == (8, 2, 1, 1)  # both of its axes pruned
    assert const_array(_node(model, "dwconv").inputs[1]).shape == (8, 1, 3, 3)
    assert _node(model, "dwconv").attributes.get_int("group") == 8
    assert all(const_array(v).shape == (8,) for v in _node(model, "bn1").inputs[1:])
    assert const_array(_node(model, "conv2").inputs[1]).shape == (8, 8, 1, 1)
    assert {s["layer"] for s in report["skipped"]} == {"conv2", "conv3", "fc"}
    x = rng.normal(0, 1, (5, 4, 8, 8)).astype(np.float32)
    (ref,) = _session(original).run(None, {"x": x})
    (out,) = _session(model).run(None, {"x": x})
    assert out.shape == ref.shape == (5, 5)
    cos = np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out)
    assert cos > 0.9  # half the channels gone, still the same function roughly


@pytest.mark.parametrize("build,shape,block,ratio,factor", [
    (ffn_block, (8, 6, 16), "o1", 0.5, 0.5),  # the FFN output before the residual add
    # the conv consuming the pruned channels; the refit SE gate also moves its kept inputs a little
    (se_residual_cnn, (8, 4, 8, 8), "c2", 0.5, 0.8),
])
def test_refit_preserves_the_block_output_better_than_plain_removal(build, shape, block, ratio, factor):
    rng = np.random.default_rng(2)
    batches = _batches(rng, shape, n=12)
    x = rng.normal(0, 1, shape).astype(np.float32)  # held out: not in the calibration batches
    (ref,) = _session(_ir(build(np.random.default_rng(3))), [block]).run([block], {"x": x})
    errors = {}
    for refit in (False, True):
        model = _ir(build(np.random.default_rng(3)))
        prune_channels(model, ratio, batches, workdir=None, refit=refit)
        (out,) = _session(model, [block]).run([block], {"x": x})
        errors[refit] = float(np.mean((out - ref) ** 2))
    assert errors[True] < factor * errors[False], errors


def test_ffn_report_records_the_refit_error_drop():
    rng = np.random.default_rng(4)
    model = _ir(ffn_block(rng))
    report = prune_channels(model, 0.25, _batches(rng, (8, 6, 16)), workdir=None)
    (layer,) = report["layers"]
    assert (layer["channels_before"], layer["channels_after"]) == (64, 48)
    (consumer,) = layer["consumers"]
    assert consumer["mse_refit"] < consumer["mse_removed"]
    assert const_array(_node(model, "ffn_out").inputs[1]).shape == (48, 16)
    assert const_array(_node(model, "ffn_in_bias").inputs[1]).shape == (48,)


def test_refit_recovers_a_channel_that_is_a_combination_of_the_kept_ones():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (500, 4))
    x = np.concatenate([x, x[:, :1] * 2 - x[:, 1:2] + 0.5], axis=1)  # channel 4 = 2 x0 - x1 + 0.5
    w, b = rng.normal(0, 1, (5, 3)), rng.normal(0, 1, 3)
    gram = rf.Gram(5)
    gram.update(x, axis=-1)
    keep = np.arange(4)
    w_new, b_new = rf.refit(gram, w, b, keep, ridge=1e-9)
    np.testing.assert_allclose(x[:, :4] @ w_new + b_new, x @ w + b, atol=1e-5)
    assert rf.output_error(gram, w, b, keep, w_new, b_new) < 1e-9
    assert rf.output_error(gram, w, b, keep, w[keep], b) > 0.1


def test_keep_count_rounds_wide_layers_to_multiples_of_eight():
    assert rf.keep_count(1536, 0.3) == 1072
    assert rf.keep_count(16, 0.5) == 8
    assert rf.keep_count(3, 0.9) == 1
    assert rf.select(np.array([0.1, 3.0, 2.0, 0.5]), 2).tolist() == [1, 2]


def test_obs_selection_drops_a_duplicate_channel_that_rms_times_norm_would_keep():
    rng = np.random.default_rng(6)
    base = rng.normal(0, 1, (1000, 3))
    x = np.concatenate([base, base[:, :1], rng.normal(0, 1, (1000, 1))], axis=1)  # channel 3 = channel 0
    w = np.array([[2.0], [1.0], [1.0], [2.0], [0.5]])
    gram = rf.Gram(5)
    gram.update(x, axis=-1)
    assert rf.select(rf.importance(gram.rms(), w), 4).tolist() == [0, 1, 2, 3]  # drops the quiet unique one
    keep = rf.obs_select([(gram, w)], 4)
    assert len(keep) == 4 and 4 in keep and len({0, 3} & set(keep.tolist())) == 1  # drops a duplicate
