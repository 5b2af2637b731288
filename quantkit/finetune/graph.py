"""The placed, quantized ONNX graph as a trainable torch module.

Every node runs in torch in graph order. Quantized ops read the trainable state (lsq.Learnable):

  DequantizeLinear(weight codes)     latent weight -> fake quant with a learnable (per-channel or
                                     blocked) scale; int8 codes stay in [-127, 127] as placed
  DequantizeLinear(int32 bias)       latent bias, scale tied to input scale x weight scale (the
                                     integer kernels assume that product)
  QuantizeLinear -> DequantizeLinear activation codes with a learnable scale (shared by the pair)
  MatMulNBits / GatherBlockQuantized latent blocks with learnable block scales
  DynamicQuantizeMatMul              latent int8 weight; A quantized per tensor at run time
  float parameters                   LayerNorm scale and bias, a linear op's bias (Add of a constant
                                     vector to a MatMul/Gemm/Conv output), weights left float: plain
                                     parameters (what the integer kernels do not see is exact in torch)

`taps` names intermediate values (block outputs) that forward returns after the graph's outputs,
for distillation on them (loop.py).

`codes(name)` gives what the trained graph stores for an initializer, so export.py writes back
exactly what the forward pass used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from quantkit.errors import UnsupportedModelError
from quantkit.finetune import fakequant as fq
from quantkit.finetune.lsq import Learnable, as_tensor
from quantkit.finetune.ops import FLOAT_OPS, attr
from quantkit.quantize import blockwise as bw

MS = "com.microsoft"
RANGES = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT4: (-8, 7),
          ir.DataType.UINT4: (0, 15), ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT16: (0, 65535),
          ir.DataType.INT32: (-(2**31), 2**31 - 1)}
QUANT_OPS = {("", "QuantizeLinear"), ("", "DequantizeLinear"), (MS, "MatMulNBits"), (MS, "GatherBlockQuantized"),
             (MS, "DynamicQuantizeMatMul")}


@dataclass
class Trained:
    """How one trained initializer is quantized: its codes' range, zero point and layout."""

    kind: str  # weight, bias, nbits, gather, dynamic
    qmin: int
    qmax: int
    zero_point: torch.Tensor
    scale: str  # the scale initializer's name (for a bias: "input_scale*weight_scale")
    axis: int = 0
    block: int = 0
    size: int = 0  # along the blocked axis, or K / the table's columns
    tied: tuple[str, str] = ("", "")  # a bias's input and weight scales


LINEAR = {"MatMul", "Gemm", "Conv", "MatMulNBits", "DynamicQuantizeMatMul", "ConvInteger", "MatMulInteger"}


def _float_parameters(node: ir.Node) -> list[ir.Value]:
    """The inputs of a float node that train as plain parameters: LayerNorm's scale and bias, the
    weights and biases of linear ops left float, and a bias vector added to a linear op's output."""
    ins = [v for v in node.inputs if v is not None]
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "LayerNormalization" or node.op_type in ("MatMul", "Gemm", "Conv"):
        return ins[1:]
    if node.op_type == "Add" and len(ins) == 2:
        for const, other in ((ins[0], ins[1]), (ins[1], ins[0])):
            src = other.producer()
            if const.const_value is not None and len(const.const_value.shape) == 1 and src is not None \
                    and src.op_type in LINEAR:
                return [const]
    return []


def _dtype(value: ir.Value) -> ir.DataType:
    return value.const_value.dtype if value.const_value is not None else value.dtype


