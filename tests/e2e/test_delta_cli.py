"""`quantkit delta` and `quantkit apply` end to end on sample_models/digits_delta and small models
written by the tests."""

import itertools
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from quantkit.cli import cli
from quantkit.delta import tensors

ROOT_CMD = [sys.executable, "-c"]


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture
def pair(samples):
    d = samples / "digits_delta"
    return d / "base.onnx", d / "new.onnx", d / "eval.npz"


def _weights(path):
    return tensors.read(path).arrays


def test_auto_meets_the_accuracy_target_and_beats_int8(pair, tmp_path):
    base, new, ev = pair
    upd, rep = tmp_path / "u.qkd", tmp_path / "r.json"
    r = run("delta", base, new, "-o", upd, "--eval", ev, "--max-accuracy-drop", "0.5", "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    (logits,) = report["outputs"]
    assert logits["accuracy_fp32"] - logits["accuracy_quantized"] <= 0.5
    assert report["bytes"]["update"] == upd.stat().st_size
    assert report["bytes"]["new_model"] == new.stat().st_size
    assert report["auto"]["tried"] and report["gates"]["passed"]
    lossy = {t["encoding"] for t in report["tensors"]} - {"exact", "unchanged"}
    assert lossy, report["encodings"]  # auto chose a lossy encoding for some tensor
    r8 = run("delta", base, new, "-o", tmp_path / "u8.qkd", "--method", "int8", "-q")
    assert r8.exit_code == 0, r8.output
    assert upd.stat().st_size < (tmp_path / "u8.qkd").stat().st_size
    # the applied model is what the report measured: its weights follow the chosen encodings
    out = tmp_path / "applied.onnx"
    assert run("apply", base, upd, "-o", out).exit_code == 0
    got, want = _weights(out), _weights(new)
    for t in report["tensors"]:
        err = np.linalg.norm(got[t["name"]].astype(np.float64) - want[t["name"]])
        d = np.linalg.norm(want[t["name"]].astype(np.float64) - _weights(base)[t["name"]])
        assert err <= t["relative_error"] * d * 1.001 + 1e-6, t["name"]


def test_a_missed_target_exits_5_after_writing(pair, tmp_path):
    base, new, ev = pair
    upd, rep = tmp_path / "u.qkd", tmp_path / "r.json"
    r = run("delta", base, new, "-o", upd, "--method", "topk", "--density", "0.01", "--eval", ev,
            "--min-cosine", "0.99", "--report", rep)
    assert r.exit_code == 5, r.output
    assert "mean cosine" in r.output
    report = json.loads(rep.read_text())
    assert upd.is_file() and not report["gates"]["passed"]
    assert report["outputs"][0]["cosine_mean"] < 0.99
    assert report["encodings"]["topk"] == 3


def test_apply_refuses_another_base_and_a_corrupted_update(pair, tmp_path):
    base, new, _ = pair
    upd = tmp_path / "u.qkd"
    assert run("delta", base, new, "-o", upd, "--method", "int8").exit_code == 0
    r = run("apply", new, upd, "-o", tmp_path / "x.onnx")
    assert r.exit_code == 3 and "another base" in r.output
    data = bytearray(upd.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.qkd"
    bad.write_bytes(bytes(data))
    r = run("apply", base, bad, "-o", tmp_path / "x.onnx")
    assert r.exit_code == 3 and "corrupted" in r.output
    assert not (tmp_path / "x.onnx").exists()
    r = run("apply", base, upd, "-o", base)
    assert r.exit_code == 2 and "same file as the input" in r.output
    (tmp_path / "taken.onnx").write_bytes(b"x")
    assert run("apply", base, upd, "-o", tmp_path / "taken.onnx").exit_code == 2


def test_apply_imports_neither_torch_nor_onnxruntime(pair, tmp_path):
    base, new, _ = pair
    upd, out = tmp_path / "u.qkd", tmp_path / "applied.onnx"
    assert run("delta", base, new, "-o", upd, "--method", "sign").exit_code == 0
    code = f"""
import sys
from quantkit.cli import main
sys.argv = ["quantkit", "apply", {str(base)!r}, {str(upd)!r}, "-o", {str(out)!r}]
try:
    main()
except SystemExit as e:
    assert e.code in (0, None), e.code
loaded = [m for m in ("torch", "onnxruntime", "onnx_ir") if m in sys.modules]
assert not loaded, loaded
print("ok")
"""
    p = subprocess.run([*ROOT_CMD, code], capture_output=True, text=True, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    w_new, w_out, w_base = _weights(new), _weights(out), _weights(base)
    d = w_new["head.1.weight"] - w_base["head.1.weight"]
    got = w_out["head.1.weight"] - w_base["head.1.weight"]
    assert np.array_equal(np.sign(got[d != 0]), np.sign(d[d != 0]))  # 1-bit sign deltas arrived
    assert np.array_equal(w_out["features.1.bias"], w_new["features.1.bias"])  # small tensors bit-exact


def _matmul_model(path, w):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _rounds(tmp_path, feedback: bool, rounds: int = 10, density: float = 0.1):
    """One client, a constant drift g per round; the receiver applies each compressed update to
    the global model. Returns the receiver's error against the uncompressed sum after each round."""
    rng = np.random.default_rng(0)
    w0, g = rng.standard_normal((64, 64)), rng.standard_normal((64, 64)) * 1e-2
    glob = tmp_path / "g0.onnx"
    _matmul_model(glob, w0)
    state = tmp_path / f"state_{feedback}.npz"
    errors = []
    for t in range(1, rounds + 1):
        cur = _weights(glob)["w"].astype(np.float64)
        local = tmp_path / f"local{t}.onnx"
        _matmul_model(local, cur + g)
        upd = tmp_path / f"u{t}.qkd"
        args = ["delta", glob, local, "-o", upd, "--method", "topk", "--density", str(density), "--force"]
        r = run(*args, *(["--residual", state] if feedback else []))
        assert r.exit_code == 0, r.output
        nxt = tmp_path / f"g{t}.onnx"
        assert run("apply", glob, upd, "-o", nxt, "--force").exit_code == 0
        glob = nxt
        errors.append(np.linalg.norm(_weights(glob)["w"] - (w0 + t * g)) / np.linalg.norm(t * g))
    if feedback:
        with np.load(state) as z:
            assert set(z.files) == {"w"}
            np.testing.assert_allclose(np.linalg.norm(z["w"]), errors[-1] * np.linalg.norm(rounds * g), rtol=1e-3)
        _matmul_model(tmp_path / "other.onnx", np.zeros((64, 32)))  # a state for another model is refused
        r = run("delta", tmp_path / "other.onnx", tmp_path / "other.onnx", "-o", tmp_path / "x.qkd",
                "--method", "topk", "--residual", state)
        assert r.exit_code == 3 and "residual state" in r.output
    return errors


def test_error_feedback_keeps_the_accumulated_error_from_growing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, fed = _rounds(tmp_path / "a", False), _rounds(tmp_path / "b", True)
    # errors are relative to the uncompressed sum t * g. Without feedback the same 10% of entries
    # win every round, so the absolute error grows linearly with t (the relative one stays put);
    # with feedback the receiver is off by the residual only, which shrinks relative to t * g
    assert plain[-1] > 0.7 and abs(plain[-1] - plain[0]) < 0.01
    assert fed[-1] < 0.5 * plain[-1]
    assert all(a > b for a, b in itertools.pairwise(fed))


@pytest.mark.parametrize("form", ["safetensors", "state_dict"])
def test_state_dict_and_safetensors_round_trip(pair, tmp_path, form):
    base, new, _ = pair
    wb, wn = _weights(base), _weights(new)
    paths = []
    for name, w in (("base", wb), ("new", wn)):
        if form == "safetensors":
            from safetensors.numpy import save_file
            p = tmp_path / f"{name}.safetensors"
            save_file(w, str(p))
        else:
            import torch
            p = tmp_path / f"{name}.pt"
            torch.save({k: torch.from_numpy(v.copy()) for k, v in w.items()}, p)
        paths.append(p)
    upd, out = tmp_path / "u.qkd", tmp_path / f"out{paths[0].suffix}"
    r = run("delta", *paths, "-o", upd, "--method", "int4", "--json", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["kind"] == form and report["encodings"]["int4"] == 3
    assert run("apply", paths[0], upd, "-o", tmp_path / "out.onnx").exit_code == 2  # same form as the base
    assert run("apply", paths[0], upd, "-o", out).exit_code == 0, run("apply", paths[0], upd, "-o", out).output
    got = tensors.read(out)
    assert got.kind == form and sorted(got.arrays) == sorted(wn)
    for k, v in wn.items():
        assert got.arrays[k].dtype == v.dtype and got.arrays[k].shape == v.shape
        bound = np.abs(v.astype(np.float64) - wb[k]).max() / 14 + 1e-7  # int4 blocks: half a step
        assert np.abs(got.arrays[k].astype(np.float64) - v).max() <= bound, k


def test_mismatched_models_name_the_first_tensor_that_differs(samples, pair, tmp_path):
    base, new, _ = pair
    r = run("delta", base, samples / "digits_transformer" / "model.onnx", "-o", tmp_path / "u.qkd",
            "--method", "int8")
    assert r.exit_code == 3 and "tensor 'features.0.weight'" in r.output
    m = onnx.load(str(new))
    m.graph.initializer[0].name = "renamed"
    for n in m.graph.node:
        n.input[:] = ["renamed" if i == "features.0.weight" else i for i in n.input]
    onnx.save(m, str(tmp_path / "renamed.onnx"))
    r = run("delta", base, tmp_path / "renamed.onnx", "-o", tmp_path / "u.qkd", "--method", "int8")
    assert r.exit_code == 3 and "'features.0.weight'" in r.output and "not in" in r.output
    m = onnx.load(str(new))
    t = m.graph.initializer[3]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    onnx.save(m, str(tmp_path / "f64.onnx"))
    r = run("delta", base, tmp_path / "f64.onnx", "-o", tmp_path / "u.qkd", "--method", "int8")
    assert r.exit_code == 3 and f"'{t.name}' is float32" in r.output and "float64" in r.output
    m = onnx.load(str(new))
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type = "Sigmoid"  # same weights, another graph
    onnx.save(m, str(tmp_path / "sigmoid.onnx"))
    r = run("delta", base, tmp_path / "sigmoid.onnx", "-o", tmp_path / "u.qkd", "--method", "int8")
    assert r.exit_code == 3 and f"node '{relu.name}' differs" in r.output
    assert not (tmp_path / "u.qkd").exists()


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized_pair(request, tmp_path_factory):
    from conftest import ROOT
    d, cal = ROOT / "sample_models" / "digits_delta", ROOT / "sample_models" / "digits_cnn" / "calib.npz"
    tmp = tmp_path_factory.mktemp(request.param)
    data = ["--calib", cal, "--calib-samples", "64"] if request.param == "int8" else \
        ["--weights", "int4", "--eval", d / "eval.npz"]
    for name in ("base", "new"):
        r = run("quantize", d / f"{name}.onnx", *data, "-o", tmp / f"{name}.q.onnx", "--no-speed-guard", "-q")
        assert r.exit_code == 0, r.output
    return tmp / "base.q.onnx", tmp / "new.q.onnx"


def test_delta_between_quantized_models_sends_integer_weights_and_scales_exactly(quantized_pair, tmp_path):
    base, new = quantized_pair
    upd, out = tmp_path / "u.qkd", tmp_path / "applied.q.onnx"
    r = run("delta", base, new, "-o", upd, "--method", "sign", "--json", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    wb, wn = _weights(base), _weights(new)
    by_name = {t["name"]: t for t in report["tensors"]}
    ints = [k for k, v in wn.items() if v.dtype in (np.int8, np.uint8, np.int32)]
    assert ints and set(by_name) == set(wn)
    # every tensor of a quantized weight (integers, and scales however large: int4 block scales
    # of head.1 have 2,048 values) is exact or unchanged, never a 1-bit sign delta
    assert all(by_name[k]["encoding"] in ("exact", "unchanged") for k in wn)
    same = [k for k in wn if k in wb and np.array_equal(wb[k], wn[k])]
    # e.g. the int8 weights' zero points (int4 runs store their convolutions' codes with no zero point)
    assert same or "int4" in str(base.parent.name)
    assert all(by_name[k]["encoding"] == "unchanged" for k in same)
    assert report["bytes"]["update"] < report["bytes"]["zipped_fp32_delta"]
    assert run("apply", base, upd, "-o", out).exit_code == 0
    got = _weights(out)
    assert all(got[k].tobytes() == v.tobytes() for k, v in wn.items())  # bit for bit


def test_quantize_works_on_an_applied_model(pair, tmp_path, samples):
    base, new, ev = pair
    upd, out = tmp_path / "u.qkd", tmp_path / "applied.onnx"
    assert run("delta", base, new, "-o", upd, "--method", "int8").exit_code == 0
    assert run("apply", base, upd, "-o", out).exit_code == 0
    rep = tmp_path / "q.json"
    r = run("quantize", out, "--calib", samples / "digits_cnn" / "calib.npz", "--eval", ev, "-o",
            tmp_path / "q.onnx", "--report", rep, "--no-speed-guard", "-q", "--calib-samples", "64")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["nodes"]["quantized"] and report["outputs"][0]["accuracy_quantized"] > 90
