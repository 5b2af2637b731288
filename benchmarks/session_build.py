"""What it costs to open an onnxruntime session on an in-memory model, with every weight serialized into
the bytes onnxruntime parses against quantkit's runtime.session (the larger weights handed over as arrays,
SessionOptions.add_external_initializers), and what reading a model file's size costs the first time and
once remembered (load/onnx.py:model_bytes).

    python benchmarks/session_build.py [--model minilm] [--repeats 5] [--cache DIR]

Best of `--repeats` for each, alternating; the outputs of the two sessions on a zero feed are compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantkit import runtime  # noqa: E402
from quantkit.load import onnx as load_onnx  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("QUANTKIT_REAL_CACHE", ROOT / "benchmarks" / ".cache" / "real"))


def _serialized(model: ir.Model):
    return ort.InferenceSession(runtime._serialized(model), sess_options=runtime.session_options(1),
                                providers=["CPUExecutionProvider"])


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = ap.parse_args()
    path = a.cache / a.model / "model.onnx"
    model = ir.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        handed = _best(lambda: runtime.session(model, Path(tmp), threads=1), a.repeats)
        serialized = _best(lambda: _serialized(model), a.repeats)
        s1, s2 = _serialized(model), runtime.session(model, Path(tmp), threads=1)
    feed = {i.name: np.zeros([d if isinstance(d, int) else 2 for d in i.shape], np.int64 if "int64" in i.type
                             else np.float32) for i in s1.get_inputs()}
    same = all(np.array_equal(x, y) for x, y in zip(s1.run(None, feed), s2.run(None, feed)))

    def first():
        load_onnx._locations.cache_clear()
        load_onnx.model_bytes(path)

    cold = _best(first, a.repeats)
    load_onnx.model_bytes(path)
    warm = _best(lambda: load_onnx.model_bytes(path), a.repeats)
    mb = load_onnx.model_bytes(path) / 2**20
    print(f"{a.model} ({mb:.1f} MB), best of {a.repeats}, load average {os.getloadavg()[0]:.1f}\n")
    print("| what | seconds |\n| --- | ---: |")
    print(f"| session, every weight serialized | {serialized:.3f} |")
    print(f"| session, weights handed as arrays (runtime.session) | {handed:.3f} |")
    print(f"| model_bytes, file parsed | {cold:.3f} |")
    print(f"| model_bytes, remembered | {warm:.5f} |")
    print(f"\nsame outputs on a zero feed: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
