"""Where int8 loses accuracy on a real model, weights or activations, and what GPTQ rounding of the
per-channel int8 weights (quantize/gptq_channel.py, `--weight-rounding gptq`) gives back.

    python benchmarks/weight_rounding.py [--model ocr_rec] [--cache DIR]

Each row is one `quantkit quantize` run on the prepared model (benchmarks/_real_data.py), with its
placement fixed by a plan (`--from-plan`) so that only the rounding differs between the rtn and gptq
rows, scored on the evaluation set as benchmarks/real_models.py scores it:

  every Conv weight-only int8, ...     Conv weights int8 per channel behind a DequantizeLinear, float
                                       activations (MatMuls stay float): the weights' share of the error
  every op static int8                 the activations' share on top
  default placement                    no plan: the accuracy budget's own search (quantkit's default)
  --min-sqnr 20                        the search with that target (as benchmarks/real_models.py runs it)

and, from the default runs' sensitivity rows, the median own SQNR per op of static int8 (weight and
input rounding) against its weight-only int8 alternative (weight rounding alone).
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
sys.path.insert(0, str(HERE))
from _real_data import CACHE  # noqa: E402 - the benchmarks folder is put on the path just above
from real_models import eval_set, metrics, run_eval  # noqa: E402

from _measure import ROOT, quantkit_cmd, run_measured  # noqa: E402


def planned_ops(model: Path) -> list[tuple[str, str]]:
    """(node, op type) of every op static int8 plans on the canonicalized model."""
    from quantkit.config import QuantConfig
    from quantkit.graph.canonicalize import canonicalize
    from quantkit.load.onnx import load_onnx
    from quantkit.quantize.scheme import placement_for

    m = load_onnx(model)
    canonicalize(m)
    return [(op.key, op.node.op_type) for op in placement_for(QuantConfig()).plan(m).ops]


def plan_file(model: Path, nodes: dict[str, str], path: Path) -> Path:
    from quantkit.load.onnx import file_sha256
    from quantkit.quantize.budget import PlanFile

    path.write_text(json.dumps(PlanFile(nodes, [], file_sha256(model), target="").save()))
    return path


def quantize(model: Path, calib: Path, out: Path, rounding: str, extra: list) -> dict:
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    report = out.with_suffix(".json")
    cmd = quantkit_cmd("quantize", model, "--calib", calib, "-o", out, "--weight-rounding", rounding,
                       "--no-speed-guard", "--report", report, "--force", "-q", *extra)
    m = run_measured(cmd, env=env)
    if m.returncode not in (0, 5):  # 5: the target's gate failed on the data; the model is written all the same
        raise SystemExit(f"{' '.join(map(str, cmd))} failed: {m.stderr.strip()[-300:]}")
    return {"seconds": m.seconds, "report": json.loads(report.read_text()), "gate_failed": m.returncode == 5}


def near_ties(model: Path, calib: Path, samples: int = 64, margin: float = 0.01) -> str:
    """The placement probe's samples (the first 64 of the calibration set) whose fp32 output has a
    position where the top two class probabilities are within `margin`: a CTC decode any noise may flip."""
    import numpy as np
    from real_models import session

    with np.load(calib) as z:
        feed = {k: z[k][:samples] for k in z.files if k != "labels"}
    sess = session(model)
    out = np.concatenate([sess.run(None, {k: v[i:i + 8] for k, v in feed.items()})[0] for i in range(0, samples, 8)])
    top2 = np.sort(out, axis=-1)[..., -2:]
    gaps = (top2[..., 1] - top2[..., 0]).min(axis=1)
    tied = [int(i) for i in np.nonzero(gaps < margin)[0]]
    return (f"probe samples (calibration 0-{samples - 1}) with a position whose top-2 probabilities are within "
            f"{margin}: {tied} (their smallest gaps: {', '.join(f'{gaps[i]:.4f}' for i in tied)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ocr_rec")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--ties", action="store_true", help="only list the probe's near-tied samples")
    args = ap.parse_args()
    d = args.cache / args.model
    if args.ties:
        print(near_ties(d / "model.onnx", d / "calib.npz"))
        return
    model, calib = d / "model.onnx", d / "calib.npz"
    data, truth, alphabet = eval_set(args.model, d)
    ref = run_eval(args.model, model, data)
    ops = planned_ops(model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plans = {"every Conv weight-only int8, the rest float": {k: ("weight_only" if t == "Conv" else "float")
                                                                   for k, t in ops},
                 "every op static int8": {}}
        variants = [(name, ["--from-plan", plan_file(model, nodes, work / f"plan{i}.json")])
                    for i, (name, nodes) in enumerate(plans.items())]
        variants += [("default placement", []), ("--min-sqnr 20", ["--min-sqnr", 20])]
        for name, extra in variants:
            for rounding in ("rtn", "gptq"):
                out = work / f"{len(rows)}.onnx"
                run = quantize(model, calib, out, rounding, extra)
                rep = run["report"]
                rows.append({"placement": name + (" (gate failed, exit 5)" if run["gate_failed"] else ""),
                             "rounding": rounding, "seconds": run["seconds"],
                             "calibrate_seconds": rep["stage_seconds"]["calibrate"],
                             "size_ratio": model.stat().st_size / out.stat().st_size,
                             "moved": len((rep.get("placement") or {}).get("moved") or {}),
                             "metrics": metrics(args.model, ref, run_eval(args.model, out, data), data, truth,
                                                alphabet),
                             "sensitivity": rep.get("sensitivity") or []})
                print(f"{name} / {rounding}: {rows[-1]['metrics']}", file=sys.stderr, flush=True)
    print(table(args.model, rows, len(ops)))


def table(kind: str, rows: list[dict], n_ops: int) -> str:
    cols = list(rows[0]["metrics"])
    lines = [f"{kind}: {n_ops} quantizable ops; load average {os.getloadavg()[0]:.1f} at the end", "",
             "| placement | rounding | " + " | ".join(cols) + " | ops moved off static | size ratio | quantize s "
             "| calibrate s |", "| --- | --- |" + " ---: |" * (len(cols) + 4)]
    for r in rows:
        vals = " | ".join(f"{r['metrics'][c]:.1f}" for c in cols)
        lines.append(f"| {r['placement']} | {r['rounding']} | {vals} | {r['moved']} | {r['size_ratio']:.2f}x | "
                     f"{r['seconds']:.0f} | {r['calibrate_seconds']:.0f} |")
    lines += ["", "own SQNR per op (sensitivity rows of the default runs), median over ops:", ""]
    for r in rows:
        if r["placement"] != "default placement" or not r["sensitivity"]:
            continue
        static = [s["own_sqnr_db"] for s in r["sensitivity"] if s["own_sqnr_db"] is not None]
        wo = [v for s in r["sensitivity"] if (v := (s["alternatives_own_sqnr_db"] or {}).get("weight_only"))
              is not None and s["op_type"] == "Conv"]
        lines.append(f"- {r['rounding']}: static int8 {statistics.median(static):.1f} dB over {len(static)} ops; "
                     f"Conv weight-only int8 {statistics.median(wo):.1f} dB over {len(wo)} convolutions")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
