"""PyTorch models in: the only module that imports torch (lazily, from api.py, only when the model
file is not ONNX).

Recognized by content, not by suffix:
  * TorchScript archives (torch.jit.save)             -> loaded with torch.jit.load
  * torch.export programs (torch.export.save, .pt2)    -> loaded with torch.export.load
  * a state_dict (.pt/.pth, weights_only) or .safetensors, with --model-class pkg.mod:factory
  * a whole pickled module (torch.save(model))         -> only with --allow-pickle

The model is exported with torch.onnx (the dynamo exporter, falling back to the TorchScript
exporter with a note), and the exported ONNX is checked against torch on a calibration batch.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.calibrate.data import InputSpec
from quantkit.errors import ConfigError, InputError, UnsupportedModelError

PICKLE_REFUSAL = ("{path} is a pickled torch module: loading it runs arbitrary code from the file. "
                  "Pass --allow-pickle if you trust it, or save model.state_dict() and use --model-class")


def is_torch_file(path: Path) -> bool:
    """True for the PyTorch forms above (zip archives and safetensors); ONNX files are protobuf."""
    return zipfile.is_zipfile(path) or _is_safetensors(path)


def _is_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100_000_000 and head[8:9] == b"{" and n <= os.path.getsize(path) - 8


def kind_of(path: Path) -> str:
    if _is_safetensors(path):
        return "safetensors"
    names = zipfile.ZipFile(path).namelist()
    if any(n.endswith("archive_format") or "serialized_exported_program" in n or n.endswith(".json") and "models/" in n
           for n in names):
        return "export"
    if any("/code/" in n and n.endswith(".py") for n in names) or any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return "pickle"  # torch.save: a state_dict or a whole module; told apart when loading


@dataclass
class Exported:
    onnx_path: Path
    module: object  # callable torch module used as the reference
    input_names: list[str]
    info: dict = field(default_factory=dict)


def parse_input_spec(text: str) -> InputSpec:
    """NAME:DIMSxDIMS:DTYPE, e.g. pixels:Bx3x224x224:float32. A dimension that is not a number is
    dynamic (and named by it)."""
    try:
        name, dims, dtype = text.split(":")
        shape = tuple(int(d) if d.isdigit() else None for d in dims.lower().split("x"))
        return InputSpec(name, np.dtype(dtype), shape)
    except (ValueError, TypeError):
        raise ConfigError(f"--input {text!r}: expected NAME:DIMxDIM...:DTYPE, e.g. x:Bx3x224x224:float32") from None


def _torch():
    try:
        import torch
    except ImportError:
        raise UnsupportedModelError("PyTorch models need torch: pip install torch==2.13.0 (the CPU wheel)") from None
    return torch


def _load_state_dict(path: Path, kind: str) -> dict:
    torch = _torch()
    if kind == "safetensors":
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            base = 8 + n
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}
        raw = Path(path).read_bytes()
        out = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            buf = bytearray(raw[base + start : base + end])
            dtype = dtypes[meta["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[key] = t.reshape(meta["shape"])
        return out
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError with "Weights only load failed"
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise InputError(PICKLE_REFUSAL.format(path=path)) from None
        raise InputError(f"{path} could not be read as a torch checkpoint: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def _factory(spec: str):
    if ":" not in spec:
        raise ConfigError(f"--model-class {spec!r}: expected package.module:factory")
    mod_name, attr = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"--model-class: cannot import {mod_name!r} ({e})") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"--model-class: {mod_name} has no {attr!r}")
    return fn


def load_module(path: Path, model_class: str | None, allow_pickle: bool):
    """(module, kind) for any of the accepted forms; a torch.nn.Module, ScriptModule or
    ExportedProgram."""
    torch = _torch()
    kind = kind_of(path)
    if kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval(), kind
    if kind == "export":
        return torch.export.load(str(path)), kind
    if model_class is not None:
        state = _load_state_dict(path, kind)
        module = _factory(model_class)()
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"{path} does not fit --model-class {model_class}: "
                             f"{len(missing)} missing key(s) (e.g. {list(missing)[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {list(unexpected)[:3]})")
        return module.eval(), "state_dict"
    if kind == "safetensors":
        raise ConfigError(f"{path} holds only weights: pass --model-class package.module:factory to build the module")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise InputError(f"{path} could not be read as a torch file: {str(e).splitlines()[0]}") from None
        if not allow_pickle:
            raise InputError(PICKLE_REFUSAL.format(path=path)) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        raise ConfigError(f"{path} holds a state_dict (weights only): pass --model-class package.module:factory")
    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a torch module")
    return obj.eval(), "pickle"


def forward_names(module) -> list[str] | None:
    """Parameter names of forward, when torch can tell them."""
    torch = _torch()
    if isinstance(module, torch.export.ExportedProgram):
        return [s.arg.name for s in module.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if isinstance(module, torch.jit.ScriptModule):
        args = module.forward.schema.arguments
        return [a.name for a in args[1:]]
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def order_inputs(specs: list[InputSpec], module) -> list[InputSpec]:
    names = forward_names(module)
    if not names or len(specs) == 1:
        return specs
    by_name = {s.name: s for s in specs}
    missing = [n for n in names[: len(specs)] if n not in by_name]
    if missing:
        raise InputError(f"the model's forward takes ({', '.join(names)}) but the data has arrays "
                         f"{', '.join(by_name)}; name the arrays after the forward arguments")
    return [by_name[n] for n in names if n in by_name]


def run_torch(module, arrays: list[np.ndarray]) -> list[np.ndarray]:
    torch = _torch()
    with torch.no_grad():
        call = module.module() if isinstance(module, torch.export.ExportedProgram) else module
        out = call(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
    if isinstance(out, dict):
        out = list(out.values())
    if not isinstance(out, (list, tuple)):
        out = [out]
    return [o.detach().cpu().numpy() for o in out]


def export(module, kind: str, specs: list[InputSpec], example: list[np.ndarray], path: Path) -> dict:
    """torch -> ONNX, dynamo exporter first, TorchScript exporter as the fallback. The batch axis
    and the axes the signature marks dynamic are exported dynamic. The exporters' own chatter
    (progress lines on stdout, warnings) is kept off the terminal: stdout may carry --json."""
    import contextlib
    import io
    import logging
    import warnings

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            return _export(module, kind, specs, example, path)
        finally:
            logging.disable(logging.NOTSET)


def _export(module, kind: str, specs: list[InputSpec], example: list[np.ndarray], path: Path) -> dict:
    torch = _torch()
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    names = [s.name for s in specs]
    dyn = [{i: torch.export.Dim.DYNAMIC for i, d in enumerate(s.shape or ()) if d is None or i == 0} for s in specs]
    info = {"source_kind": kind}
    errors = []
    if kind != "torchscript":
        try:
            prog = torch.onnx.export(module, args, input_names=names, dynamic_shapes=tuple(dyn), dynamo=True,
                                     optimize=True, verbose=False)
            prog.save(str(path))
            info["exporter"] = "dynamo"
            return info
        except Exception as e:  # the exporter raises many exception types
            errors.append(_first_line(e) + (" (pip install onnxscript)" if "onnxscript" in str(e) else ""))
            if kind == "export":
                raise UnsupportedModelError(f"torch.onnx could not export the program: {errors[0]}") from None
    try:
        axes = {s.name: {i: f"{s.name}_dim{i}" for i in d} for s, d in zip(specs, dyn)}
        torch.onnx.export(module, args, str(path), input_names=names, dynamic_axes=axes, dynamo=False,
                          opset_version=17, verbose=False)
    except Exception as e:
        errors.append(_first_line(e))
        raise UnsupportedModelError(f"torch.onnx could not export the model: {' / '.join(errors)}") from None
    info["exporter"] = "torchscript"
    if errors:
        info["fallback_reason"] = f"the dynamo exporter failed ({errors[0]}); used the TorchScript exporter"
    return info


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
