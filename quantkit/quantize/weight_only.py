"""Weight-only quantization: int4 (or int8) weights, float activations, no calibration needed
except for data-aware rounding (GPTQ).

  MatMul / Gemm      -> com.microsoft.MatMulNBits (blockwise along K, packed), or with
                        --format qdq a standard DequantizeLinear(int4, block_size) -> MatMul
  embedding Gather   -> com.microsoft.GatherBlockQuantized, or DequantizeLinear -> Gather
  Conv / ConvTranspose: onnxruntime has no int4 convolution: int8 per-channel weights behind a
                        DequantizeLinear, and the report says so
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit.calibrate.collect import Statistics, StatRequest
from quantkit.calibrate.observers import GramObserver
from quantkit.config import Algorithm, Format, QuantConfig, Weights
from quantkit.errors import UnsupportedModelError, first_line
from quantkit.graph.ir_edit import Editor, const_array, k_major_weight
from quantkit.load.external import read_ahead
from quantkit.quantize import awq
from quantkit.quantize import blockwise as bw
from quantkit.quantize.gptq import gptq_many
from quantkit.quantize.plan import OpKind, Plan, QuantizedOp, SchemeName
from quantkit.quantize.scheme import Findings, RewriteResult, Scheme, Trial

MS_DOMAIN = "com.microsoft"
CONV_FALLBACK = "int4 has no convolution kernel in onnxruntime: weights stored int8 behind a DequantizeLinear"
AUTO = "auto"  # --keep-int8 auto
AUTO_GAIN_DB = 1.0  # a layer stays at 8 bits when that raises the output SQNR by at least this


def bits_for(node: ir.Node, config: QuantConfig) -> int:
    if config.weights == Weights.INT8:
        return 8
    for p in config.keep_int8:
        if fnmatch.fnmatchcase(node.name or "", p) or fnmatch.fnmatchcase(node.op_type, p):
            return 8
    return 4


def opset_at_least(model: ir.Model, version: int) -> ir.Model:
    """Blocked int4 DequantizeLinear needs opset 21: convert older models, or say why not."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return model
    import onnx

    try:
        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), version)
    except Exception as e:  # the converter raises bare RuntimeErrors
        raise UnsupportedModelError(f"--format qdq needs opset {version} and converting from opset {current} "
                                    f"failed ({first_line(e)}); use --format ort") from e
    return ir.serde.deserialize_model(proto)


