"""Errors keep their cause: one line without --verbose, the original chained traceback with it."""

import pytest
from click.testing import CliRunner

import quantkit.api
from quantkit.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


@pytest.fixture
def broken_model(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_text("not a model")
    return p


def test_input_error_is_one_line_without_verbose(broken_model, samples, tmp_path):
    r = _run(broken_model, "--activations", "dynamic", "--eval", samples / "digits_cnn" / "eval.npz",
             "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_verbose_shows_the_original_cause_of_a_typed_error(broken_model, samples, tmp_path):
    r = _run(broken_model, "--activations", "dynamic", "--eval", samples / "digits_cnn" / "eval.npz",
             "-o", tmp_path / "o.onnx", "-v")
    assert r.exit_code == 3
    # protobuf's own error and the frame that raised it, not only quantkit's InputError
    assert "DecodeError" in r.stderr and "deserialize_proto" in r.stderr
    assert r.stderr.index("DecodeError") < r.stderr.index("quantkit.errors.InputError")
    assert r.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_internal_errors_show_the_original_traceback_with_verbose(samples, tmp_path, monkeypatch):
    def boom(model):
        raise ZeroDivisionError("the original failure")

    monkeypatch.setattr(quantkit.api, "canonicalize", boom)
    d = samples / "digits_cnn"
    args = [d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "o.onnx"]
    quiet = _run(*args)
    assert quiet.exit_code == 1 and "Traceback" not in quiet.stderr
    assert "internal error: ZeroDivisionError: the original failure" in quiet.stderr
    loud = _run(*args, "-v")
    assert loud.exit_code == 1
    assert "Traceback" in loud.stderr and "in boom" in loud.stderr
    assert "ZeroDivisionError: the original failure" in loud.stderr
