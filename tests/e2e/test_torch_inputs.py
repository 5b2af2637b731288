"""PyTorch model files in: each form quantizes end to end from the CLI."""

import json
import struct

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch, samples):
    monkeypatch.chdir(samples.parent)  # --model-class imports sample_models.* from the working directory


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def run_json(*args):
    r = quantize(*args, "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("name,exporter", [("model.torchscript.pt", "torchscript"), ("model.pt2", "dynamo")])
def test_torchscript_and_torch_export_programs(samples, tmp_path, name, exporter):
    d = samples / "digits_cnn"
    report = run_json(d / name, "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", tmp_path / "q.onnx")
    assert report["export"]["exporter"] == exporter
    assert report["export"]["max_abs_error"] < 1e-4
    assert report["outputs"][0]["accuracy_drop_points"] <= 1.0
    assert any("PyTorch model's own outputs" in n for n in report["notes"])


def _save_safetensors(state: dict, path):
    """The safetensors layout written out: 8-byte header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for k, t in state.items():
        raw = t.detach().contiguous().numpy().astype("<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.mark.parametrize("form", ["state_dict", "safetensors"])
def test_checkpoint_with_model_class(samples, tmp_path, form):
    d = samples / "digits_cnn"
    ckpt = d / "model.state_dict.pt"
    if form == "safetensors":
        ckpt = tmp_path / "model.safetensors"
        state = torch.load(d / "model.state_dict.pt", weights_only=True)
        _save_safetensors({k: v.float() for k, v in state.items()}, ckpt)
    fp32 = tmp_path / "fp32.onnx"
    report = run_json(ckpt, "--model-class", "sample_models.digits_models:DigitsCNN", "--calib", d / "calib.npz",
                      "--eval", d / "eval.npz", "-o", tmp_path / "q.onnx", "--save-fp32", fp32)
    assert report["outputs"][0]["accuracy_fp32"] > 95 and report["outputs"][0]["accuracy_drop_points"] <= 1.0
    onnx.checker.check_model(str(fp32))


def test_checkpoint_without_model_class_says_what_to_do(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.state_dict.pt", "--calib", d / "calib.npz", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--model-class" in r.stderr


def test_pickled_module_is_refused_without_allow_pickle(samples, tmp_path):
    from sample_models.digits_models import DigitsCNN

    d = samples / "digits_cnn"
    model = DigitsCNN()
    model.load_state_dict(torch.load(d / "model.state_dict.pt", weights_only=True))
    torch.save(model, tmp_path / "whole.pt")
    out = tmp_path / "q.onnx"
    r = quantize(tmp_path / "whole.pt", "--calib", d / "calib.npz", "-o", out)
    assert r.exit_code == 3 and "--allow-pickle" in r.stderr and "arbitrary code" in r.stderr
    assert not out.exists()
    report = run_json(tmp_path / "whole.pt", "--allow-pickle", "--calib", d / "calib.npz", "-o", out)
    assert report["export"]["max_abs_error"] < 1e-4 and out.exists()


def test_two_inputs_of_different_dtypes_with_dynamic_batch_and_sequence(tmp_path):
    from sample_models.bert_style import tiny

    torch.manual_seed(0)
    torch.save(tiny().state_dict(), tmp_path / "enc.pt")
    rng = np.random.default_rng(0)

    def data(n, seq):
        ids = rng.integers(3, 256, size=(n, seq)).astype(np.int64)
        mask = np.ones((n, seq), np.float32)
        mask[:, seq - 4 :] = 0.0
        return {"input_ids": ids, "attention_mask": mask}

    np.savez(tmp_path / "calib.npz", **data(16, 24))
    np.savez(tmp_path / "eval.npz", **data(8, 12))  # another sequence length than calibration
    fp32 = tmp_path / "fp32.onnx"
    report = run_json(tmp_path / "enc.pt", "--model-class", "sample_models.bert_style:tiny", "--calib",
                      tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "-o", tmp_path / "q.onnx",
                      "--save-fp32", fp32)
    graph = onnx.load(str(fp32)).graph
    dtypes = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert dtypes == {"input_ids": onnx.TensorProto.INT64, "attention_mask": onnx.TensorProto.FLOAT}
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param  # batch and sequence are dynamic
    logits, pooled = report["outputs"]  # torch returns (logits, pooled)
    assert pooled["cosine_mean"] > 0.99 and report["evaluation"]["samples"] == 8


def test_explicit_input_signature_and_pt_tensor_data(samples, tmp_path):
    d = samples / "digits_cnn"
    x = np.load(d / "calib.npz")["x"]
    torch.save({"x": torch.from_numpy(x[:64])}, tmp_path / "calib.pt")
    torch.save(torch.from_numpy(x[64:96]), tmp_path / "eval.pt")
    report = run_json(d / "model.torchscript.pt", "--input", "x:Bx1x8x8:float32", "--calib", tmp_path / "calib.pt",
                      "--eval", tmp_path / "eval.pt", "-o", tmp_path / "q.onnx")
    assert report["calibration"]["samples"] == 64 and report["evaluation"]["samples"] == 32


def test_image_folder_with_preprocessing_and_labels_from_subfolders(samples, tmp_path):
    from PIL import Image

    d = samples / "digits_cnn"
    ev = np.load(d / "eval.npz")
    root = tmp_path / "images"
    for i, (img, label) in enumerate(zip(ev["x"][:60], ev["labels"][:60])):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img[0] * 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    report = run_json(d / "model.onnx", "--calib", root, "--preprocess", "mode=L,scale=1/255", "-o",
                      tmp_path / "q.onnx")
    assert report["evaluation"]["samples"] == 60
    # labels come from the sorted class folders; all ten digits are present so indices match digits
    assert report["outputs"][0]["accuracy_fp32"] > 90
    r = quantize(d / "model.onnx", "--calib", root, "--preprocess", "mode=L,crop=4", "-o", tmp_path / "q2.onnx")
    assert r.exit_code == 3 and "adjust --preprocess" in r.stderr
