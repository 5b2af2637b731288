"""quantkit: post-training quantization of ONNX models for CPUs and edge devices.

`quantkit.quantize(model, calib=..., **options)` is the Python API (see quantkit/run.py); importing
quantkit loads neither onnxruntime nor torch: the pipeline is imported when a run starts.
"""

__version__ = "0.1.0"

from quantkit.run import Quantized, quantize

__all__ = ["Quantized", "__version__", "quantize"]
