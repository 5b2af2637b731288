import numpy as np

from quantkit.calibrate.observers import OBSERVERS, MinMaxObserver, make_observer


def test_minmax_over_batches_equals_global_minmax():
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, s, (4, 7)) for s in (1, 5, 0.1)]
    obs = MinMaxObserver()
    for b in batches:
        obs.update(b)
    allx = np.concatenate(batches)
    assert obs.range() == (allx.min(), allx.max())


def test_minmax_ignores_and_counts_non_finite_values():
    obs = MinMaxObserver()
    obs.update(np.array([-np.inf, -1.0, 2.0, np.nan, np.float32(np.finfo(np.float32).max) * 0 + 3.0]))
    assert obs.range() == (-1.0, 3.0)
    assert obs.nonfinite == 2


def test_unseen_observer_reports_it():
    obs = MinMaxObserver()
    obs.update(np.array([np.inf]))
    assert not obs.seen and obs.range() == (0.0, 0.0)


def test_registry_looks_up_by_name():
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert OBSERVERS["minmax"].name == "minmax"
