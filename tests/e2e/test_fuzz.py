"""Seeded fuzzing of the inputs: truncations and byte flips of a sample model and of a data file.
Whatever the damage, quantkit answers with a documented exit code (never 1, the code for its own
bugs), within a time limit (never a hang)."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

CNN = Path(__file__).resolve().parents[2] / "sample_models" / "digits_cnn"
CASES = 20
SECONDS = 90


def _mutate(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:  # truncation
        return data[: int(rng.integers(1, len(data)))]
    buf = bytearray(data)
    for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 8))):  # a few byte flips
        buf[pos] ^= int(rng.integers(1, 256))
    return bytes(buf)


class Hang(Exception):
    pass


def _run_with_deadline(args):
    def alarm(signum, frame):
        raise Hang(f"no answer within {SECONDS} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    try:
        return CliRunner().invoke(cli, ["quantize", *map(str, args)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("target", ["model", "data"])
@pytest.mark.parametrize("seed", range(CASES))
def test_damaged_inputs_never_crash_or_hang(tmp_path, monkeypatch, target, seed):
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    model, calib = tmp_path / "model.onnx", tmp_path / "calib.npz"
    model.write_bytes((CNN / "model.onnx").read_bytes())
    calib.write_bytes((CNN / "calib.npz").read_bytes())
    victim = model if target == "model" else calib
    victim.write_bytes(_mutate(victim.read_bytes(), 1000 * (target == "data") + seed))
    r = _run_with_deadline([model, "--calib", calib, "-o", tmp_path / "o.onnx", "--no-speed-guard",
                            "--calib-samples", "64"])
    assert not isinstance(r.exception, Hang), r.exception
    assert r.exit_code in (0, 3, 4), (r.exit_code, r.stderr)
    assert list(systmp.iterdir()) == []
    if r.exit_code != 0:
        assert not (tmp_path / "o.onnx").exists()
