"""--finetune with --prune: the pruned, quantized model is distilled from the unpruned fp32 model
(its teacher), so training recovers what pruning cost; weights pruned to zero stay zero."""

import onnx_ir as ir
import pytest

import quantkit

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch, samples):
    monkeypatch.chdir(samples.parent)


def _run(samples, tmp_path, name, **options):
    d = samples / "digits_cnn"
    return quantkit.quantize(d / "model.pt2", calib=d / "calib.npz", eval=d / "eval.npz", output=tmp_path / name,
                             no_speed_guard=True, threads=1, **options)


def test_channel_pruned_int8_recovers_against_the_unpruned_teacher(samples, tmp_path):
    pruned = _run(samples, tmp_path, "p.onnx", prune=0.3)
    tuned = _run(samples, tmp_path, "pt.onnx", prune=0.3, finetune=60, lr=1e-3)
    ft = tuned.report["finetune"]
    assert tuned.report["pruning"]["params_after"] < 0.8 * tuned.report["pruning"]["params_before"]
    assert ft["steps_done"] == 60 and ft["heldout_loss_after"] < 0.7 * ft["heldout_loss_before"]
    # the held-out loss is measured against the unpruned model: before training it is the pruned model's own
    # error, which is what the report of the run without --finetune scores on the evaluation data
    alone, after = pruned.report["outputs"][0], tuned.report["outputs"][0]
    assert ft["before"][0]["sqnr_db"] == pytest.approx(alone["sqnr_db"], abs=1e-6)
    assert after["sqnr_db"] > alone["sqnr_db"] + 1.0  # evaluation data, onnxruntime, against the unpruned fp32
    assert after["top1_agreement"] >= alone["top1_agreement"]
    assert ft["torch_vs_onnxruntime"]["sqnr_db"] > 60
    shapes = {v.name: v.const_value.shape for v in ir.load(tmp_path / "pt.onnx").graph.initializers.values()}
    assert shapes == {v.name: v.const_value.shape for v in ir.load(tmp_path / "p.onnx").graph.initializers.values()}


def test_unstructured_zeros_stay_zero_through_training(samples, tmp_path):
    q = _run(samples, tmp_path, "u.onnx", weights="int4", prune=0.5, prune_structure="unstructured",
             finetune=40, lr=1e-3)
    p, ft = q.report["pruning"], q.report["finetune"]
    assert ft["steps_done"] == 40 and ft["heldout_loss_after"] < ft["heldout_loss_before"]
    # stored after training: the fill fraction is that of the trained codes (the block scales' records have none)
    stored = [r for r in p["storage"]["by_tensor"] if r["fill_fraction"] is not None]
    assert stored and all(r["fill_fraction"] >= 0.5 for r in stored)
