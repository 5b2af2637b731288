"""Issue 14's encoder target step by step: MiniLM with 30% of its FFN neurons pruned, static int8,
then recovery training (--finetune, distilled from the unpruned model), uniform against per-layer
(--prune-allocation sensitivity) ratios.

    python benchmarks/prune_finetune.py [--cache benchmarks/.cache/real] [--steps 300 1000] [--match TEXT]
                                        [--refit one-shot|sequential] [--calib-sentences N]
                                        [--replay-plan]

--replay-plan: the int8 run without training writes its placement (--plan); its per-token dynamic
int8 ops (MatMulInteger + Round, which --finetune cannot run in torch) are moved to dynamic int8
(DynamicQuantizeMatMul, which it trains), and the fine-tuned runs replay that plan (--from-plan).

Same setting as benchmarks/finetune.py (whose functions this reuses): the PyTorch checkpoint of
all-MiniLM-L6-v2 with --model-class, trained on 1,024 docstring sentences the evaluation set does not
hold, scored on the cache's 256 evaluation sentences (masked mean-pooled cosine to fp32). Each run is
one `quantkit quantize` process. Results: benchmarks/.cache/prune/minilm/finetune.json (each run
written as soon as it is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.finetune import bench, minilm_metrics, prepare_minilm, saver  # noqa: E402


def runs(steps: list[int], lr: float, case: dict, refit: str = "one-shot",
         calib: str = "") -> list[tuple[str, list[str]]]:
    ft = ["--finetune-data", case["finetune_data"], "--lr", str(lr)]
    out = []
    for allocation in ("uniform", "sensitivity"):
        prune = ["--prune", "0.3", "--prune-structure", "channel", "--prune-allocation", allocation]
        what = allocation
        if refit != "one-shot":
            prune += ["--prune-refit", refit]
            what += f", {refit}"
        what += calib
        out.append((f"prune 30% FFN ({what}) + static int8", prune))
        out += [(f"prune 30% FFN ({what}) + static int8 + finetune {n}", [*prune, "--finetune", str(n), *ft])
                for n in steps]
    return out


def replayed(todo: list[tuple[str, list[str]]], case: dict, tmp: Path, env: dict, save) -> list:
    """Run the untrained rows with --plan, then give the trained rows that plan, its per-token ops
    made dynamic int8 (--from-plan). Returns the rows left to run."""
    trained = [(n, args) for n, args in todo if "--finetune" in args]
    for name, args in todo:
        if "--finetune" in args:
            continue
        plan = tmp / "plan.json"
        bench(case, [(name, [*args, "--plan", str(plan)])], minilm_metrics, tmp, env, save)
        data = json.loads(plan.read_text())
        moved = sorted(k for k, v in data["nodes"].items() if v == "per_token")
        data["nodes"] = {k: "dynamic" if v == "per_token" else v for k, v in data["nodes"].items()}
        print(f"per-token ops moved to dynamic int8: {moved}", flush=True)
        replay = tmp / "plan_replay.json"
        replay.write_text(json.dumps(data))
        trained = [(n + ", plan replayed (per-token -> dynamic)", [*a, "--from-plan", str(replay)])
                   for n, a in trained if n.startswith(name)]
    return trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QUANTKIT_REAL_CACHE", HERE / ".cache" / "real")))
    ap.add_argument("--steps", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--lr", type=float, default=1e-4, help="as benchmarks/finetune.py's --lr-prune")
    ap.add_argument("--match", help="only the runs whose name contains this")
    ap.add_argument("--refit", default="one-shot", choices=["one-shot", "sequential"], help="--prune-refit")
    ap.add_argument("--calib-sentences", type=int, metavar="N", help="calibrate (pruning and int8) on N training "
                    "sentences (benchmarks/prune_sweep.py:training_calib) instead of the cache's 128")
    ap.add_argument("--calib-skip", type=int, default=0, metavar="K", help="with --calib-sentences: start after the "
                    "first K training sentences (1024: calibration disjoint from the fine-tuning sentences)")
    ap.add_argument("--replay-plan", action="store_true", help="fine-tune on the untrained run's placement with "
                    "its per-token ops moved to dynamic int8 (see above)")
    a = ap.parse_args()
    work = HERE / ".cache" / "finetune"
    work.mkdir(parents=True, exist_ok=True)
    out = HERE / ".cache" / "prune" / "minilm" / "finetune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"QUANTKIT_REAL_CACHE": str(a.cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    os.environ.update(env)
    case = prepare_minilm(a.cache, work)
    calib = ""
    if a.calib_sentences:
        sys.path.insert(0, str(HERE))
        from prune_sweep import training_calib

        case["calib"] = training_calib(a.calib_sentences, a.calib_skip)
        calib = f", {a.calib_sentences} calibration sentences" + (f" after {a.calib_skip}" if a.calib_skip else "")
    todo = [r for r in runs(a.steps, a.lr, case, a.refit, calib) if not a.match or a.match in r[0]]
    with tempfile.TemporaryDirectory(prefix="qk-prune-finetune-") as tmp:
        if a.replay_plan:
            todo = replayed(todo, case, Path(tmp), env, saver(out, "minilm"))
        bench(case, todo, minilm_metrics, Path(tmp), env, saver(out, "minilm"))
    results = json.loads(out.read_text())["minilm"]
    for name, r in results.items():
        m = r["metrics"]
        print(f"| {name} | {m['pooled cosine']:.4f} | {m['pooled cosine min']:.4f} | {m['token SQNR dB']:.1f} | "
              f"{r['cpu_minutes']:.1f} |")


if __name__ == "__main__":
    main()
