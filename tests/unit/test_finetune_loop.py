"""The distillation loop: the loss, labels mixed in, the held-out split and the best step kept."""

import math

import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from test_finetune_exact import _cnn, _quantized  # noqa: E402

from quantkit.finetune import loop  # noqa: E402
from quantkit.finetune.graph import QuantGraph  # noqa: E402
from quantkit.finetune.step import HELDOUT_MAX, _split  # noqa: E402


def test_loss_is_normalized_mse_and_mixes_cross_entropy_with_labels():
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    b = loop.Batch([], [teacher], labels)
    distill = float(loop.loss_of([out], b, 0.0))
    assert distill == pytest.approx(0.5 / 2.0)  # mean squared error 0.5 over the teacher's mean square 2
    ce = float(torch.nn.functional.cross_entropy(out, labels))
    assert float(loop.loss_of([out], b, 0.25)) == pytest.approx(0.75 * distill + 0.25 * ce)
    assert float(loop.loss_of([out], loop.Batch([], [teacher], None), 0.25)) == pytest.approx(distill)


def test_split_holds_out_a_fifth_at_most_eight_batches():
    train, held, notes = _split(list(range(10)))
    assert held == [8, 9] and train == list(range(8)) and not notes
    train, held, _ = _split(list(range(100)))
    assert len(held) == HELDOUT_MAX and len(train) == 100 - HELDOUT_MAX
    train, held, notes = _split([0])
    assert train == held == [0] and "one batch" in notes[0]


def test_training_keeps_the_step_with_the_lowest_heldout_loss(tmp_path):
    path, data = _quantized(tmp_path, _cnn)
    g = QuantGraph(ir.load(path))
    x = torch.from_numpy(data["x"])
    with torch.no_grad():  # a teacher the quantized graph cannot match exactly: its own outputs, shifted
        teacher = [t + 0.5 for t in g(x[:8])]
    batches = [loop.Batch([x[:8]], teacher)]
    result = loop.train(g, batches, batches, steps=30, lr=1e-2)
    assert result.steps_done == 30 and not result.interrupted
    held = [p["heldout_loss"] for p in result.curve]
    assert result.heldout_best == min(held) < held[0]
    assert result.curve[[p["step"] for p in result.curve].index(result.best_step)]["heldout_loss"] == min(held)
    assert math.isclose(loop.heldout_loss(g, batches, 0.0), result.heldout_best, rel_tol=1e-5)  # restored