class WeightOnlyScheme(Scheme):
    """int4 (or int8) weights, float activations; GPTQ rounding from the layers' input Gram matrices."""

    name = SchemeName.WEIGHT_ONLY

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(dataclasses.replace(config, keep_int8=tuple(p for p in config.keep_int8 if p != AUTO)))
        self.auto_keep = AUTO in config.keep_int8
        # GPTQ rounds a layer as soon as its input's Gram matrix is known and drops the Gram:
        # (weight name, bits) -> the rounded weight, or the .npz it was spilled to
        self.rounded: dict[tuple[str, int], tuple[bw.Blockwise, bw.RoundingError] | Path] = {}
        self.consumers: dict[str, list[QuantizedOp]] = {}  # GPTQ: input tensor -> the layers reading it
        self.spill: Path | None = None  # where rounded weights go instead of memory (large models)
        self.awq: dict[str, tuple[float, np.ndarray]] = {}  # AWQ: input tensor -> (alpha, channel scales)
        self._awq_scale: dict[int, np.ndarray] = {}  # id(node) -> its weight's row scales, during a rewrite

    def refuse(self, op: QuantizedOp) -> str | None:
        if not op.weighted:
            return "weight-only quantization: activation x activation MatMul stays float"
        node = op.node
        if node.op_type == "Gemm" and node.inputs[2:3] and node.inputs[2] is not None and not op.bias:
            return "Gemm with alpha/beta != 1 or a non-vector C"
        return None

    def prepare_model(self, model: ir.Model) -> ir.Model:
        return opset_at_least(model, 21) if self.config.format == Format.QDQ else model

    def requests(self, plan: Plan) -> list[StatRequest]:
        """GPTQ: X^T X of every weighted MatMul/Gemm input; AWQ: its mean |x| per channel."""
        if self.config.algorithm not in (Algorithm.GPTQ, Algorithm.AWQ):
            return []
        ops = [op for op in plan.ops
               if op.scheme == self.name and op.weighted and op.node.op_type in ("MatMul", "Gemm")]
        self.consumers = {}
        for op in ops:
            self.consumers.setdefault(op.inputs[0].name, []).append(op)
        kind = "abs_mean" if self.config.algorithm == Algorithm.AWQ else "gram"
        return [StatRequest(name, kind) for name in self.consumers]

    def use(self, stats: Statistics) -> Findings:
        """Round every layer whose input Gram matrix these statistics hold (may be called once per
        calibration pass when the Grams are gathered a few at a time); the Grams are dropped."""
        for name, obs in stats.of_kind("gram").items():
            if not isinstance(obs, GramObserver):
                continue
            h = obs.hessian()
            if h is None:
                continue
            self._round(self.consumers.get(name, []), h)
            obs.gram = None
        for name, obs in stats.of_kind("abs_mean").items():
            act = obs.mean() if isinstance(obs, awq.AbsMeanObserver) else None
            ops = self.consumers.get(name, [])
            if act is None or not ops:
                continue
            cfg = self.config
            self.awq[name] = awq.search([k_major_weight(op.node) for op in ops], act, bits_for(ops[0].node, cfg),
                                        cfg.block_size, cfg.symmetric)
        if not self.awq:
            return Findings()
        scaled = [a for a, _ in self.awq.values() if a > 0]
        return Findings(notes=[f"awq: {len(scaled)} of {len(self.awq)} layer input(s) scaled before rounding "
                               f"(alpha {min(scaled, default=0):.1f}..{max(scaled, default=0):.1f}; 0 = plain RTN)"])

    def _scale_inputs(self, ops: list[QuantizedOp], edit: Editor) -> None:
        """AWQ: one Mul(x, 1/s) per scaled input tensor, read by the layers whose weights get s."""
        groups: dict[str, list[QuantizedOp]] = {}
        for op in ops:
            if op.node.op_type in ("MatMul", "Gemm") and op.node.inputs[0] is not None:
                groups.setdefault(op.node.inputs[0].name, []).append(op)
        for name, members in groups.items():
            alpha, s = self.awq.get(name, (0.0, None))
            if s is None or alpha == 0:
                continue
            x = members[0].node.inputs[0]
            mul = edit.node("Mul", [x, edit.initializer(f"{name}_awq_inv_scale", (1.0 / s).astype(np.float32))],
                            name=f"{name}_awq", output=f"{name}_awq")
            mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
            edit.graph.insert_before(members[0].node, mul)
            for op in members:
                self._awq_scale[id(op.node)] = s
                op.node.replace_input_with(0, mul.outputs[0])

    def _round(self, ops: list[QuantizedOp], hessian: np.ndarray) -> None:
        """GPTQ for the layers reading one input, those of the same bit width rounded together."""
        groups: dict[int, dict[str, QuantizedOp]] = {}
        for op in ops:
            bits = bits_for(op.node, self.config)
            if (op.node.inputs[1].name, bits) not in self.rounded:
                groups.setdefault(bits, {}).setdefault(op.node.inputs[1].name, op)
        for bits, group in groups.items():
            ws = [k_major_weight(op.node) for op in group.values()]
            for w_name, w, qb in zip(group, ws, gptq_many(ws, hessian, bits, self.config.block_size,
                                                          self.config.symmetric)):
                self._keep((w_name, bits), qb, bw.rounding_error(w, qb))  # the weight is at hand: its error too

    def _keep(self, key: tuple[str, int], qb: bw.Blockwise, err: bw.RoundingError) -> None:
        if self.spill is None:
            self.rounded[key] = (qb, err)
            return
        path = self.spill / f"gptq_{len(self.rounded)}.npz"
        np.savez(path, q=qb.q, scales=qb.scales, zero_points=qb.zero_points, k=qb.k, bits=qb.bits, block=qb.block,
                 symmetric=qb.symmetric, signal=err.signal, error=err.error, count=err.count)
        self.rounded[key] = path

    def _gptq(self, w_name: str, bits: int) -> tuple[bw.Blockwise, bw.RoundingError] | None:
        found = self.rounded.get((w_name, bits)) if self.config.algorithm == Algorithm.GPTQ else None
        if not isinstance(found, Path):
            return found
        with np.load(found) as z:
            qb = bw.Blockwise(z["q"], z["scales"], z["zero_points"], int(z["k"]), int(z["bits"]), int(z["block"]),
                              bool(z["symmetric"]))
            return qb, bw.RoundingError(float(z["signal"]), float(z["error"]), int(z["count"]))

    def tune(self, plan: Plan, trial: Trial, status: Callable[[str], None]) -> list[str]:
        """--keep-int8 auto: try the first and the last int4 layer at 8 bits, each on its own,
        and keep 8 bits where that raises the output SQNR on a calibration batch by >= 1 dB."""
        if not self.auto_keep:
            return []
        names = [op.node.name for op in plan.ops if op.node.op_type in ("MatMul", "Gemm") and op.node.name]
        if not names:
            return ["--keep-int8 auto: no named MatMul/Gemm to consider"]
        status("--keep-int8 auto: measuring the first and last layers at 8 bits")
        base_cfg, kept, notes = self.config, [], []
        base = trial(self.with_config(base_cfg))
        for name in dict.fromkeys([names[0], names[-1]]):
            gain = trial(self.with_config(dataclasses.replace(base_cfg, keep_int8=base_cfg.keep_int8 + (name,)))) - base
            keep = gain >= AUTO_GAIN_DB
            notes.append(f"--keep-int8 auto: {name} at 8 bits changes output SQNR by {gain:+.2f} dB "
                         f"({'kept at 8 bits' if keep else 'left at 4 bits'})")
            kept += [name] if keep else []
        self.config = dataclasses.replace(base_cfg, keep_int8=base_cfg.keep_int8 + tuple(kept))
        return notes

    def with_config(self, config: QuantConfig) -> WeightOnlyScheme:
        """The same scheme (and Hessians) under another config, for tuning trials."""
        other = WeightOnlyScheme(config)
        other.rounded, other.consumers, other.spill, other.awq = self.rounded, self.consumers, self.spill, self.awq
        return other

    def rewrite(self, model: ir.Model, ops: list[QuantizedOp], edit: Editor) -> RewriteResult:
        result = RewriteResult()
        if self.config.format != Format.QDQ and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        self._awq_scale = {}
        if self.awq and self.config.algorithm == Algorithm.AWQ:
            self._scale_inputs(ops, edit)
        for op, w in read_ahead(ops, self._weight):  # the next weight is read while this one is rounded
            name = op.node.name or op.node.outputs[0].name
            node_name, bits = op.node.name, bits_for(op.node, self.config)
            err, how = None, "round to nearest"
            if op.node.op_type in ("Conv", "ConvTranspose"):
                self._conv(edit, op)
                result.notes.append(f"{name}: {CONV_FALLBACK}")
            elif op.kind == OpKind.EMBEDDING:
                err = self._embedding(edit, op, name, w)
            else:
                gptq, err = self._matmul(edit, op, name, w)
                result.gptq += [name] if gptq else []
                how = "GPTQ" if gptq else how
            if err is not None and node_name:  # the report keys its weight_error rows by node name
                sym = "symmetric" if self.config.symmetric else "asymmetric"
                result.weight_error[node_name] = (f"int{bits} blocks of {self.config.block_size}, {sym}, {how}", err)
            result.quantized_nodes.append(name)
        return result

    def _weight(self, op: QuantizedOp) -> np.ndarray | None:
        """The float weight the rewrite of `op` rounds to nearest, as (K, N); None when it reads none
        (a convolution, a layer GPTQ rounded already)."""
        node = op.node
        if op.kind == OpKind.EMBEDDING:
            return const_array(node.inputs[0]).T
        if node.op_type not in ("MatMul", "Gemm"):
            return None
        key = (node.inputs[1].name, bits_for(node, self.config))
        if self.config.algorithm == Algorithm.GPTQ and key in self.rounded:
            return None
        return k_major_weight(node)

    def _conv(self, edit: Editor, op: QuantizedOp) -> None:
        node = op.node
        q, scale, zp = self.memo.quantize(node.inputs[1].const_value, op.weight_axis)  # GPTQ codes when static's
        node.replace_input_with(1, edit.dequantized(node.inputs[1].name, q, scale, zp, op.weight_axis, node))

    def _embedding(self, edit: Editor, op: QuantizedOp, name: str, table_t: np.ndarray) -> bw.RoundingError:
        """Blocks along each row of the table (`table_t` is its transpose, (dim, vocab)):
        GatherBlockQuantized, or DequantizeLinear -> Gather. Returns the rounding error."""
        node, cfg = op.node, self.config
        bits = bits_for(node, cfg)
        table_in = node.inputs[0]
        qb, err = bw.quantize_measured(table_t, bits, cfg.block_size, cfg.symmetric)
        if cfg.format == Format.QDQ:
            node.replace_input_with(0, _qdq_blocked(edit, table_in.name, qb, 1, False, node))
            return err
        data = edit.initializer(f"{table_in.name}_q{bits}", bw.pack(qb.q.reshape(qb.q.shape[0], -1)[:, : qb.k], bits))
        ins = [data, node.inputs[1], edit.initializer(f"{table_in.name}_scales", qb.scales)]
        if not cfg.symmetric:
            ins.append(edit.initializer(f"{table_in.name}_zero_points", bw.pack(qb.zero_points, bits)))
        new = edit.node("GatherBlockQuantized", ins, {"gather_axis": 0, "quantize_axis": 1,
                        "block_size": cfg.block_size, "bits": bits}, domain=MS_DOMAIN, name=f"{name}_int{bits}")
        op.node = edit.replace_node(node, new)
        return err

    def _matmul(self, edit: Editor, op: QuantizedOp, name: str,
                w: np.ndarray | None) -> tuple[bool, bw.RoundingError | None]:
        """MatMul/Gemm -> MatMulNBits (or blocked DequantizeLinear -> MatMul) of its (K, N) weight
        `w`: whether GPTQ rounded it, and the rounding error of the weight (None under AWQ: the
        rounded weight is w * s)."""
        node, cfg = op.node, self.config
        bits = bits_for(node, cfg)
        w_name = node.inputs[1].name
        h = self._gptq(w_name, bits)  # rounded by GPTQ when the calibration pass saw its input
        s = self._awq_scale.get(id(node))
        if h is not None:
            qb, err = h
        elif s is not None:  # the input was divided by s: the weight rows carry it
            qb = bw.quantize_blockwise(w * s[:, None], bits, cfg.block_size, cfg.symmetric)
            err = None
        else:
            qb, err = bw.quantize_measured(w, bits, cfg.block_size, cfg.symmetric)
        if cfg.format == Format.QDQ:
            trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
            node.replace_input_with(1, _qdq_blocked(edit, w_name, qb, 1 if trans_b else 0, not trans_b, node))
            return h is not None, err
        ins = [node.inputs[0], edit.initializer(f"{w_name}_q{bits}", bw.pack(qb.q, bits)),
               edit.initializer(f"{w_name}_scales", qb.scales.reshape(-1))]
        ins.append(None if cfg.symmetric else
                   edit.initializer(f"{w_name}_zero_points", bw.pack(qb.zero_points, bits).reshape(-1)))
        if node.op_type == "Gemm" and op.bias:
            ins += [None, node.inputs[2]]  # no g_idx, then the bias
        while ins[-1] is None:
            ins.pop()
        k, n = qb.k, qb.q.shape[0]
        new = edit.node("MatMulNBits", ins, {"K": k, "N": n, "bits": bits, "block_size": cfg.block_size,
                        "accuracy_level": cfg.accuracy_level}, domain=MS_DOMAIN, name=f"{name}_int{bits}")
        op.node = edit.replace_node(node, new)
        return h is not None, err


