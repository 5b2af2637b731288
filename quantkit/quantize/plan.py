"""Decide what to quantize: which nodes get int8 weights, which tensors need activation ranges,
which scheme rewrites each node, and, for every node left float, why. Decisions only; the
schemes (quantize/qdq.py, dynamic.py, weight_only.py) edit the graph."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx_ir as ir

from quantkit.config import Activations, QuantConfig
from quantkit.graph.ir_edit import const_spec

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops between a quantized op and the tensor its output QDQ goes on. onnxruntime folds a Relu
# into the following QuantizeLinear when the zero point is the type's minimum (uint8 zp 0).
FUSED_ACTIVATIONS = ("Relu",)
ACT_X_ACT = "both inputs are computed at run time (activation x activation)"
# Activations onnxruntime fuses into a float Conv but has no integer kernel for: after an int8
# Conv they cost a DequantizeLinear, the activation and a QuantizeLinear over the whole tensor.
MIN_EMBEDDING = 4096  # smaller tables (position ids, tiny vocabularies) are not worth a DequantizeLinear
NO_INT8_KERNEL = ("HardSwish", "HardSigmoid", "Tanh", "Elu", "Softplus", "Gelu", "Mish")
# Ops without weights that onnxruntime runs on uint8/int8 tensors when they sit between
# DequantizeLinear and QuantizeLinear (QLinearAdd, QLinearMul, QLinearConcat, QLinearSigmoid,
# QLinearLeakyRelu, QLinearAveragePool, QLinearGlobalAveragePool; MaxPool and Resize on the int8
# tensor itself). Taken into the int8 region only where every activation input already comes out
# of it, so the op trades a DequantizeLinear -> float op -> QuantizeLinear for an integer kernel.
INT8_REGION_OPS = ("Add", "Mul", "Concat", "Sigmoid", "LeakyRelu", "MaxPool", "AveragePool",
                   "GlobalAveragePool", "Resize", "Split")
MULTI_OUTPUT = ("Split",)  # every output gets a QDQ (on the input's grid: quantize/qdq.py PASS_THROUGH)
FIRST_INPUT_ONLY = ("Resize", "Split")  # their other inputs are shapes, scales or split sizes, never activations


class OpKind(str, Enum):
    """The groups of quantized ops the speed guard keeps or drops as one. The value is a stable
    key; `label` is what the report shows."""

    CONV_UNFUSED_ACTIVATION = "conv_unfused_activation"
    ATTENTION_MATMUL = "attention_matmul"
    DEPTHWISE_CONV = "depthwise_conv"
    CONV_TRANSPOSE = "conv_transpose"
    GEMM = "gemm"
    MATMUL = "matmul"
    CONV = "conv"
    EMBEDDING = "embedding"
    INT8_REGION = "int8_region"

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    OpKind.CONV_UNFUSED_ACTIVATION: "Conv followed by an activation without an int8 kernel",
    OpKind.ATTENTION_MATMUL: "MatMul (activation x activation)",
    OpKind.DEPTHWISE_CONV: "Conv (grouped/depthwise)",
    OpKind.CONV_TRANSPOSE: "ConvTranspose",
    OpKind.GEMM: "Gemm",
    OpKind.MATMUL: "MatMul",
    OpKind.CONV: "Conv",
    OpKind.EMBEDDING: "Gather (embedding table)",
    OpKind.INT8_REGION: "Add/Mul/Concat/Sigmoid/pooling/Resize/Split between int8 ops",
}
# Kinds with no weight to store: int8 can only buy them speed. An activation x activation MatMul quantizes both
# inputs on every run; on all-MiniLM-L6-v2 the model with its 12 attention MatMuls float timed 0.5-5% faster than
# with them int8 in every run. The accuracy search moves them to float from its first level (budget.py), and the
# speed guard keeps them int8 only on a clear, repeated win (speed.py). The int8 region's ops (Add, Concat, Split,
# Sigmoid... between int8 ops) have no weight either: on nudenet's YOLOv8n the model ran 4.9-10.3% slower with
# them than without, and with a keep-unless-clearly-slower rule the load decided which file was written.
SPEED_ONLY_KINDS = (OpKind.ATTENTION_MATMUL, OpKind.INT8_REGION)
_BY_OP_TYPE = {"Conv": OpKind.CONV, "ConvTranspose": OpKind.CONV_TRANSPOSE, "Gemm": OpKind.GEMM,
               "MatMul": OpKind.MATMUL, "Gather": OpKind.EMBEDDING}


class SchemeName(str, Enum):
    """Which scheme rewrites a planned op (quantize/scheme.py has the registry)."""

    STATIC = "static"  # int8 QDQ, calibrated activations
    DYNAMIC = "dynamic"  # int8 weights, activations quantized at run time
    WEIGHT_ONLY = "weight_only"  # int4/int8 weights, float activations
    PER_TOKEN = "per_token"  # int8 weights, activations quantized at run time with one scale per token
    SPLIT = "split"  # static int8 with the input's few outlier channels computed in float


@dataclass
class QuantizedOp:
    node: ir.Node
    inputs: list[ir.Value]  # float activation inputs fed through QDQ
    weighted: bool  # input `weight_index` is a constant weight stored as int8
    weight_axis: int | None = None  # per-channel axis of the weight, None for per-tensor
    weight_index: int = 1  # 0 for an embedding Gather
    bias: bool = False  # input 2 is a constant bias that can become int32
    output: ir.Value | None = None  # tensor that gets output QDQ (after any fused Relu), None if kept float
    more_outputs: tuple[ir.Value, ...] = ()  # a Split's other outputs, each with its own output QDQ
    scheme: SchemeName | None = None  # set when a scheme claims the op
    kind: OpKind = field(init=False)  # the speed guard's group, fixed when planned
    key: str = field(init=False)  # the planned node's name (its first output's when unnamed), kept after rewriting

    def __post_init__(self) -> None:
        self.kind = _kind(self.node, self.weighted)
        self.key = self.node.name or self.node.outputs[0].name

    @property
    def qdq_outputs(self) -> tuple[ir.Value, ...]:
        """The outputs that get an output QDQ: `output` (when not kept float) and a Split's other parts."""
        return (*((self.output,) if self.output is not None else ()), *self.more_outputs)


