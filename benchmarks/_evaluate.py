"""Score quantized models against their fp32 original, the same way for every tool: the same
eval batches through onnxruntime, the same comparison code as quantkit's report, latency
interleaved against fp32 in one process."""

from __future__ import annotations

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


def score(fp32: Path, quantized: Path, data: Path, batch: int = 8, threads: int | None = None,
          latency_batch: dict | None = None, runs: int = 30) -> dict:
    """First output's figures (cosine, accuracy when labelled), size and latency ratio."""
    specs = input_specs(load_onnx(fp32))
    ref, q = session(fp32, threads), session(quantized, threads)
    names = [o.name for o in ref.get_outputs()]
    feeds = {s.name for s in specs}
    cmp = OutputComparison(names[0])
    first = None
    for b in DataSource(data, specs).batches(batch):
        feed = {k: v for k, v in b.items() if k in feeds}
        first = first or feed
        cmp.update(ref.run(names[:1], feed)[0], q.run(names[:1], feed)[0], b.get(LABELS))
    lat = compare_latency(ref, q, latency_batch or first, runs=runs)
    out = cmp.result()
    out.update(bytes_fp32=model_bytes(fp32), bytes_quantized=model_bytes(quantized), **lat)
    return out