def _qdq_blocked(edit: Editor, base: str, qb: bw.Blockwise, axis: int, rows_first: bool, before: ir.Node) -> ir.Value:
    """DequantizeLinear(int4/uint4 or int8/uint8, blocked along `axis`) of a Blockwise weight, laid
    out (K, N) when rows_first (blocks along axis 0) or (N, K) otherwise (blocks along axis 1)."""
    codes = qb.q.reshape(qb.q.shape[0], -1)[:, : qb.k]  # (N, K)
    scales, zps = qb.scales, qb.zero_points  # (N, kb)
    if rows_first:
        codes, scales, zps = codes.T, scales.T, zps.T
    if qb.symmetric:  # signed codes around 0, no zero point input
        signed = codes.astype(np.int16) - zps.max()
        dtype = ir.DataType.INT4 if qb.bits == 4 else ir.DataType.INT8
        qv = edit.initializer(f"{base}_q{qb.bits}", signed.astype(np.int8), dtype)
        inputs = [qv, edit.initializer(f"{base}_scale", scales.astype(np.float32))]
    else:
        dtype = ir.DataType.UINT4 if qb.bits == 4 else ir.DataType.UINT8
        zp_v = edit.initializer(f"{base}_zero_point", zps.astype(np.uint8), dtype)
        qv = edit.initializer(f"{base}_q{qb.bits}", codes.astype(np.uint8), dtype)
        inputs = [qv, edit.initializer(f"{base}_scale", scales.astype(np.float32)), zp_v]
    dq = edit.node("DequantizeLinear", inputs, {"axis": 0 if rows_first else 1, "block_size": qb.block},
                   name=f"{base}_DequantizeLinear", output=f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    edit.graph.insert_before(before, dq)
    return dq.outputs[0]
