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


# --- histograms -------------------------------------------------------------------------------

from quantkit.calibrate.observers import HistogramObserver  # noqa: E402


def test_histogram_merged_over_growing_batches_equals_one_histogram_of_everything():
    rng = np.random.default_rng(0)
    h = HistogramObserver(bins=512)
    xs = []
    for i in range(12):
        x = rng.normal(i * 0.3, 1 + i, 5000).astype(np.float32)  # range grows both ways
        h.update(x)
        xs.append(x)
    allx = np.concatenate(xs)
    assert h.counts.sum() == allx.size
    assert h.range() == (allx.min(), allx.max())
    ref, _ = np.histogram(allx, bins=h.edges)
    # identical but for values sitting exactly on a bin edge (float rounding of the edges)
    assert np.abs(ref - h.counts).sum() <= 4


def test_histogram_memory_does_not_depend_on_samples_or_shapes():
    h = HistogramObserver(bins=256)
    for n in (3, 1000, 17):
        h.update(np.random.default_rng(n).normal(size=(n, 5, n % 7 + 1)))
    assert h.counts.shape == (256,)


def test_histogram_state_roundtrip():
    h = HistogramObserver(bins=64)
    h.update(np.array([-1.0, 0.5, 2.0, np.inf]))
    g = HistogramObserver.from_state(h.state())
    assert g.range() == h.range() and g.nonfinite == 1
    np.testing.assert_array_equal(g.counts, h.counts)
    np.testing.assert_allclose(g.edges, h.edges)


def test_large_tensors_are_sampled_across_every_channel_with_weighted_counts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 384)).astype(np.float32)  # 768k elements: above the sample cap
    x[:, 7] += 40.0  # one outlier channel, as transformers have
    h = HistogramObserver()
    h.update(x)
    assert h.range() == (x.min(), x.max())  # exact, not sampled
    assert abs(int(h.counts.sum()) - x.size) <= 100  # weighted back to the full count, within one stride
    outlier_mass = h.counts[h.edges[1:] > 30].sum() / h.counts.sum()
    assert abs(outlier_mass - 1 / 384) < 0.2 / 384  # the outlier channel is sampled like the others
