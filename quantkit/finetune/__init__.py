"""Recovery training (--finetune): the placed, quantized ONNX graph run as a trainable torch graph.

Design: the pipeline first places and quantizes the model as usual (ranges, weights, placement,
speed guard). That ONNX graph is then interpreted op by op in torch (graph.py), where every
quantized weight becomes a latent float parameter behind a fake quantizer with a learnable scale,
every QuantizeLinear/DequantizeLinear pair a fake quantizer with a learnable range (lsq.py,
fakequant.py). The graph is distilled against the fp32 model's outputs (loop.py; batches of a model
that reads an attention mask are cut to their real tokens, trim.py) and the trained
codes and scales are written back into the same graph (export.py): the structure that ships is the
one that was trained, so the onnxruntime model matches the fake-quantized torch model up to the
kernels' own integer arithmetic (tested in tests/finetune/).
"""
