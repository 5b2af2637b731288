"""quantkit against hostile and careless input: every case checks the exit code, that the error is
one line naming the problem, that no input was changed, that no output appeared where the run
failed, and that no temporary file was left behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

from models import control_flow, conv_bn_relu_gemm, stateful_vad

ROOT = Path(__file__).resolve().parents[2]
CNN = ROOT / "sample_models" / "digits_cnn"
FAST = ("--no-speed-guard", "--calib-samples", "32")


class Evil:
    """Unpickling this creates the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _digest(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
    return out


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Invoke the CLI with the process temp dir pointed at an empty folder, and check afterwards
    that nothing is left in it and that the given inputs are byte-for-byte unchanged."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))

    def invoke(*args, inputs=(), expect=None):
        before = _digest(inputs)
        r = CliRunner().invoke(cli, ["quantize", *map(str, args)])
        assert list(systmp.iterdir()) == [], "temporary files were left behind"
        assert _digest(inputs) == before, "an input was modified"
        if expect is not None:
            assert r.exit_code == expect, (r.exit_code, r.stderr, r.exception)
        if r.exit_code not in (0, 5):
            lines = [x for x in r.stderr.splitlines() if x.startswith(("error:", "internal error:"))]
            assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        return r

    return invoke


def _outputs_absent(*paths):
    for p in paths:
        assert not os.path.lexists(p), f"{p} was written by a failed run"


# ---------------------------------------------------------------- security: code from model files

def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, replace.get(info.filename, zin.read(info.filename)))
        for name, data in (add or {}).items():
            zout.writestr(name, data)


def _torch_save_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("variant", ["sample_inputs", "raw_constant", "torchscript"])
def test_torch_archives_that_would_unpickle_code_are_refused(run, tmp_path, variant):
    marker = tmp_path / "PWNED"
    evil = Evil(marker)
    if variant == "sample_inputs":
        src, bad = CNN / "model.pt2", tmp_path / "evil.pt2"
        _rewrite_zip(src, bad, {"model/data/sample_inputs/model.pt": _torch_save_bytes(evil)})
    elif variant == "raw_constant":
        src, bad = CNN / "model.pt2", tmp_path / "evil.pt2"
        _rewrite_zip(src, bad, {}, {"model/data/constants/custom_obj_0": pickle.dumps(evil, protocol=2)})
    else:
        src, bad = CNN / "model.torchscript.pt", tmp_path / "evil.pt"
        _rewrite_zip(src, bad, {"model.torchscript/data.pkl": pickle.dumps(evil, protocol=2)})
    out = tmp_path / "o.onnx"
    r = run(bad, "--calib", CNN / "calib.npz", "-o", out, *FAST, inputs=[bad], expect=3)
    assert "--allow-pickle" in r.stderr and "system" in r.stderr
    assert not marker.exists()
    _outputs_absent(out)


def test_plain_torch_archives_still_load(run, tmp_path):
    out = tmp_path / "o.onnx"
    run(CNN / "model.pt2", "--calib", CNN / "calib.npz", "-o", out, *FAST, expect=0)
    onnx.checker.check_model(str(out))


# ---------------------------------------------------------------- security: outputs

def test_outputs_must_be_regular_files(run, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", tmp_path / "o.onnx", "--report", link,
            "--force", inputs=[target], expect=2)
    assert "symlink" in r.stderr and link.is_symlink()
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", "/dev/null", "--force", expect=2)
    assert "device" in r.stderr and Path("/dev/null").is_char_device()
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", tmp_path, "--force", expect=2)
    assert "directory" in r.stderr
    _outputs_absent(tmp_path / "o.onnx")


