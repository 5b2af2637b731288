"""The update encodings and the .qkd container: round trips with their stated error bounds."""

import ml_dtypes
import numpy as np
import pytest

from quantkit.delta import container
from quantkit.delta import encodings as enc
from quantkit.delta.select import TAUS, menu, pick, relative_error, search
from quantkit.errors import InputError

RNG = np.random.default_rng(0)


def _delta(shape, scale=1e-3):
    # heavy-tailed like fine-tuning deltas: most entries small, a few large
    return (RNG.standard_t(3, size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
@pytest.mark.parametrize("shape", [(64, 48), (7, 13), (1000,), (3, 5, 3, 3)])
def test_blockwise_error_is_within_half_a_step_of_each_block(bits, qmax, shape):
    d = _delta(shape)
    e = enc.encode(d, f"int{bits}")
    got = enc.decode(e, shape)
    assert got.shape == shape
    flat = np.concatenate([d.reshape(-1), np.zeros((-d.size) % enc.BLOCK, np.float32)]).reshape(-1, enc.BLOCK)
    bound = np.abs(flat).max(axis=1, keepdims=True) / (2 * qmax) * (1 + 1e-6)
    err = np.abs(flat - np.concatenate([got.reshape(-1), np.zeros((-d.size) % enc.BLOCK)]).reshape(-1, enc.BLOCK))
    assert np.all(err <= bound + 1e-12)
    assert e.arrays["q"].nbytes == (flat.size if bits == 8 else flat.size // 2)
    # a wrong decoder would not do this well: the error is far below the delta itself
    assert np.linalg.norm(err) < (0.02 if bits == 8 else 0.25) * np.linalg.norm(d)


def test_nibbles_pack_two_per_byte_and_round_trip():
    q = RNG.integers(-8, 8, size=101).astype(np.int8)
    packed = enc.pack_nibbles(q)
    assert packed.dtype == np.uint8 and packed.size == 51
    assert np.array_equal(enc.unpack_nibbles(packed, 101), q)
    assert packed[0] == (q[0] + 8) | ((q[1] + 8) << 4)


def test_sign_keeps_every_sign_and_the_l2_optimal_row_scale():
    d = _delta((32, 40))
    e = enc.encode(d, "sign")
    got = enc.decode(e, d.shape)
    assert e.arrays["bits"].nbytes == 32 * 40 // 8
    assert np.array_equal(np.sign(got), np.where(d >= 0, 1.0, -1.0))
    np.testing.assert_allclose(np.abs(got).max(axis=1), np.abs(d).mean(axis=1), rtol=1e-6)
    err = np.linalg.norm(d - got)
    for f in (0.9, 1.1):  # the mean |d| per row minimizes ||d - s sign(d)||: any other scale is worse
        assert np.linalg.norm(d - got * f) > err


def test_topk_is_exact_at_the_k_largest_entries_and_zero_elsewhere():
    d = _delta((50, 70))
    e = enc.encode(d, "topk", density=0.03)
    got = enc.decode(e, d.shape)
    k = round(0.03 * d.size)
    kept = np.flatnonzero(got.reshape(-1))
    assert e.params["k"] == k and kept.size == k
    assert np.array_equal(got.reshape(-1)[kept], d.reshape(-1)[kept].astype(np.float64))
    assert np.abs(d).reshape(-1)[kept].min() >= np.sort(np.abs(d).reshape(-1))[-k]
    assert e.arrays["gaps"].dtype == np.uint8 and e.arrays["gaps"].nbytes < 2 * k  # varints, not int64


def test_topk_int8_values_keep_the_indices_and_half_a_step_of_the_largest_value():
    d = _delta((50, 70))
    exact = enc.encode(d, "topk", density=0.05)
    e = enc.encode(d, "topk", density=0.05, values="int8")
    got, ref = enc.decode(e, d.shape).reshape(-1), enc.decode(exact, d.shape).reshape(-1)
    kept = np.flatnonzero(ref)
    assert np.array_equal(e.arrays["gaps"], exact.arrays["gaps"]) and e.arrays["values"].dtype == np.int8
    step = np.abs(ref[kept]).max() / 127
    assert np.abs(got[kept] - ref[kept]).max() <= step / 2 * (1 + 1e-6)
    assert np.count_nonzero(got[np.setdiff1d(np.arange(d.size), kept)]) == 0


def test_varints_round_trip_small_and_large_values():
    v = np.array([1, 127, 128, 300, 16383, 16384, 2**35 + 7, 1], np.uint64)
    b = enc.varint_encode(v)
    assert b.size == 1 + 1 + 2 + 2 + 2 + 3 + 6 + 1
    assert np.array_equal(enc.varint_decode(b), v)


@pytest.mark.parametrize("shape,rank", [((40, 30), 4), ((16, 8, 3, 3), 3)])
def test_lowrank_error_equals_the_svd_tail(shape, rank):
    d = _delta(shape).astype(np.float64)
    e = enc.encode(d, "lowrank", rank=rank)
    got = enc.decode(e, shape)
    s = np.linalg.svd(d.reshape(shape[0], -1), compute_uv=False)
    tail = np.sqrt((s[rank:] ** 2).sum())
    np.testing.assert_allclose(np.linalg.norm(d - got), tail, rtol=1e-5)
    assert e.arrays["a"].shape == (shape[0], rank) and e.arrays["b"].shape == (rank, d.size // shape[0])


def test_randomized_power_iteration_finds_the_top_singular_values():
    u, _ = np.linalg.qr(RNG.standard_normal((300, 20)))
    v, _ = np.linalg.qr(RNG.standard_normal((200, 20)))
    s = 2.0 ** -np.arange(20)
    m = (u * s) @ v.T
    _, got, _ = enc.top_singular(m, 5, exact_up_to=10)
    np.testing.assert_allclose(got, s[:5], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.float32, np.float16, np.bool_, ml_dtypes.int4])
def test_exact_is_bit_exact_for_every_dtype(dtype):
    if dtype == np.bool_:
        base, new = RNG.random(100) > 0.5, RNG.random(100) > 0.5
    elif np.dtype(dtype).kind == "f":
        base = RNG.standard_normal(100).astype(dtype)
        new = base.copy()
        new[::7] += dtype(0.5)
        new[3], new[5] = np.nan, -0.0
    else:
        info = np.iinfo(np.int8) if dtype == ml_dtypes.int4 else np.iinfo(dtype)
        lo, hi = (-8, 7) if dtype == ml_dtypes.int4 else (info.min, info.max)
        base = RNG.integers(lo, hi + 1, size=100).astype(dtype)
        new = base.copy()
        new[0], base[0] = np.array(hi).astype(dtype), np.array(lo).astype(dtype)  # wraps around
    e = enc.encode_exact(base, new)
    got = enc.reconstruct(base, e)
    assert got.dtype == base.dtype
    assert got.tobytes() == new.tobytes()


def test_exact_difference_of_integers_is_zero_where_unchanged():
    base = RNG.integers(-127, 128, size=1000).astype(np.int8)
    new = base.copy()
    new[10] += 1
    d = enc.encode_exact(base, new).arrays["d"]
    assert np.count_nonzero(d) == 1 and d[10] == 1


def _update(records):
    return container.Update("onnx", "ab" * 32, records, {"method": "test"})


def test_container_round_trips_every_encoding():
    d = _delta((64, 32))
    base = RNG.integers(-127, 128, size=50).astype(np.int8)
    records = [container.Record(f"t{m}", enc.encode(d, m)) for m in enc.LOSSY]
    records += [container.Record("unchanged", enc.Encoded("unchanged")),
                container.Record("int", enc.encode_exact(base, base + 1))]
    data = container.pack(_update(records))
    got = container.unpack(data, "u.qkd")
    assert got.base_fingerprint == "ab" * 32 and got.kind == "onnx"
    assert [r.name for r in got.records] == [r.name for r in records]
    for a, b in zip(records, got.records):
        assert a.encoded.method == b.encoded.method and a.encoded.params == b.encoded.params
        for k in a.encoded.arrays:
            assert a.encoded.arrays[k].dtype == b.encoded.arrays[k].dtype
            assert np.array_equal(a.encoded.arrays[k], b.encoded.arrays[k])


def test_container_refuses_corruption_and_other_files():
    data = bytearray(container.pack(_update([container.Record("t", enc.encode(_delta((64, 32)), "int8"))])))
    data[-20] ^= 0x01
    with pytest.raises(InputError, match="checksum"):
        container.unpack(bytes(data), "u.qkd")
    with pytest.raises(InputError, match="not a quantkit update"):
        container.unpack(b"\x08\x07onnx model", "m.onnx")


def test_auto_menu_is_a_pareto_front_and_search_finds_the_cheapest_passing_level():
    base = RNG.standard_normal((64, 64)).astype(np.float32)
    new = (base + _delta((64, 64))).astype(np.float32)
    d = new.astype(np.float64) - base
    front = menu(d, base, new)
    costs, errors = [c.cost for c in front], [c.error for c in front]
    assert costs == sorted(costs) and errors == sorted(errors, reverse=True)
    assert front[-1].encoded.method == "exact" and front[-1].error == 0.0
    # a fake target, monotone in tau like a real one: pass when the tensor's relative error is <= 0.1
    def passes(choice):
        e = choice["w"]
        err = 0.0 if e.method == "exact" else relative_error(d, e)
        return err <= 0.1, [{"error": err}]

    choice, outputs, log = search({"w": front}, passes)
    first_ok = next(t for t in TAUS if pick(front, t).error <= 0.1)
    assert choice["w"] is pick(front, first_ok).encoded
    assert outputs[0]["error"] <= 0.1
    assert len(log) <= 4  # bisection over the ladder, not every level
    assert choice["w"].method != "exact"  # something lossy meets a 10% budget
