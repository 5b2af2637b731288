"""Deciding what to quantize reads no weight values: a model kept on disk is planned from the
initializers' types and shapes alone (const_spec), with the same decisions as from the values."""

from __future__ import annotations

import onnx_ir as ir
from large_model import write_lm

from quantkit.config import QuantConfig
from quantkit.graph import shapes
from quantkit.graph.ir_edit import const_array, const_spec
from quantkit.graph.masks import mask_tensors
from quantkit.load.external import ReadTensor
from quantkit.load.onnx import load_onnx
from quantkit.quantize.plan import make_plan


def _summary(plan):
    return ([(op.node.name, op.kind, op.weighted, op.weight_axis, op.bias) for op in plan.ops],
            [(s.node, s.reason) for s in plan.skipped])


def test_plan_of_a_model_on_disk_reads_no_weight(tmp_path, monkeypatch):
    write_lm(tmp_path, layers=2, dim=64, vocab=256)
    in_memory = load_onnx(tmp_path / "model.onnx")
    on_disk = load_onnx(tmp_path / "model.onnx", keep_on_disk=True)
    for m in (in_memory, on_disk):
        shapes.infer(m)
    for v in on_disk.graph.initializers.values():
        spec, arr = const_spec(v), const_array(v)
        assert spec.dtype == arr.dtype and spec.shape == arr.shape and spec.size == arr.size and spec.ndim == arr.ndim
    reads = []
    monkeypatch.setattr(ReadTensor, "numpy", lambda self: reads.append(self.name))
    monkeypatch.setattr(ir.ExternalTensor, "numpy", lambda self: reads.append(self.name))
    for cfg in (QuantConfig(weights="int4", activations="none"), QuantConfig()):
        plan = make_plan(on_disk, cfg)
        assert _summary(plan) == _summary(make_plan(in_memory, cfg))
        assert sum(op.weighted for op in plan.ops) == 7  # 2 x (up, down), proj, lm_head, the embedding
    assert mask_tensors(on_disk) == {}
    big = [v.name for v in on_disk.graph.initializers.values() if isinstance(v.const_value, ReadTensor)]
    assert len(big) == 7 and reads == []  # 7 weights on disk, none read