class QuantGraph(torch.nn.Module):
    def __init__(self, model: ir.Model, emulate_int8_a: bool = True, taps: Sequence[str] = (),
                 keep_zeros: bool = False) -> None:
        super().__init__()
        graph = model.graph
        graph.sort()
        if any(isinstance(a.value, (ir.Graph, list)) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for n in graph for a in n.attributes.values()):
            raise UnsupportedModelError("--finetune cannot train through If/Loop/Scan subgraphs")
        unknown = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph
                          if (n.domain, n.op_type) not in QUANT_OPS and not (n.domain in ("", "ai.onnx")
                                                                              and n.op_type in FLOAT_OPS)})
        if unknown:
            raise UnsupportedModelError(f"--finetune cannot run op(s) {', '.join(unknown)} in torch; "
                                        "quantize without --finetune")
        self.nodes = list(graph)
        self.consts = {name: as_tensor(v.const_value.numpy()) for name, v in graph.initializers.items()
                       if v.const_value is not None}
        self.inputs = [v.name for v in graph.inputs if v.name not in self.consts]
        self.outputs = [v.name for v in graph.outputs]
        self.taps = list(taps)
        self.emulate_int8_a = emulate_int8_a
        self.learn = Learnable()
        self.trained: dict[str, Trained] = {}
        for node in self.nodes:
            self._register(node)
        # weights pruned to zero stay zero (--prune unstructured / 2:4: the sparse storage relies on them)
        self.zero_masks = {name: self.learn.weight(name) != 0 for name, t in self.trained.items()
                           if t.kind != "bias"} if keep_zeros else {}

    # ---------------------------------------------------------------- what trains
    def _register(self, node: ir.Node) -> None:
        key = (node.domain, node.op_type)
        ins = node.inputs
        if key == ("", "QuantizeLinear") and ins[1].name in self.consts:
            self.learn.add_scale(ins[1].name, self.consts[ins[1].name])
        elif key == ("", "DequantizeLinear") and ins[0].name in self.consts:
            if _dtype(ins[0]) == ir.DataType.INT32:
                self._register_bias(node)
            else:
                self._register_weight(node)
        elif key == (MS, "MatMulNBits"):
            self._register_nbits(node)
        elif key == (MS, "GatherBlockQuantized"):
            self._register_gather(node)
        elif key == (MS, "DynamicQuantizeMatMul") and ins[1].name in self.consts:
            self._register_dynamic(node)
        else:
            for v in _float_parameters(node):
                if v.name in self.consts and self.consts[v.name].is_floating_point():
                    self.learn.add_float(v.name, self.consts[v.name])

    def _zero(self, node: ir.Node, idx: int) -> torch.Tensor:
        v = node.inputs[idx] if len(node.inputs) > idx else None
        return self.consts[v.name].float() if v is not None else torch.zeros(())

    def _register_weight(self, node: ir.Node) -> None:
        w, s = node.inputs[0], node.inputs[1]
        codes, scale = self.consts[w.name].float(), self.consts[s.name]
        zp = self._zero(node, 2)
        qmin, qmax = RANGES[_dtype(w)]
        if _dtype(w) == ir.DataType.INT8 and not zp.abs().max() > 0:
            qmin = -127  # symmetric int8 weights: q(-w) == -q(w), as placed
        axis, block = attr(node, "axis", 1) % max(codes.dim(), 1), attr(node, "block_size", 0)
        t = Trained("weight", qmin, qmax, zp, s.name, axis, block, codes.shape[axis] if codes.dim() else 0)
        self.trained[w.name] = t
        self.learn.add_scale(s.name, scale, weight=True)
        self.learn.add_weight(w.name, fq.dequantize(codes, self._expand(t, scale.float(), codes.dim()),
                                                     self._expand(t, zp, codes.dim())))

    def _register_bias(self, node: ir.Node) -> None:
        b, s = node.inputs[0], node.inputs[1]
        users = [u.node for u in node.outputs[0].uses()]
        scales = []
        for user in users[:1]:
            for idx in (0, 1):
                src = user.inputs[idx].producer() if len(user.inputs) > idx and user.inputs[idx] else None
                if src is not None and src.op_type == "DequantizeLinear":
                    scales.append(src.inputs[1].name)
        if len(users) != 1 or len(scales) != 2 or not all(n in self.learn.scales for n in scales):
            return  # stays the constant it is
        self.trained[b.name] = Trained("bias", *RANGES[ir.DataType.INT32], torch.zeros(()), s.name,
                                       tied=(scales[0], scales[1]))
        self.learn.add_weight(b.name, self.consts[b.name].double() * self.consts[s.name].double())

    def _register_nbits(self, node: ir.Node) -> None:
        b, s = node.inputs[1], node.inputs[2]
        bits, block, k, n = (attr(node, a) for a in ("bits", "block_size", "K", "N"))
        packed = self.consts[b.name].numpy().reshape(n, -1, block * bits // 8)
        codes = torch.from_numpy(bw.unpack(packed, bits, block).astype(np.float32))
        kb = codes.shape[1]
        scale = self.consts[s.name].reshape(n, kb)
        zpv = node.inputs[3] if len(node.inputs) > 3 else None
        zp = torch.full((n, kb), 2.0 ** (bits - 1)) if zpv is None else torch.from_numpy(
            bw.unpack(self.consts[zpv.name].numpy().reshape(n, -1), bits, kb).astype(np.float32))
        self.trained[b.name] = Trained("nbits", 0, 2**bits - 1, zp, s.name, block=block, size=k)
        self.learn.add_scale(s.name, scale, weight=True)
        self.learn.add_weight(b.name, (codes - zp[..., None]) * scale[..., None])

    def _register_gather(self, node: ir.Node) -> None:
        d, s = node.inputs[0], node.inputs[2]
        bits, block = attr(node, "bits", 4), attr(node, "block_size", 128)
        rank = len(self.consts[d.name].shape)
        if attr(node, "gather_axis", 0) != 0 or attr(node, "quantize_axis", 1) != 1 or rank != 2:
            raise UnsupportedModelError("--finetune: GatherBlockQuantized other than rows of a 2-D table")
        rows = self.consts[d.name].shape[0]
        cols = self.consts[d.name].shape[1] * 8 // bits
        scale = self.consts[s.name].float()
        kb = scale.shape[1]
        codes = torch.from_numpy(bw.unpack(self.consts[d.name].numpy(), bits, kb * block).astype(np.float32))
        zpv = node.inputs[3] if len(node.inputs) > 3 else None
        zp = torch.full((rows, kb), 2.0 ** (bits - 1)) if zpv is None else torch.from_numpy(
            bw.unpack(self.consts[zpv.name].numpy(), bits, kb).astype(np.float32))
        self.trained[d.name] = Trained("gather", 0, 2**bits - 1, zp, s.name, block=block, size=cols)
        self.learn.add_scale(s.name, scale, weight=True)
        self.learn.add_weight(d.name, (codes.reshape(rows, kb, block) - zp[..., None]) * scale[..., None])

    def _register_dynamic(self, node: ir.Node) -> None:
        b, s = node.inputs[1], node.inputs[2]
        codes, scale = self.consts[b.name].float(), self.consts[s.name].float()
        zp = self._zero(node, 3)
        qmin, qmax = RANGES[_dtype(b)]
        t = Trained("dynamic", -127 if qmin == -128 and not zp.abs().max() > 0 else qmin, qmax, zp, s.name, axis=1)
        self.trained[b.name] = t
        self.learn.add_scale(s.name, scale, weight=True)
        self.learn.add_weight(b.name, fq.dequantize(codes, scale, zp))

    # ---------------------------------------------------------------- forward
    def scale(self, name: str) -> torch.Tensor:
        return self.learn.scale(name) if name in self.learn.scales else self.consts[name].float()

    @staticmethod
    def _expand(t: Trained, v: torch.Tensor, rank: int) -> torch.Tensor:
        if v.dim() == 0 or rank == 0:
            return v
        if t.block:
            return fq.blocked(v, t.axis, t.block, t.size)
        return fq.along(v, t.axis, rank)

    def latent(self, name: str) -> torch.Tensor:
        w = self.learn.weight(name)
        return w * self.zero_masks[name] if name in self.zero_masks else w

    def fake_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized) of a trained initializer, in its ONNX layout (codes) and the layout
        the op computes with (dequantized: MatMulNBits as (K, N), a table as (rows, cols))."""
        t, w = self.trained[name], self.latent(name)
        if t.kind == "bias":
            s = self.scale(t.tied[0]).double() * self.scale(t.tied[1]).double()
            s = s.float().double()  # the float32 product ONNX stores
            q = torch.clamp(fq.round_ste(w / s), t.qmin, t.qmax)
            return q, (q * s).float()
        s = self.scale(t.scale)
        if t.kind in ("nbits", "gather"):
            q = fq.quantize(w, s[..., None], t.zero_point[..., None], t.qmin, t.qmax)
            deq = fq.dequantize(q, s[..., None], t.zero_point[..., None]).reshape(w.shape[0], -1)[:, :t.size]
            return q, deq.t() if t.kind == "nbits" else deq
        rank = w.dim()
        s, zp = self._expand(t, s, rank), self._expand(t, t.zero_point, rank)
        q = fq.quantize(w, s, zp, t.qmin, t.qmax)
        return q, fq.dequantize(q, s, zp)

    def forward(self, *args: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(zip(self.inputs, args))
        for node in self.nodes:
            ins = [None if v is None else env[v.name] if v.name in env else self._const(v.name)
                   for v in node.inputs]
            outs = self._run(node, ins)
            for v, o in zip(node.outputs, outs):
                env[v.name] = o
        return [env[n] if n in env else self.consts[n] for n in [*self.outputs, *self.taps]]

    def _const(self, name: str) -> torch.Tensor | None:
        return self.learn.plain(name) if name in self.learn.floats else self.consts.get(name)

    def _run(self, node: ir.Node, ins: list) -> list[torch.Tensor]:
        key = (node.domain, node.op_type)
        if key not in QUANT_OPS:
            return FLOAT_OPS[node.op_type](node, ins)
        first = node.inputs[0].name
        if key == ("", "QuantizeLinear"):
            zp_v = node.inputs[2] if len(node.inputs) > 2 else None
            qmin, qmax = RANGES[_dtype(zp_v)] if zp_v is not None else (0, 255)
            zp = ins[2].float() if zp_v is not None else torch.zeros(())
            rank = ins[0].dim()
            s = fq.along(self.scale(node.inputs[1].name), attr(node, "axis", 1), rank)
            return [fq.quantize(ins[0], s, fq.along(zp, attr(node, "axis", 1), rank), qmin, qmax)]
        if key == ("", "DequantizeLinear"):
            if first in self.trained:
                return [self.fake_weight(first)[1]]
            rank = ins[0].dim()
            zp = ins[2].float() if len(ins) > 2 and ins[2] is not None else torch.zeros(())
            axis = attr(node, "axis", 1)
            return [fq.dequantize(ins[0].float(), fq.along(self.scale(node.inputs[1].name), axis, rank),
                                  fq.along(zp, axis, rank))]
        return self._contrib(node, ins)

    def _contrib(self, node: ir.Node, ins: list) -> list[torch.Tensor]:
        if node.op_type == "MatMulNBits":
            a = ins[0]
            if self.emulate_int8_a and attr(node, "accuracy_level", 0) == 4:
                a = fq.int8_blocks_of_a(a, attr(node, "block_size"))
            y = a @ self.fake_weight(node.inputs[1].name)[1]
            bias = ins[5] if len(ins) > 5 else None
            return [y + bias if bias is not None else y]
        if node.op_type == "GatherBlockQuantized":
            t = self.trained[node.inputs[0].name]
            idx = ins[1].long()
            idx = torch.where(idx < 0, idx + t.zero_point.shape[0], idx).reshape(-1)
            w, s, zp = self.latent(node.inputs[0].name)[idx], self.scale(t.scale)[idx], t.zero_point[idx]
            rows = fq.fake_quant(w, s[..., None], zp[..., None], t.qmin, t.qmax)
            return [rows.reshape(len(idx), -1)[:, :t.size].reshape(*ins[1].shape, t.size)]
        # DynamicQuantizeMatMul
        y = fq.dynamic_uint8(ins[0]) @ self.fake_weight(node.inputs[1].name)[1]
        bias = ins[4] if len(ins) > 4 else None
        return [y + bias if bias is not None else y]
