"""The placement search's sessions at one intra-op thread, two runs at a time (today), against one
session at onnxruntime's default thread count run one batch at a time (before): whole
`quantkit quantize` runs in this process, alternating the two settings round by round so that
machine load hits both alike; per run the report's stage seconds and whether the written bytes match.

    python benchmarks/placement_threads.py --model minilm|ocr_rec [--rounds 2]

Models come from benchmarks/.cache/real/<model>/ (benchmarks/_real_data.py prepares them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quantkit import runtime  # noqa: E402
from quantkit.cli import main  # noqa: E402

SETTINGS = {"one thread, two at a time": (1, 2), "default threads, one at a time": (None, 1)}


def run_once(model_dir: Path, out: Path, setting: str) -> dict:
    runtime.PLACEMENT_THREADS, runtime.PARALLEL_RUNS = SETTINGS[setting]
    report = out.with_suffix(".json")
    argv = sys.argv
    sys.argv = ["quantkit", "quantize", str(model_dir / "model.onnx"), "--calib", str(model_dir / "calib.npz"),
                "--threads", "1", "-o", str(out), "--report", str(report), "--force", "-q"]
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = argv
    r = json.loads(report.read_text())
    return {"seconds": r["seconds"], "placement": r["stage_seconds"]["placement"], "bytes": out.read_bytes(),
            "candidates": len(r["placement"]["trials"])}


def main_(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QUANTKIT_REAL_CACHE", HERE / ".cache" / "real")))
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for j, setting in enumerate(SETTINGS):
                out = Path(tmp) / f"r{i}_{j}.onnx"
                runs[setting].append(run_once(args.cache / args.model, out, setting))
    first = next(iter(runs.values()))[0]["bytes"]
    print(f"{args.model}: {args.rounds} round(s), load average {os.getloadavg()[0]:.1f} at the end")
    print("| placement sessions | placement s (each run) | whole run s (each run) | candidates "
          "| output = first run's |")
    print("| --- | --- | --- | ---: | --- |")
    for setting, rs in runs.items():
        placement = ", ".join(f"{r['placement']:.1f}" for r in rs)
        whole = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        median = statistics.median(r["placement"] for r in rs)
        same = "yes" if all(r["bytes"] == first for r in rs) else "no"
        print(f"| {setting} | {placement} (median {median:.1f}) | {whole} | {rs[0]['candidates']} | {same} |")

if __name__ == "__main__":
    main_()