def test_no_output_may_be_an_input_or_another_output(run, tmp_path):
    calib = tmp_path / "calib.npz"
    shutil.copy(CNN / "calib.npz", calib)
    hard = tmp_path / "hardlink.json"
    os.link(calib, hard)
    model = CNN / "model.onnx"
    cases = [("--report", calib), ("--report", hard), ("-o", calib)]
    for flag, path in cases:
        args = ["-o", tmp_path / "o.onnx"] if flag != "-o" else []
        r = run(model, "--calib", calib, *args, flag, path, "--force", inputs=[calib], expect=2)
        assert "same file" in r.stderr
    r = run(model, "--calib", calib, "-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx", inputs=[calib],
            expect=2)
    assert "same file as the output" in r.stderr
    _outputs_absent(tmp_path / "o.onnx")


def test_a_destination_that_appears_during_the_run_is_not_overwritten(tmp_path):
    from quantkit.errors import ConfigError
    from quantkit.output import Outputs

    dest, report = tmp_path / "m.json", tmp_path / "r.json"
    with Outputs(force=False) as out:
        out.stage_json({"a": 1}, report)
        out.stage_json({"b": 2}, dest)
        dest.write_text("the other run's result")  # another process won the race
        with pytest.raises(ConfigError, match="appeared while quantkit was running"):
            out.commit()
    assert dest.read_text() == "the other run's result"
    assert not report.exists(), "the outputs are committed together or not at all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_concurrent_runs_to_one_output_never_both_succeed(tmp_path):
    out = tmp_path / "o.onnx"
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(CNN / "model.onnx"), "--calib", str(CNN / "calib.npz"),
           "-o", str(out), "-q", *FAST]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes == [0, 2], codes
    onnx.checker.check_model(str(out))


def test_unwritable_destination_is_found_before_any_work(run, tmp_path):
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", "/proc/quantkit-test.onnx", expect=3)
    assert "cannot write" in r.stderr


def test_a_full_disk_leaves_neither_model_nor_report(run, tmp_path, monkeypatch):
    import errno

    from quantkit import runtime

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime, "save", full)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", out, "--report", rep, *FAST, expect=3)
    assert "no space left" in r.stderr and "nothing was written" in r.stderr
    _outputs_absent(out, rep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["systmp"]


# ---------------------------------------------------------------- numbers that lie

def test_nan_outputs_are_the_worst_error_and_fail_every_gate():
    from quantkit.config import Gates
    from quantkit.output import dumps
    from quantkit.report.compare import OutputComparison
    from quantkit.report.gates import check_gates

    ref = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    c = OutputComparison("logits")
    c.update(ref, np.full_like(ref, np.nan), np.arange(4))
    res = c.result()
    assert res["nonfinite"] == 40 and res["cosine_mean"] == -1.0 and res["sqnr_db"] is None
    for gates in (Gates(min_cosine=-1.0), Gates(max_accuracy_drop=100.0), Gates(require_speedup=0.01)):
        assert any("non-finite" in f for f in check_gates([res], gates, {"speedup": 2.0}))
    json.loads(dumps({"x": float("nan"), "y": [float("inf")]}))  # valid JSON, no bare NaN


@pytest.mark.parametrize("value, word", [(np.nan, "nan"), (np.inf, "inf")])
def test_non_finite_calibration_data_is_refused_with_its_position(run, tmp_path, value, word):
    x = np.load(CNN / "calib.npz")["x"][:16].copy()
    x[5, 0, 3, 2] = value
    bad = tmp_path / "c.npz"
    np.savez(bad, x=x)
    r = run(CNN / "model.onnx", "--calib", bad, "-o", tmp_path / "o.onnx", expect=3)
    assert "input 'x'" in r.stderr and "sample 5" in r.stderr and word in r.stderr.lower()
    _outputs_absent(tmp_path / "o.onnx")


@pytest.mark.parametrize("labels, words", [
    (lambda n: np.full(n, 10), "class id 10"),
    (lambda n: -np.ones(n, np.int64), "negative"),
    (lambda n: np.zeros(n, np.float32), "integers"),
    (lambda n: np.array(["cat"] * n), "class id"),
    (lambda n: np.ones((n, 10)), "one-hot"),
])
def test_bad_labels_are_bad_input(run, tmp_path, labels, words):
    x = np.load(CNN / "eval.npz")["x"][:16]
    bad = tmp_path / "e.npz"
    np.savez(bad, x=x, labels=labels(16))
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "--eval", bad, "-o", tmp_path / "o.onnx", *FAST,
            expect=3)
    assert words in r.stderr
    _outputs_absent(tmp_path / "o.onnx")


