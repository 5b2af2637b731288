"""The weights of a model as named numpy arrays, read from and written back to the form they came
in: ONNX initializers, a PyTorch state_dict (.pt, weights_only), or .safetensors. Imports numpy and
onnx only; torch and safetensors are imported when such a file is met, so `apply` on ONNX runs on
a device with numpy and onnx alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit.errors import InputError, UnsupportedModelError
from quantkit.output import Outputs

INLINE_LIMIT = 1_500_000_000  # protobuf's 2 GiB ceiling, with a margin (as in quantkit.runtime)
# ops of quantized models: every initializer they read (integer weights, scales, zero points) is
# part of a quantized weight and is sent bit-exact, whatever its size
QUANTIZED_OPS = {"DequantizeLinear", "QuantizeLinear", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
                 "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}


@dataclass
class ModelTensors:
    kind: str  # "onnx", "state_dict" or "safetensors"
    arrays: dict[str, np.ndarray]  # in file order
    proto: onnx.ModelProto | None = None  # ONNX only: the graph the arrays go back into

    def type_of(self, name: str) -> str:
        return self.arrays[name].dtype.name


def kind_of(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        return "state_dict"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return "safetensors"  # an 8-byte header length, then the JSON header
    return "onnx"


def read(path: Path) -> ModelTensors:
    kind = kind_of(path)
    if kind == "onnx":
        return _read_onnx(Path(path))
    if kind == "safetensors":
        return ModelTensors(kind, _read_safetensors(Path(path)))
    return ModelTensors(kind, _read_state_dict(Path(path)))


def _read_onnx(path: Path) -> ModelTensors:
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - DecodeError, OSError, a missing external data file
        why = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{path} is not a readable ONNX model ({type(e).__name__}: {why})") from None
    if not proto.graph.node:
        raise InputError(f"{path} is not a readable ONNX model: its graph has no nodes")
    arrays = {}
    for t in proto.graph.initializer:
        try:
            arrays[t.name] = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001 - an element type numpy cannot hold
            raise UnsupportedModelError(f"{path}: initializer '{t.name}' cannot be read as an array ({e})") from None
    return ModelTensors("onnx", arrays, proto)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise UnsupportedModelError(".safetensors files need the safetensors package: "
                                    "pip install 'quantkit[delta]'") from None
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # noqa: BLE001 - SafetensorError, a dtype numpy lacks (bf16)
        raise InputError(f"{path} could not be read as .safetensors: {str(e).splitlines()[0]}") from None


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UnsupportedModelError("PyTorch state_dict files need torch: "
                                    "pip install torch==2.13.0 (the CPU wheel)") from None
    from quantkit.load.torch import load_state_dict

    obj = load_state_dict(path, "pickle")  # weights_only: a pickle that is more than tensors is refused
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: entry '{k}' is a {type(v).__name__}, not a tensor; save model.state_dict()")
        if v.dtype == torch.bfloat16:
            raise UnsupportedModelError(f"{path}: tensor '{k}' is bfloat16, which numpy cannot hold; "
                                        "save it as float32")
        out[k] = v.detach().cpu().contiguous().numpy()
    return out


def _graph_signature(proto: onnx.ModelProto) -> list[tuple[str, bytes]]:
    """Each node as (a readable name, its bytes without the node name): the architecture."""
    sig = []
    for i, n in enumerate(proto.graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = ""
        sig.append((n.name or f"#{i} {n.op_type}", copy.SerializeToString(deterministic=True)))
    return sig


def quantized_weights(tensors: ModelTensors) -> set[str]:
    """Initializers read by quantized ops (ONNX only): what `quantize` wrote, to be kept exact."""
    if tensors.proto is None:
        return set()
    names: set[str] = set()
    for n in tensors.proto.graph.node:
        if n.op_type in QUANTIZED_OPS:
            names.update(i for i in n.input if i in tensors.arrays)
    return names


def check_same_architecture(base: ModelTensors, new: ModelTensors, base_path: Path, new_path: Path) -> None:
    """One line naming the first tensor (or node) that differs: a delta needs the same weights."""
    if base.kind != new.kind:
        raise InputError(f"{base_path} is a {base.kind} file but {new_path} is a {new.kind} file; "
                         "give two of the same form")
    for name, a in base.arrays.items():
        b = new.arrays.get(name)
        if b is None:
            raise InputError(f"tensor '{name}' of {base_path} is not in {new_path} (renamed, or another architecture)")
        if a.shape != b.shape:
            raise InputError(f"tensor '{name}' has shape {list(a.shape)} in {base_path} "
                             f"but {list(b.shape)} in {new_path}")
        if a.dtype != b.dtype:
            raise InputError(f"tensor '{name}' is {a.dtype.name} in {base_path} but {b.dtype.name} in {new_path}")
    extra = [n for n in new.arrays if n not in base.arrays]
    if extra:
        raise InputError(f"tensor '{extra[0]}' of {new_path} is not in {base_path} (renamed, or another architecture)")
    if base.kind == "onnx":
        sb, sn = _graph_signature(base.proto), _graph_signature(new.proto)
        for (name, x), (_, y) in zip(sb, sn):
            if x != y:
                raise InputError(f"node '{name}' differs between {base_path} and {new_path}: not the same architecture")
        if len(sb) != len(sn):
            raise InputError(f"{base_path} has {len(sb)} nodes but {new_path} has {len(sn)}: not the same architecture")


def fingerprint(tensors: ModelTensors) -> str:
    """sha256 over the weights in name order (name, dtype, shape, bytes): the same for a model
    re-saved with other metadata, different for any changed weight."""
    h = hashlib.sha256()
    for name in sorted(tensors.arrays):
        a = np.ascontiguousarray(tensors.arrays[name])
        h.update(json.dumps([name, a.dtype.name, list(a.shape)]).encode())
        h.update(a.view(np.uint8).reshape(-1).tobytes() if a.dtype.itemsize else b"")
    return h.hexdigest()


def write(tensors: ModelTensors, arrays: dict[str, np.ndarray], path: Path, force: bool) -> None:
    """Write `arrays` in the form `tensors` came in, atomically (quantkit/output.py's rules)."""
    def save(target: Path) -> None:
        if tensors.kind == "onnx":
            build_onnx(tensors.proto, arrays, target)
        elif tensors.kind == "safetensors":
            from safetensors.numpy import save_file
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(target))
        else:
            import torch
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, target)

    with Outputs(force) as out:
        out.stage_written(Path(path), save)
        out.commit()


def build_onnx(proto: onnx.ModelProto, arrays: dict[str, np.ndarray], target: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    if sum(a.nbytes for a in arrays.values()) > INLINE_LIMIT:
        onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data")
    else:
        onnx.save(model, str(target))


def file_bytes(path: Path) -> int:
    """Size on disk, with an ONNX model's external data files."""
    path = Path(path)
    total = os.path.getsize(path)
    if kind_of(path) == "onnx":
        proto = onnx.load(str(path), load_external_data=False)
        locs = {kv.value for t in proto.graph.initializer for kv in t.external_data if kv.key == "location"}
        total += sum(os.path.getsize(path.parent / loc) for loc in locs)
    return total

