"""Where the fp32 ONNX model comes from: an ONNX file as it is, or a PyTorch file exported (and
checked against torch) first; and the data sources the model is fed from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit import runtime
from quantkit.calibrate.data import DataSource, InputSpec, peek_specs
from quantkit.calibrate.images import ImageSource, Preprocess, image_spec, is_image_data
from quantkit.config import RunConfig
from quantkit.errors import ConfigError, InputError, UnsupportedModelError
from quantkit.output import write_copy


def open_data(path: Path, specs: list[InputSpec], preprocess: str | None):
    """Arrays (.npz/.npy/.pt, a file or a directory) or a folder of images."""
    if is_image_data(path):
        return ImageSource(path, specs, Preprocess.parse(preprocess))
    if preprocess:
        raise ConfigError(f"--preprocess applies to image folders; {path} holds arrays")
    return DataSource(path, specs)



@dataclass
class Source:
    """The fp32 ONNX model the pipeline works on, and where it came from."""

    onnx_path: Path
    export: dict | None = None  # for PyTorch inputs: exporter, fallback, export check
    reference: Callable | None = None  # feed -> outputs of the PyTorch model itself


def load_source(cfg: RunConfig, workdir: Path, status) -> Source:
    """ONNX files are used as they are; PyTorch files are exported (and checked) first."""
    from quantkit.load import torch as torch_load  # imports torch itself only when called on torch files

    if not cfg.model.is_file():
        raise InputError(f"model file {cfg.model} does not exist")
    if not torch_load.is_torch_file(cfg.model):
        if cfg.save_fp32 is not None:
            raise ConfigError("--save-fp32 is for PyTorch models; this model is already ONNX")
        return Source(cfg.model)
    status(f"loading PyTorch model {cfg.model}")
    module, kind = torch_load.load_module(cfg.model, cfg.model_class, cfg.allow_pickle)
    data = cfg.data.calib or cfg.data.eval
    if cfg.inputs:
        specs = [torch_load.parse_input_spec(t) for t in cfg.inputs]
    elif data is not None:
        first_name = (torch_load.forward_names(module) or ["input"])[0]
        specs = [image_spec(data, first_name, Preprocess.parse(cfg.data.preprocess))] if is_image_data(data) \
            else peek_specs(data, first_name)
    else:
        raise ConfigError("a PyTorch model needs its input signature: pass --calib/--eval data "
                          "or --input NAME:SHAPE:DTYPE")
    specs = torch_load.order_inputs(specs, module)
    if data is not None:
        first = next(open_data(data, specs, cfg.data.preprocess).batches(2))
        example = [first[s.name] for s in specs]
    else:
        example = [np.ones([2 if d is None else d for d in s.shape], s.dtype) for s in specs]
    onnx_path = workdir / "exported.onnx"
    status(f"exporting {kind} model to ONNX")
    info = torch_load.export(module, kind, specs, example, onnx_path)
    sess = runtime.session(onnx_path, workdir, tag="exported")
    got = runtime.run(sess, None, {s.name: a for s, a in zip(specs, example)}, "the export check batch")
    ref = torch_load.run_torch(module, example)
    if len(ref) != len(got):
        raise UnsupportedModelError(f"the exported model has {len(got)} outputs but torch returns {len(ref)}")
    info["max_abs_error"] = max(float(np.abs(np.asarray(r, np.float64) - np.asarray(g, np.float64)).max(initial=0))
                                for r, g in zip(ref, got))
    info["checked_on_samples"] = len(example[0])
    if cfg.save_fp32 is not None:
        write_copy(onnx_path, cfg.save_fp32)
    names = [s.name for s in specs]
    return Source(onnx_path, info, lambda feed: torch_load.run_torch(module, [feed[n] for n in names]))
