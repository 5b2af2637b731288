"""quantkit: post-training quantization of ONNX models for CPUs and edge devices."""

__version__ = "0.1.0"
