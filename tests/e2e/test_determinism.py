"""The same command on the same inputs writes the same bytes, however many candidate placements
the speed guard built before choosing. The guard's clock is replaced by a scripted one so that
its decisions cannot vary with the machine's load: the first group tried is dropped (a later
candidate, not the first one built, is written), every other group is kept."""

import json

import onnx
import pytest
from click.testing import CliRunner

import quantkit.api
from quantkit.cli import cli
from quantkit.quantize import speed
from quantkit.quantize.plan import OpKind


def _scripted_guard(extra_builds: int):
    real = speed.guard

    def fake(build, session, fp32_sess, feed, kinds, status=lambda s: None, **_):
        for _ in range(extra_builds):  # candidates nobody asked for: they must leave no trace
            build(set())
            build({sorted(kinds)[0]})
        def timer(sessions, feed, runs):
            if len(sessions) == 2:  # final check against fp32: the chosen placement wins
                return [100.0, 40.0]
            # fp32, the current placement, then trials: the first group's wins every look, shared (both)
            # or its own (the short one and each repeat); the other groups' lose at once
            return [100.0, 50.0, 40.0] + [55.0] * (len(sessions) - 3)

        return real(build, session, fp32_sess, feed, kinds, status=status, timer=timer)

    return fake


def _quantize(d, tmp_path, name, monkeypatch, extra_builds):
    monkeypatch.setattr(quantkit.api, "guard", _scripted_guard(extra_builds))
    out, rep = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
    r = CliRunner().invoke(cli, ["quantize", str(d / "model.onnx"), "--calib", str(d / "calib.npz"),
                                 "-o", str(out), "--report", str(rep), "-q", "--method", "auto",
                                 "--bias-correction"])
    assert r.exit_code == 0, r.output
    return out.read_bytes(), json.loads(rep.read_text())


@pytest.fixture
def cnn(samples):
    return samples / "digits_cnn"


def test_two_runs_and_extra_candidates_write_identical_bytes(cnn, tmp_path, monkeypatch):
    first, report = _quantize(cnn, tmp_path, "a", monkeypatch, extra_builds=0)
    second, _ = _quantize(cnn, tmp_path, "b", monkeypatch, extra_builds=0)
    more, _ = _quantize(cnn, tmp_path, "c", monkeypatch, extra_builds=3)
    assert first == second
    assert first == more
    # the written model is a later candidate: the guard dropped the first group it tried
    guard = report["speed_guard"]
    assert guard["dropped"] == [guard["trials"][0]["group"]] and not guard["int8_cannot_win"]
    assert len(guard["trials"]) >= 2
    model = onnx.load_from_string(first)
    names = [t.name for t in model.graph.initializer] + [o for n in model.graph.node for o in n.output]
    assert len(names) == len(set(names))


def test_the_guard_tries_groups_in_enum_order_not_by_display_text(cnn, tmp_path, monkeypatch):
    _, report = _quantize(cnn, tmp_path, "a", monkeypatch, extra_builds=0)
    tried = [t["group"] for t in report["speed_guard"]["trials"] if "decision" in t and t["group"][0] != "("]
    order = [k.label for k in speed.ORDER]
    assert tried == sorted(tried, key=order.index)
    assert set(tried) <= {k.label for k in OpKind}
