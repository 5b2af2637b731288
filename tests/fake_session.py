"""A stand-in for an onnxruntime InferenceSession in unit tests: named inputs and outputs, a count of
runs, and `outputs(feed)` (what a subclass computes) returned by run()."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


class FakeSession:
    def __init__(self, inputs: tuple[str, ...] = ("x",), outputs: tuple[str, ...] = ("y",)):
        self.input_names, self.output_names, self.runs = list(inputs), list(outputs), 0

    def get_inputs(self):
        return [SimpleNamespace(name=n) for n in self.input_names]

    def get_outputs(self):
        return [SimpleNamespace(name=n) for n in self.output_names]

    def run(self, names, feed) -> list[np.ndarray]:
        self.runs += 1
        return self.outputs(feed)

    def outputs(self, feed) -> list[np.ndarray]:
        raise NotImplementedError
