"""--finetune trains a placement with the outlier-channel split: the plan's split is replayed, training
lowers the held-out loss, and the written model keeps the split's structure (Gather + float MatMul + Add
beside the integer MatMul) with its trained float rows."""

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import quantkit

torch = pytest.importorskip("torch")

NET = '''
import torch


class Net(torch.nn.Module):
    """Linear -> one channel x300 (an outlier channel, as after an encoder's GELU) -> Linear -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 16)
        spike = torch.ones(64)
        spike[7] = 300.0
        self.register_buffer("spike", spike)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x) * self.spike)))
'''


@pytest.fixture
def net(tmp_path, monkeypatch):
    (tmp_path / "outlier_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("outlier_net", None)
    from outlier_net import Net

    torch.save(Net().state_dict(), tmp_path / "net.pt")
    rng = np.random.default_rng(0)
    for name, n in (("calib", 64), ("train", 256), ("eval", 64)):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(size=(n, 4, 64)).astype(np.float32))
    return tmp_path


def test_a_split_placement_trains_and_ships_as_trained(net):
    common = dict(model_class="outlier_net:Net", calib=net / "calib.npz", eval=net / "eval.npz",
                  no_speed_guard=True, threads=1)
    quantkit.quantize(net / "net.pt", output=net / "q.onnx", plan=net / "plan.json", **common)
    plan = json.loads((net / "plan.json").read_text())
    written = onnx.load(str(net / "q.onnx"))
    second = [n.name for n in written.graph.node if n.op_type == "MatMulIntegerToFloat"][1]  # the layer after the spike
    plan["nodes"] = {second: "split"}
    (net / "split.json").write_text(json.dumps(plan))
    static = quantkit.quantize(net / "net.pt", output=net / "s.onnx", from_plan=net / "split.json", **common)
    trained = quantkit.quantize(net / "net.pt", output=net / "t.onnx", from_plan=net / "split.json", finetune=300,
                                finetune_data=net / "train.npz", lr=1e-3, **common)
    ft = trained.report["finetune"]
    assert ft["heldout_loss_after"] < ft["heldout_loss_before"]
    assert static.report["outputs"][0]["sqnr_db"] > 30  # the x300 channel no longer sets the step of all 64
    ops = {path: [n.op_type for n in onnx.load(str(net / path)).graph.node] for path in ("s.onnx", "t.onnx")}
    assert ops["s.onnx"] == ops["t.onnx"] and ops["t.onnx"].count("Gather") == 1

    def rows(path):
        g = onnx.load(str(net / path)).graph
        gather = next(n for n in g.node if n.op_type == "Gather")
        side = next(n for n in g.node if n.op_type == "MatMul" and gather.output[0] in n.input)
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        return inits[gather.input[1]], inits[side.input[1]]

    (channels_s, rows_s), (channels_t, rows_t) = rows("s.onnx"), rows("t.onnx")
    assert channels_s.tolist() == channels_t.tolist() == [7]
    assert rows_s.shape == rows_t.shape == (1, 64) and not np.array_equal(rows_s, rows_t)  # trained, then written
