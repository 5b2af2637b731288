"""graph/hardswish.py: x * Clip(x + 3, 0, 6) / 6 rewritten as x * HardSigmoid(x), with the same outputs in
onnxruntime, and left alone when it is not exactly that function or an intermediate has another reader."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from quantkit.graph.canonicalize import canonicalize
from quantkit.graph.hardswish import fuse_hardswish

HEAD = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y{extra_out}) <float[3, 2, 1, 1] w = {w}, float three = {{3.0}},
  float zero = {{0.0}}, float six = {{{six}}}, float sixth = {{0.16666667}}> {{
  c = Conv(x, w)
  a = Add({add})
  k = Clip(a, zero, six)
{tail}
}}"""
PADDLE_TAIL = "  m = Mul(c, k)\n  y = Div(m, six)"  # paddle2onnx's order: x * clip, then / 6
SIXTH_FIRST_TAIL = "  d = Mul(k, sixth)\n  y = Mul(d, c)"  # clip * (1/6), then times x


W = np.round(np.random.default_rng(0).normal(size=(3, 2)) * 3, 3)


def model(tail=PADDLE_TAIL, add="c, three", six="6.0", extra_out=""):
    w = "{" + ", ".join(f"{v:.3f}" for v in W.ravel()) + "}"
    return onnx.parser.parse_model(HEAD.format(w=w, add=add, six=six, tail=tail, extra_out=extra_out))


def run(proto, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


X = np.linspace(-2.5, 2.5, 32, dtype=np.float32).reshape(1, 2, 4, 4)


@pytest.mark.parametrize("tail,add", [(PADDLE_TAIL, "c, three"), (SIXTH_FIRST_TAIL, "three, c")])
def test_decomposed_hardswish_becomes_hardsigmoid_times_x_with_the_same_outputs(tail, add):
    proto = model(tail, add)
    (ref,) = run(proto, X)
    # the 1x1 conv's output reaches the three pieces of the function (0 below -3, x(x+3)/6, x above 3), so a
    # rewrite wrong on any of them would show
    c = np.einsum("oi,nihw->nohw", W, X)
    assert c.min() < -3 and c.max() > 3 and ((c > -3) & (c < 3)).any()
    m = ir.serde.deserialize_model(proto)
    notes = canonicalize(m)
    assert [n.op_type for n in m.graph] == ["Conv", "HardSigmoid", "Mul"]
    hsig = next(n for n in m.graph if n.op_type == "HardSigmoid")
    assert hsig.attributes.get_float("alpha") == pytest.approx(1 / 6)
    assert hsig.attributes.get_float("beta") == 0.5
    assert [o.name for o in m.graph.outputs] == ["y"]
    assert any("rewrote 1 HardSwish" in n for n in notes)
    (got,) = run(ir.serde.serialize_model(m), X)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{"six": "5.0"},  # Clip(.., 0, 5) / 5 is not HardSwish
                                {"add": "c, c"},  # x + x, not x + 3
                                {"extra_out": ", float[1, 3, 4, 4] k"}])  # the clipped tensor is read outside
def test_left_alone_when_not_exactly_hardswish_or_an_intermediate_is_read(kw):
    m = ir.serde.deserialize_model(model(**kw))
    assert fuse_hardswish(m) == 0
    assert [n.op_type for n in m.graph] == ["Conv", "Add", "Clip", "Mul", "Div"]


def test_clip_with_bounds_as_attributes_before_opset_11():
    text = """<ir_version: 5, opset_import: ["" : 10]>
    g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y) <float three = {3.0}, float six = {6.0}> {
      a = Add(x, three)
      k = Clip <min = 0.0, max = 6.0> (a)
      m = Mul(x, k)
      y = Div(m, six)
    }"""
    proto = onnx.parser.parse_model(text)
    x = X * 3  # -7.5 .. 7.5: every piece of the function
    (ref,) = run(proto, x)
    m = ir.serde.deserialize_model(proto)
    assert fuse_hardswish(m) == 1
    assert [n.op_type for n in m.graph] == ["HardSigmoid", "Mul"]
    np.testing.assert_allclose(run(ir.serde.serialize_model(m), x)[0], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref, x * np.clip(x + 3, 0, 6) / 6, rtol=1e-5, atol=1e-6)
