import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def samples() -> Path:
    return ROOT / "sample_models"


@pytest.fixture(scope="session", params=["dynamo", "torchscript"])
def encoder(request, tmp_path_factory):
    """A 2-layer BERT-style encoder (sample_models/bert_style.py) exported by each torch.onnx
    exporter, with calibration and evaluation token ids whose real lengths differ (so masks do):
    (model path, folder holding calib.npz and eval.npz)."""
    import numpy as np

    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "sample_models"))
    from bert_style import build, export, tokenize

    rng = np.random.default_rng(0)
    ids, mask = tokenize(rng.integers(0, 17, size=(64, 8, 8)), vocab=512)
    for i in range(len(mask)):
        cut = rng.integers(20, 51)
        ids[i, cut:], mask[i, cut:] = 0, 0
    d = tmp_path_factory.mktemp(f"encoder_{request.param}")
    np.savez(d / "calib.npz", input_ids=ids[:48], attention_mask=mask[:48])
    np.savez(d / "eval.npz", input_ids=ids[48:], attention_mask=mask[48:])
    torch.manual_seed(0)
    model = build(layers=2, hidden=64, heads=4, ff=128, vocab=512).eval()
    path = d / f"{request.param}.onnx"
    export(model, ids[:2], mask[:2], path, exporter=request.param)
    return path, d
