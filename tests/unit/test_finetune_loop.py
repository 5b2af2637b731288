"""The distillation loop: the loss, labels mixed in, the held-out split and the best step kept."""

import math

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from test_finetune_exact import _cnn, _quantized  # noqa: E402

from quantkit.finetune import loop  # noqa: E402
from quantkit.finetune.graph import QuantGraph  # noqa: E402
from quantkit.finetune.step import HELDOUT_MAX, _split, padding_positions  # noqa: E402


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


def test_block_outputs_add_their_own_mean_to_the_loss_and_only_where_the_batch_has_them():
    teacher, tap = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    out, tap_out = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    plain = float(loop.loss_of([out, tap_out], loop.Batch([], [teacher]), 0.0))
    assert plain == pytest.approx(0.5 / 2.0)  # the graph's extra output is ignored without a teacher for it
    both = float(loop.loss_of([out, tap_out], loop.Batch([], [teacher], taps=[tap.half()]), 0.0))
    assert both == pytest.approx(0.5 / 2.0 + 0.5 / 1.0)


def test_split_holds_out_a_fifth_at_most_eight_batches():
    batches = list(range(10))
    train, held, notes = _split(batches)
    assert held == [8, 9] and train == batches[:8] and not notes
    train, held, _ = _split(list(range(100)))
    assert len(held) == HELDOUT_MAX and len(train) == 100 - HELDOUT_MAX
    train, held, notes = _split([0])
    assert train == [0] and held == [0]
    assert "one batch" in notes[0]


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


def test_padding_positions_are_left_out_of_the_loss_of_token_outputs_only():
    teacher = torch.tensor([[[2.0], [2.0], [9.0]]])  # (batch 1, sequence 3, 1): the last token is padding
    out = torch.tensor([[[1.0], [2.0], [0.0]]])
    pooled_t, pooled_o = torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 2.0]])  # (batch, hidden): not per token
    positions = torch.tensor([[1, 1, 0]])
    b = loop.Batch([], [teacher, pooled_t], positions=positions)
    w = loop.PADDING_WEIGHT
    token = (1.0 + 0.0 + w * 81.0) / (4.0 + 4.0 + w * 81.0)  # squared error over the teacher's square, padding ~0
    assert float(loop.loss_of([out, pooled_o], b, 0.0)) == pytest.approx((token + 1.0 / 8.0) / 2)
    assert token < 0.14  # 0.125 on the real tokens alone, 0.92 counting the padded one fully
    everywhere = float(loop.loss_of([out, pooled_o], loop.Batch([], [teacher, pooled_t]), 0.0))
    assert everywhere == pytest.approx(((1.0 + 0.0 + 81.0) / (4.0 + 4.0 + 81.0) + 1.0 / 8.0) / 2)


def test_an_attention_mask_of_zeros_and_ones_gives_the_positions_and_nothing_else_does():
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    assert torch.equal(padding_positions({"input_ids": mask * 7, "attention_mask": mask}), torch.from_numpy(mask))
    assert padding_positions({"attention_mask": mask.astype(np.float32)}) is None  # an additive float mask
    assert padding_positions({"attention_mask": mask * 2}) is None
    assert padding_positions({"mask": mask}) is None  # only the transformers name: other masks mean other things
