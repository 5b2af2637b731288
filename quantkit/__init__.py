"""quantkit: post-training quantization of ONNX models for CPUs and edge devices.

`quantkit.quantize(model, calib=..., **options)` is the Python API (see quantkit/run.py); importing
quantkit loads neither onnxruntime nor torch: the pipeline is imported when a run starts.
"""

import sys
import types

__version__ = "0.1.0"

from quantkit.run import Quantized, quantize


class _Package(types.ModuleType):
    """The subpackage of quantization schemes is also called `quantize`; importing it would bind
    quantkit.quantize to that module. The API function keeps the name; the subpackage stays
    reachable by import (`from quantkit.quantize import plan`), which goes through sys.modules."""

    def __setattr__(self, name, value):
        if name == "quantize" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["Quantized", "__version__", "quantize"]
