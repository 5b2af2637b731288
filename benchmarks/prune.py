"""Pruning + quantization on real pretrained models: accuracy against fp32 on held-out data,
size and single-thread speed of pruned + int8 models against int8 alone and fp32.

    python benchmarks/prune.py --model minilm|ocr_rec|ocr_cls [--cache DIR] [--rounds N] [--prefix P]
                               [--calib-sentences N]  (minilm: calibrate on N training sentences)
                               [--more-sentences N]   (minilm: ... on N sentences of _real_data.more_sentences())
                               [--only TEXT...] [--reuse]  (rows whose name holds TEXT; --reuse: models
                               already written are scored and timed again, not quantized again)

The models and data are the ones benchmarks/real_models.py prepares (benchmarks/_real_data.py)
under DIR (default benchmarks/.cache/real; `QUANTKIT_REAL_CACHE` overrides). Every quantkit run is
the CLI in its own process; outputs go to benchmarks/.cache/prune/<model>/. The "pruned fp32"
row is the pruning step alone (quantkit.prune through the API, no quantization) to separate the
two sources of error. Speed: 1 intra-op thread, one fixed batch, all models interleaved round by
round, best of 3 medians (benchmarks/real_models.py:interleaved_best_ms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402
from real_models import run_tool  # noqa: E402

from _measure import ROOT, quantkit_cmd  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("QUANTKIT_REAL_CACHE", ROOT / "benchmarks" / ".cache" / "real"))


def runs_for(kind: str, d: Path, calib: Path | None = None) -> dict[str, list]:
    """Each row: the quantkit arguments after MODEL (output, threads and force added)."""
    calib = calib or d / "calib.npz"
    if kind == "minilm":
        # dynamic int8 is quantkit's fast int8 on this model (static int8 keeps most MatMuls float to
        # meet its default accuracy budget; see BENCHMARKS.md, real models)
        int8 = ["--activations", "dynamic", "--calib", calib]
        int4 = ["--weights", "int4", "--block-size", "128", "--calib", calib]
        joint = ["--calib", calib, "--prune", "0.3", "--prune-allocation", "sensitivity", "--prune-refit", "joint",
                 "--prune-train-steps", "2000"]
        # issue 14, stop 27: exactly 30% (--prune-fixed, no ratio search), the target steering int8 alone,
        # measured against the pruned float model
        fixed = {f"prune 30% FFN (sensitivity, joint 3000, fixed) + static int8 to --min-cosine {x}":
                 [*joint, "--prune-joint-steps", "3000", "--prune-fixed", "--min-cosine", x]
                 for x in ("0.9986", "0.9987", "0.9988")}
        return {"int8 (dynamic)": int8,
                "prune 10% FFN + int8": [*int8, "--prune", "0.1"],
                "prune 30% FFN + int8": [*int8, "--prune", "0.3"],
                "prune 30% FFN (sensitivity) + int8": [*int8, "--prune", "0.3", "--prune-allocation", "sensitivity"],
                "prune 30% FFN (sequential) + int8": [*int8, "--prune", "0.3", "--prune-refit", "sequential"],
                "int8 (static)": ["--calib", calib],
                "prune 30% FFN (sequential) + static int8": ["--calib", calib, "--prune", "0.3",
                                                             "--prune-refit", "sequential"],
                "prune 30% FFN (train) + static int8": ["--calib", calib, "--prune", "0.3", "--prune-refit", "train"],
                "prune 30% FFN (sequential, sensitivity) + static int8": [
                    "--calib", calib, "--prune", "0.3", "--prune-refit", "sequential",
                    "--prune-allocation", "sensitivity"],
                # issue 14, stop 26: stop 24's S3 settings plus the joint phase, one command from the original model
                "prune 30% FFN (sensitivity, joint) + static int8": [*joint],
                "prune 30% FFN (sensitivity, joint pooled) + static int8": [*joint, "--prune-joint-loss", "pooled"],
                **fixed,
                "prune 25% heads + int8": [*int8, "--prune", "0.25", "--prune-structure", "head"],
                "int4 (block 128)": int4,
                "unstructured 50% wanda + int4": [*int4, "--prune", "0.5", "--prune-structure", "unstructured"],
                "unstructured 50% sparsegpt + int4": [*int4, "--prune", "0.5", "--prune-structure", "unstructured",
                                                      "--prune-method", "sparsegpt"]}
    int8 = ["--calib", calib]
    sens = ["--prune-allocation", "sensitivity"]
    return {"int8 (static)": int8,
            "prune 30% channels + int8": [*int8, "--prune", "0.3"],
            "prune 50% channels + int8": [*int8, "--prune", "0.5"],
            **{f"prune {p}% MACs (sensitivity) + int8": [*int8, "--prune", str(p / 100), *sens]
               for p in (10, 12.5, 15, 20, 30, 40)}}


def pruned_fp32(d: Path, ratio: float, out: Path) -> Path:
    """The pruning step alone, through the API: the model canonicalized and pruned, not quantized."""
    from quantkit import runtime
    from quantkit.calibrate.data import assign_batch_axes
    from quantkit.config import PruneConfig
    from quantkit.graph import shapes
    from quantkit.graph.canonicalize import canonicalize
    from quantkit.load.onnx import input_specs, load_onnx
    from quantkit.load.source import open_data
    from quantkit.prune import prune

    model = load_onnx(d / "model.onnx")
    canonicalize(model)
    shapes.infer(model)
    calib = open_data(d / "calib.npz", assign_batch_axes(input_specs(model), {}), None)
    feed = next(calib.batches(8))
    with tempfile.TemporaryDirectory() as tmp:
        prune(model, PruneConfig(ratio=ratio), lambda: calib.batches(8), feed, Path(tmp))
    runtime.save(model, out)
    return out


def bench(kind: str, cache: Path, rounds: int, only: list[str] | None = None,
          pruned: list[Path] | None = None, calib: Path | None = None, prefix: str = "",
          pruned_int8: str = "", min_cosine: float | None = None, reuse: bool = False) -> dict:
    d = cache / kind
    out = ROOT / "benchmarks" / ".cache" / "prune" / kind
    out.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs: dict[str, dict] = {"fp32": {"path": str(d / "model.onnx")}}
    if not only:
        fp32_pruned = pruned_fp32(d, 0.3, out / f"{prefix}pruned30_fp32.onnx")
        runs["pruned 30% fp32 (no quantization)"] = {"path": str(fp32_pruned)}
    rows = {name: (d / "model.onnx", args) for name, args in runs_for(kind, d, calib).items()}
    int8_args = next(args for name, args in runs_for(kind, d, calib).items() if name.startswith("int8" + pruned_int8))
    # an already pruned float model (e.g. benchmarks/prune_sweep.py's) quantized as int8 alone is: its
    # placement then holds the default budget against the pruned model instead of the unpruned one
    target = ["--min-cosine", min_cosine] if min_cosine is not None else []
    suffix = f", min-cosine {min_cosine:g}" if min_cosine is not None else ""
    rows.update({f"{p.stem} then int8{pruned_int8}{suffix}": (p.resolve(), [*int8_args, *target])
                 for p in pruned or []})
    for name, (source, args) in rows.items():
        if only and not name.startswith("int8") and not any(o in name for o in only) and source == d / "model.onnx":
            continue
        stem = name.replace(" ", "_").replace("%", "").replace("+", "").replace("(", "").replace(")", "")
        path = out / f"{prefix}{stem}.onnx"
        report = path.with_suffix(".json")
        print(f"[{kind}] {name} ...", file=sys.stderr, flush=True)
        # with a large calibration set, the report's own evaluation on the held-out set instead of on all of
        # it (the model written is the same; the figures below are measured here anyway)
        scored = ["--eval", d / "eval.npz"] if calib is not None else []
        cmd = quantkit_cmd("quantize", source, *args, *scored, "-o", path, "--report", report,
                           "--threads", 1, "--force", "-q")
        if reuse and path.exists() and report.exists():  # scored and timed again, not quantized again
            runs[name] = {"path": str(path), "reused": True, "command": " ".join(map(str, cmd[2:]))}
        else:
            runs[name] = {**run_tool(cmd, path, env), "command": " ".join(map(str, cmd[2:]))}
        if runs[name]["path"]:
            p = json.loads(report.read_text()).get("pruning")
            if p:
                runs[name]["pruning"] = {k: p.get(k) for k in ("params_before", "params_after", "macs_before",
                                                               "macs_after", "nonzero_before", "nonzero_after")}
                if p.get("joint"):  # --prune-refit joint's record
                    runs[name]["joint"] = p["joint"]
    return evaluate(kind, d, runs, rounds)


def evaluate(kind: str, d: Path, runs: dict, rounds: int) -> dict:
    """Scored and timed as benchmarks/real_models.py does, fp32 among the runs."""
    return {"timing": real_models.evaluate(kind, d, runs, rounds), "runs": runs}


def table(kind: str, result: dict) -> str:
    runs, timing = result["runs"], result["timing"]
    cols = list(runs["fp32"]["metrics"])
    int8 = next(k for k in runs if k.startswith("int8"))
    fp32_bytes = Path(runs["fp32"]["path"]).stat().st_size
    lines = [f"### {kind}", "",
             f"speed at 1 thread, batch {timing['speed_batch']}, best of 3 medians of {timing['rounds']} interleaved "
             f"runs; load average {timing['load_before'][0]:.1f} before, {timing['load_after'][0]:.1f} after.", "",
             "| model | " + " | ".join(cols) + " | MB | size ratio | ms | vs fp32 | vs int8 | MACs after/before |",
             "| --- |" + " ---: |" * (len(cols) + 6)]
    for name, r in runs.items():
        if "metrics" not in r:
            lines.append(f"| {name} | failed: {r.get('error')} |" + " |" * (len(cols) + 4))
            continue
        vals = " | ".join(f"{r['metrics'][c]:.4f}" if "cosine" in c else f"{r['metrics'][c]:.1f}" for c in cols)
        p = r.get("pruning")
        macs = f"{p['macs_after'] / p['macs_before']:.2f}" if p and p.get("macs_before") and p.get("macs_after") \
            else "-"
        mb = fp32_bytes / r["size_ratio"] / 1e6
        lines.append(f"| {name} | {vals} | {mb:.2f} | {r['size_ratio']:.2f}x | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{runs[int8]['ms'] / r['ms']:.2f}x | {macs} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in runs.values() if r.get("command")]
    return "\n".join(lines)


def main() -> None:
    from prune_sweep import add_corpus_options, training_calib

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=["minilm", "ocr_rec", "ocr_cls"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the prepared real models")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing runs per repetition")
    ap.add_argument("--only", nargs="+", metavar="TEXT", help="only the rows whose name contains one of these "
                    "(fp32 and int8 alone are always run)")
    ap.add_argument("--pruned", type=Path, nargs="+", help="pruned float models (benchmarks/prune_sweep.py writes "
                    "them) to quantize as int8 alone is, each one more row")
    ap.add_argument("--prefix", default="", help="prefix of the files written under benchmarks/.cache/prune/<model>/")
    ap.add_argument("--pruned-int8", default="", choices=["static", "dynamic"], help="--pruned: quantized "
                    "as this int8 row is (default: the first int8 row: minilm dynamic, the others static)")
    ap.add_argument("--min-cosine", type=float, help="--pruned: quantized with this placement target (quantize "
                    "--min-cosine, measured against the pruned model it is given) instead of the default budget")
    ap.add_argument("--reuse", action="store_true", help="a row whose model and report are already written (same "
                    "--prefix) is scored and timed again without running quantkit again")
    ap.add_argument("--calib-sentences", type=int, metavar="N", help="minilm: calibrate every run on N training "
                    "sentences (benchmarks/prune_sweep.py:training_calib) instead of the cache's 128")
    add_corpus_options(ap)
    args = ap.parse_args()
    calib = None
    if args.calib_sentences:
        calib = training_calib(args.calib_sentences)
    if args.more_sentences:
        calib = training_calib(args.more_sentences, more=args.more_corpus)
    result = bench(args.model, args.cache, args.rounds, args.only, args.pruned, calib, args.prefix,
                   f" ({args.pruned_int8})" if args.pruned_int8 else "", args.min_cosine, args.reuse)
    name = "results.json" if not args.only else "results_" + "_".join(args.only).replace(" ", "-") + ".json"
    name = args.prefix + name
    out = ROOT / "benchmarks" / ".cache" / "prune" / args.model / name
    out.write_text(json.dumps(result, indent=1, default=str))
    print(table(args.model, result))


if __name__ == "__main__":
    main()
