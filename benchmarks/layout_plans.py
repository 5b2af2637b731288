"""Placements of the PP-PicoDet layout detector against the issue's first detector row (>= 98% of the
top-100 anchors as fp32's, >= 1.3x faster): quantkit's own searches (default budget, targets) and
fixed placements replayed with --from-plan, each scored on the evaluation pages and timed against fp32.

    python benchmarks/layout_plans.py [--work DIR] [--rows NAME ...] [--rounds 10] [--reuse]

Rows (`--rows` picks some, in this order; `--list` prints them):
  onnxruntime static   benchmarks/ort_static.py (its quantize_static, QDQ, per-channel, MinMax), batch 1
  quantkit default, quantkit --min-cosine X, quantkit --min-sqnr DB
      `quantkit quantize MODEL --calib CALIB --threads 1` with that target (search + speed guard), each
      writing its --plan and --report next to its model (the default's report ranks the sensitivity the
      `least sensitive` plans use; it runs first when a row needs it)
  plan: ...   quantkit's --from-plan format over the 102 convolutions (no search, no speed guard; a node
      the plan does not name stays static int8): all float (BN folded: quantkit's graph, no int8); all
      weight-only int8; all static (also with --method mse/percentile/entropy, --weight-rounding gptq);
      the stem conv float; plus the depthwise convs; plus the head towers; the N least sensitive static
      (the rest float or weight-only)
Each row: top-100 anchor agreement (real_models.layout_metrics: per page the 100 best anchors by best class
score over all four strides), detection F1 against fp32's, score-map SQNR, size ratio, and speed against
fp32 (1 thread, batch 1, every model interleaved round by round, best of 3 medians, as real_models.py).
Models, plans and reports go to --work (default: a temporary directory, removed at the end); with
--reuse a row whose model is already there is not quantized again (its quantize time is the stored one).
"""

from __future__ import annotations

import argparse
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

from _measure import ROOT, python, quantkit_cmd, run_measured  # noqa: E402

STEM = "p2o.Conv.0"
# the per-stride head towers (5x5 depthwise + 1x1 pairs) and the four GFL output convs of this model
HEAD_FROM = 66
TARGETS = {"quantkit default": [], "quantkit --min-cosine 0.99": ["--min-cosine", 0.99],
           "quantkit --min-cosine 0.98": ["--min-cosine", 0.98], "quantkit --min-cosine 0.95": ["--min-cosine", 0.95],
           "quantkit --min-sqnr 25": ["--min-sqnr", 25], "quantkit --min-sqnr 20": ["--min-sqnr", 20],
           "quantkit --min-sqnr 15": ["--min-sqnr", 15]}
LEAST = (80, 60, 40, 20)
# calibration choices replayed on the all-static plan: how far static int8's own noise can come down
METHODS = {"plan: all static, --method mse": ["--method", "mse"],
           "plan: all static, --method percentile": ["--method", "percentile"],
           "plan: all static, --method entropy": ["--method", "entropy"],
           "plan: all static, --weight-rounding gptq": ["--weight-rounding", "gptq"]}
ORT = "onnxruntime static"  # benchmarks/ort_static.py, batch 1: the all-int8 speed reference


def conv_facts(model: Path) -> tuple[list[str], set[str]]:
    """The convolutions in graph order and the depthwise (grouped) ones."""
    import onnx

    convs, grouped = [], set()
    for n in onnx.load(str(model), load_external_data=False).graph.node:
        if n.op_type == "Conv":
            convs.append(n.name)
            if any(a.name == "group" and a.i > 1 for a in n.attribute):
                grouped.add(n.name)
    return convs, grouped


