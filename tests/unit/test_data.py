import numpy as np
import pytest

from quantkit.calibrate.data import DataSource, InputSpec
from quantkit.errors import InputError

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 3, 4))]


def _concat(batches, key="x"):
    return np.concatenate([b[key] for b in batches])


@pytest.mark.parametrize("saver", [np.savez, np.savez_compressed])
def test_npz_streams_in_batches_and_reassembles_exactly(tmp_path, saver):
    x = np.random.default_rng(0).normal(size=(23, 3, 4)).astype(np.float32)
    saver(tmp_path / "c.npz", x=x, labels=np.arange(23))
    src = DataSource(tmp_path / "c.npz", SPEC)
    batches = list(src.batches(5))
    assert [len(b["x"]) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(_concat(batches), x)
    np.testing.assert_array_equal(_concat(batches, "labels"), np.arange(23))
    assert src.has_labels and src.samples == 23


def test_limit_caps_the_samples(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((20, 3, 4), np.float32))
    assert sum(len(b["x"]) for b in DataSource(tmp_path / "c.npz", SPEC).batches(8, limit=10)) == 10


def test_npy_for_single_input_model(tmp_path):
    x = np.ones((6, 3, 4), np.float32)
    np.save(tmp_path / "c.npy", x)
    np.testing.assert_array_equal(_concat(DataSource(tmp_path / "c.npy", SPEC).batches(4)), x)


def test_fortran_order_arrays_are_read_correctly(tmp_path):
    x = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    np.save(tmp_path / "c.npy", x)
    np.testing.assert_array_equal(_concat(DataSource(tmp_path / "c.npy", SPEC).batches(1)), x)


def test_directory_of_files_is_read_in_name_order(tmp_path):
    d = tmp_path / "calib"
    d.mkdir()
    a, b = np.zeros((3, 3, 4), np.float32), np.ones((4, 3, 4), np.float32)
    np.savez(d / "a.npz", x=a)
    np.save(d / "b.npy", b)
    src = DataSource(d, SPEC)
    assert src.samples == 7
    np.testing.assert_array_equal(_concat(src.batches(2)), np.concatenate([a, b]))


@pytest.mark.parametrize("arrays,message", [
    ({"image": np.zeros((2, 3, 4), np.float32)}, "has no array for input 'x'; it has: image"),
    ({"x": np.zeros((2, 3, 4), np.float64)}, "is float64 but the model expects float32"),
    ({"x": np.zeros((2, 12), np.float32)}, "rank 2"),
    ({"x": np.zeros((2, 3, 5), np.float32)}, "size 5 on axis 2"),
    ({"x": np.zeros((2, 3, 4), np.float32), "labels": np.zeros(3)}, "different sample counts"),
])
def test_mismatches_fail_before_any_run_with_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(InputError, match=message) as e:
        DataSource(tmp_path / "c.npz", SPEC)
    assert "\n" not in str(e.value)


def test_npy_for_multi_input_model_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 3, 4), np.float32))
    specs = SPEC + [InputSpec("mask", np.dtype(np.int64), (None, 3))]
    with pytest.raises(InputError, match="several inputs"):
        DataSource(tmp_path / "c.npy", specs)


def test_pickled_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="Python objects"):
        DataSource(tmp_path / "c.npy", SPEC)


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        DataSource(tmp_path / "nope.npz", SPEC)
    (tmp_path / "c.csv").write_text("1,2")
    with pytest.raises(InputError, match="unsupported data file"):
        DataSource(tmp_path / "c.csv", SPEC)


def test_extra_arrays_are_reported_not_read(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 4), np.float32), other=np.zeros(2))
    src = DataSource(tmp_path / "c.npz", SPEC)
    assert src.extra_keys == ["other"]
    assert set(next(src.batches(2))) == {"x"}
