"""Where a model's time goes in onnxruntime, per op type: kernel time from onnxruntime's own profiler
(SessionOptions.enable_profiling), 1 thread, on real_models.py's speed batch, averaged over the runs after warm-up.

    python benchmarks/op_profile.py --model layout [--canonical] [--runs 10] [QUANTIZED.onnx ...]

Profiles the shipped fp32 model, with --canonical also quantkit's canonical form of it (graph/canonicalize.py,
still fp32), then each model file given. Prints per model the total kernel ms per run and the op types that
take the most of it (the profiler's own overhead makes totals higher than plain timings).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import real_models as rmod  # noqa: E402 - the benchmarks folder is put on the path just above
from _real_data import CACHE  # noqa: E402

from quantkit.graph.canonicalize import canonicalize  # noqa: E402


def profile(path: Path, feed: dict, runs: int, tmp: Path, top: int = 10) -> tuple[float, list[tuple[str, float, int]]]:
    """(kernel ms per run, [(op type, ms per run, nodes)] largest first) over `runs` runs after 3 warm-ups."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / path.stem)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(3 + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    total, nodes = Counter(), Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    n = 3 + runs  # the profiler records the warm-up runs too
    rows = [(op, us / n / 1e3, nodes[op] // n) for op, us in total.most_common(top)]
    return sum(total.values()) / n / 1e3, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=rmod.KINDS)
    ap.add_argument("--canonical", action="store_true", help="also quantkit's canonical fp32 form of the model")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("files", nargs="*", type=Path, help="more model files of the same model (e.g. quantized)")
    args = ap.parse_args()
    d = CACHE / args.model
    data, _, _ = rmod.eval_set(args.model, d)
    feed = {k: v[:rmod.SPEED_BATCH[args.model]] for k, v in data.items()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"shipped fp32": d / "model.onnx"}
        if args.canonical:
            model = ir.load(d / "model.onnx")
            canonicalize(model)
            paths["canonical fp32"] = Path(tmp) / "canonical.onnx"
            ir.save(model, paths["canonical fp32"])
        paths.update({str(f): f for f in args.files})
        for name, path in paths.items():
            total, rows = profile(path, feed, args.runs, Path(tmp))
            print(f"{name}: {total:.1f} ms of kernels per run; " + ", ".join(
                f"{op} {ms:.1f} ({n})" for op, ms, n in rows))


if __name__ == "__main__":
    main()