def test_one_hot_labels_give_the_same_accuracy_as_class_ids(run, tmp_path):
    ev = np.load(CNN / "eval.npz")
    ids = ev["labels"][:64]
    one_hot = np.eye(10, dtype=np.float32)[ids]
    reports = []
    for name, lab in (("ids", ids), ("onehot", one_hot)):
        data = tmp_path / f"{name}.npz"
        np.savez(data, x=ev["x"][:64], labels=lab)
        r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "--eval", data, "-o", tmp_path / f"{name}.onnx",
                "--json", "-q", *FAST, expect=0)
        reports.append(json.loads(r.stdout)["outputs"][0])
    assert reports[0]["accuracy_fp32"] == reports[1]["accuracy_fp32"] > 80


@pytest.mark.parametrize("args, words", [
    (["--min-cosine", "nan"], "finite"),
    (["--max-accuracy-drop", "inf"], "finite"),
    (["--threads", "-3"], "--threads"),
    (["--block-size", "64"], "--block-size"),
    (["--method", "entropy", "--activations", "dynamic"], "--method"),
    (["--input", "x:Bx1x8x8:float32"], "--input"),
    (["--percentile", "99.9"], "--percentile"),
    (["--preprocess", "std=0"], "std"),
    (["--batch-axis", "nosuch=0"], "nosuch"),
    (["--activations", "dynamic", "--stats-cache", "s.npz"], "--stats-cache"),
])
def test_options_are_validated(run, tmp_path, args, words):
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", tmp_path / "o.onnx", *args, expect=2)
    assert words in r.stderr


def _tamper_cache(path: Path, field: str, value) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.endswith("/" + field))
    arrays[key] = np.asarray(value, dtype=arrays[key].dtype)
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize("field, value", [("lo", np.nan), ("counts", -5), ("width", 0.0)])
def test_a_tampered_stats_cache_is_a_miss_with_a_note(run, tmp_path, field, value):
    cache = tmp_path / "stats.npz"
    args = (CNN / "model.onnx", "--calib", CNN / "calib.npz", "--stats-cache", cache, "--method", "mse", *FAST)
    good = run(*args, "-o", tmp_path / "a.onnx", "--json", "-q", expect=0)
    _tamper_cache(cache, field, value)
    again = run(*args, "-o", tmp_path / "b.onnx", "--json", "-q", expect=0)
    assert any("integrity" in n for n in json.loads(again.stdout)["notes"])
    cos = [json.loads(x.stdout)["outputs"][0]["cosine_mean"] for x in (good, again)]
    assert cos[0] == pytest.approx(cos[1], abs=1e-6)


def test_a_file_that_is_not_a_cache_is_refused_and_kept(run, tmp_path):
    cache = tmp_path / "stats.npz"
    cache.write_bytes(b"my notes, not a cache")
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "--stats-cache", cache, "-o", tmp_path / "o.onnx",
            inputs=[cache], expect=3)
    assert "not a quantkit stats cache" in r.stderr


# ---------------------------------------------------------------- bad input is not a bug

def _external_model(tmp_path: Path, location: str) -> Path:
    m = conv_bn_relu_gemm(np.random.default_rng(0))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(m, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
    onnx.save(proto, str(folder / "m.onnx"))
    return folder / "m.onnx"


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.data", "link.data"])
def test_external_data_outside_the_model_folder_is_refused(run, tmp_path, location):
    model = _external_model(tmp_path, location)
    (tmp_path / "secret.data").write_bytes(b"\0" * 100_000)
    (model.parent / "link.data").symlink_to(tmp_path / "secret.data")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((8, 3, 8, 8), np.float32))
    r = run(model, "--calib", calib, "-o", tmp_path / "o.onnx", expect=3)
    assert "outside the model's folder" in r.stderr


