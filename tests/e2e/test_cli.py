"""The CLI end to end on sample_models/ and on models written by the tests."""

import json
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

from models import conv_bn_relu_gemm


@pytest.fixture
def clean_tmp(tmp_path, monkeypatch):
    """Point the process temp dir at an empty folder so the test can see what is left behind."""
    t = tmp_path / "systmp"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


def quantize(*args):
    result = CliRunner().invoke(cli, ["quantize", *map(str, args)])
    return result


def _int8_share(path):
    """Fraction of initializer bytes stored as int8."""
    m = onnx.load(str(path))
    sizes = {}
    for t in m.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        sizes[a.dtype.name] = sizes.get(a.dtype.name, 0) + a.nbytes
    return sizes.get("int8", 0) / sum(sizes.values())


def test_digits_cnn_meets_the_accuracy_and_size_bar(samples, tmp_path, clean_tmp):
    d = samples / "digits_cnn"
    out, rep = tmp_path / "cnn.int8.onnx", tmp_path / "report.json"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", out,
                 "--report", rep, "--max-accuracy-drop", "0.5", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    (logits,) = report["outputs"]
    assert logits["accuracy_drop_points"] <= 0.5
    assert logits["accuracy_fp32"] > 95
    assert logits["cosine_mean"] > 0.999
    assert report["model"]["compression"] >= 3.0
    assert report["gates"]["passed"] is True
    quantized = report["nodes"]["quantized"]
    assert report["nodes"]["float"] == []
    assert len([q for q in quantized if q["op_type"] in ("Conv", "Gemm")]) == 6
    # the pooling between int8 convs runs on the int8 tensor too
    assert {q["op_type"] for q in quantized} - {"Conv", "Gemm"} <= {"MaxPool", "AveragePool", "GlobalAveragePool"}
    assert any("BatchNormalization" in n for n in report["notes"])
    assert report["latency"]["fp32_ms"] > 0 and report["latency"]["quantized_ms"] > 0
    assert _int8_share(out) > 0.9
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(d / "eval.npz")["x"][:4]
    assert sess.run(None, {"x": x})[0].shape == (4, 10)
    # the table is on the terminal, and nothing is left behind
    assert "acc int8" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.int8.onnx", "report.json", "systmp"]
    assert list(clean_tmp.iterdir()) == []


def test_digits_transformer_keeps_its_outputs(samples, tmp_path):
    d = samples / "digits_transformer"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz",
                 "-o", tmp_path / "t.onnx", "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    (logits,) = report["outputs"]
    assert logits["cosine_mean"] > 0.999 and logits["top1_agreement"] > 0.98
    assert abs(logits["accuracy_drop_points"]) <= 1.0
    assert report["nodes"]["float"] == []
    kinds = [q["kind"] for q in report["nodes"]["quantized"]]
    # 2 layers x (qkv, out, ff1, ff2) + embed + head, and 2 x 2 attention MatMuls
    assert kinds.count("MatMul (activation x activation)") == 4 and len(kinds) == 14


def _bad_calib(tmp_path, kind):
    x = np.load(tmp_path.parent / "x.npy") if False else np.zeros((16, 1, 8, 8), np.float32)
    arrays = {"name": {"pixels": x}, "dtype": {"x": x.astype(np.int64)}, "rank": {"x": x[:, 0]}}[kind]
    p = tmp_path / f"bad_{kind}.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("kind,words", [("name", "no array for input 'x'"), ("dtype", "is int64"),
                                        ("rank", "rank 3")])
def test_bad_calibration_data_exits_3_with_one_line_and_no_output(samples, tmp_path, clean_tmp, kind, words):
    out = tmp_path / "o.onnx"
    r = quantize(samples / "digits_cnn" / "model.onnx", "--calib", _bad_calib(tmp_path, kind), "-o", out)
    assert r.exit_code == 3
    assert r.stderr.startswith("error: ") and words in r.stderr and r.stderr.count("\n") == 1
    assert "Traceback" not in r.output
    assert not out.exists() and list(clean_tmp.iterdir()) == []


def test_existing_output_needs_force(samples, tmp_path):
    d = samples / "digits_cnn"
    out = tmp_path / "o.onnx"
    out.write_bytes(b"precious")
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", out, "-q")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", out, "-q", "--force")
    assert r.exit_code == 0
    onnx.checker.check_model(str(out))


