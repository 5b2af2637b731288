"""Score quantized models against their fp32 original, the same way for every tool: the same
eval batches through onnxruntime, the same comparison code as quantkit's report, latency
interleaved against fp32 in one process."""

from __future__ import annotations

import time
from pathlib import Path

import onnxruntime as ort

from quantkit.calibrate.data import LABELS, DataSource
from quantkit.load.onnx import input_specs, load_onnx, model_bytes
from quantkit.report.compare import OutputComparison
from quantkit.report.latency import compare_latency


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(model: Path, data: Path, batch: int = 8, limit: int | None = None):
    specs = input_specs(load_onnx(model))
    names = {s.name for s in specs}
    for b in DataSource(data, specs).batches(batch, limit):
        yield {k: v for k, v in b.items() if k in names}, b.get(LABELS)


def forward_seconds(model: Path, data: Path, batch: int = 8, limit: int | None = None) -> float:
    """Plain fp32 inference over the data: the yardstick for calibration time."""
    sess = session(model)
    batches = [f for f, _ in feeds(model, data, batch, limit)]
    sess.run(None, batches[0])  # warm-up, as a calibrator's session is warm after its first batch
    t = time.perf_counter()
    for f in batches:
        sess.run(None, f)
    return time.perf_counter() - t


def score(fp32: Path, quantized: Path, data: Path, batch: int = 8, threads: int | None = None,
          latency_feed: dict | None = None, runs: int = 30) -> dict:
    """Per output name: cosine, SQNR, top-1 and accuracy (with labels); plus sizes and latency."""
    ref, q = session(fp32, threads), session(quantized, threads)
    names = [o.name for o in ref.get_outputs()]
    cmps = [OutputComparison(n) for n in names]
    first = None
    for feed, labels in feeds(fp32, data, batch):
        first = first or feed
        for i, (c, r, x) in enumerate(zip(cmps, ref.run(names, feed), q.run(names, feed))):
            c.update(r, x, labels if i == 0 else None)
    out = {c.name: c.result() for c in cmps}
    out.update(bytes_fp32=model_bytes(fp32), bytes_quantized=model_bytes(quantized),
               **compare_latency(ref, q, latency_feed or first, runs=runs))
    return out
