"""Issue 14, stop 26: quantkit's joint phase (`--prune-refit joint`'s last step, quantkit/prune/joint.py)
alone, on an already pruned and block-trained all-MiniLM-L6-v2 float model (benchmarks/prune_sweep.py's
output), to compare its losses without repeating the pruning and the block training.

    python benchmarks/prune_joint_phase.py PRUNED.onnx OUT.onnx [--steps 1500] [--lr 1e-4]
                                           [--loss outputs|pooled] [--calib-sentences 2352] [--cache DIR]

The phase runs through the API exactly as `quantize --prune ... --prune-refit joint` runs it after the
block training: the same calibration batches (N `training_calib` sentences, batches of 8, every 8th
held out), the original model (the cache's model.onnx, canonicalized as quantkit loads it) as the
teacher, and as the pruned blocks the FFN weights whose shapes the pruning changed. Scored on the
cache's 256 evaluation sentences against the unpruned fp32 model (benchmarks/real_models.py's metric),
before and after. Result: OUT.json beside OUT.onnx and on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402
from prune_sweep import DEFAULT_CACHE, load, training_calib  # noqa: E402


def pruned_weights(original, pruned) -> list[str]:
    """The initializers of `pruned` whose shape differs from the original's of the same name."""
    from quantkit.graph.ir_edit import const_array

    old = original.graph.initializers
    return [name for name, v in pruned.graph.initializers.items()
            if name in old and const_array(v) is not None and const_array(v).shape != const_array(old[name]).shape
            and const_array(v).ndim == 2]


def main() -> None:
    from quantkit import runtime
    from quantkit.load.onnx import load_onnx
    from quantkit.prune import joint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pruned", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--steps", type=int, default=joint.SETTINGS.steps)
    ap.add_argument("--lr", type=float, default=joint.SETTINGS.lr)
    ap.add_argument("--loss", choices=["outputs", "pooled"], default="outputs")
    ap.add_argument("--calib-sentences", type=int, default=2352)
    args = ap.parse_args()
    d = args.cache / "minilm"
    original, calib = load(d, training_calib(args.calib_sentences))
    pruned = load_onnx(args.pruned)
    layers = [{"weights": pruned_weights(original, pruned)}]
    settings = replace(joint.settings_for(args.steps, args.loss), lr=args.lr)
    evalset, _, _ = real_models.eval_set("minilm", d)
    ref = real_models.run_eval("minilm", d / "model.onnx", evalset)
    before = real_models.metrics("minilm", ref, real_models.run_eval("minilm", args.pruned, evalset), evalset, [], None)
    t, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        record = joint.train_joint(pruned, original, layers, lambda: calib.batches(8), Path(tmp), settings)
    seconds = time.perf_counter() - t
    runtime.save(pruned, args.out)
    after = real_models.metrics("minilm", ref, real_models.run_eval("minilm", args.out, evalset), evalset, [], None)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "before": before, "after": after,
              "seconds": round(seconds, 1), "load": [round(load0, 1), round(os.getloadavg()[0], 1)], "joint": record}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
