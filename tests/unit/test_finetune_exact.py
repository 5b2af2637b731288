"""The trainable torch graph (quantkit/finetune) computes what onnxruntime computes on the quantized
model, before training and after its weights and scales moved and were written back."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import quantkit

torch = pytest.importorskip("torch")

from quantkit.finetune import fakequant as fq  # noqa: E402
from quantkit.finetune.export import write_back  # noqa: E402
from quantkit.finetune.graph import QuantGraph  # noqa: E402


def _init(name, a):
    return onnx.numpy_helper.from_array(np.asarray(a), name)


def _cnn(path, rng):
    h = onnx.helper
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             h.make_node("Relu", ["c2"], ["r2"]), h.make_node("GlobalAveragePool", ["r2"], ["p"]),
             h.make_node("Flatten", ["p"], ["f"]), h.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    inits = [_init("w1", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             _init("b1", rng.normal(0, 0.1, 8).astype(np.float32)),
             _init("w2", rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)),
             _init("b2", rng.normal(0, 0.1, 16).astype(np.float32)),
             _init("w3", rng.normal(0, 0.3, (4, 16)).astype(np.float32)),
             _init("b3", rng.normal(0, 0.1, 4).astype(np.float32))]
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 12, 12])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), path)
    return {"x": rng.normal(0, 1, (64, 3, 12, 12)).astype(np.float32)}


def _encoder(path, rng):
    h = onnx.helper
    nodes = [h.make_node("Gather", ["emb", "ids"], ["e"]), h.make_node("MatMul", ["e", "w1"], ["m1"]),
             h.make_node("Add", ["m1", "b1"], ["a1"]), h.make_node("Relu", ["a1"], ["r1"]),
             h.make_node("MatMul", ["r1", "w2"], ["y"])]
    inits = [_init("emb", rng.normal(0, 1, (100, 64)).astype(np.float32)),
             _init("w1", rng.normal(0, 0.2, (64, 96)).astype(np.float32)),
             _init("b1", rng.normal(0, 0.1, 96).astype(np.float32)),
             _init("w2", rng.normal(0, 0.2, (96, 32)).astype(np.float32))]
    g = h.make_graph(nodes, "enc", [h.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 6])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 32])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), path)
    return {"ids": rng.integers(0, 100, (64, 6)).astype(np.int64)}


def _quantized(tmp_path, build, **options):
    rng = np.random.default_rng(0)
    data = build(tmp_path / "m.onnx", rng)
    np.savez(tmp_path / "calib.npz", **data)
    quantkit.quantize(tmp_path / "m.onnx", calib=tmp_path / "calib.npz", output=tmp_path / "q.onnx",
                      no_speed_guard=True, **options)
    return tmp_path / "q.onnx", data


def _perturb(g: QuantGraph, seed: int = 1) -> None:
    """What training does: latent weights and log-scales move."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.learn.latent:
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-3) * 0.2)
        for p in g.learn.log_scale:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for p in g.learn.float_params:
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-2) * 0.2)


def _sqnr(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    err = float(((ref - got) ** 2).sum())
    return np.inf if err == 0 else 10 * np.log10(float((ref**2).sum()) / err)


def _compare(path, g: QuantGraph, feed) -> float:
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with torch.no_grad():
        ref = g(*[torch.from_numpy(feed[n]) for n in g.inputs])[0].numpy()
    return _sqnr(ref, got)


def test_int8_static_fake_quant_matches_onnxruntime_before_and_after_training(tmp_path):
    path, data = _quantized(tmp_path, _cnn)
    model = ir.load(path)
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 8  # activations, weights, biases
    g = QuantGraph(model)
    assert set(g.trained) >= {n.inputs[0].name for n in model.graph
                              if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None}
    feed = {"x": data["x"][:16]}
    assert _compare(path, g, feed) > 60  # dB: identical up to float summation order and rare rounding ties
    quant_err = _sqnr(ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, feed)[0], ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0])
    _perturb(g)
    assert write_back(g, model) == len(g.trained) + len(g.learn.scales) + len(g.learn.floats)
    ir.save(model, tmp_path / "trained.onnx")
    moved = _sqnr(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0],
                  ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"]).run(
                      None, feed)[0])
    assert moved < 40  # the written model really changed
    assert _compare(tmp_path / "trained.onnx", g, feed) > max(60, quant_err + 20)


