"""--method, --stats-cache and progress output, end to end."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.cli import TerminalProgress, cli


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse", "auto"])
def test_each_method_quantizes_the_transformer_and_reports_its_choice(samples, tmp_path, method):
    d = samples / "digits_transformer"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz",
                 "-o", tmp_path / "q.onnx", "--method", method, "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["outputs"][0]["cosine_mean"] > 0.999
    chosen = report["calibration"]["methods_chosen"]
    assert sum(chosen.values()) == len(report["activations"])
    if method != "auto":
        assert set(chosen) == {method}
    for a in report["activations"].values():
        lo, hi = a["range"]
        olo, ohi = a["observed"]
        assert olo - 1e-6 <= lo <= hi <= ohi + 1e-6  # a chosen range never exceeds what was seen


def test_stats_cache_skips_the_forward_pass_on_rerun_and_gives_the_same_ranges(samples, tmp_path):
    d = samples / "digits_cnn"
    cache = tmp_path / "stats.npz"
    # GPTQ's input Hessians are not cached (--weight-rounding gptq reruns the pass for them: see below)
    args = [d / "model.onnx", "--calib", d / "calib.npz", "--stats-cache", cache, "--json", "-q", "--no-speed-guard",
            "--weight-rounding", "rtn"]
    first = json.loads(quantize(*args, "-o", tmp_path / "a.onnx", "--method", "minmax").stdout)
    assert cache.exists() and first["calibration"]["samples"] == 256
    second_r = quantize(*args, "-o", tmp_path / "b.onnx", "--method", "minmax")
    second = json.loads(second_r.stdout)
    assert second["calibration"]["samples"] == 0  # nothing ran through the model
    assert any("read from" in n for n in second["notes"])
    for k, a in first["activations"].items():
        assert second["activations"][k]["range"] == pytest.approx(a["range"])
    third = json.loads(quantize(*args, "-o", tmp_path / "c.onnx", "--method", "percentile").stdout)
    assert third["calibration"]["samples"] == 0 and set(third["calibration"]["methods_chosen"]) == {"percentile"}
    gptq = json.loads(quantize(*args[:-2], "--weight-rounding", "gptq", "-o", tmp_path / "d.onnx",
                               "--method", "minmax").stdout)
    assert gptq["calibration"]["samples"] == 256 and gptq["nodes"]["gptq"]  # one pass, for the Hessians only
    assert any("one pass gathered the rest (gram, patch_gram)" in n for n in gptq["notes"])
    for k, a in first["activations"].items():
        assert gptq["activations"][k]["range"] == pytest.approx(a["range"])


def test_stats_cache_for_other_data_is_recollected(samples, tmp_path):
    d = samples / "digits_cnn"
    cache = tmp_path / "stats.npz"
    quantize(d / "model.onnx", "--calib", d / "calib.npz", "--stats-cache", cache, "-o", tmp_path / "a.onnx", "-q")
    np.savez(tmp_path / "other.npz", x=np.load(d / "calib.npz")["x"][:64])
    r = quantize(d / "model.onnx", "--calib", tmp_path / "other.npz", "--stats-cache", cache,
                 "-o", tmp_path / "b.onnx", "--json", "-q")
    report = json.loads(r.stdout)
    assert report["calibration"]["samples"] == 64
    assert any("another model or calibration data" in n for n in report["notes"])


def test_a_file_that_is_not_a_stats_cache_is_not_overwritten(samples, tmp_path):
    d = samples / "digits_cnn"
    cache = tmp_path / "notes.npz"
    cache.write_text("my notes")
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--stats-cache", cache, "-o", tmp_path / "a.onnx")
    assert r.exit_code == 3 and "not a quantkit stats cache" in r.stderr
    assert cache.read_text() == "my notes"


def test_progress_prints_plain_lines_when_not_a_tty_and_nothing_when_quiet(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "a.onnx")
    lines = [ln for ln in r.stderr.splitlines() if "calibrating" in ln and "samples (" in ln]
    assert 5 <= len(lines) <= 12 and lines[-1].endswith("256/256 samples (100%)")
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "b.onnx", "-q")
    assert r.stderr == "" and r.stdout == ""


def test_progress_bar_on_a_terminal(tmp_path):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = TerminalProgress(out)
    p.start("calibrating", 100)
    for _ in range(10):
        p.advance(10)
    p.finish()
    assert "calibrating" in out.getvalue() and "100/100" in out.getvalue()
