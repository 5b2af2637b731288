"""Placements of the YOLOv8n (nudenet 3.4.2's 320n.onnx, real_models.py's `yolov8`) against the issue's YOLOv8 row
(>= 97% detection F1 against fp32 at >= 2.5x faster): quantkit's own searches (default budget, targets) and
fixed placements replayed with --from-plan, each scored on the evaluation pictures and timed against fp32.

    python benchmarks/yolo_plans.py [--work DIR] [--rows NAME ...] [--rounds 10] [--reuse] [--list]

The model's one output `output0` [N, 4 + 18, anchors] is a Concat of boxes (pixels) and class scores (0-1);
quantkit (report/parts.py, since 3915d7b) compares, budgets and gates it part by part ("output0[:, 0:4]" and
"output0[:, 4:22]"), so a target holds for the scores on their own.

Rows (`--rows` picks some, in this order; `--list` prints them):
  onnxruntime static   benchmarks/ort_static.py (quantize_static, QDQ, per-channel, MinMax), batch 1
  quantkit default, quantkit --min-cosine X, quantkit --min-sqnr DB
      `quantkit quantize MODEL --calib CALIB --threads 1` with that target (search + speed guard), writing
      its --plan and --report next to its model; the targets hold on every part of the output
  plan: ...   quantkit's --from-plan format over the nodes quantkit quantizes (64 Conv, 57 SiLU = Sigmoid and
      Mul, 8 Concat, 3 MaxPool, 2 Resize: the default's int8 nodes and the ones its placement moved; a node
      the plan does not name stays static int8): all float; all static (also with --method
      mse/percentile/entropy, --weight-rounding gptq, --bias-correction, --activations int8); the head's
      three per-level Concats (64 box-distribution logits + 18 class logits in one tensor) float; plus the
      class branch (cv3.*); the whole head (model.22) float; the SiLUs float; every op without weights float
      (the convolutions alone int8)
  split output (check): quantkit default
      historical (stop 26 measured the part-wise budget this way before quantkit had it): the default search
      on the model with its output split into boxes and scores by one Split node at the end, scored on the
      two outputs concatenated back; now a cross-check that quantkit's part-wise judgement of the one output
      places the nodes as its per-output judgement of the two (the script says whether the placements agree,
      and what the speed guard dropped in each)
Each row: detection F1 against fp32's (decoded as NudeNet does), top-100 anchor agreement, boxes per image,
score and box SQNR (real_models.yolo_metrics), size ratio, and speed against fp32 (1 thread, batch 1, every
model interleaved round by round, best of 3 medians, as real_models.py). After the table: the Pareto front of
detection F1, speed and size, the fastest row with F1 >= 97%, and the fastest row's F1. Models, plans and
reports go to --work (default: a temporary directory, removed at the end); with --reuse a row whose model is
already there is not quantized again (its quantize time is the stored one).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import layout_plans  # noqa: E402
import real_models as rmod  # noqa: E402 - the benchmarks folder is put on the path just above
from _real_data import CACHE  # noqa: E402
from layout_plans import ORT, quantize, row_stem, table  # noqa: E402

TARGETS = {"quantkit default": [],
           **{f"quantkit --min-cosine {c}": ["--min-cosine", c] for c in (0.997, 0.995, 0.99)},
           **{f"quantkit --min-sqnr {db}": ["--min-sqnr", db] for db in (25, 20, 15)}}
# the default search on the model with its one output split into boxes and scores (split_output below): since
# quantkit judges the parts of a concatenated output itself, a check that both judgements place the same
SPLIT = "split output (check): quantkit default"
SPLIT_TARGETS = {SPLIT: []}
F1 = "detection F1 %"
WANT_F1 = 97.0  # the YOLOv8 row: >= 97% F1 at >= 2.5x faster
HEAD = "/model.22/"
HEAD_CONCATS = ("/model.22/Concat", "/model.22/Concat_1", "/model.22/Concat_2")
NO_WEIGHTS = ("Sigmoid", "Mul", "Concat", "MaxPool", "Resize", "Add")
# calibration choices replayed on the all-static plan: how far static int8's own noise comes down
METHODS = {"plan: all static, --method mse": ["--method", "mse"],
           "plan: all static, --method percentile": ["--method", "percentile"],
           "plan: all static, --method entropy": ["--method", "entropy"],
           "plan: all static, --weight-rounding gptq": ["--weight-rounding", "gptq"],
           "plan: all static, --bias-correction": ["--bias-correction"],
           "plan: all static, --activations int8": ["--activations", "int8"]}
PLAN_ROWS = ("plan: all float", "plan: all static", *METHODS, "plan: head Concats float",
             "plan: head Concats + class branch float", "plan: head float", "plan: SiLU float",
             "plan: ops without weights float")


def quantized_nodes(work: Path) -> dict[str, str] | None:
    """The nodes quantkit quantizes (node -> op type): the default row's int8 nodes and the ones its placement
    moved (to float, or another scheme); None before it ran."""
    rep = work / "quantkit_default.report.json"
    if not rep.exists():
        return None
    report = json.loads(rep.read_text())
    nodes = {r["node"]: r["op_type"] for r in report["nodes"]["quantized"]}
    moved = (report.get("placement") or {}).get("moved") or {}
    nodes.update({r["node"]: r["op_type"] for r in report["nodes"]["float"] if r["node"] in moved})
    missing = set(moved) - set(nodes)
    if missing:
        raise SystemExit(f"{rep}: moved nodes not in the report's node lists: {sorted(missing)[:5]}")
    return nodes


def fixed_plans(nodes: dict[str, str]) -> dict[str, dict[str, str]]:
    """Per-node overrides (node -> float); nodes left out stay static int8."""
    def floated(pick) -> dict[str, str]:
        return {k: "float" for k, t in nodes.items() if pick(k, t)}

    return {"plan: all float": floated(lambda k, t: True),
            "plan: all static": {},
            **{name: {} for name in METHODS},
            "plan: head Concats float": floated(lambda k, t: k in HEAD_CONCATS),
            "plan: head Concats + class branch float": floated(lambda k, t: k in HEAD_CONCATS or "/cv3." in k),
            "plan: head float": floated(lambda k, t: k.startswith(HEAD)),
            "plan: SiLU float": floated(lambda k, t: "/act/" in k),
            "plan: ops without weights float": floated(lambda k, t: t in NO_WEIGHTS)}


def split_output(model: Path, dst: Path) -> Path:
    """The model with its output [N, 4 + C, anchors] split (one Split node) into two graph outputs, boxes
    [N, 4, anchors] and scores [N, C, anchors]: the same computation, two outputs quantkit scores apart."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(model))
    out = m.graph.output[0]
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    m.graph.initializer.append(numpy_helper.from_array(np.array([4, dims[1] - 4], np.int64), "split_sizes"))
    m.graph.node.append(helper.make_node("Split", [out.name, "split_sizes"], ["boxes", "scores"], axis=1,
                                         name="split_boxes_scores"))
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [dims[0], 4, dims[2]]),
                           helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT,
                                                         [dims[0], dims[1] - 4, dims[2]])])
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def search_args(name: str, work: Path) -> list:
    return [*{**TARGETS, **SPLIT_TARGETS}[name], "--plan", work / f"{row_stem(name)}.plan.json",
            "--report", work / f"{row_stem(name)}.report.json"]