def test_int4_weight_only_fake_quant_matches_matmulnbits_and_gather_block_quantized(tmp_path):
    path, data = _quantized(tmp_path, _encoder, weights="int4")
    model = ir.load(path)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 1
    g = QuantGraph(model)
    assert {t.kind for t in g.trained.values()} == {"nbits", "gather"}
    assert set(g.learn.floats) == {"b1"}  # the bias added to a MatMulNBits output trains as a plain parameter
    feed = {"ids": data["ids"][:16]}
    before = _compare(path, g, feed)
    _perturb(g)
    write_back(g, model)
    ir.save(model, tmp_path / "trained.onnx")
    after = _compare(tmp_path / "trained.onnx", g, feed)
    # MatMulNBits accuracy_level 4 quantizes A to int8 per block in the kernel (a * 127 / max|a|, rounded);
    # emulated, the two agree to float precision; without the emulation only to ~40 dB
    assert before > 100 and after > 100
    g0 = QuantGraph(ir.load(path), emulate_int8_a=False)
    assert _compare(path, g0, feed) < 60


def test_int4_with_float_compute_matches_to_float_precision(tmp_path):
    path, data = _quantized(tmp_path, _encoder, weights="int4", accuracy_level=0)
    model = ir.load(path)
    g = QuantGraph(model)
    _perturb(g)
    write_back(g, model)
    ir.save(model, tmp_path / "trained.onnx")
    assert _compare(tmp_path / "trained.onnx", g, {"ids": data["ids"][:16]}) > 100


def test_quantize_linear_rounds_half_to_even_and_saturates_as_onnxruntime():
    h = onnx.helper
    scale, zp = np.float32(0.5), np.uint8(10)
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 200.0, -200.0, 3.3], np.float32)  # ties at x / scale = k + 0.5
    g = h.make_graph([h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8])],
                     [h.make_tensor_value_info("q", onnx.TensorProto.UINT8, [8])], [_init("s", scale), _init("z", zp)])
    sess = ort.InferenceSession(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    got = fq.quantize(torch.from_numpy(x), torch.tensor(scale), torch.tensor(float(zp)), 0, 255).numpy()
    assert np.array_equal(got.astype(np.uint8), want)
    assert list(want[:5]) == [10, 12, 12, 10, 8]  # half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2


def test_lsq_gradient_reaches_scales_and_latent_weights_only():
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = fq.fake_quant(x, s, torch.tensor(0.0), -8, 7)
    y.sum().backward()
    inside = (x.detach() / 0.1 >= -8.5) & (x.detach() / 0.1 <= 7.5)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[~inside] == 0)  # straight through, clipped outside
    assert s.grad is not None and float(s.grad) != 0


def _ln_encoder(path, rng):
    h = onnx.helper
    nodes = [h.make_node("Gather", ["emb", "ids"], ["e"]), h.make_node("MatMul", ["e", "w1"], ["m1"]),
             h.make_node("Add", ["m1", "b1"], ["a1"]), h.make_node("Add", ["a1", "e"], ["res"]),
             h.make_node("LayerNormalization", ["res", "g", "beta"], ["ln"], axis=-1),
             h.make_node("MatMul", ["ln", "w2"], ["y"])]
    inits = [_init("emb", rng.normal(0, 1, (100, 64)).astype(np.float32)),
             _init("w1", rng.normal(0, 0.2, (64, 64)).astype(np.float32)),
             _init("b1", rng.normal(0, 0.1, 64).astype(np.float32)),
             _init("g", rng.normal(1, 0.1, 64).astype(np.float32)),
             _init("beta", rng.normal(0, 0.1, 64).astype(np.float32)),
             _init("w2", rng.normal(0, 0.2, (64, 32)).astype(np.float32))]
    g = h.make_graph(nodes, "enc", [h.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 6])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 32])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), path)
    return {"ids": rng.integers(0, 100, (64, 6)).astype(np.int64)}


def test_block_outputs_are_the_layernorm_outputs_and_their_teacher_is_the_fp32_model(tmp_path):
    from quantkit.finetune.blocks import block_outputs

    path, data = _quantized(tmp_path, _ln_encoder, weights="int4")
    names, teacher = block_outputs(ir.load(path), tmp_path / "m.onnx", tmp_path)
    assert names == ["ln"]
    feed = {"ids": data["ids"][:8]}
    full = onnx.load(tmp_path / "m.onnx")
    full.graph.output.append(onnx.ValueInfoProto(name="ln"))
    want = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"]).run(["ln"], feed)[0]
    assert np.array_equal(teacher(feed)[0], want)
    g = QuantGraph(ir.load(path), taps=names)
    assert set(g.learn.floats) == {"b1", "g", "beta"}  # LayerNorm's scale and bias train too
    with torch.no_grad():
        y, ln = g(torch.from_numpy(feed["ids"]))
    assert y.shape == (8, 6, 32) and 15 < _sqnr(want, ln.numpy()) < 60  # the int4 model's own block output
    assert block_outputs(ir.load(tmp_path / "q.onnx"), tmp_path / "m.onnx", tmp_path)[0] == ["ln"]
    (tmp_path / "c").mkdir()
    cnn_path, _ = _quantized(tmp_path / "c", _cnn)
    assert block_outputs(ir.load(cnn_path), tmp_path / "c" / "m.onnx", tmp_path) == ([], None)
