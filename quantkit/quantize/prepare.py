"""Preparation steps some options add before the rewrite: SmoothQuant's smoothing, GPTQ's
Hessians, the opset upgrade blocked int4 DequantizeLinear needs, and --keep-int8 auto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.calibrate.collect import collect
from quantkit.calibrate.data import DataSource, complete_batches
from quantkit.config import RunConfig
from quantkit.errors import ConfigError, UnsupportedModelError
from quantkit.graph.canonicalize import const_array
from quantkit.quantize import smoothquant, weight_only
from quantkit.quantize.plan import make_plan


def auto_keep_int8(cfg: RunConfig, model: ir.Model, plan_for, hessians, fp32, feed, workdir: Path, status):
    """--keep-int8 auto: try the first and the last int4 layer at 8 bits, each on its own, and
    keep 8 bits where that raises the output SQNR on a calibration batch by at least 1 dB."""
    import dataclasses

    base_cfg = dataclasses.replace(cfg.quant, keep_int8=tuple(p for p in cfg.quant.keep_int8 if p != "auto"))
    ops = [op for op in plan_for(model.clone()).ops if op.node.op_type in ("MatMul", "Gemm")]
    names = [op.node.name for op in ops if op.node.name]
    if not names:
        return base_cfg, ["--keep-int8 auto: no named MatMul/Gemm to consider"]
    ref = fp32.run(None, feed)

    def sqnr(config) -> float:
        m = model.clone()
        weight_only.rewrite(m, plan_for(m), config, hessians)
        out = runtime.session(m, workdir, tag="candidate").run(None, feed)
        sig = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in ref)
        err = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(o, np.float64)) ** 2)) for r, o in zip(ref, out))
        return 10 * np.log10(sig / max(err, 1e-30))

    status("--keep-int8 auto: measuring the first and last layers at 8 bits")
    base = sqnr(base_cfg)
    kept, notes = [], []
    for name in dict.fromkeys([names[0], names[-1]]):
        gain = sqnr(dataclasses.replace(base_cfg, keep_int8=base_cfg.keep_int8 + (name,))) - base
        notes.append(f"--keep-int8 auto: {name} at 8 bits changes output SQNR by {gain:+.2f} dB "
                     f"({'kept at 8 bits' if gain >= 1.0 else 'left at 4 bits'})")
        if gain >= 1.0:
            kept.append(name)
    return dataclasses.replace(base_cfg, keep_int8=base_cfg.keep_int8 + tuple(kept)), notes


def opset_at_least(model: ir.Model, version: int) -> ir.Model:
    """Blocked int4 DequantizeLinear needs opset 21: convert older models, or say why not."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return model
    import onnx

    try:
        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), version)
    except Exception as e:  # the converter raises bare RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"--format qdq needs opset {version} and converting from opset {current} "
                                    f"failed ({first}); use --format ort") from None
    return ir.serde.deserialize_model(proto)


def gptq_hessians(cfg: RunConfig, model: ir.Model, calib: DataSource, batch: int, fixed: bool, workdir: Path,
              status) -> dict:
    """X^T X of every weighted MatMul/Gemm input over the calibration data, for GPTQ."""
    plan = make_plan(model, cfg.quant)
    values = list({id(op.inputs[0]): op.inputs[0] for op in plan.ops
                   if op.weighted and op.node.op_type in ("MatMul", "Gemm")}.values())
    status(f"gptq: collecting input statistics of {len(values)} tensor(s)")
    observers, _ = collect(model, values, complete_batches(calib, batch, cfg.data.calib_samples, fixed), "gram",
                           workdir)
    return {n: o.hessian() for n, o in observers.items() if o.hessian() is not None}


def smooth(cfg: RunConfig, model: ir.Model, calib: DataSource | None, batch: int, fixed: bool, workdir: Path,
            status) -> list[dict]:
    """SmoothQuant: one pass collecting per-channel ranges and sampled rows of every LayerNorm
    output that feeds MatMuls, then per group the alpha (or none) with the least output error."""
    if calib is None:
        raise ConfigError("--smoothquant needs --calib: the smoothing factors come from calibration activations")
    groups = smoothquant.find_groups(model)
    if not groups:
        return []
    status(f"smoothquant: collecting channel statistics for {len(groups)} LayerNorm output(s)")
    observers, _ = collect(model, [g.source for g in groups],
                           complete_batches(calib, batch, cfg.data.calib_samples, fixed), "channel", workdir)
    alpha = None if cfg.quant.smoothquant == "auto" else float(cfg.quant.smoothquant)
    out = []
    for g in groups:
        weights = [const_array(mm.inputs[1]) for mm in g.consumers]
        s, a, err = smoothquant.choose_scales(observers[g.source.name], weights, alpha)
        entry = {"layernorm": g.norm.name, "matmuls": [mm.name for mm in g.consumers], "alpha": a,
                 "relative_error": err}
        entry["applied"] = smoothquant.apply(model, g, s) if s is not None else "no alpha beat no smoothing"
        out.append(entry)
    return out