def _kind(node: ir.Node, weighted: bool) -> OpKind:
    if node.op_type in INT8_REGION_OPS:
        return OpKind.INT8_REGION
    if not weighted:
        return OpKind.ATTENTION_MATMUL
    if node.op_type == "Conv":
        nxt = {u.node.op_type for u in node.outputs[0].uses()}
        if nxt & set(NO_INT8_KERNEL):
            return OpKind.CONV_UNFUSED_ACTIVATION
        if node.attributes.get_int("group", 1) > 1:
            return OpKind.DEPTHWISE_CONV
    return _BY_OP_TYPE[node.op_type]


@dataclass
class Skipped:
    node: str
    op_type: str
    reason: str


@dataclass
class Plan:
    ops: list[QuantizedOp] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    float_tensors: dict[str, str] = field(default_factory=dict)  # tensor -> why it stays float

    def skip(self, op: QuantizedOp, reason: str) -> None:
        self.skipped.append(Skipped(op.node.name or "", op.node.op_type, reason))

    def activation_tensors(self, scheme: SchemeName | None = None) -> list[ir.Value]:
        """Each tensor needing a calibrated range (of the ops of `scheme`, or of all), once, in
        graph order."""
        return activation_tensors([op for op in self.ops if scheme is None or op.scheme == scheme])

    def keep_float(self, tensors: dict[str, str]) -> None:
        """Tensors that must not be quantized (e.g. attention masks): ops reading them stay float,
        output QDQ on them is dropped."""
        self.float_tensors.update(tensors)
        kept = []
        for op in self.ops:
            bad = [v.name for v in op.inputs if v.name in tensors]
            if bad:
                self.skipped.append(Skipped(op.node.name or "", op.node.op_type,
                                            f"input '{bad[0]}' stays float: {tensors[bad[0]]}"))
                continue
            if op.output is not None and op.output.name in tensors:
                op.output = None
            op.more_outputs = tuple(v for v in op.more_outputs if v.name not in tensors)
            kept.append(op)
        self.ops = kept

    def drop(self, kinds: set[OpKind], reason: str, keep: frozenset[str] = frozenset()) -> None:
        """Leave every op of the given kinds float (the speed guard's decision), except the ops named in
        `keep` (by key)."""
        gone = [op for op in self.ops if op.kind in kinds and op.key not in keep]
        self.skipped += [Skipped(op.node.name or "", op.node.op_type, reason) for op in gone]
        self.ops = [op for op in self.ops if op.kind not in kinds or op.key in keep]


