"""Channel pruning alone (no quantization) at several ratios, uniform against per-layer ratios
from the sensitivity curves: accuracy against fp32 on the held-out evaluation set and the MACs
left, on the real models of benchmarks/real_models.py.

    python benchmarks/prune_sweep.py --model ocr_rec|ocr_cls|minilm [--ratios 0.1 0.2 0.3]
                                     [--allocation uniform sensitivity] [--refit one-shot sequential]
                                     [--refit ... train [--train steps=1500 lr=1e-4 ...] [--train-more N]]
                                     [--refit joint [--train-steps N] [--joint-steps N]]
                                     [--calib FILE.npz | --calib-sentences N | --more-sentences N]
                                     [--more-corpus all|stdlib] [--cache DIR]

Pruning goes through quantkit's API (quantkit.prune.prune, the step `quantize --prune` runs before
quantizing), on the calibration set in batches of 8; the sensitivity curves are measured once per
model and reused for every ratio (as the ratio search does). Results: the table on stdout and
benchmarks/.cache/prune/<model>/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402

from _measure import ROOT  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("QUANTKIT_REAL_CACHE", ROOT / "benchmarks" / ".cache" / "real"))


def training_calib(n: int, skip: int = 0, more: str = "", prefix: str = "") -> Path:
    """MiniLM calibration data of n sentences the evaluation set does not hold: sentences 384+skip ..
    384+skip+n-1 of benchmarks/_real_data.py's list (the cache took [0, 384) for calib + eval; 2,352
    in all; the first 1,024 are benchmarks/finetune.py's training sentences), padded to 50 tokens.
    more="all": sentences skip .. skip+n-1 of _real_data.more_sentences() instead (about 108,000,
    disjoint from that list); more="stdlib": of its reference-manual and standard-library part (10,758)."""
    from _real_data import sentences, tokenize

    kind = {'': '', 'all': 'more_', 'stdlib': 'stdlib_'}[more]
    name = f"{prefix}{kind}calib_{n}{f'_from{skip}' if skip else ''}.npz"
    path = ROOT / "benchmarks" / ".cache" / "prune" / "minilm" / name
    if not path.exists():
        texts = _more(more, prefix)[skip:skip + n] if more else sentences()[384 + skip:384 + skip + n]
        ids, mask = tokenize(texts, max_len=50)
        full_ids, full_mask = np.zeros((len(texts), 50), np.int64), np.zeros((len(texts), 50), np.int64)
        full_ids[:, :ids.shape[1]], full_mask[:, :mask.shape[1]] = ids, mask
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, input_ids=full_ids, attention_mask=full_mask)
    return path


def _more(corpus: str, prefix: str = "") -> list[str]:
    """_real_data.more_sentences() ("all"; "stdlib": packages=()), kept in a JSON file next to the data
    made from it (reading ~10,000 source files takes a minute)."""
    from _real_data import more_sentences

    name = prefix + ("more_sentences_stdlib.json" if corpus == "stdlib" else "more_sentences.json")
    path = ROOT / "benchmarks" / ".cache" / "prune" / "minilm" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(more_sentences() if corpus == "all" else more_sentences(())))
    return json.loads(path.read_text())


def load(d: Path, calib_file: Path | None = None):
    from quantkit.calibrate.data import assign_batch_axes
    from quantkit.graph import shapes
    from quantkit.graph.canonicalize import canonicalize
    from quantkit.load.onnx import input_specs, load_onnx
    from quantkit.load.source import open_data

    model = load_onnx(d / "model.onnx")
    canonicalize(model)
    shapes.infer(model)
    calib = open_data(calib_file or d / "calib.npz", assign_batch_axes(input_specs(model), {}), None)
    return model, calib


def sweep(kind: str, d: Path, ratios: list[float], allocations: list[str], out: Path,
          curves_file: Path | None = None, refits: tuple[str, ...] = ("one-shot",),
          calib_file: Path | None = None, prefix: str = "", train_file: Path | None = None,
          steps: dict | None = None) -> list[dict]:
    from dataclasses import asdict

    from quantkit import runtime
    from quantkit.config import PruneConfig
    from quantkit.prune import prune
    from quantkit.prune.allocate import Curve

    model, calib = load(d, calib_file)
    extra = load(d, train_file)[1] if train_file is not None else None
    feed = next(calib.batches(8))
    data, truth, alphabet = real_models.eval_set(kind, d)
    ref = real_models.run_eval(kind, d / "model.onnx", data)
    rows = [{"allocation": "-", "ratio": 0.0, "macs": 1.0,
             "metrics": real_models.metrics(kind, ref, ref, data, truth, alphabet), "seconds": 0.0}]
    for allocation, refit in ((a, r) for a in allocations for r in refits):
        cache: dict = {}
        if allocation == "sensitivity" and curves_file is not None and curves_file.exists():
            cache["curves"] = [Curve(**c) for c in json.loads(curves_file.read_text())]
        for ratio in ratios:
            print(f"[{kind}] {allocation} {refit} {ratio:.0%} ...", file=sys.stderr, flush=True)
            candidate = model.clone()
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                section = prune(candidate, PruneConfig(ratio=ratio, allocation=allocation, refit=refit,
                                                       **(steps or {})),
                                lambda: calib.batches(8), feed, Path(tmp), cache,
                                train_batches=(lambda: extra.batches(8)) if extra is not None else None)
            seconds = time.perf_counter() - t
            path = out / f"{prefix}sweep_{allocation}_{refit}_{round(ratio * 100)}.onnx"
            runtime.save(candidate, path)
            q = real_models.run_eval(kind, path, data)
            rows.append({"allocation": allocation if refit == "one-shot" else f"{allocation}, {refit}",
                         "training": [la.get("training") for la in section["layers"]],
                         "ratio": ratio, "seconds": round(seconds, 1),
                         "macs": section["macs_after"] / section["macs_before"],
                         "metrics": real_models.metrics(kind, ref, q, data, truth, alphabet),
                         "layers": {la["layer"]: round(la["ratio"], 3) for la in section["layers"]},
                         "sensitivity": section.get("sensitivity")})
        if allocation == "sensitivity" and curves_file is not None and "curves" in cache:
            curves_file.write_text(json.dumps([asdict(c) for c in cache["curves"]]))
    return rows


def tables_share(kind: str, d: Path, ratio: float, methods: list[str], out: Path) -> list[dict]:
    """Unstructured pruning alone (fp32): every layer as `quantize --prune-structure unstructured`
    prunes them, against the same with the embedding tables (Gather) put back dense afterwards,
    to show what pruning the tables costs."""
    from quantkit import runtime
    from quantkit.config import PruneConfig
    from quantkit.prune import prune

    model, calib = load(d)
    feed = next(calib.batches(8))
    tables = {n.inputs[0].name: n.inputs[0].const_value for n in model.graph
              if n.op_type == "Gather" and n.inputs[0].const_value is not None}
    with np.load(d / "eval.npz") as z:
        data = {k: z[k] for k in z.files if k != "labels"}
    ref = real_models.run_eval(kind, d / "model.onnx", data)
    rows = []
    for method in methods:
        candidate = model.clone()
        with tempfile.TemporaryDirectory() as tmp:
            prune(candidate, PruneConfig(ratio=ratio, structure="unstructured", method=method),
                  lambda: calib.batches(8), feed, Path(tmp))
        for tables_pruned in (True, False):
            if not tables_pruned:
                for name, tensor in tables.items():
                    candidate.graph.initializers[name].const_value = tensor
            path = out / f"unstructured_{method}_{'all' if tables_pruned else 'dense_tables'}.onnx"
            runtime.save(candidate, path)
            q = real_models.run_eval(kind, path, data)
            rows.append({"allocation": f"unstructured {method}, tables {'pruned' if tables_pruned else 'dense'}",
                         "ratio": ratio, "macs": 1.0, "seconds": 0.0,
                         "metrics": real_models.metrics(kind, ref, q, data, [], None)})
    return rows


def table(kind: str, rows: list[dict]) -> str:
    cols = list(rows[0]["metrics"])
    lines = [f"### {kind}: pruning alone (fp32)", "",
             "| allocation | ratio | MACs after/before | " + " | ".join(cols) + " | prune s |",
             "| --- | ---: | ---: |" + " ---: |" * (len(cols) + 1)]
    for r in rows:
        vals = " | ".join(f"{r['metrics'][c]:.4f}" if "cosine" in c else f"{r['metrics'][c]:.1f}" for c in cols)
        lines.append(f"| {r['allocation']} | {r['ratio']:.0%} | {r['macs']:.3f} | {vals} | {r['seconds']} |")
    return "\n".join(lines)


def add_corpus_options(ap: argparse.ArgumentParser) -> None:
    """--more-sentences / --more-corpus (training_calib's `more`), shared with prune.py and prune_finetune.py."""
    ap.add_argument("--more-sentences", type=int, metavar="N", help="minilm: calibrate on the first N sentences of "
                    "_real_data.more_sentences() (the larger corpus, disjoint from the evaluation set)")
    ap.add_argument("--more-corpus", default="all", choices=["all", "stdlib"], help="--more-sentences from all of "
                    "more_sentences() or from its reference-manual and standard-library part only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=["minilm", "ocr_rec", "ocr_cls"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the prepared real models")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--allocation", nargs="+", default=["uniform", "sensitivity"], choices=["uniform", "sensitivity"])
    ap.add_argument("--refit", nargs="+", default=["one-shot"], choices=["one-shot", "sequential", "train", "joint"])
    ap.add_argument("--train-steps", type=int, help="--refit train/joint: as quantize --prune-train-steps")
    ap.add_argument("--joint-steps", type=int, help="--refit joint: as quantize --prune-joint-steps")
    ap.add_argument("--train", nargs="+", metavar="KEY=VALUE", default=[], help="--refit train: override "
                    "quantkit.prune.blocktrain.SETTINGS fields (steps, batch, lr, every, patience, holdout)")
    ap.add_argument("--calib", type=Path, help="calibration .npz instead of the cache's calib.npz (e.g. "
                    "benchmarks/finetune.py's 1,024 training sentences, .cache/finetune/minilm_finetune.npz)")
    ap.add_argument("--calib-sentences", type=int, metavar="N", help="minilm: calibrate on N training sentences "
                    "(training_calib; up to 2352) instead of the cache's 128")
    add_corpus_options(ap)
    ap.add_argument("--ridge", type=float, nargs="+", metavar="FRACTION", help="instead of quantkit's ridge "
                    "(prune/refit.py:ridge_for), each of these fixed fractions of the Gram's mean diagonal in turn")
    ap.add_argument("--train-more", type=int, metavar="N", help="--refit train: the block training also on the first "
                    "N sentences of more_sentences() (--more-corpus), which the refit does not see")
    ap.add_argument("--prefix", default="", help="prefix of the files written (models and sweep.json)")
    ap.add_argument("--curves", type=Path, help="JSON file of the sensitivity curves: read when it exists (the "
                    "curves depend on the model and calibration data only), else written after measuring them")
    ap.add_argument("--unstructured-tables", nargs="+", metavar="METHOD", choices=["magnitude", "wanda", "sparsegpt"],
                    help="instead: unstructured pruning at the first --ratios, embedding tables pruned vs kept dense")
    args = ap.parse_args()
    if args.train:
        from dataclasses import replace

        from quantkit.prune import blocktrain

        blocktrain.SETTINGS = replace(blocktrain.SETTINGS, **{k: float(v) if k == "lr" else int(v)
                                                              for k, v in (kv.split("=") for kv in args.train)})
    train_file = training_calib(args.train_more, more=args.more_corpus, prefix=args.prefix) if args.train_more else None
    if args.calib_sentences:
        args.calib = training_calib(args.calib_sentences)
    if args.more_sentences:
        args.calib = training_calib(args.more_sentences, more=args.more_corpus)
    out = ROOT / "benchmarks" / ".cache" / "prune" / args.model
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    if args.unstructured_tables:
        rows = tables_share(args.model, args.cache / args.model, args.ratios[0], args.unstructured_tables, out)
    elif args.ridge:
        from quantkit.prune import refit

        rows = []
        for fraction in args.ridge:
            refit.ridge_for = lambda gram, f=fraction: f  # every refit (and OBS target fit) reads it here
            got = sweep(args.model, args.cache / args.model, args.ratios, args.allocation, out, args.curves,
                        tuple(args.refit), args.calib, args.prefix, train_file)
            rows += [{**r, "allocation": f"{r['allocation']}, ridge {fraction:g}"} for r in got[1:]]
    else:
        steps = {k: v for k, v in (("train_steps", args.train_steps), ("joint_steps", args.joint_steps)) if v}
        rows = sweep(args.model, args.cache / args.model, args.ratios, args.allocation, out, args.curves,
                     tuple(args.refit), args.calib, args.prefix, train_file, steps)
    name = args.prefix + ("sweep_tables.json" if args.unstructured_tables else "sweep.json")
    (out / name).write_text(json.dumps(rows, indent=1, default=str))
    print(table(args.model, rows))
    print(f"\nload average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