def test_external_data_shorter_than_declared_is_refused(run, tmp_path):
    model = _external_model(tmp_path, "m.data")
    data = model.parent / "m.data"
    data.write_bytes(data.read_bytes()[:100])
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((8, 3, 8, 8), np.float32))
    r = run(model, "--calib", calib, "-o", tmp_path / "o.onnx", expect=3)
    assert "holds only 100 bytes" in r.stderr


def test_truncated_npy_is_refused_not_a_hang(run, tmp_path):
    x = np.load(CNN / "calib.npz")["x"][:64]
    npy = tmp_path / "c.npy"
    np.save(npy, x)
    npy.write_bytes(npy.read_bytes()[:-1000])
    r = run(CNN / "model.onnx", "--calib", npy, "-o", tmp_path / "o.onnx", expect=3)
    assert "truncated" in r.stderr


def test_npz_member_with_a_bad_crc_is_refused(run, tmp_path):
    x = np.load(CNN / "calib.npz")["x"][:64]
    npz = tmp_path / "c.npz"
    np.savez(npz, x=x)
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the stored array: the CRC no longer matches
    npz.write_bytes(bytes(raw))
    r = run(CNN / "model.onnx", "--calib", npz, "-o", tmp_path / "o.onnx", "--no-speed-guard", expect=3)
    assert "Bad CRC" in r.stderr or "finite" in r.stderr


@pytest.mark.parametrize("content", [
    struct.pack("<Q", 30) + b'{"w": {"dtype": "F99", "shape"',
    struct.pack("<Q", 60) + b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}',
])
def test_bad_safetensors_are_bad_input(run, tmp_path, content, monkeypatch):
    st = tmp_path / "w.safetensors"
    st.write_bytes(content.ljust(len(content) + 8, b" "))
    monkeypatch.chdir(ROOT)
    r = run(st, "--model-class", "sample_models.digits_models:DigitsCNN", "--calib", CNN / "calib.npz",
            "-o", tmp_path / "o.onnx", expect=3)
    assert "safetensors" in r.stderr or "PyTorch" in r.stderr


def test_image_decompression_bombs_are_bad_input(run, tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (64, 64)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    r = run(CNN / "model.onnx", "--calib", folder, "--preprocess", "resize=8x8,mode=L", "-o", tmp_path / "o.onnx",
            expect=3)
    assert "too large to decode safely" in r.stderr


@pytest.mark.parametrize("members", [
    {"model/archive_format": b"pt2", "model/models/model.json": b"{not json"},
    {"m/code/__torch__/m.py": b"garbage", "m/data.pkl": b"\x80\x02}q\x00."},
])
def test_fake_torch_archives_are_bad_input(run, tmp_path, members):
    fake = tmp_path / "fake.pt2"
    with zipfile.ZipFile(fake, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    r = run(fake, "--calib", CNN / "calib.npz", "-o", tmp_path / "o.onnx", expect=3)
    assert "not a readable" in r.stderr


@pytest.mark.parametrize("body, words", [
    ("def make():\n    raise RuntimeError('boom')\n", "boom"),
    ("def make():\n    return 42\n", "not a torch.nn.Module"),
    ("import sys\ndef make():\n    sys.exit(0)\n", "calling it failed"),
    ("raise SystemExit(0)\ndef make():\n    pass\n", "importing"),
])
def test_model_class_factories_that_misbehave_are_bad_input(run, tmp_path, monkeypatch, body, words):
    (tmp_path / "userfactory.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("userfactory", None)
    r = run(CNN / "model.state_dict.pt", "--model-class", "userfactory:make", "--calib", CNN / "calib.npz",
            "-o", tmp_path / "o.onnx", expect=3)
    assert words in r.stderr
    _outputs_absent(tmp_path / "o.onnx")


def test_pickled_module_class_from_the_working_directory(run, tmp_path, monkeypatch):
    import torch

    (tmp_path / "mynet.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet

        torch.save(mynet.Net(), tmp_path / "whole.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynet", None)
    run("whole.pt", "--allow-pickle", "--calib", CNN / "calib.npz", "-o", "o.onnx", *FAST, expect=0)
    (tmp_path / "mynet.py").unlink()
    sys.modules.pop("mynet", None)
    r = run("whole.pt", "--allow-pickle", "--calib", CNN / "calib.npz", "-o", "o2.onnx", *FAST, expect=3)
    assert "mynet" in r.stderr and "cannot be imported" in r.stderr


def test_model_with_no_inputs_and_directories_and_empty_data(run, tmp_path):
    m = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["y"], value=onnx.numpy_helper.from_array(np.ones(3, np.float32)))],
        "g", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "noinputs.onnx"))
    r = run(tmp_path / "noinputs.onnx", "--calib", CNN / "calib.npz", "-o", tmp_path / "o.onnx", expect=3)
    assert "no graph inputs" in r.stderr
    r = run(CNN, "--calib", CNN / "calib.npz", "-o", tmp_path / "o.onnx", expect=3)
    assert "is a directory" in r.stderr
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 8, 8), np.float32))
    r = run(CNN / "model.onnx", "--calib", empty, "-o", tmp_path / "o.onnx", expect=3)
    assert "holds no samples" in r.stderr and "batch size" not in r.stderr


