"""Fixed placements replayed on the PP-PicoDet layout detector (benchmarks/real_models.py --model layout
must have run first): what one node and what weight-only int8 everywhere cost in detections.

    python benchmarks/layout_plans.py

Plans (quantkit's --from-plan format, no search), each over all 102 convolutions:
  conv0 static      every convolution float except p2o.Conv.0 (the stem, on the image), static int8
  all weight-only   every convolution weight-only int8 (per-channel weights, float activations)
Scored like real_models.py on the evaluation pages: detection F1 against fp32, score-map SQNR, size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models as rmod  # noqa: E402 - the benchmarks folder is put on the path just above
from _real_data import CACHE  # noqa: E402

from _measure import ROOT, quantkit_cmd, run_measured  # noqa: E402


def plans(d: Path) -> dict[str, dict[str, str]]:
    report = json.loads((d / "quantized" / "quantkit_static.json").read_text())
    convs = [row["node"] for row in report["sensitivity"]]
    return {"conv0 static": {n: "float" for n in convs if n != "p2o.Conv.0"},
            "all weight-only": {n: "weight_only" for n in convs}}


def main() -> None:
    d = CACHE / "layout"
    sha = hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest()
    with np.load(d / "eval.npz") as z:
        data = {"image": z["image"]}
    ref = rmod.run_eval("layout", d / "model.onnx", data)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print("| plan | " + " | ".join(rmod.layout_metrics(ref, ref)) + " | size ratio |")
    print("| --- |" + " ---: |" * 6)
    with tempfile.TemporaryDirectory() as tmp:
        for name, nodes in plans(d).items():
            plan, out = Path(tmp) / "plan.json", Path(tmp) / "q.onnx"
            plan.write_text(json.dumps({"format": "quantkit-plan-1", "nodes": nodes, "speed_dropped": [],
                                        "model_sha256": sha, "target": ""}))
            m = run_measured(quantkit_cmd("quantize", d / "model.onnx", "--calib", d / "calib.npz", "--from-plan",
                                          plan, "-o", out, "--threads", 1, "--force", "-q"), env=env, cwd=Path(tmp))
            if m.returncode != 0:
                print(f"| {name} | failed: exit {m.returncode} |" + " |" * 5)
                continue
            vals = rmod.layout_metrics(ref, rmod.run_eval("layout", out, data))
            size = (d / "model.onnx").stat().st_size / out.stat().st_size
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals.values()) + f" | {size:.2f}x |", flush=True)
    print(f"\n(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
