"""The Python API: quantkit.quantize(model, **options) with the CLI's options, validation and typed
errors; `import quantkit` stays light; progress reaches every long stage."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import quantkit
from quantkit.errors import AccuracyGateError, ConfigError, InputError


@pytest.fixture
def cnn(request):
    return request.config.rootpath / "sample_models" / "digits_cnn"


def test_import_quantkit_loads_no_heavy_library():
    code = ("import sys, quantkit; heavy = [m for m in ('onnxruntime', 'torch', 'onnx', 'onnx_ir', 'matplotlib', "
            "'numpy') if m in sys.modules]; print(heavy); assert not heavy; assert callable(quantkit.quantize)")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_schemes_subpackage_does_not_shadow_the_function():
    import quantkit.api  # imports the quantkit.quantize subpackage
    from quantkit.quantize import plan

    assert callable(quantkit.quantize) and quantkit.quantize.__module__ == "quantkit.run"
    assert plan.make_plan is not None


def test_quantize_returns_the_report_and_the_model(cnn, tmp_path):
    q = quantkit.quantize(cnn / "model.onnx", calib=cnn / "calib.npz", eval=cnn / "eval.npz",
                          output=tmp_path / "q.onnx", report=tmp_path / "r.json", html=tmp_path / "r.html",
                          no_speed_guard=True, max_accuracy_drop=1.0)
    assert q.passed and q.path == tmp_path / "q.onnx" and q.html.is_file() and (tmp_path / "r.json").is_file()
    ops = [n.op_type for n in q.model.graph.node]
    assert isinstance(q.model, onnx.ModelProto) and ops.count("DequantizeLinear") >= 6
    logits = q.report["outputs"][0]
    assert logits["accuracy_drop_points"] <= 1.0 and logits["cosine_mean"] > 0.999
    assert q.report["effective_config"]["max_accuracy_drop"] == 1.0
    assert q.report["effective_config"]["no_speed_guard"] is True
    x = np.load(cnn / "eval.npz")["x"][:8]
    (y,) = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.shape == (8, 10)


def test_same_validation_and_errors_as_the_cli(cnn, tmp_path):
    with pytest.raises(ConfigError, match="--calib is required"):
        quantkit.quantize(cnn / "model.onnx", output=tmp_path / "q.onnx")
    with pytest.raises(ConfigError, match="unknown option 'calibration'"):
        quantkit.quantize(cnn / "model.onnx", calibration=cnn / "calib.npz")
    with pytest.raises(ConfigError, match="'calib_samples' must be an integer"):
        quantkit.quantize(cnn / "model.onnx", calib=cnn / "calib.npz", calib_samples="all")
    with pytest.raises(ConfigError, match="--method must be one of"):
        quantkit.quantize(cnn / "model.onnx", calib=cnn / "calib.npz", method="best")
    with pytest.raises(InputError, match="does not exist"):
        quantkit.quantize(tmp_path / "none.onnx", calib=cnn / "calib.npz", output=tmp_path / "q.onnx")
    (tmp_path / "q.onnx").write_bytes(b"")
    with pytest.raises(ConfigError, match="--force"):
        quantkit.quantize(cnn / "model.onnx", calib=cnn / "calib.npz", output=tmp_path / "q.onnx")


def test_a_failed_gate_raises_after_writing_with_the_result_attached(cnn, tmp_path):
    with pytest.raises(AccuracyGateError) as e:
        quantkit.quantize(cnn / "model.onnx", calib=cnn / "calib.npz", output=tmp_path / "q.onnx",
                          no_speed_guard=True, min_cosine=1.0, calib_samples=64)
    assert (tmp_path / "q.onnx").is_file() and e.value.result.gate_failures and not e.value.result.passed
    q = quantkit.quantize(cnn / "model.onnx", calib=cnn / "calib.npz", output=tmp_path / "q.onnx", force=True,
                          no_speed_guard=True, min_cosine=1.0, calib_samples=64, check_gates=False)
    assert q.gate_failures == q.report["gates"]["failures"] and "cosine" in q.gate_failures[0]


class Recorder:
    def __init__(self):
        self.stages = []

    def start(self, label, total, unit="samples"):
        self.stages.append({"label": label, "total": total, "unit": unit, "done": 0, "finished": False})

    def advance(self, n):
        self.stages[-1]["done"] += n

    def finish(self):
        self.stages[-1]["finished"] = True


def test_progress_reaches_export_calibration_speed_guard_and_evaluation(cnn, tmp_path):
    pytest.importorskip("torch")
    rec = Recorder()
    q = quantkit.quantize(cnn / "model.pt2", calib=cnn / "calib.npz", eval=cnn / "eval.npz",
                          output=tmp_path / "q.onnx", progress=rec, calib_samples=64)
    by = {s["label"]: s for s in rec.stages}
    assert list(by) == ["exporting the PyTorch model to ONNX", "calibrating", "speed guard", "evaluating"]
    assert all(s["finished"] and s["done"] == s["total"] for s in rec.stages), rec.stages
    assert by["calibrating"]["total"] == 64 and by["evaluating"]["total"] == 360
    from quantkit.quantize.speed import RESTORED

    trials = [t for t in q.report["speed_guard"]["trials"] if t["group"] != RESTORED]
    assert by["speed guard"]["total"] == len(trials) and by["speed guard"]["unit"] == "placements"


def test_terminal_progress_names_the_unit_and_shows_where_a_stage_ended():
    import io

    from quantkit.cli import TerminalProgress

    out = io.StringIO()
    p = TerminalProgress(out)
    p.start("evaluating", 360)
    for _ in range(45):
        p.advance(8)
    p.finish()
    p.start("speed guard", 3, unit="placements")
    p.advance(1)
    p.finish()
    lines = out.getvalue().splitlines()
    evaluating = [ln for ln in lines if "evaluating" in ln]
    assert evaluating[-1] == "quantkit: evaluating 360/360 samples (100%)" and len(evaluating) <= 12
    assert lines[-1] == "quantkit: speed guard 1/3 placements (33%)"
    assert len(set(lines)) == len(lines)  # the final line is not printed twice
