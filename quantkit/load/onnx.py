"""Load an ONNX file (with external data) into onnx_ir and check it is one we can work on."""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from quantkit.calibrate.data import InputSpec
from quantkit.errors import InputError, UnsupportedModelError, first_line
from quantkit.load.external import read_lazily
from quantkit.runtime import INLINE_LIMIT

# Per-channel DequantizeLinear (the `axis` attribute) exists from opset 13.
MIN_OPSET = 13
OLDEST_CONVERTIBLE_OPSET = 7


def load_onnx(path: Path, keep_on_disk: bool = False) -> ir.Model:
    """keep_on_disk: external weights stay in their file and are read one tensor at a time
    (load/external.py) however small the model."""
    path = Path(path)
    check_model_path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, UnicodeDecodeError on corrupted strings, OSError, ...
        raise InputError(f"{path} is not a readable ONNX model ({type(e).__name__}: {first_line(e, 300)})") from e
    if not proto.graph.node:
        raise InputError(f"{path} is not a readable ONNX model: its graph has no nodes")
    if all(i.name in {t.name for t in proto.graph.initializer} for i in proto.graph.input):
        raise InputError(f"{path} has no graph inputs to feed data to; quantkit needs a model that takes inputs")
    _check_external_data(proto, path)
    opset = _default_opset(proto)
    try:
        if opset < MIN_OPSET:
            proto = _upgrade_opset(path, opset)
        model = ir.serde.deserialize_model(proto)
    except (UnsupportedModelError, InputError):
        raise
    except Exception as e:  # a protobuf that parses but is not a consistent ONNX model
        raise InputError(f"{path} is not a valid ONNX model: {first_line(e, 300)}") from e
    if opset >= MIN_OPSET:
        ir.external_data.set_base_dir(model.graph, str(path.parent))
        if keep_on_disk:
            read_lazily(model)
        elif model_bytes(path) <= INLINE_LIMIT:
            # small enough to hold: in memory, the model serializes for onnxruntime without files;
            # larger ones stay memory-mapped and go through a saved copy (runtime.session)
            ir.external_data.load_to_model(model)
    return model


def check_model_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path} is a directory; give the model file (.onnx, or a PyTorch file)")
    if not path.exists():
        raise InputError(f"model file {path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file; give the model file (.onnx, or a PyTorch file)")


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
            f"({first_line(e)}); re-export it with opset >= {MIN_OPSET}"
        ) from None


def _external_tensors(proto: onnx.ModelProto):
    """(tensor, {location, offset, length}) for every initializer kept in an external file,
    including those of If/Loop/Scan subgraphs and of Constant nodes."""
    for t in _all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t, {kv.key: kv.value for kv in t.external_data}


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_tensors(g)


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    return {info.get("location", "") for _, info in _external_tensors(proto)}


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Every external tensor lives in a file inside the model's folder and is as long as declared."""
    folder = path.parent.resolve()
    sizes: dict[str, int] = {}
    for t, info in _external_tensors(proto):
        loc = info.get("location", "")
        if loc not in sizes:
            sizes[loc] = _external_file_size(path, folder, loc)
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        need = int(length) if length is not None else _nbytes(t)
        if offset < 0 or offset + need > sizes[loc]:
            raise InputError(f"{path}: tensor '{t.name}' needs bytes {offset}..{offset + need} of '{loc}', "
                             f"which holds only {sizes[loc]} bytes (truncated or not this model's data file)")


def _external_file_size(path: Path, folder: Path, loc: str) -> int:
    target = path.parent / loc
    if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts or not target.resolve().is_relative_to(folder):
        raise InputError(f"{path} points to external data '{loc}' outside the model's folder; quantkit reads "
                         "external data only from files inside the model's own folder")
    if not target.is_file():
        raise InputError(f"{path} keeps weights in external file '{loc}', which is missing next to it; "
                         "copy it into the model's directory")
    return target.stat().st_size


_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def _nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        return n * int(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files(path: Path) -> list[Path]:
    """The model file and, for ONNX, the external data files it references (for telling outputs
    from inputs); a file that is not readable ONNX is just itself."""
    path = Path(path)
    if not path.is_file() or zipfile.is_zipfile(path):  # missing, or a PyTorch archive
        return [path]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX (a PyTorch file), or unreadable: load_onnx reports it later
        return [path]
    return [path, *(path.parent / loc for loc in sorted(_external_locations(proto)) if loc)]


def model_bytes(path: Path) -> int:
    """Size on disk of a model: the .onnx file plus the external data files it references."""
    path = Path(path)
    stat = os.stat(path)
    locations = _locations(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return stat.st_size + sum(os.path.getsize(path.parent / loc) for loc in locations)


@functools.lru_cache(maxsize=8)
def _locations(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The external data files a model file references, parsed once per version of the file (a run
    asks for its input's size several times; parsing MiniLM's 86 MB file takes 0.06 s: benchmarks/session_build.py)."""
    return tuple(_external_locations(onnx.load(path, load_external_data=False)))


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
            # a symbolic dim, or -1/0 as some converters write for "any size", is dynamic
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in v.shape)
        specs.append(InputSpec(v.name, dtype, shape))
    return specs
