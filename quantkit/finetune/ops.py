"""Float ONNX ops in torch, with ONNX semantics (broadcasting, negative axes, attributes and
opset-18 axes-as-inputs). Each takes (node, inputs) and returns the list of outputs; the quantized
ops, which read the trainable state, live in graph.py."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from quantkit.errors import UnsupportedModelError

DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    if a is None:
        return default
    v = a.value
    if isinstance(v, ir.TensorProtocol):
        return v.numpy()
    return list(v) if isinstance(v, (tuple, list)) or type(v).__name__ == "Sequence" else v


def ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(node: ir.Node, ins: list, idx: int = 1) -> list[int] | None:
    a = attr(node, "axes")
    if a is None and len(ins) > idx and ins[idx] is not None:
        a = ints(ins[idx])
    return a


def _unsqueeze(node, ins):
    x = ins[0]
    axes = sorted(a % (x.dim() + len(_axes(node, ins))) for a in _axes(node, ins))
    for a in axes:
        x = x.unsqueeze(a)
    return [x]


def _squeeze(node, ins):
    axes = _axes(node, ins)
    x = ins[0]
    if axes is None:
        return [x.squeeze()]
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return [x]


def _gather(node, ins):
    x, idx = ins
    axis = attr(node, "axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1).long())
    return [out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))]


def _gather_elements(node, ins):
    x, idx = ins
    axis = attr(node, "axis", 0) % x.dim()
    return [torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx).long())]


def _gather_nd(node, ins):
    x, idx = ins
    if attr(node, "batch_dims", 0):
        raise UnsupportedModelError("--finetune: GatherND with batch_dims is not supported")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k).long()
    flat = torch.where(flat < 0, flat + torch.tensor(x.shape[:k]), flat)
    return [x[tuple(flat.t())].reshape((*idx.shape[:-1], *x.shape[k:]))]


def _trilu(node, ins):
    k = int(ins[1]) if len(ins) > 1 and ins[1] is not None else 0
    return [torch.triu(ins[0], k) if attr(node, "upper", 1) else torch.tril(ins[0], k)]


def _cumsum(node, ins):
    if attr(node, "exclusive", 0) or attr(node, "reverse", 0):
        raise UnsupportedModelError("--finetune: exclusive or reverse CumSum is not supported")
    return [torch.cumsum(ins[0], int(ins[1]))]


def _slice(node, ins):
    x = ins[0]
    starts, ends = ints(ins[1]), ints(ins[2])
    axes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise UnsupportedModelError("--finetune: Slice with a negative step is not supported")
        n = x.shape[a]
        index[a % x.dim()] = slice(max(min(s, n), -n), max(min(e, n), -n - 1), st)
    return [x[tuple(index)]]


def _reshape(node, ins):
    x, shape = ins[0], ints(ins[1])
    if not attr(node, "allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _expand(node, ins):
    shape = torch.broadcast_shapes(tuple(ins[0].shape), tuple(ints(ins[1])))
    return [ins[0].expand(shape)]


def _div(node, ins):
    a, b = ins
    if not a.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


def _constant_of_shape(node, ins):
    v = attr(node, "value")
    value = torch.from_numpy(np.asarray(v).reshape(-1)[:1].copy()) if v is not None else torch.zeros(1)
    return [value.expand(ints(ins[0])).clone() if ins[0].numel() else value.reshape(())]


def _constant(node, ins):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        v = attr(node, key)
        if v is not None:
            a = np.asarray(v)
            a = a.astype(np.float32) if a.dtype == np.float64 else a
            return [torch.from_numpy(a.copy())]
    raise UnsupportedModelError(f"--finetune: Constant {node.name!r} has no supported value attribute")


def _range(node, ins):
    start, limit, delta = (t.item() for t in ins)
    return [torch.arange(start, limit, delta, dtype=ins[0].dtype)]


def _flatten(node, ins):
    x = ins[0]
    axis = attr(node, "axis", 1) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


def _gemm(node, ins):
    a, b = ins[0], ins[1]
    if attr(node, "transA", 0):
        a = a.t()
    if attr(node, "transB", 0):
        b = b.t()
    y = attr(node, "alpha", 1.0) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + attr(node, "beta", 1.0) * ins[2]
    return [y]


def _layer_norm(node, ins):
    x = ins[0]
    axis = attr(node, "axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + attr(node, "epsilon", 1e-5)) * ins[1]
    return [y + ins[2] if len(ins) > 2 and ins[2] is not None else y]


def _pads(node, x_dims: int) -> tuple[list[int], bool]:
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
        raise UnsupportedModelError(f"--finetune: {node.op_type} {node.name!r} uses auto_pad SAME, not supported")
    pads = attr(node, "pads") or [0] * (2 * x_dims)
    half = len(pads) // 2
    return pads, pads[:half] == pads[half:]


def _torch_pad(x, pads, value=0.0):
    half = len(pads) // 2
    flat = []
    for i in reversed(range(half)):
        flat += [pads[i], pads[i + half]]
    return F.pad(x, flat, value=value)


def _conv(node, ins):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    n = x.dim() - 2
    pads, sym = _pads(node, n)
    if not sym:
        x, pads = _torch_pad(x, pads), [0] * (2 * n)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return [conv(x, w, b, stride=attr(node, "strides") or 1, padding=pads[:n], dilation=attr(node, "dilations") or 1,
                 groups=attr(node, "group", 1))]


def _pool(node, ins):
    x = ins[0]
    n = x.dim() - 2
    pads, sym = _pads(node, n)
    k, strides = attr(node, "kernel_shape"), attr(node, "strides") or [1] * n
    ceil = bool(attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        if not sym:
            x, pads = _torch_pad(x, pads, float("-inf")), [0] * (2 * n)
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
        return [pool(x, k, strides, pads[:n], dilation=attr(node, "dilations") or 1, ceil_mode=ceil)]
    if not sym:
        raise UnsupportedModelError(f"--finetune: AveragePool {node.name!r} with asymmetric pads is not supported")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    return [pool(x, k, strides, pads[:n], ceil_mode=ceil, count_include_pad=bool(attr(node, "count_include_pad", 0)))]


def _reduce(fn):
    def op(node, ins):
        x = ins[0]
        axes = _axes(node, ins)
        keep = bool(attr(node, "keepdims", 1))
        if not axes:
            if attr(node, "noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [a % x.dim() for a in axes], keep)]
    return op


def _split(node, ins):
    x = ins[0]
    axis = attr(node, "axis", 0) % x.dim()
    sizes = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else attr(node, "split")
    if sizes is None:
        parts = attr(node, "num_outputs") or len(node.outputs)
        sizes = [-(-x.shape[axis] // parts)] * parts
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return list(torch.split(x, sizes, dim=axis))


def _clip(node, ins):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else attr(node, "min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else attr(node, "max")
    return [torch.clamp(ins[0], min=lo, max=hi)]


def _softmax(node, ins):
    return [torch.softmax(ins[0], attr(node, "axis", -1))]


def _batchnorm(node, ins):
    x, g, b, m, v = ins[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = g / torch.sqrt(v + attr(node, "epsilon", 1e-5))
    return [(x - m.reshape(shape)) * inv.reshape(shape) + b.reshape(shape)]


def _selu(node, ins):
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    return [gamma * torch.where(ins[0] > 0, ins[0], alpha * torch.expm1(ins[0]))]


def _variadic(fn):
    def op(node, ins):
        out = ins[0]
        for t in ins[1:]:
            out = fn(out, t)
        return [out]
    return op


def _unary(fn):
    return lambda node, ins: [fn(ins[0])]


def _binary(fn):
    return lambda node, ins: [fn(ins[0], ins[1])]


FLOAT_OPS = {
    "Identity": _unary(lambda x: x), "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Shape": lambda n, i: [torch.tensor(i[0].shape, dtype=torch.int64)[attr(n, "start", 0):attr(n, "end")]],
    "Size": lambda n, i: [torch.tensor(i[0].numel(), dtype=torch.int64)],
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd, "Trilu": _trilu,
    "CumSum": _cumsum,
    "Mod": lambda n, i: [torch.fmod(i[0], i[1]) if attr(n, "fmod", 0) else torch.remainder(i[0], i[1])],
    "Sign": _unary(torch.sign), "IsNaN": _unary(torch.isnan), "Xor": _binary(torch.logical_xor),
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Slice": _slice, "Reshape": _reshape, "Expand": _expand, "Flatten": _flatten, "Split": _split,
    "Concat": lambda n, i: [torch.cat([t for t in i if t is not None], attr(n, "axis"))],
    "Transpose": lambda n, i: [i[0].permute(attr(n, "perm") or list(reversed(range(i[0].dim()))))],
    "Cast": lambda n, i: [i[0].to(DTYPES[attr(n, "to")])], "Range": _range,
    "Tile": lambda n, i: [i[0].repeat(ints(i[1]))],
    "Where": lambda n, i: [torch.where(i[0], i[1], i[2])],
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Gemm": _gemm,
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Not": _unary(torch.logical_not),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Erf": _unary(torch.erf), "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid),
    "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "Relu": _unary(torch.relu), "Clip": _clip, "Softmax": _softmax, "LayerNormalization": _layer_norm,
    "HardSigmoid": lambda n, i: [torch.clamp(attr(n, "alpha", 0.2) * i[0] + attr(n, "beta", 0.5), 0, 1)],
    "HardSwish": _unary(F.hardswish), "LeakyRelu": lambda n, i: [F.leaky_relu(i[0], attr(n, "alpha", 0.01))],
    "Elu": lambda n, i: [F.elu(i[0], attr(n, "alpha", 1.0))], "Selu": _selu, "Softplus": _unary(F.softplus),
    "Mish": _unary(F.mish), "Dropout": lambda n, i: [i[0]],  # inference: the input (no mask output)
    "Gelu": lambda n, i: [F.gelu(i[0], approximate="tanh" if attr(n, "approximate", "none") == "tanh" else "none")],
    "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool, "BatchNormalization": _batchnorm,
    "GlobalAveragePool": lambda n, i: [i[0].mean(list(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda n, i: [i[0].amax(list(range(2, i[0].dim())), keepdim=True)],
    "ReduceMean": _reduce(lambda x, a, k: x.mean(a, keepdim=k)),
    "ReduceSum": _reduce(lambda x, a, k: x.sum(a, keepdim=k)),
    "ReduceMax": _reduce(lambda x, a, k: x.amax(a, keepdim=k)),
    "ReduceMin": _reduce(lambda x, a, k: x.amin(a, keepdim=k)),
}
