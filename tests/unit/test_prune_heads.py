"""Attention-head pruning on a torch.onnx-style attention block: the block is found, heads are
removed from Q/K/V and the output projection, explicit head counts in the shapes are rewritten,
and the refit output projection beats plain removal."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from prune_models import attention_block, ffn_block

from quantkit.graph.ir_edit import Editor, const_array, with_outputs
from quantkit.prune import heads as hd
from quantkit.prune.refit import Gram, obs_select_groups


def _ir(proto):
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _run(model, feed, outputs=None):
    proto = ir.serde.serialize_model(with_outputs(model, outputs) if outputs else model)
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, feed)


def _feed(rng, n=4, t=6, d=16, rank=None):
    mask = np.zeros((n, 1, 1, t), np.float32)
    mask[0, ..., -2:] = -1e4  # the first sample has two padded positions
    x = rng.normal(0, 1, (n, t, d))
    if rank is not None:  # inputs in a `rank`-dimensional subspace, as real hidden states mostly are
        x = x[..., :rank] @ np.random.default_rng(9).normal(0, 1, (rank, d)) + 0.05 * x
    return {"x": x.astype(np.float32), "mask": mask}


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def test_finds_the_block_and_only_at_its_output_projection():
    model = _ir(attention_block(np.random.default_rng(0)))
    found = {n.name: hd.find_attention(n) for n in model.graph}
    block = found["o_proj"]
    assert isinstance(block, hd.Attention) and (block.heads, block.dim) == (4, 4)
    assert [p.matmul.name for p in (block.q, block.k, block.v)] == ["q_proj", "k_proj", "v_proj"]
    assert all(v is None for k, v in found.items() if k != "o_proj")
    assert all(hd.find_attention(n) is None for n in _ir(ffn_block(np.random.default_rng(0))).graph)


@pytest.mark.parametrize("shared_shape", [True, False])
def test_pruned_heads_give_a_valid_graph_with_rewritten_shapes(shared_shape):
    rng = np.random.default_rng(1)
    model = _ir(attention_block(rng, shared_shape=shared_shape))
    feed = _feed(rng)
    data = [_feed(rng) for _ in range(4)]
    report = hd.prune_attention(model, 0.5, lambda: iter(data), None)
    (layer,) = report["layers"]
    assert (layer["heads_before"], layer["heads_after"]) == (4, 2)
    for p in "qkv":
        assert const_array(_node(model, f"{p}_proj").inputs[1]).shape == (16, 8)
        assert const_array(_node(model, f"{p}_bias").inputs[1]).shape == (8,)
        assert const_array(_node(model, f"{p}_split").inputs[1]).tolist() == [0, 0, 2, 4]
    assert const_array(_node(model, "merge").inputs[1]).tolist() == [0, 0, 8]
    assert const_array(_node(model, "o_proj").inputs[1]).shape == (8, 16)
    (y,) = _run(model, feed)
    assert y.shape == feed["x"].shape and np.isfinite(y).all()


def _soft_attention():
    """The block with small Q/K weights: attention spread evenly, so each head's context is close
    to a linear function of the inputs and the kept heads can stand in for the removed ones."""
    model = _ir(attention_block(np.random.default_rng(3)))
    for name in ("wq", "wk"):
        v = model.graph.initializers[name]
        v.const_value = ir.tensor(const_array(v) * 0.05, name=name)
    return model


def test_refit_output_projection_beats_plain_head_removal():
    rng = np.random.default_rng(2)
    data = [_feed(rng, rank=5) for _ in range(8)]
    feed = _feed(rng, rank=5)
    (ref,) = _run(_soft_attention(), feed, ["o1"])
    errors = {}
    for refit in (False, True):
        model = _soft_attention()
        block = hd.find_attention(_node(model, "o_proj"))
        gram = Gram(16)
        for b in data:
            (c2,) = _run(model, b, ["c2"])
            gram.update(c2, -1)
        keep = np.array([0, 2])
        hd.prune_heads(block, keep, gram, Editor(model.graph))
        if not refit:  # plain removal: the original rows of the output projection and its bias
            w = const_array(_ir(attention_block(np.random.default_rng(3))).graph.initializers["wo"])
            cols = np.concatenate([np.arange(0, 4), np.arange(8, 12)])
            model.graph.initializers["wo"].const_value = ir.tensor(w[cols], name="wo")
            model.graph.initializers["bo"].const_value = ir.tensor(
                const_array(_ir(attention_block(np.random.default_rng(3))).graph.initializers["bo"]), name="bo")
        (out,) = _run(model, feed, ["o1"])
        errors[refit] = float(np.mean((out - ref) ** 2))
    assert errors[True] < 0.5 * errors[False], errors


def test_group_selection_drops_the_head_that_contributes_nothing():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (500, 8))
    x[:, 4:6] *= 1e-3  # head 2 (dims 4, 5) is nearly silent
    gram = Gram(8)
    gram.update(x, -1)
    keep = obs_select_groups(gram, rng.normal(0, 1, (8, 3)), hd.head_groups(4, 2), 3)
    assert keep.tolist() == [0, 1, 3]
