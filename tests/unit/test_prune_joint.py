"""--prune-refit joint (prune/joint.py): after block training, the kept parameters of every pruned
block trained together towards the original model's graph outputs. Numerics on the planted
two-block post-LayerNorm encoder of test_prune_blocktrain.py (erf GELU FFNs on a residual stream,
the output masked by the attention mask)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402
from test_prune_blocktrain import D, H, _data, _model, _session  # noqa: E402

from quantkit.config import PruneConfig  # noqa: E402
from quantkit.errors import ConfigError  # noqa: E402
from quantkit.graph.ir_edit import const_array  # noqa: E402
from quantkit.prune import blocktrain, joint, prune  # noqa: E402
from quantkit.report.compare import OutputComparison  # noqa: E402

QUICK = {blocktrain: dict(steps=100, batch=512, lr=3e-3, every=25, holdout=5),
         joint: dict(steps=300, lr=3e-3, every=25, holdout=5)}


def _pruned(calib, refit: str, **extra) -> tuple[ir.Model, dict]:
    model = _model(ln=True)
    with pytest.MonkeyPatch.context() as mp:
        for module, changes in QUICK.items():
            mp.setattr(module, "SETTINGS", replace(module.SETTINGS, **changes))
        section = prune(model, PruneConfig(ratio=0.5, refit=refit, **extra), lambda: iter(calib), calib[0], None)
    return model, section


@pytest.fixture(scope="module")
def runs():
    """Calibration and unseen batches, the original model's outputs on the unseen ones, and the
    model pruned with block training alone, with the joint phase, and with its pooled loss."""
    rng = np.random.default_rng(0)
    calib, held = _data(rng, 20), _data(rng, 8)
    ref = [_session(_model(ln=True)).run(["y"], b)[0] for b in held]
    return {"calib": calib, "held": held, "ref": ref, "train": _pruned(calib, "train"),
            "joint": _pruned(calib, "joint"), "pooled": _pruned(calib, "joint", joint_loss="pooled")}


def _pooled_cosine(model: ir.Model, held, ref) -> float:
    """Mean cosine of the mask-aware mean-pooled output vectors against the original model's."""
    sess, cos = _session(model), []
    for b, r in zip(held, ref):
        m = b["attention_mask"][..., None].astype(np.float64)
        p, q = ((np.asarray(a, np.float64) * m).sum(1) / m.sum(1) for a in (sess.run(["y"], b)[0], r))
        cos += list((p * q).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(q, axis=1))
    return float(np.mean(cos))


def _report_cosine(model: ir.Model, held, ref) -> float:
    """The report's per-sample cosine (padding masked) against the original model's outputs."""
    sess, cmp = _session(model), OutputComparison("y")
    for b, r in zip(held, ref):
        cmp.update(r, sess.run(["y"], b)[0], feed=b)
    return cmp.result()["cosine_mean"]