def activation_tensors(ops: list[QuantizedOp]) -> list[ir.Value]:
    """Each tensor the ops read or write through QDQ, once, in op order."""
    seen: dict[int, ir.Value] = {}
    for op in ops:
        for v in (*op.inputs, *op.qdq_outputs):
            seen.setdefault(id(v), v)
    return list(seen.values())


def _is_float32(v: ir.Value | None) -> bool:
    return v is not None and v.dtype == ir.DataType.FLOAT


def _excluded(node: ir.Node, patterns: tuple[str, ...]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(node.name or "", p) or fnmatch.fnmatchcase(node.op_type, p):
            return p
    return None


def _weight_axis(node: ir.Node, per_channel: bool) -> int | None:
    if not per_channel:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        # weight is (C_in, C_out / group, k...): output channels are axis 1, but only per group
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1  # MatMul (K, N): one scale per output column


def _output_tensor(node: ir.Node) -> ir.Value | None:
    if node.op_type == "MatMul":
        # onnxruntime runs DequantizeLinear -> MatMul as MatMulIntegerToFloat, as fast as QLinearMatMul.
        # An output QDQ would only round what a float consumer reads (the residual Add after an
        # encoder's FFN, whose outlier channel sets a scale 100x the typical value); a quantized
        # consumer quantizes the same tensor as its own input anyway.
        return None
    out = node.outputs[0]
    while not out.is_graph_output():
        users = out.uses()
        if len(users) != 1:
            break
        consumer = next(iter(users)).node
        if consumer.op_type not in FUSED_ACTIVATIONS or consumer.domain != "":
            break
        out = consumer.outputs[0]
    # a graph output stays float: QDQ there only adds error to what the user reads
    return None if out.is_graph_output() or not _is_float32(out) else out


def _why_not(node: ir.Node, config: QuantConfig) -> str | None:
    pattern = _excluded(node, config.exclude)
    if pattern is not None:
        return f"excluded by --exclude {pattern}"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "has no weight input"
    w = const_spec(node.inputs[1])
    if w is None:
        if const_spec(node.inputs[0]) is not None:
            return "constant is the first input; only constant second inputs (weights) are quantized"
        if node.op_type != "MatMul" or not config.attention_matmuls:
            return ACT_X_ACT
        if not (_is_float32(node.inputs[0]) and _is_float32(node.inputs[1])):
            return ACT_X_ACT + " with non-float32 inputs"
        return None
    if w.dtype.name != "float32":
        return f"weight is {w.dtype.name}, only float32 weights are quantized"
    if not _is_float32(node.inputs[0]):
        return "input is not float32" if node.inputs[0].dtype else "input type unknown after shape inference"
    if node.op_type == "MatMul" and w.ndim != 2:
        return f"MatMul weight has rank {w.ndim}; only 2-D weights are quantized"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) == 1:
        return "Gemm with transA=1 has no integer kernel"
    return None