def run_rows(rows: list[str], d: Path, work: Path, reuse: bool) -> dict[str, dict]:
    model, calib = d / "model.onnx", d / "calib.npz"
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    runs: dict[str, dict] = {}
    if any(r in PLAN_ROWS for r in rows) and quantized_nodes(work) is None:
        print("[yolov8] quantkit default (for the nodes it quantizes) ...", file=sys.stderr, flush=True)
        runs["quantkit default"] = quantize("quantkit default", model, calib, work,
                                            search_args("quantkit default", work), reuse)
    plans = fixed_plans(quantized_nodes(work) or {})
    for name in rows:
        if name in runs:
            continue
        print(f"[yolov8] {name} ...", file=sys.stderr, flush=True)
        if name == ORT:
            runs[name] = quantize(name, model, calib, work, ["ort_static.py"], reuse)
        elif name in TARGETS:
            runs[name] = quantize(name, model, calib, work, search_args(name, work), reuse)
        elif name in SPLIT_TARGETS:
            split = split_output(model, work / "model_split.onnx")
            runs[name] = quantize(name, split, calib, work, search_args(name, work), reuse)
        elif name in plans:
            plan = work / f"{row_stem(name)}.plan.json"
            plan.write_text(json.dumps({"format": "quantkit-plan-1", "nodes": plans[name], "speed_dropped": [],
                                        "model_sha256": sha, "target": ""}))
            runs[name] = quantize(name, model, calib, work, ["--from-plan", plan, *METHODS.get(name, [])], reuse)
        else:
            raise SystemExit(f"unknown row {name!r}; see --list")
    return runs


