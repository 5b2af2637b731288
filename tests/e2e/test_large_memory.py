"""Peak memory of whole quantkit runs on a generated model with external data (~740 MB), each
measured on its own subprocess with wait4 (the kernel's ru_maxrss of that process alone).

The bound is on the whole process, interpreter and libraries included (~110 MB before any model
is read), so the model must be large enough for the ratio to mean something: at 740 MB the fixed
part is 15% of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from large_model import write_data, write_lm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("large")
    write_lm(folder, layers=20, dim=1024, vocab=8192)
    write_data(folder / "data.npz", samples=8, seq=8)
    return folder


# A child inherits its parent's peak RSS across exec (Linux keeps the old mm's high-water mark), and
# pytest's own may be large: a small launcher process starts the run and reports its wait4 peak.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def _peak_run(args: list) -> int:
    """Peak resident bytes of `python -m quantkit ARGS` (which must succeed) in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "quantkit", *map(str, args)],
                       env=env, capture_output=True, text=True)
    code, peak_kib = map(int, p.stdout.split())
    assert code == 0, p.stderr
    return peak_kib * 1024


def _model_bytes(folder: Path) -> int:
    return (folder / "model.onnx").stat().st_size + (folder / "model.onnx.data").stat().st_size


@pytest.mark.parametrize("mode,bound,op,count", [
    (["--weights", "int4"], 1.25, "MatMulNBits", 42),
    (["--calib", "{data}", "--calib-samples", "4"], 1.5, "QuantizeLinear", None),
])
def test_peak_memory_stays_near_the_model_size(big, tmp_path, mode, bound, op, count):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    args = [a.replace("{data}", str(big / "data.npz")) for a in mode]
    peak = _peak_run(["quantize", big / "model.onnx", *args, "--eval", big / "data.npz", "--batch-size", 4,
                         "-o", out, "--report", report, "-q"])
    size = _model_bytes(big)
    assert peak <= bound * size, f"peak {peak / 2**20:.0f} MiB is {peak / size:.2f}x the model ({size / 2**20:.0f} MiB)"
    r = json.loads(report.read_text())
    mem = r["memory"]
    assert mem["streamed"] and mem["model_bytes"] == size
    assert 0.8 * size < mem["peak_rss_bytes"] <= peak  # the fp32 reference alone maps every weight
    assert r["outputs"][0]["cosine_mean"] > 0.97
    lm = r["evaluation"]["language_model"]
    assert lm["positions"] == 8 * 8 and lm["top1_agreement"] > 0.5 and 0 < lm["kl_mean"] < 0.05
    m = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert op in ops and (count is None or ops.count(op) == count)
    assert (tmp_path / "q.onnx.data").is_file()
    q = onnx.load(str(out))  # the output is self-contained: its data file beside it, nothing else
    if count is not None:  # weight-only int4: every MatMul and the Gemm became MatMulNBits
        assert "MatMul" not in ops and "Gemm" not in ops and "GatherBlockQuantized" in ops
    assert sum(t.ByteSize() for t in q.graph.initializer) < size / (5 if count else 3)


def test_streamed_output_matches_the_in_memory_path(tmp_path):
    """The same small model through both paths (streaming forced by the size limit) writes the
    same weights."""
    from quantkit.quantize import streaming

    folder = tmp_path / "m"
    write_lm(folder, layers=2, dim=64, vocab=128)
    write_data(tmp_path / "d.npz", samples=4, seq=4, vocab=128)
    outs = {}
    for name, limit in (("memory", 1 << 40), ("streamed", 0)):
        code = (f"import sys; from quantkit.quantize import streaming; streaming.MIN_BYTES = {limit}; "
                "from quantkit.cli import main; sys.argv = ['quantkit'] + sys.argv[1:]; main()")
        p = subprocess.run([sys.executable, "-c", code, "quantize", folder / "model.onnx", "--weights", "int4",
                            "--eval", tmp_path / "d.npz", "-o", tmp_path / f"{name}.onnx", "--report",
                            tmp_path / f"{name}.json", "--no-speed-guard", "-q"],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        outs[name] = {t.name: onnx.numpy_helper.to_array(t)
                      for t in onnx.load(str(tmp_path / f"{name}.onnx")).graph.initializer}
    assert streaming.MIN_BYTES > 0
    assert json.loads((tmp_path / "streamed.json").read_text())["memory"]["streamed"]
    assert not json.loads((tmp_path / "memory.json").read_text())["memory"]["streamed"]
    assert outs["memory"].keys() == outs["streamed"].keys()
    for k, v in outs["memory"].items():
        np.testing.assert_array_equal(v, outs["streamed"][k], err_msg=k)
