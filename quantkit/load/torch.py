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

import contextlib
import importlib
import inspect
import os
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.calibrate.data import InputSpec
from quantkit.errors import ConfigError, InputError, UnsupportedModelError, first_line
from quantkit.load import archive

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
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path} is not a readable PyTorch archive ({e})") from e
    if any(n.endswith("archive_format") or "serialized_exported_program" in n or n.endswith(".json") and "models/" in n
           for n in names):
        return "export"
    if any("/code/" in n and n.endswith(".py") for n in names) or any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return "pickle"  # torch.save: a state_dict or a whole module; told apart when loading


def check_archive(path: Path, kind: str, allow_pickle: bool) -> None:
    """Refuse an archive that would unpickle anything but tensors, unless --allow-pickle."""
    if allow_pickle:
        return
    bad = archive.unsafe_globals(path, torchscript=kind == "torchscript")
    if bad:
        member, name = bad[0]
        raise InputError(f"{path}: loading it would unpickle {member}, which imports {name}: that runs code "
                         "from the file. Pass --allow-pickle only if you trust the file")


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
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--input {text!r}: expected NAME:DIMxDIM...:DTYPE, e.g. x:Bx3x224x224:float32") from e


@contextlib.contextmanager
def private_caches(workdir: Path):
    """torch's compiler caches (TORCHINDUCTOR_CACHE_DIR, by default a folder in the system temp
    dir that outlives the process) go into our work dir, which is removed at the end."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(workdir) / "torch-cache")
    os.environ["TRITON_CACHE_DIR"] = str(Path(workdir) / "torch-cache" / "triton")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _torch():
    try:
        import torch
    except ImportError as e:
        raise UnsupportedModelError("PyTorch models need torch: pip install torch==2.13.0 (the CPU wheel)") from e
    return torch


def load_state_dict(path: Path, kind: str) -> dict:
    torch = _torch()
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise UnsupportedModelError(".safetensors checkpoints need the safetensors package: "
                                        "pip install safetensors") from e
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, and OSError for unreadable files
            raise InputError(f"{path} is not a readable .safetensors file: {first_line(e, 300)}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError with "Weights only load failed"
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise InputError(PICKLE_REFUSAL.format(path=path)) from e
        raise InputError(f"{path} could not be read as a torch checkpoint: {first_line(e, 300)}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return obj


@contextlib.contextmanager
def _cwd_on_path():
    """The working directory on the import path, as for `python -m`: --model-class factories and
    the classes of pickled modules are found the same way."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        sys.path.remove(cwd)


def _factory(spec: str):
    if ":" not in spec:
        raise ConfigError(f"--model-class {spec!r}: expected package.module:factory")
    mod_name, attr = spec.split(":", 1)
    with _cwd_on_path():
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ConfigError(f"--model-class: cannot import {mod_name!r} ({e}); run from the directory "
                              "that holds it or put it on PYTHONPATH") from e
        except BaseException as e:  # the module's own code failed, or called exit()
            raise InputError(f"--model-class: importing {mod_name!r} failed: {first_line(e, 300)}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"--model-class: {mod_name} has no {attr!r}")
    return fn


def _build(spec: str):
    torch = _torch()
    factory = _factory(spec)
    try:
        module = factory()
    except (Exception, SystemExit) as e:  # user code: anything, including exit()
        raise InputError(f"--model-class {spec}: calling it failed: {first_line(e, 300)}") from e
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"--model-class {spec} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _load_archive(path: Path, kind: str, allow_pickle: bool):
    torch = _torch()
    check_archive(path, kind, allow_pickle)
    what = "TorchScript archive" if kind == "torchscript" else "torch.export program"
    try:
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu").eval()
        return torch.export.load(str(path))
    except Exception as e:  # torch raises RuntimeError, KeyError, ValueError... on broken archives
        raise InputError(f"{path} is not a readable {what}: {first_line(e, 300)}") from e


def load_module(path: Path, model_class: str | None, allow_pickle: bool):
    """(module, kind) for any of the accepted forms; a torch.nn.Module, ScriptModule or
    ExportedProgram."""
    torch = _torch()
    kind = kind_of(path)
    if kind in ("torchscript", "export"):
        return _load_archive(path, kind, allow_pickle), kind
    if model_class is not None:
        state = load_state_dict(path, kind)
        module = _build(model_class)
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
            raise InputError(f"{path} could not be read as a torch file: {first_line(e, 300)}") from e
        if not allow_pickle:
            raise InputError(PICKLE_REFUSAL.format(path=path)) from e
        obj = _unpickle(path)
    if isinstance(obj, dict):
        raise ConfigError(f"{path} holds a state_dict (weights only): pass --model-class package.module:factory")
    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a torch module")
    return obj.eval(), "pickle"


def _unpickle(path: Path):
    """A whole pickled module, with --allow-pickle: its class is imported like --model-class's."""
    torch = _torch()
    with _cwd_on_path():
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as e:
            raise InputError(f"{path}: the pickled module's class cannot be imported ({first_line(e, 300)}); run "
                             "from the directory that holds its module or put it on PYTHONPATH") from e
        except Exception as e:
            raise InputError(f"{path} could not be unpickled: {first_line(e, 300)}") from e


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


def export(module, kind: str, specs: list[InputSpec], example: list[np.ndarray], path: Path,
           output_names: tuple[str, ...] = ()) -> dict:
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
            info = _export(module, kind, specs, example, path, list(output_names) or None)
        finally:
            logging.disable(logging.NOTSET)
    if output_names:
        _check_output_names(path, output_names)
    return info


def _check_output_names(path: Path, names: tuple[str, ...]) -> None:
    """The exporters give the first len(names) outputs those names and silently ignore extra ones."""
    import onnx

    got = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    if len(got) != len(names) or list(names) != got:
        raise ConfigError(f"--output-names gives {len(names)} name(s) but the exported model has {len(got)} "
                          f"output(s) ({', '.join(got)}); give one name per output")


def _export(module, kind: str, specs: list[InputSpec], example: list[np.ndarray], path: Path,
            output_names: list[str] | None) -> dict:
    torch = _torch()
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    names = [s.name for s in specs]
    dyn = [{i: torch.export.Dim.DYNAMIC for i, d in enumerate(s.shape or ()) if d is None or i == 0} for s in specs]
    info = {"source_kind": kind}
    errors = []
    if kind != "torchscript":
        try:
            prog = torch.onnx.export(module, args, input_names=names, output_names=output_names,
                                     dynamic_shapes=tuple(dyn), dynamo=True,
                                     optimize=True, verbose=False)
            prog.save(str(path))
            info["exporter"] = "dynamo"
            return info
        except Exception as e:  # the exporter raises many exception types
            errors.append(first_line(e, 300) + (" (pip install onnxscript)" if "onnxscript" in str(e) else ""))
            if kind == "export":
                raise UnsupportedModelError(f"torch.onnx could not export the program: {errors[0]}") from e
    try:
        axes = {s.name: {i: f"{s.name}_dim{i}" for i in d} for s, d in zip(specs, dyn)}
        torch.onnx.export(module, args, str(path), input_names=names, output_names=output_names,
                          dynamic_axes=axes, dynamo=False,
                          opset_version=17, verbose=False)
    except Exception as e:
        errors.append(first_line(e, 300))
        raise UnsupportedModelError(f"torch.onnx could not export the model: {' / '.join(errors)}") from e
    info["exporter"] = "torchscript"
    if errors:
        info["fallback_reason"] = f"the dynamo exporter failed ({errors[0]}); used the TorchScript exporter"
    return info