# ---------------------------------------------------------------- streams and signals

def test_json_stdout_is_one_document_whatever_else_prints(run, tmp_path, monkeypatch):
    from quantkit import api

    original = api.canonicalize

    def chatty(model):
        print("a library printing to stdout")
        os.write(1, b"and C++ writing to descriptor 1\n")
        return original(model)

    monkeypatch.setattr(api, "canonicalize", chatty)
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", tmp_path / "o.onnx", "--json", *FAST, expect=0)
    assert json.loads(r.stdout)["outputs"]
    assert "a library printing" not in r.stdout + r.stderr
    bad = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", tmp_path / "o.onnx", "--json", expect=2)
    assert json.loads(bad.stdout)["error"]["exit_code"] == 2


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signals_clean_up_and_exit_128_plus_n(tmp_path, sig, code):
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantkit", "quantize", str(ROOT / "sample_models/digits_transformer/model.onnx"),
         "--calib", str(ROOT / "sample_models/digits_transformer/calib.npz"), "-o", str(out), "--method", "entropy"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "TMPDIR": str(systmp)})
    for line in proc.stderr:
        if "calibrating" in line:
            break
    status = Path(f"/proc/{proc.pid}/status")
    masks = [x for x in status.read_text().splitlines() if x.startswith(("SigBlk", "SigIgn", "SigCgt"))] \
        if status.exists() else []
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == code, f"{masks}\n{rest}"
    assert "interrupted" in rest
    # onnxruntime's telemetry SDK writes $TMPDIR/.ses when it is imported: not a quantkit file
    assert [p.name for p in systmp.iterdir() if p.name != ".ses"] == []
    _outputs_absent(out)


def test_a_signal_whose_exception_python_dropped_still_stops_the_run(run, tmp_path, monkeypatch):
    """The handler's Interrupted can be raised inside a __del__ or a finalizer, where Python only prints
    "Exception ignored" and goes on: the recorded signal stops the run at the next status line, and
    nothing is written."""
    from quantkit import api, errors

    real = api._canonicalize

    def dropped(*a, **k):
        errors.signal_received(signal.SIGTERM)  # what the handler records before its raise is lost
        return real(*a, **k)

    monkeypatch.setattr(api, "_canonicalize", dropped)
    out = tmp_path / "o.onnx"
    r = run(CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", out, "--report", tmp_path / "r.json",
            expect=143)
    assert "interrupted by SIGTERM" in r.stderr
    _outputs_absent(out, tmp_path / "r.json")
    assert errors._received == []  # cleared when the command ends


def test_outputs_are_not_placed_after_a_signal(tmp_path):
    from quantkit import errors
    from quantkit.output import Outputs

    target = tmp_path / "x.json"
    with Outputs(False) as out:
        out.stage_json({"a": 1}, target)
        errors.signal_received(signal.SIGINT)
        try:
            with pytest.raises(errors.Interrupted):
                out.commit()
        finally:
            errors.clear_signals()
    _outputs_absent(target)