def test_output_may_not_overwrite_the_input_even_with_force(samples, tmp_path):
    d = samples / "digits_cnn"
    model = tmp_path / "m.onnx"
    model.write_bytes((d / "model.onnx").read_bytes())
    r = quantize(model, "--calib", d / "calib.npz", "-o", model, "--force")
    assert r.exit_code == 2 and "same file as the input" in r.stderr
    assert model.read_bytes() == (d / "model.onnx").read_bytes()


def test_failed_gate_exits_5_after_writing_model_and_report(samples, tmp_path):
    d = samples / "digits_cnn"
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", out, "--report", rep,
                 "--min-cosine", "1.0")
    assert r.exit_code == 5 and "mean cosine" in r.stderr
    report = json.loads(rep.read_text())
    assert report["gates"]["passed"] is False and report["gates"]["failures"]
    assert out.exists()
    assert report["evaluation"]["on_calibration_data"] is True
    assert any("calibration data" in n for n in report["notes"])


def test_accuracy_gate_without_labels_is_a_usage_error(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "o.onnx", "--max-accuracy-drop", "1")
    assert r.exit_code == 2 and "needs labels" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_model_with_constant_node_weights_gets_int8_weights(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(rng, weights_as_constants=True), str(model))
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(32, 3, 8, 8)).astype(np.float32))
    r = quantize(model, "--calib", tmp_path / "c.npz", "-o", tmp_path / "q.onnx", "--min-cosine", "0.99",
                 "--report", tmp_path / "r.json", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    assert _int8_share(tmp_path / "q.onnx") > 0.8
    assert any("Constant" in n for n in json.loads((tmp_path / "r.json").read_text())["notes"])


def test_old_opset_model_is_converted(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(rng, opset=11), str(model))
    np.save(tmp_path / "c.npy", rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    r = quantize(model, "--calib", tmp_path / "c.npy", "-o", tmp_path / "q.onnx", "--min-cosine", "0.99")
    assert r.exit_code == 0, r.output


def test_external_data_model_and_its_missing_data_file(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(rng), str(model), save_as_external_data=True, location="m.weights",
              size_threshold=0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    r = quantize(model, "--calib", tmp_path / "c.npz", "-o", tmp_path / "q.onnx", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["bytes_before"] > (tmp_path / "m.onnx").stat().st_size
    (tmp_path / "m.weights").unlink()
    r = quantize(model, "--calib", tmp_path / "c.npz", "-o", tmp_path / "q2.onnx")
    assert r.exit_code == 3 and "m.weights" in r.stderr


def test_fixed_batch_model_uses_its_batch_and_rejects_another(tmp_path):
    rng = np.random.default_rng(0)
    proto = conv_bn_relu_gemm(rng)
    for v in (proto.graph.input[0], proto.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(5, 3, 8, 8)).astype(np.float32))
    r = quantize(tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "q.onnx", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calibration"]["batch_size"] == 1
    r = quantize(tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "q2.onnx", "--batch-size", "4")
    assert r.exit_code == 2 and "fixed batch size 1" in r.stderr


def test_timings_run_one_sample_unless_a_batch_size_is_asked_for_or_a_sample_is_cheap(tmp_path, monkeypatch):
    """The speed guard and the latency figure time a request at a time when a sample costs MIN_TIMED_MACS or
    more; a cheaper model times its first batch (one-sample runs too short to time under load); --batch-size
    times that batch."""
    from quantkit import api

    rng = np.random.default_rng(0)
    onnx.save(conv_bn_relu_gemm(rng), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))

    def timed(*extra):
        r = quantize(tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "q.onnx", "--json", "-q",
                     "--force", *extra)
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        return report["latency"]["batch_size"], report["calibration"]["batch_size"]

    assert timed() == (8, 8)  # a few thousand multiply-accumulates a sample
    assert timed("--batch-size", "4") == (4, 4)
    monkeypatch.setattr(api, "MIN_TIMED_MACS", 1)
    assert timed() == (1, 8)
    assert timed("--batch-size", "4") == (4, 4)


def test_timings_fall_back_to_the_batch_when_the_graph_bakes_its_size_in_and_name_the_samples_timed(tmp_path):
    """A model that declares a dynamic batch but reshapes to a constant (8, 16) cannot run one sample: the
    timings take the first batch of 8 (and say so) instead of failing the run; --batch-size 16 on 3 samples
    times 3, and the report says 3, not 16."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 10)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([8, 16], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["rr"], name="reshape"),
             helper.make_node("MatMul", ["rr", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "baked.onnx"))
    np.savez(tmp_path / "c16.npz", x=rng.normal(size=(16, 16)).astype(np.float32))
    r = quantize(tmp_path / "baked.onnx", "--calib", tmp_path / "c16.npz", "-o", tmp_path / "b.onnx", "--json", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["latency"]["batch_size"] == 8
    assert any("does not run on 1 sample(s)" in n and "Reshape" in n for n in report["notes"])

    onnx.save(conv_bn_relu_gemm(rng), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c3.npz", x=rng.normal(size=(3, 3, 8, 8)).astype(np.float32))
    r = quantize(tmp_path / "m.onnx", "--calib", tmp_path / "c3.npz", "-o", tmp_path / "q.onnx", "--json", "-q",
                 "--batch-size", "16", "--no-speed-guard", "--latency-runs", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["latency"]["batch_size"] == 3


def test_the_slower_than_fp32_note_names_the_batch_timed(tmp_path, monkeypatch):
    """The note says the batch the latency figure timed (one sample), not the calibration batch of 8."""
    import quantkit.api

    monkeypatch.setattr(quantkit.api, "compare_latency",
                        lambda *a, **k: {"fp32_ms": 1.0, "quantized_ms": 2.0, "speedup": 0.5, "runs": 1})
    monkeypatch.setattr(quantkit.api, "MIN_TIMED_MACS", 1)  # this tiny model times one sample
    rng = np.random.default_rng(0)
    onnx.save(conv_bn_relu_gemm(rng), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    r = quantize(tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "q.onnx", "--json", "-q",
                 "--no-speed-guard")
    assert r.exit_code == 0, r.output
    (slower,) = [n for n in json.loads(r.stdout)["notes"] if "SLOWER" in n]
    assert "2.00x SLOWER" in slower and "at batch 1:" in slower


def test_the_timing_feed_is_the_first_samples_along_each_inputs_batch_axis():
    from quantkit.api import _timing_feed
    from quantkit.calibrate.data import InputSpec

    feed = {"x": np.arange(24, dtype=np.float32).reshape(4, 6), "t": np.arange(8).reshape(2, 4),
            "w": np.ones((3, 3), np.float32)}
    specs = [InputSpec("x", np.dtype(np.float32), None, 0), InputSpec("t", np.dtype(np.int64), None, 1),
             InputSpec("w", np.dtype(np.float32), None, None)]
    out = _timing_feed(feed, specs, 1)
    np.testing.assert_array_equal(out["x"], feed["x"][:1])
    np.testing.assert_array_equal(out["t"], feed["t"][:, :1])
    assert out["w"] is feed["w"]  # no batch axis: fed whole
    assert _timing_feed(feed, specs, 4)["x"] is feed["x"]


@pytest.mark.parametrize("args,code", [
    (["quantize", "{tmp}/garbage.onnx", "--calib", "{tmp}/c.npy"], 3),
    (["quantize", "{tmp}/missing.onnx", "--calib", "{tmp}/c.npy"], 3),
    (["quantize", "{samples}/digits_cnn/model.onnx"], 2),
    (["quantize", "{samples}/digits_cnn/model.onnx", "--calib", "{tmp}/c.npy", "--activations", "int4"], 2),
    (["quantize", "{samples}/digits_cnn/model.onnx", "--calib", "{tmp}/c.npy", "--batch-size", "0"], 2),
])
def test_exit_codes_for_bad_invocations(samples, tmp_path, args, code):
    (tmp_path / "garbage.onnx").write_bytes(b"not an onnx file")
    np.save(tmp_path / "c.npy", np.zeros((2, 1, 8, 8), np.float32))
    args = [a.format(tmp=tmp_path, samples=samples) for a in args]
    r = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == code, r.output
    assert not (tmp_path / "o.onnx").exists()


def test_help_is_fast_and_imports_neither_torch_nor_onnxruntime():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom quantkit.cli import cli\n"
            "r = CliRunner().invoke(cli, ['quantize', '--help'])\nassert r.exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "quantkit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "quantkit" in out.stdout


def test_large_model_path_goes_through_files_and_writes_external_data(tmp_path, monkeypatch, clean_tmp):
    """Models over the protobuf limit cannot be serialized in memory; exercise that path on a small
    model by lowering the limit."""
    from quantkit import runtime
    from quantkit.load import onnx as load_onnx

    monkeypatch.setattr(runtime, "INLINE_LIMIT", 1000)
    monkeypatch.setattr(load_onnx, "INLINE_LIMIT", 1000)
    rng = np.random.default_rng(0)
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(rng), str(model), save_as_external_data=True, location="m.weights",
              size_threshold=0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    r = quantize(model, "--calib", tmp_path / "c.npz", "-o", out, "--min-cosine", "0.99", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q.onnx.data").exists()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})[0].shape == (2, 10)
    assert list(clean_tmp.iterdir()) == []


def test_speed_guard_reports_every_trial_and_never_writes_an_unquantized_model(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "q.onnx", "--json", "-q",
                 "--threads", "1")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    guard = report["speed_guard"]
    assert {t["group"] for t in guard["trials"]} >= {"Conv", "Gemm"}
    assert all(t["with_ms"] > 0 for t in guard["trials"])
    assert report["nodes"]["quantized"]  # something is always quantized
    if guard["int8_cannot_win"]:
        assert len(report["nodes"]["quantized"]) == 6  # the full placement: the smallest file
    # whatever the guard decided, a slower result is always said plainly
    assert any("SLOWER" in n for n in report["notes"]) == (report["latency"]["speedup"] < 1)
    assert report["latency"]["threads"] == 1


def test_require_speedup_turns_a_slow_model_into_a_gate_failure(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "q.onnx", "--no-speed-guard",
                 "--require-speedup", "50", "--report", tmp_path / "r.json")
    assert r.exit_code == 5 and "--require-speedup 50" in r.stderr
    assert (tmp_path / "q.onnx").exists() and json.loads((tmp_path / "r.json").read_text())["gates"]["passed"] is False


def test_int4_on_a_conv_net_falls_back_to_int8_for_convolutions_and_says_so(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--weights", "int4", "--eval", d / "eval.npz", "-o", tmp_path / "q.onnx",
                 "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert sum("no convolution kernel" in n for n in report["notes"]) == 4
    assert report["outputs"][0]["accuracy_drop_points"] <= 1.0


def test_quantizing_an_onnx_model_never_imports_torch(samples, tmp_path):
    d = samples / "digits_cnn"
    code = ("import sys\nfrom click.testing import CliRunner\nfrom quantkit.cli import cli\n"
            f"r = CliRunner().invoke(cli, ['quantize', r'{d / 'model.onnx'}', '--calib', r'{d / 'calib.npz'}', "
            f"'-o', r'{tmp_path / 'q.onnx'}', '-q', '--no-speed-guard'])\n"
            "assert r.exit_code == 0, r.output\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mode", [[], ["--weights", "int4"]])
def test_weights_left_in_external_data_reach_onnxruntime_from_any_working_directory(tmp_path, monkeypatch, mode):
    """Weights kept memory-mapped from `m.weights` while the candidates are small enough to
    serialize: from bytes, onnxruntime would look for `m.weights` in the working directory
    ("escapes working directory"); such candidates go through a file in the work dir."""
    from quantkit.load import onnx as load_onnx

    monkeypatch.setattr(load_onnx, "INLINE_LIMIT", 1000)  # keep the weights mapped, not loaded
    rng = np.random.default_rng(0)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(conv_bn_relu_gemm(rng), str(folder / "m.onnx"), save_as_external_data=True, location="m.weights",
              size_threshold=0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = quantize(folder / "m.onnx", "--calib", tmp_path / "c.npz", "--eval", tmp_path / "c.npz",
                 "-o", tmp_path / "q.onnx", "--no-speed-guard", *mode)
    assert r.exit_code == 0, r.output
    assert list(elsewhere.iterdir()) == []