def score(d: Path, runs: dict[str, dict], rounds: int) -> dict:
    return layout_plans.score(d, runs, rounds, "yolov8", "images", rmod.yolo_metrics)


def pareto(runs: dict[str, dict]) -> dict:
    """The rows no other row beats on detection F1, speed and size at once; the fastest row with F1 >= 97%;
    the fastest row."""
    pts = {k: (r["metrics"][F1], r["speedup"], r["size_ratio"]) for k, r in runs.items() if "metrics" in r}

    def beaten(a: tuple, b: tuple) -> bool:  # b at least as good everywhere and better somewhere
        return all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b))

    front = sorted((k for k, a in pts.items() if not any(beaten(a, b) for b in pts.values())),
                   key=lambda k: -pts[k][1])
    good = [k for k in pts if pts[k][0] >= WANT_F1]
    return {"front": front, "best_97": max(good, key=lambda k: pts[k][1]) if good else None,
            "fastest": max(pts, key=lambda k: pts[k][1])}


def plan_check(work: Path) -> dict | None:
    """The split-output check row's plan against the default's: whether the placement moves the same nodes, and
    what the speed guard dropped in each (None: one of them is missing)."""
    plans = [work / f"{row_stem(n)}.plan.json" for n in ("quantkit default", SPLIT)]
    if not all(p.exists() for p in plans):
        return None
    default, split = (json.loads(p.read_text()) for p in plans)
    return {"same_nodes": default["nodes"] == split["nodes"], "moved": len(default["nodes"]),
            "speed_dropped": {"quantkit default": default["speed_dropped"], SPLIT: split["speed_dropped"]}}


def summary(runs: dict[str, dict], work: Path) -> str:
    p = pareto(runs)

    def point(k: str | None) -> str:
        if k is None:
            return "none"
        r = runs[k]
        return f"{k} ({r['metrics'][F1]:.1f}% F1, {r['speedup']:.2f}x faster, {r['size_ratio']:.2f}x smaller)"

    lines = ["Pareto front (F1, speed, size), fastest first:", *(f"  {point(k)}" for k in p["front"]),
             f"fastest with F1 >= {WANT_F1:g}%: {point(p['best_97'])}", f"fastest: {point(p['fastest'])}"]
    timed = [k for k in (ORT, *TARGETS, SPLIT) if runs.get(k, {}).get("cpu_seconds") is not None]
    lines.append("quantize wall / CPU s (CPU: user + system, all threads; wall counts any wait for the cores): "
                 + "; ".join(f"{k} {runs[k]['seconds']:.1f} / {runs[k]['cpu_seconds']:.1f}" for k in timed))
    check = plan_check(work)
    if check is not None:
        lines.append(f"split-output check: the placement moves {'the same' if check['same_nodes'] else 'OTHER'} "
                     f"nodes ({check['moved']} in the default's); the speed guard dropped "
                     + "; ".join(f"{k}: {v or 'nothing'}" for k, v in check["speed_dropped"].items()))
    return "\n".join(lines)


def main() -> None:
    args = layout_plans.arguments(__doc__)
    d = CACHE / "yolov8"
    rows = [ORT, *TARGETS, *PLAN_ROWS, *SPLIT_TARGETS]
    if args.list:
        print("\n".join(rows))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = run_rows(args.rows or rows, d, work, args.reuse)
        timing = score(d, runs, args.rounds)
        (work / "results.json").write_text(json.dumps({"timing": timing, "runs": runs, "pareto": pareto(runs),
                                                       "split_check": plan_check(work)}, indent=1))
        print(table(runs, timing))
        print(summary(runs, work))


if __name__ == "__main__":
    main()