def fixed_plans(convs: list[str], grouped: set[str], ranked: list[str] | None) -> dict[str, dict[str, str]]:
    """Per-node overrides (node -> float / weight_only); nodes left out stay static int8."""
    heads = {c for c in convs if int(c.rsplit(".", 1)[1]) >= HEAD_FROM}
    plans = {"plan: all float": {c: "float" for c in convs},
             "plan: all weight-only": {c: "weight_only" for c in convs},
             "plan: all static": {},
             **{name: {} for name in METHODS},
             "plan: stem float": {STEM: "float"},
             "plan: stem + depthwise float": {c: "float" for c in convs if c == STEM or c in grouped},
             "plan: stem + heads float": {c: "float" for c in convs if c == STEM or c in heads},
             "plan: stem + depthwise + heads float": {c: "float" for c in convs
                                                      if c == STEM or c in grouped or c in heads}}
    for n in LEAST if ranked else ():
        # the report ranks the most sensitive first: all but the last n leave static int8
        plans[f"plan: {n} least sensitive static"] = {c: "float" for c in ranked[:-n]}
        plans[f"plan: {n} least sensitive static, rest weight-only"] = {c: "weight_only" for c in ranked[:-n]}
    return plans


def row_stem(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def quantize(name: str, model: Path, calib: Path, work: Path, extra: list, reuse: bool) -> dict:
    """One row's quantized model (and its plan/report for a search); wall seconds from the run, or stored.
    `extra`: quantkit's arguments, or for onnxruntime ["ort_static.py"] (then no pre-process when that fails)."""
    out, info = work / f"{row_stem(name)}.onnx", work / f"{row_stem(name)}.run.json"
    if reuse and out.exists() and info.exists():
        return json.loads(info.read_text())
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if extra == ["ort_static.py"]:
        cmds = [[python(), str(HERE / "ort_static.py"), str(model), str(calib), str(out), "--batch-size", "1", *x]
                for x in ([], ["--no-preprocess"])]
    else:
        cmds = [quantkit_cmd("quantize", model, "--calib", calib, *extra, "-o", out, "--threads", 1, "--force", "-q")]
    for cmd in cmds:
        with tempfile.TemporaryDirectory() as scratch:
            m = run_measured(cmd, env=env, cwd=Path(scratch))
        if m.returncode == 0:
            break
    r = {"path": str(out) if m.returncode == 0 else None, "seconds": m.seconds, "cpu_seconds": m.cpu_seconds,
         "error": None if m.returncode == 0 else f"exit {m.returncode}: {m.stderr.strip()[-200:]}"}
    info.write_text(json.dumps(r))
    return r


def search_args(name: str, work: Path) -> list:
    return [*TARGETS[name], "--plan", work / f"{row_stem(name)}.plan.json",
            "--report", work / f"{row_stem(name)}.report.json"]


def ranking(work: Path) -> list[str] | None:
    rep = work / "quantkit_default.report.json"
    return [r["node"] for r in json.loads(rep.read_text())["sensitivity"]] if rep.exists() else None


def run_rows(rows: list[str], d: Path, work: Path, reuse: bool) -> dict[str, dict]:
    model, calib = d / "model.onnx", d / "calib.npz"
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    convs, grouped = conv_facts(model)
    runs: dict[str, dict] = {}
    for name in rows:
        if name == ORT:
            print(f"[layout] {name} ...", file=sys.stderr, flush=True)
            runs[name] = quantize(name, model, calib, work, ["ort_static.py"], reuse)
            continue
        if name in TARGETS:
            print(f"[layout] {name} ...", file=sys.stderr, flush=True)
            runs[name] = quantize(name, model, calib, work, search_args(name, work), reuse)
            continue
        if name.startswith("plan:") and "least sensitive" in name and ranking(work) is None:
            print("[layout] quantkit default (for its sensitivity ranking) ...", file=sys.stderr, flush=True)
            runs["quantkit default"] = quantize("quantkit default", model, calib, work,
                                                search_args("quantkit default", work), reuse)
        nodes = fixed_plans(convs, grouped, ranking(work)).get(name)
        if nodes is None:
            raise SystemExit(f"unknown row {name!r}; see --list")
        plan = work / f"{row_stem(name)}.plan.json"
        plan.write_text(json.dumps({"format": "quantkit-plan-1", "nodes": nodes, "speed_dropped": [],
                                    "model_sha256": sha, "target": ""}))
        print(f"[layout] {name} ...", file=sys.stderr, flush=True)
        runs[name] = quantize(name, model, calib, work, ["--from-plan", plan, *METHODS.get(name, [])], reuse)
    return runs


def score(d: Path, runs: dict[str, dict], rounds: int, kind: str = "layout", input_name: str = "image",
          metrics=None) -> dict:
    """Each row's metrics against fp32 on the evaluation set, its size ratio and its speed (interleaved, best
    of `rounds`); `kind`, `input_name`, `metrics`: the model's (real_models.py), the layout detector's by default."""
    metrics = metrics or rmod.layout_metrics
    with np.load(d / "eval.npz") as z:
        data = {input_name: z[input_name]}
    paths = {"fp32": d / "model.onnx", **{k: Path(r["path"]) for k, r in runs.items() if r.get("path")}}
    ref = rmod.run_eval(kind, paths["fp32"], data)
    runs.setdefault("fp32", {})
    for name, p in paths.items():
        print(f"[{kind}] evaluating {name} ...", file=sys.stderr, flush=True)
        q = ref if name == "fp32" else rmod.run_eval(kind, p, data)
        size = paths["fp32"].stat().st_size / p.stat().st_size
        runs[name].update(metrics=metrics(ref, q), size_ratio=size)
    load_before = os.getloadavg()
    ms = rmod.interleaved_best_ms(paths, {input_name: data[input_name][:1]}, rounds)
    for name in paths:
        runs[name].update(ms=ms[name], speedup=ms["fp32"] / ms[name])
    return {"load_before": load_before[0], "load_after": os.getloadavg()[0], "rounds": rounds}


def table(runs: dict[str, dict], timing: dict) -> str:
    cols = list(runs["fp32"]["metrics"])
    lines = ["| row | " + " | ".join(cols) + " | size ratio | ms | speedup | quantize s |",
             "| --- |" + " ---: |" * (len(cols) + 4)]
    for name in ["fp32", *[k for k in runs if k != "fp32"]]:
        r = runs[name]
        if "metrics" not in r:
            lines.append(f"| {name} | failed: {r.get('error')} |" + " |" * (len(cols) + 3))
            continue
        vals = " | ".join(f"{v:.1f}" for v in r["metrics"].values())
        q = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"| {name} | {vals} | {r['size_ratio']:.2f}x | {r['ms']:.1f} | {r['speedup']:.2f}x | {q} |")
    lines.append(f"\n(speed: 1 thread, batch 1, best of 3 medians of {timing['rounds']} interleaved runs; load average "
                 f"{timing['load_before']:.1f} before, {timing['load_after']:.1f} after timing)")
    return "\n".join(lines)


def all_rows(d: Path, work: Path) -> list[str]:
    convs, grouped = conv_facts(d / "model.onnx")
    ranked = ranking(work) or [f"rank{i}" for i in range(len(convs))]  # names only, for --list
    return [ORT, *TARGETS, *fixed_plans(convs, grouped, ranked)]


def arguments(doc: str | None) -> argparse.Namespace:
    """The options layout_plans.py and yolo_plans.py share."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--work", type=Path, help="keep models, plans and reports here (default: a temporary dir)")
    ap.add_argument("--rows", nargs="+", help="these rows only (names as --list prints them)")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing runs per repetition")
    ap.add_argument("--reuse", action="store_true", help="do not quantize again a row whose model is in --work")
    ap.add_argument("--list", action="store_true", help="print the row names and stop")
    return ap.parse_args()


def main() -> None:
    args = arguments(__doc__)
    d = CACHE / "layout"
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.list:
            print("\n".join(all_rows(d, work)))
            return
        runs = run_rows(args.rows or all_rows(d, work), d, work, args.reuse)
        timing = score(d, runs, args.rounds)
        (work / "results.json").write_text(json.dumps({"timing": timing, "runs": runs}, indent=1))
        print(table(runs, timing))


if __name__ == "__main__":
    main()
