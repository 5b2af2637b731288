"""The evaluation reuses fp32 outputs the placement probe already computed, only on identical feeds,
and gives the same figures as running the reference again."""

import numpy as np
from fake_session import FakeSession

from quantkit.api import _evaluate
from quantkit.calibrate.data import DataSource, InputSpec


class Linear(FakeSession):
    """A stand-in session: y = x @ w, counting the batches it runs."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def outputs(self, feed):
        return [feed["x"] @ self.w]


def test_known_reference_outputs_replace_runs_on_identical_feeds_only(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    src = DataSource(tmp_path / "d.npz", [InputSpec("x", np.dtype(np.float32), (None, 6))])
    w = rng.normal(size=(6, 3)).astype(np.float32)
    q = Linear(w + np.float32(0.01))
    plain_ref = Linear(w)
    plain, _, _ = _evaluate(plain_ref, q, src, 8, False, None)
    batches = list(src.batches(8))
    known = [({"x": b["x"]}, [b["x"] @ w]) for b in batches[:2]]
    known[1] = ({"x": batches[1]["x"] + 1}, known[1][1])  # computed on another feed: must not be used
    ref = Linear(w)
    reused, _, _ = _evaluate(ref, q, src, 8, False, None, known=known)
    assert plain_ref.runs == 3 and ref.runs == 2  # batch 0 reused; batch 1's feed differs; batch 2 unknown
    assert reused[0].result() == plain[0].result()