def _subgraph_skips(node: ir.Node) -> list[Skipped]:
    out = []
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value
            for g in graphs:
                out += [Skipped(inner.name or "", inner.op_type, f"inside a {node.op_type} subgraph; kept float")
                        for inner in g.all_nodes() if inner.op_type in WEIGHTED_OPS]
    return out


def _bias_ok(node: ir.Node, w) -> bool:
    if len(node.inputs) < 3 or const_spec(node.inputs[2]) is None:
        return False
    b = const_spec(node.inputs[2])
    if b.ndim != 1 or b.dtype.name != "float32":
        return False
    if node.op_type == "Gemm":
        # int32 bias needs y = A.B + C exactly: alpha = beta = 1 and one entry per column
        n_out = w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1]
        return (b.shape[0] == n_out and node.attributes.get_float("alpha", 1.0) == 1.0
                and node.attributes.get_float("beta", 1.0) == 1.0)
    return True


def make_plan(model: ir.Model, config: QuantConfig) -> Plan:
    plan = Plan()
    for node in model.graph:
        plan.skipped += _subgraph_skips(node)
        if node.op_type == "Gather" and node.domain == "":
            table = const_spec(node.inputs[0])
            if (table is not None and table.dtype == np.float32 and table.ndim == 2 and table.size >= MIN_EMBEDDING
                    and node.attributes.get_int("axis", 0) == 0 and not _excluded(node, config.exclude)):
                # weight-only: one scale per row, so each token's vector keeps its own resolution
                plan.ops.append(QuantizedOp(node, [], weighted=True, weight_axis=0, weight_index=0))
            continue
        if node.op_type not in WEIGHTED_OPS or node.domain != "":
            continue
        reason = _why_not(node, config)
        if reason:
            plan.skipped.append(Skipped(node.name or "", node.op_type, reason))
            continue
        w = const_spec(node.inputs[1])
        if w is None:  # activation x activation MatMul (attention)
            plan.ops.append(QuantizedOp(node, [node.inputs[0], node.inputs[1]], weighted=False,
                                        output=_output_tensor(node)))
            continue
        plan.ops.append(QuantizedOp(node, [node.inputs[0]], weighted=True,
                                    weight_axis=_weight_axis(node, config.per_channel),
                                    bias=_bias_ok(node, w), output=_output_tensor(node)))
    if config.activations in (Activations.UINT8, Activations.INT8):
        plan.ops += _int8_region(model, plan.ops, config)
    return plan


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs computed at run time (constants and shape-like inputs of Resize excluded)."""
    ins = node.inputs[:1] if node.op_type in FIRST_INPUT_ONLY else node.inputs
    return [v for v in ins if v is not None and const_spec(v) is None]


def _int8_region(model: ir.Model, ops: list[QuantizedOp], config: QuantConfig) -> list[QuantizedOp]:
    """Ops of INT8_REGION_OPS whose every activation input is already int8 (an output QDQ of a
    planned op, or of an op taken here before it in graph order), all float32 and none a graph
    output: their output gets a QDQ so onnxruntime runs them on the integer tensors."""
    int8 = {id(v) for op in ops for v in op.qdq_outputs}
    taken = []
    for node in model.graph:
        if node.op_type not in INT8_REGION_OPS or node.domain != "" or _excluded(node, config.exclude):
            continue
        acts = _activation_inputs(node)
        out = node.outputs[0]
        more = tuple(node.outputs[1:]) if node.op_type in MULTI_OUTPUT else ()
        if (not acts or any(id(v) not in int8 or not _is_float32(v) for v in acts)
                or len(acts) != len([v for v in node.inputs if v is not None])
                and node.op_type not in FIRST_INPUT_ONLY
                or any(o.is_graph_output() or not _is_float32(o) for o in (out, *more))
                or not more and any(o.uses() or o.is_graph_output() for o in node.outputs[1:])):
            continue
        op = QuantizedOp(node, acts, weighted=False, output=out, more_outputs=more)
        taken.append(op)
        int8.update(id(o) for o in op.qdq_outputs)
    return taken