def test_the_joint_phase_lowers_the_output_error_below_the_block_trained_start(runs):
    (trained, _), (joined, section) = runs["train"], runs["joint"]
    r = section["joint"]
    assert section["refit"] == "joint" and r["trained"] and r["loss"] == "outputs" and r["trimmed"], r
    assert r["tensors"] == 8 and r["parameters"] == 2 * (D * H // 2 + H // 2 + H // 2 * D + D)
    # its own held-out calibration batches (every 5th of 20), which it never trained on
    assert r["held_out_loss_best"] < r["held_out_loss_start"] and r["best_step"] > 0, r
    assert r["held_out_cosine_best"] > r["held_out_cosine_start"]
    # on sequences neither the pruning nor the training saw, as the report compares: measured
    # 1 - cosine 0.0128 (block-trained) -> 0.0077 (joint)
    e_train, e_joint = (1 - _report_cosine(m, runs["held"], runs["ref"]) for m in (trained, joined))
    assert e_joint < 0.8 * e_train, (e_train, e_joint)
    for k in ("w1", "c1", "v1", "d1", "w2", "c2", "v2", "d2"):  # every pruned block's parameters moved
        a, b = const_array(trained.graph.initializers[k]), const_array(joined.graph.initializers[k])
        assert a.shape == b.shape and not np.allclose(a, b)
    for k in ("n1", "m1", "n2", "m2"):  # the LayerNorms are not the pruned blocks': untouched
        np.testing.assert_array_equal(const_array(trained.graph.initializers[k]),
                                      const_array(joined.graph.initializers[k]))


def test_the_written_graph_is_valid_and_two_runs_write_the_same_bytes(runs):
    calib, (a, section) = runs["calib"], runs["pooled"]
    threads = torch.get_num_threads()
    b, _ = _pruned(calib, "joint", joint_loss="pooled")
    assert torch.get_num_threads() == threads  # the phase's single thread is given back
    assert section["joint"]["trained"] and section["joint"]["loss"] == "pooled"
    out = _session(a).run(None, {"x": calib[0]["x"][:3, :7], "attention_mask": calib[0]["attention_mask"][:3, :7]})
    assert out[0].shape == (3, 7, D) and np.isfinite(out[0]).all()
    assert const_array(a.graph.initializers["w1"]).shape == (D, H // 2)
    assert ir.serde.serialize_model(a).SerializeToString() == ir.serde.serialize_model(b).SerializeToString()


def test_the_pooled_loss_raises_the_pooled_cosine(runs):
    # measured: pooled 1 - cosine 0.0071 (block-trained) -> 0.0043 (pooled loss; the outputs loss: 0.0041)
    e_train, e_pooled = (1 - _pooled_cosine(runs[k][0], runs["held"], runs["ref"]) for k in ("train", "pooled"))
    assert e_pooled < 0.8 * e_train, (e_train, e_pooled)


def test_the_loss_terms_are_the_report_s_cosine_and_the_mean_pooled_cosine():
    rng = np.random.default_rng(1)
    o, t = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 6, 3))
    mask = np.ones((4, 6), np.int64)
    mask[0, 4:] = mask[2, 1:] = 0
    w = torch.from_numpy(mask.astype(np.float64))[..., None]
    cmp = OutputComparison("y")
    cmp.update(t.astype(np.float32), o.astype(np.float32), feed={"attention_mask": mask})
    got = 1 - float(joint.cosine_error(torch.from_numpy(o), torch.from_numpy(t), w))
    assert got == pytest.approx(cmp.result()["cosine_mean"], abs=1e-6)
    m = mask[..., None]
    po, pt = (o * m).sum(1) / m.sum(1), (t * m).sum(1) / m.sum(1)
    want = np.mean(1 - (po * pt).sum(1) / np.linalg.norm(po, axis=1) / np.linalg.norm(pt, axis=1))
    assert float(joint.pooled_error(torch.from_numpy(o), torch.from_numpy(t), w)) == pytest.approx(want, abs=1e-12)


def test_joint_options_are_checked_up_front(monkeypatch):
    with pytest.raises(ConfigError, match="--prune-joint-steps applies to --prune-refit joint, not train"):
        PruneConfig(ratio=0.3, refit="train", joint_steps=10)
    with pytest.raises(ConfigError, match="--prune-joint-loss applies to --prune-refit joint, not sequential"):
        PruneConfig(ratio=0.3, refit="sequential", joint_loss="pooled")
    with pytest.raises(ConfigError, match="--prune-joint-loss must be one of outputs, pooled"):
        PruneConfig(ratio=0.3, refit="joint", joint_loss="mean")
    with pytest.raises(ConfigError, match="--prune-joint-steps must be at least 1"):
        PruneConfig(ratio=0.3, refit="joint", joint_steps=0)
    cfg = PruneConfig(ratio=0.3, refit="joint", train_steps=5, joint_steps=7, joint_loss="pooled")
    s = joint.settings_for(cfg.joint_steps, cfg.joint_loss.value)
    assert (s.steps, s.pooled, cfg.train_steps) == (7, True, 5)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ConfigError, match="--prune-refit joint trains the pruned blocks in PyTorch.*pip install"):
        prune(_model(), cfg, lambda: iter(_data(np.random.default_rng(0), 2)), {}, None)
