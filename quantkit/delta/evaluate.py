"""How close a reconstructed model is to NEW on the eval data, in onnxruntime, with the same
comparison as `quantize` (report/compare.py): NEW plays the reference, apply(BASE, update) the
candidate. NEW's outputs are computed once and kept for the candidates `--method auto` tries
(up to CACHE_BYTES; past that, NEW is rerun for each candidate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.calibrate.data import LABELS, DataSource, complete_batches
from quantkit.delta.tensors import ModelTensors, build_onnx
from quantkit.errors import ConfigError
from quantkit.load.onnx import input_specs
from quantkit.report.compare import OutputComparison

DEFAULT_BATCH = 8
CACHE_BYTES = 256 * 2**20


class Evaluator:
    def __init__(self, new_path: Path, eval_path: Path, batch_size: int | None, workdir: Path,
                 threads: int | None = None):
        specs = input_specs(ir.load(str(new_path)))
        fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
        self.fixed = bool(fixed)  # a fixed batch size cannot take the short last batch
        self.batch = min(fixed) if fixed else (batch_size or DEFAULT_BATCH)
        self.source = DataSource(eval_path, specs)
        self.names_in = [s.name for s in specs]
        self.workdir, self.threads = Path(workdir), threads
        self.new = runtime.session(new_path, workdir, tag="new", threads=threads)
        self.outputs = [o.name for o in self.new.get_outputs()]
        self.cache: list[tuple[dict, list[np.ndarray]]] = []
        self.cached_all = False
        self.samples = 0
        self.has_labels = self.source.has_labels
        self.runs = 0

    def _reference(self):
        """(batch, NEW's outputs) pairs: from the cache when it holds everything."""
        if self.cached_all:
            yield from self.cache
            return
        self.cache, size, self.samples = [], 0, 0
        for b in complete_batches(self.source, self.batch, None, self.fixed):
            feed = {k: b[k] for k in self.names_in}
            ref = runtime.run(self.new, self.outputs, feed, f"the evaluation data {self.source.path}")
            self.samples += len(next(iter(feed.values())))
            size += sum(a.nbytes for a in ref) + sum(a.nbytes for a in b.values())
            if size <= CACHE_BYTES:
                self.cache.append((b, ref))
            yield b, ref
        if not self.samples:
            raise ConfigError(f"{self.source.path} holds fewer samples than the model's fixed batch size {self.batch}")
        self.cached_all = size <= CACHE_BYTES

    def compare(self, base: ModelTensors, arrays: dict[str, np.ndarray]) -> list[dict]:
        """OutputComparison results of the model with these weights against NEW."""
        path = self.workdir / "candidate.onnx"
        build_onnx(base.proto, arrays, path)
        sess = runtime.session(path, self.workdir, tag="reconstructed", threads=self.threads)
        comparisons = [OutputComparison(n) for n in self.outputs]
        for b, ref in self._reference():
            got = sess.run(self.outputs, {k: b[k] for k in self.names_in})
            for i, (c, r, x) in enumerate(zip(comparisons, ref, got)):
                c.update(r, x, b.get(LABELS) if i == 0 else None, b)
        self.runs += 1
        return [c.result() for c in comparisons]
