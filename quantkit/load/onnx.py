"""Load an ONNX file (with external data) into onnx_ir and check it is one we can work on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from quantkit.calibrate.data import InputSpec
from quantkit.errors import InputError, UnsupportedModelError
from quantkit.runtime import INLINE_LIMIT

# Per-channel DequantizeLinear (the `axis` attribute) exists from opset 13.
MIN_OPSET = 13
OLDEST_CONVERTIBLE_OPSET = 7


def load_onnx(path: Path) -> ir.Model:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not proto.graph.node:
        raise InputError(f"{path} is not a readable ONNX model: its graph has no nodes")
    _check_external_data(proto, path)
    opset = _default_opset(proto)
    if opset < MIN_OPSET:
        proto = _upgrade_opset(path, opset)
        model = ir.serde.deserialize_model(proto)
    else:
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, str(path.parent))
        if model_bytes(path) <= INLINE_LIMIT:
            # small enough to hold: in memory, the model serializes for onnxruntime without files;
            # larger ones stay memory-mapped and go through a saved copy (runtime.session)
            ir.external_data.load_to_model(model)
    return model


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UnsupportedModelError("the model imports no version of the default ONNX opset")


def _upgrade_opset(path: Path, opset: int) -> onnx.ModelProto:
    if opset < OLDEST_CONVERTIBLE_OPSET:
        raise UnsupportedModelError(
            f"{path} uses opset {opset}; quantkit needs opset >= {MIN_OPSET}. "
            "Re-export the model with a newer opset"
        )
    try:
        full = onnx.load(str(path))
        return onnx.version_converter.convert_version(full, MIN_OPSET)
    except Exception as e:  # the converter raises bare RuntimeErrors and more
        raise UnsupportedModelError(
            f"{path} uses opset {opset} and converting it to opset {MIN_OPSET} failed "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-export it with opset >= {MIN_OPSET}"
        ) from None


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    locs = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    locs.add(kv.value)
    return locs


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    for loc in sorted(_external_locations(proto)):
        if not (path.parent / loc).is_file():
            raise InputError(
                f"{path} keeps weights in external file '{loc}', which is missing next to it; "
                "copy it into the model's directory"
            )


def model_bytes(path: Path) -> int:
    """Size on disk of a model: the .onnx file plus the external data files it references."""
    path = Path(path)
    total = os.path.getsize(path)
    proto = onnx.load(str(path), load_external_data=False)
    for loc in _external_locations(proto):
        total += os.path.getsize(path.parent / loc)
    return total


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Graph inputs the user must feed (initializers listed as inputs are not among them)."""
    specs = []
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        if v.dtype is None:
            raise UnsupportedModelError(f"graph input '{v.name}' has no element type")
        try:
            dtype = np.dtype(v.dtype.numpy())
        except (TypeError, ValueError, NotImplementedError):
            raise UnsupportedModelError(
                f"graph input '{v.name}' has type {v.dtype}, which numpy data cannot feed"
            ) from None
        shape = None
        if v.shape is not None:
            shape = tuple(d if isinstance(d, int) else None for d in v.shape)
        specs.append(InputSpec(v.name, dtype, shape))
    return specs
