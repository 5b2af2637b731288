"""AWQ's scale search (quantize/awq.py): on inputs with outlier channels it cuts the layer's output
error against round-to-nearest, and the graph carries the 1/s it divides the activations by."""

from __future__ import annotations

import numpy as np

from quantkit.quantize import awq
from quantkit.quantize import blockwise as bw


def _outlier_layer(rng):
    k, n = 128, 64
    act = np.full(k, 0.1)
    act[rng.choice(k, 6, replace=False)] = 5.0  # a few channels carry large activations
    x = rng.normal(size=(512, k)) * act
    w = rng.normal(0, 1 / np.sqrt(k), (k, n)).astype(np.float32)
    return x, w, np.abs(x).mean(axis=0)


def test_search_beats_round_to_nearest_on_outlier_channels():
    rng = np.random.default_rng(0)
    x, w, act = _outlier_layer(rng)
    alpha, s = awq.search([w], act, 4, 32, True)
    assert 0 < alpha <= 1 and s.shape == (128,)
    rtn = bw.quantize_blockwise(w, 4, 32, True).dequantize()
    scaled = bw.quantize_blockwise(w * s[:, None], 4, 32, True).dequantize() / s[:, None]
    err_rtn = np.linalg.norm(x @ w - x @ rtn)
    err_awq = np.linalg.norm(x @ w - (x / s) @ (scaled * s[:, None]))
    assert err_awq < 0.8 * err_rtn
    # alpha 0 is plain RTN: the search's own measure can never end above it
    assert awq.weighted_error(w, s, act, 4, 32, True) <= awq.weighted_error(w, np.ones(128, np.float32), act, 4, 32,
                                                                             True)


def test_uniform_activations_leave_weights_unscaled():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 16)).astype(np.float32)
    s = awq.scales_for(np.ones(64), 0.7)
    np.testing.assert_allclose(s, 1.0)
    assert awq.weighted_error(w, s, np.ones(64), 4, 32, True) > 0


def test_abs_mean_observer_streams_batches():
    obs = awq.AbsMeanObserver()
    a, b = np.array([[1.0, -2.0], [3.0, 0.0]]), np.array([[[-5.0, 4.0]]])
    obs.update(a)
    obs.update(b)
    np.testing.assert_allclose(obs.mean(), [3.0, 2.0])
