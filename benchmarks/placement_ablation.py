"""One quantkit command on a real model of benchmarks/real_models.py, scored as that script scores it
(pooled cosine / token SQNR for minilm), with the size ratio, the speedup against fp32 (1 thread, batch 8,
interleaved) and the placement the run chose. For trying placements and options one at a time:

    python benchmarks/placement_ablation.py --model minilm -- --min-sqnr -50 --no-speed-guard
    python benchmarks/placement_ablation.py --model minilm --place '*layer.?/output/dense/MatMul=per_token'

Everything after `--` goes to `quantkit quantize`. `--place GLOB=SCHEME` (repeatable) writes a plan that puts
the MatMul/Gemm/Conv nodes whose names match GLOB on SCHEME (static, dynamic, per_token, weight_only, float)
and replays it with `--from-plan`. Models come from benchmarks/.cache/real (built by
benchmarks/_real_data.py on first use).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models as rmod  # noqa: E402 - the benchmarks folder is put on the path just above
from _real_data import prepare  # noqa: E402

from _measure import quantkit_cmd  # noqa: E402


def _plan(model: Path, specs: list[str], path: Path) -> Path:
    """A quantkit plan file (format quantkit-plan-1) putting the nodes matched by each GLOB on SCHEME."""
    import fnmatch
    import hashlib

    import onnx

    names = [n.name for n in onnx.load(str(model), load_external_data=False).graph.node
             if n.op_type in ("MatMul", "Gemm", "Conv")]
    nodes = {}
    for spec in specs:
        glob, scheme = spec.rsplit("=", 1)
        nodes.update({n: scheme for n in names if fnmatch.fnmatchcase(n, glob)})
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    path.write_text(json.dumps({"format": "quantkit-plan-1", "nodes": nodes, "speed_dropped": [],
                                "model_sha256": digest, "target": ""}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", choices=rmod.KINDS)
    ap.add_argument("--place", action="append", default=[], metavar="GLOB=SCHEME")
    ap.add_argument("--keep", type=Path, help="copy the quantized model (and report) to this path")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="after --: options for quantkit quantize")
    a = ap.parse_args()
    extra = [x for x in a.args if x != "--"]
    d = prepare(a.model)
    meta = json.loads((d / "meta.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out, rep = Path(tmp) / "q.onnx", Path(tmp) / "r.json"
        if a.place:
            extra += ["--from-plan", str(_plan(d / "model.onnx", a.place, Path(tmp) / "plan.json"))]
        t = time.perf_counter()
        r = subprocess.run(quantkit_cmd("quantize", d / "model.onnx", "--calib", d / "calib.npz", "-o", out,
                                        "--report", rep, "--threads", 1, "--force", "-q", *extra),
                           capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if r.returncode not in (0, 5):
            sys.exit(f"quantkit failed (exit {r.returncode}): {r.stderr.strip()}")
        data = dict(np.load(d / "eval.npz"))
        truth = json.loads((d / "eval_truth.json").read_text()) if (d / "eval_truth.json").exists() else []
        batch = rmod.SPEED_BATCH[a.model]
        ref, got = rmod.run_eval(a.model, d / "model.onnx", data, batch), rmod.run_eval(a.model, out, data, batch)
        figures = rmod.metrics(a.model, ref, got, data, truth, meta.get("alphabet"))
        ms = rmod.interleaved_best_ms({"fp32": d / "model.onnx", "q": out}, {k: v[:batch] for k, v in data.items()},
                                      rounds=8, reps=2)
        report = json.loads(rep.read_text())
        if a.keep is not None:
            import shutil

            shutil.copyfile(out, a.keep)
            shutil.copyfile(rep, a.keep.with_suffix(".json"))
        placement = report.get("placement") or {}
        print(json.dumps({
            "options": extra, "exit": r.returncode, **{k: round(v, 4) for k, v in figures.items()},
            "size_ratio": round((d / "model.onnx").stat().st_size / out.stat().st_size, 2),
            "speedup": round(ms["fp32"] / ms["q"], 2), "quantize_s": round(seconds, 1),
            "stage_seconds": report.get("stage_seconds"),
            "moved": dict(collections.Counter((placement.get("moved") or {}).values())),
            "top_sensitivity": [(x["node"], x["own_sqnr_db"]) for x in report.get("sensitivity", [])[:6]],
        }, indent=1))


if __name__ == "__main__":
    main()
