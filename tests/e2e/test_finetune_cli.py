"""--finetune end to end on the sample PyTorch CNN: training lowers the held-out distillation loss and
the accuracy figures on separate evaluation data, the written model is the trained one, Ctrl-C keeps
the best model so far, and what cannot be trained is refused with a usage error."""

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import quantkit
from quantkit.cli import cli

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch, samples):
    monkeypatch.chdir(samples.parent)


def _run(samples, tmp_path, **options):
    d = samples / "digits_cnn"
    return quantkit.quantize(d / "model.pt2", calib=d / "calib.npz", eval=d / "eval.npz", output=tmp_path / "q.onnx",
                             no_speed_guard=True, threads=1, **options)


def test_finetune_int4_lowers_heldout_loss_and_writes_the_trained_model(samples, tmp_path):
    q = _run(samples, tmp_path, weights="int4", finetune=60, lr=1e-3, html=tmp_path / "r.html", finetune_rounding=0)
    ft = q.report["finetune"]
    assert ft["steps_done"] == 60 and not ft["interrupted"] and ft["trainable"]["weights"] > 10_000
    assert len(ft["curve"]) >= 20 and ft["curve"][0]["step"] == 0
    assert ft["heldout_loss_after"] < 0.7 * ft["heldout_loss_before"]  # the kept step really is better
    # independent of the training data: the evaluation set (eval.npz), scored by onnxruntime on the written model
    before, after = ft["before"][0], q.report["outputs"][0]
    assert after["sqnr_db"] > before["sqnr_db"] + 1.0
    assert ft["torch_vs_onnxruntime"]["sqnr_db"] > 60  # what was trained is what ships
    ops = [n.op_type for n in q.model.graph.node]
    assert "MatMulNBits" in ops  # the placement is the PTQ one: only codes and scales changed
    assert q.report["effective_config"]["finetune"] == 60 and q.report["effective_config"]["lr"] == 1e-3
    page = q.html.read_text()
    assert "<h2>Fine-tuning</h2>" in page and "held-out loss" in page


def test_learned_rounding_runs_first_by_default_for_int4_and_lowers_the_error(samples, tmp_path):
    q = _run(samples, tmp_path, weights="int4", finetune=20, lr=1e-3, html=tmp_path / "r.html")
    ft, r = q.report["finetune"], q.report["finetune"]["rounding"]
    assert "learned rounding first (100 iterations per layer): 2 of 2 int4 layer(s) improved" in q.html.read_text()
    assert r["iterations"] == 100 and r["layers"] == r["layers_done"] == 2 and not r["interrupted"]  # the 2 Linear
    assert r["layers_improved"] == 2 and r["layer_error_after"] < 0.5 * r["layer_error_before"]
    assert r["heldout_loss_after"] < 0.5 * r["heldout_loss_before"]  # the model's outputs, not only its layers
    assert r["heldout_loss_after"] == pytest.approx(ft["heldout_loss_before"], rel=1e-4)  # training starts there
    assert ft["heldout_loss_after"] <= ft["heldout_loss_before"]
    # on the evaluation data, in onnxruntime: clearly closer to fp32 than the PTQ model
    assert q.report["outputs"][0]["sqnr_db"] > ft["before"][0]["sqnr_db"] + 3.0
    assert ft["torch_vs_onnxruntime"]["sqnr_db"] > 60


def test_ctrl_c_stops_training_and_still_writes_the_best_model(samples, tmp_path, monkeypatch):
    calls = {"n": 0}
    step = torch.optim.Adam.step

    def interrupted_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted_step)
    q = _run(samples, tmp_path, weights="int4", finetune=50, lr=1e-3, finetune_rounding=0)
    ft = q.report["finetune"]
    assert ft["rounding"] is None
    assert ft["interrupted"] and ft["steps_done"] == 7 and ft["best_step"] <= 7
    assert any("interrupted at step 7/50" in n for n in q.report["notes"])
    x = np.load(samples / "digits_cnn" / "eval.npz")
    name = q.model.graph.input[0].name
    out = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {name: x[name][:16]})[0]
    assert out.shape[0] == 16 and np.isfinite(out).all()
    assert ft["torch_vs_onnxruntime"]["sqnr_db"] > 60


def test_ctrl_c_during_learned_rounding_skips_training_and_writes_the_rounded_model(samples, tmp_path, monkeypatch):
    calls = {"n": 0}
    step = torch.optim.Adam.step

    def interrupted_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 110:  # the second layer's 10th iteration (100 per layer)
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted_step)
    q = _run(samples, tmp_path, weights="int4", finetune=50, lr=1e-3)
    ft = q.report["finetune"]
    assert ft["rounding"]["interrupted"] and ft["rounding"]["layers_done"] == 1 and ft["rounding"]["layers"] >= 2
    assert ft["interrupted"] and ft["steps_done"] == 0
    assert ft["torch_vs_onnxruntime"]["sqnr_db"] > 60 and q.report["outputs"][0]["sqnr_db"] > 10


def _cli(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


@pytest.mark.parametrize("model,extra,words", [
    ("model.torchscript.pt", ["--finetune", "5"], "TorchScript"),
    ("model.onnx", ["--finetune", "5"], "is ONNX"),
    ("model.pt2", ["--lr", "1e-3"], "--finetune STEPS, which was not given"),
    ("model.pt2", ["--finetune", "5", "--activations", "dynamic"], "not to --activations dynamic"),
    ("model.pt2", ["--finetune", "0"], "steps >= 1"),
    ("model.pt2", ["--finetune", "5", "--finetune-labels-weight", "2"], "[0, 1]"),
    ("model.pt2", ["--finetune-rounding", "50"], "--finetune STEPS, which was not given"),
    ("model.pt2", ["--finetune", "5", "--finetune-rounding", "-1"], "iterations >= 0"),
])
def test_what_cannot_be_trained_is_a_one_line_usage_error(samples, tmp_path, model, extra, words):
    d = samples / "digits_cnn"
    r = _cli(d / model, "--calib", d / "calib.npz", "-o", tmp_path / "q.onnx", *extra)
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert words in line and len(line.splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()
