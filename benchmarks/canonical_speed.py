"""The fp32 model as shipped against quantkit's canonical form of it (graph/canonicalize.py: BatchNormalization
folded, HardSwish spelled x * Clip(x + 3, 0, 6) / 6 rewritten as x * HardSigmoid(x), ...), both in float: how
much of a quantized model's speed-up the graph rewrite alone gives.

    python benchmarks/canonical_speed.py --model layout|ocr_det|ocr_rec|ocr_cls|minilm [--rounds 10]

Speed as benchmarks/real_models.py times it (1 thread, that script's batch, interleaved, best of 3 medians);
also the largest absolute difference of the outputs on that batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import real_models as rmod  # noqa: E402 - the benchmarks folder is put on the path just above
from _real_data import CACHE  # noqa: E402

from quantkit.graph.canonicalize import canonicalize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=rmod.KINDS)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    d = CACHE / args.model
    data, _, _ = rmod.eval_set(args.model, d)
    feed = {k: v[:rmod.SPEED_BATCH[args.model]] for k, v in data.items()}
    with tempfile.TemporaryDirectory() as tmp:
        model = ir.load(d / "model.onnx")
        notes = canonicalize(model)
        out = Path(tmp) / "canonical.onnx"
        ir.save(model, out)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(rmod.session(d / "model.onnx").run(None, feed),
                                                               rmod.session(out).run(None, feed)))
        load = os.getloadavg()[0]
        ms = rmod.interleaved_best_ms({"shipped": d / "model.onnx", "canonical": out}, feed, args.rounds)
    print(f"{args.model}: " + "; ".join(notes))
    print(f"shipped {ms['shipped']:.1f} ms, canonical {ms['canonical']:.1f} ms: {ms['shipped'] / ms['canonical']:.2f}x "
          f"(largest output difference {diff:.1e}; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)")


if __name__ == "__main__":
    main()