# ---------------------------------------------------------------- real-world input signatures

def test_stateful_model_with_a_scalar_and_a_state_batched_on_axis_1(run, tmp_path):
    rng = np.random.default_rng(0)
    onnx.save(stateful_vad(rng), str(tmp_path / "vad.onnx"))
    calib = tmp_path / "c.npz"
    np.savez(calib, input=rng.normal(size=(40, 64)).astype(np.float32),
             state=rng.normal(size=(2, 40, 128)).astype(np.float32), sr=np.array(16000, np.int64))
    r = run(tmp_path / "vad.onnx", "--calib", calib, "-o", tmp_path / "q.onnx", "--json", "-q", "--no-speed-guard",
            expect=0)
    rep = json.loads(r.stdout)
    assert rep["evaluation"]["samples"] == 40
    assert all(o["cosine_mean"] > 0.999 for o in rep["outputs"])
    # the same data with the state's axis given explicitly, and sr refused when it is per-sample
    run(tmp_path / "vad.onnx", "--calib", calib, "-o", tmp_path / "q2.onnx", "--batch-axis", "state=1",
        "--no-speed-guard", expect=0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=rng.normal(size=(40, 64)).astype(np.float32),
             state=rng.normal(size=(2, 40, 128)).astype(np.float32), sr=np.full(40, 16000, np.int64))
    r = run(tmp_path / "vad.onnx", "--calib", bad, "-o", tmp_path / "q3.onnx", expect=3)
    assert "fed whole" in r.stderr and "--batch-axis" in r.stderr


def test_weights_inside_if_and_loop_are_quantized(run, tmp_path):
    rng = np.random.default_rng(0)
    onnx.save(control_flow(rng), str(tmp_path / "cf.onnx"))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.normal(size=(32, 64)).astype(np.float32))
    r = run(tmp_path / "cf.onnx", "--calib", calib, "-o", tmp_path / "q.onnx", "--json", "-q", "--no-speed-guard",
            expect=0)
    rep = json.loads(r.stdout)
    assert rep["model"]["compression"] > 3.0
    inner = {w["node"] for w in rep["nodes"]["subgraph_weights"]}
    assert inner == {"then_matmul", "else_matmul", "loop_matmul"}
    assert rep["nodes"]["float"] == []
    assert rep["outputs"][0]["cosine_mean"] > 0.999
    q = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q, full_check=True)
    inner_dq = 0
    for node in q.graph.node:
        for a in node.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                inner_dq += sum(m.op_type == "DequantizeLinear" for m in g.node)
    assert inner_dq == 3


def test_a_model_with_corrupted_strings_is_bad_input(run, tmp_path):
    raw = conv_bn_relu_gemm(np.random.default_rng(0)).SerializeToString()
    assert raw.count(b"flatten") == 1
    bad = tmp_path / "m.onnx"
    bad.write_bytes(raw.replace(b"flatten", b"\xff\xfelatten"))  # same length: only the UTF-8 breaks
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((8, 3, 8, 8), np.float32))
    r = run(bad, "--calib", calib, "-o", tmp_path / "o.onnx", inputs=[bad], expect=3)
    assert "not a readable ONNX model" in r.stderr


def test_a_negative_dim_written_by_a_converter_is_dynamic(run, tmp_path):
    """Converters write -1 for 'any size' ([-1, 3, 8, 8]): that is a dynamic axis, not a batch of -1."""
    m = conv_bn_relu_gemm(np.random.default_rng(0))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(m, str(tmp_path / "m.onnx"))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(1).normal(size=(20, 3, 8, 8)).astype(np.float32))
    r = run(tmp_path / "m.onnx", "--calib", calib, "-o", tmp_path / "q.onnx", "--json", "-q", *FAST, expect=0)
    assert json.loads(r.stdout)["evaluation"]["samples"] == 20
