"""Issue 14's encoder target step by step: MiniLM with 30% of its FFN neurons pruned, static int8,
then recovery training (--finetune, distilled from the unpruned model), uniform against per-layer
(--prune-allocation sensitivity) ratios.

    python benchmarks/prune_finetune.py [--cache benchmarks/.cache/real] [--steps 300 1000] [--match TEXT]
                                        [--refit one-shot|sequential|train] [--calib-sentences N]
                                        [--replay-plan | --all-static] [--more-sentences N]
                                        [--finetune-sentences M] [--time] [--allocation uniform|sensitivity]
                                        [--trained-only]

--replay-plan: the int8 run without training writes its placement (--plan); its per-token dynamic
int8 ops (MatMulInteger + Round, which --finetune cannot run in torch) are moved to dynamic int8
(DynamicQuantizeMatMul, which it trains), and the fine-tuned runs replay that plan (--from-plan).
--all-static: every run (trained or not) on a plan keeping every op static int8 (nothing moved off
it; --from-plan, so no placement search).
--more-sentences N: calibrate on the first N sentences of benchmarks/_real_data.py:more_sentences()
(a larger corpus, disjoint from the evaluation set); --finetune-sentences M: train on the M after them.
--time: single-thread speed of every output against the run's own fp32 export (batch 8 of the
evaluation set, interleaved, best of 3 medians: benchmarks/real_models.py:interleaved_best_ms).

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.finetune import bench, minilm_metrics, prepare_minilm, saver  # noqa: E402


def runs(steps: list[int], lr: float, case: dict, refit: str = "one-shot", calib: str = "",
         allocations: tuple[str, ...] = ("uniform", "sensitivity")) -> list[tuple[str, list[str]]]:
    ft = ["--finetune-data", case["finetune_data"], "--lr", str(lr)]
    out = []
    for allocation in allocations:
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


def all_static(todo: list[tuple[str, list[str]]], case: dict, tmp: Path) -> list:
    """Every row on a plan that keeps every op static int8 (--from-plan: no placement search)."""
    from quantkit.load.onnx import file_sha256

    plan = tmp / "plan_all_static.json"
    plan.write_text(json.dumps({"format": "quantkit-plan-1", "nodes": {}, "speed_dropped": [],
                                "model_sha256": file_sha256(case["model"]), "target": "every op static int8"}))
    return [(n + ", every op static int8", [*a, "--from-plan", str(plan)]) for n, a in todo]


def timed(case: dict, paths: dict[str, Path], rounds: int) -> dict[str, float]:
    """Single-thread ms of each model (the run's fp32 export among them) on a batch of 8 evaluation
    sentences, interleaved."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from real_models import interleaved_best_ms

    with np.load(case["eval"]) as ev:
        feed = {k: ev[k][:8] for k in ("input_ids", "attention_mask")}
    return interleaved_best_ms(paths, feed, rounds)


def data_files(a: argparse.Namespace, case: dict) -> str:
    """Point the case's calibration (and training) data at the chosen sentences; the runs' name suffix."""
    sys.path.insert(0, str(HERE))
    from prune_sweep import training_calib

    calib = ""
    if a.more_sentences:
        case["calib"] = training_calib(a.more_sentences, more=a.more_corpus, prefix=a.prefix)
        calib = f", {a.more_sentences} calibration sentences (more_sentences, {a.more_corpus})"
    elif a.calib_sentences:
        case["calib"] = training_calib(a.calib_sentences, a.calib_skip, prefix=a.prefix)
        calib = f", {a.calib_sentences} calibration sentences" + (f" after {a.calib_skip}" if a.calib_skip else "")
    if a.finetune_sentences:
        case["finetune_data"] = training_calib(a.finetune_sentences, a.more_sentences or 0, more=a.more_corpus,
                                                prefix=a.prefix)
        calib += f", trained on {a.finetune_sentences} more_sentences ({a.more_corpus})"
    return calib


def main() -> None:
    sys.path.insert(0, str(HERE))
    from prune_sweep import add_corpus_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QUANTKIT_REAL_CACHE", HERE / ".cache" / "real")))
    ap.add_argument("--steps", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--lr", type=float, default=1e-4, help="as benchmarks/finetune.py's --lr-prune")
    ap.add_argument("--match", help="only the runs whose name contains this")
    ap.add_argument("--allocation", nargs="+", default=["uniform", "sensitivity"], choices=["uniform", "sensitivity"])
    ap.add_argument("--trained-only", action="store_true", help="only the --finetune runs")
    ap.add_argument("--refit", default="one-shot", choices=["one-shot", "sequential", "train"], help="--prune-refit")
    ap.add_argument("--calib-sentences", type=int, metavar="N", help="calibrate (pruning and int8) on N training "
                    "sentences (benchmarks/prune_sweep.py:training_calib) instead of the cache's 128")
    ap.add_argument("--calib-skip", type=int, default=0, metavar="K", help="with --calib-sentences: start after the "
                    "first K training sentences (1024: calibration disjoint from the fine-tuning sentences)")
    ap.add_argument("--replay-plan", action="store_true", help="fine-tune on the untrained run's placement with "
                    "its per-token ops moved to dynamic int8 (see above)")
    ap.add_argument("--all-static", action="store_true", help="every run on a plan keeping every op static int8 "
                    "(see above)")
    add_corpus_options(ap)
    ap.add_argument("--finetune-sentences", type=int, metavar="M", help="--finetune-data: the M more_sentences() "
                    "after the calibration ones instead of benchmarks/finetune.py's 1,024")
    ap.add_argument("--prefix", default="", help="prefix of everything written under benchmarks/.cache/prune/minilm/ "
                    "(with it, the checkpoint and training data go there too instead of benchmarks/.cache/finetune/)")
    ap.add_argument("--time", action="store_true", help="time every output against the run's fp32 export")
    ap.add_argument("--rounds", type=int, default=10, help="--time: interleaved runs per repetition")
    a = ap.parse_args()
    out = HERE / ".cache" / "prune" / "minilm" / f"{a.prefix}finetune.json"
    work = out.parent / f"{a.prefix}finetune_runs"  # the outputs are kept (for --time)
    work.mkdir(parents=True, exist_ok=True)
    env = {"QUANTKIT_REAL_CACHE": str(a.cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    os.environ.update(env)
    prep = out.parent / f"{a.prefix}finetune_prep" if a.prefix else HERE / ".cache" / "finetune"
    prep.mkdir(parents=True, exist_ok=True)
    case = prepare_minilm(a.cache, prep)
    calib = data_files(a, case)
    todo = [r for r in runs(a.steps, a.lr, case, a.refit, calib, tuple(a.allocation))
            if (not a.match or a.match in r[0]) and (not a.trained_only or "--finetune" in r[1])]
    names = [n for n, args in todo if "--finetune" not in args]
    if a.all_static:
        todo, names = all_static(todo, case, work), []
    elif a.replay_plan:
        todo = replayed(todo, case, work, env, saver(out, "minilm"))
    else:
        names = []
    names += [n for n, _ in todo]
    bench(case, todo, minilm_metrics, work, env, saver(out, "minilm"))
    results = json.loads(out.read_text())["minilm"]
    if a.time:
        ms = timed(case, {"fp32": work / "fp32.onnx", **{n: Path(results[n]["path"]) for n in names}}, a.rounds)
        load = os.getloadavg()
        for n in names:
            results[n]["speed"] = {"ms": ms[n], "fp32_ms": ms["fp32"], "vs_fp32": ms["fp32"] / ms[n], "load": load}
            saver(out, "minilm")(n, results[n])
    for name, r in results.items():
        m, sp = r["metrics"], r.get("speed")
        speed = f"{sp['vs_fp32']:.2f}x" if sp else "-"
        print(f"| {name} | {m['pooled cosine']:.4f} | {m['pooled cosine min']:.4f} | {m['token SQNR dB']:.1f} | "
              f"{r['cpu_minutes']:.1f} | {speed} |")


if __name__ == "__main__":
    main()
