"""sok_jax.data.criteo: the feature sets and the reader of the preprocessed
NumPy Criteo files, on files the test writes in the TorchRec / MLPerf layout."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from sok_jax import data
from sok_jax.data import criteo


def _day(rng, n, sizes=None):
    dense = np.log(rng.integers(0, 1000, (n, 13)) + 3.0).astype(np.float32)
    labels = rng.integers(0, 2, n).astype(np.int32)
    if sizes is None:
        sparse = rng.integers(0, 2**31 - 1, (n, 26)).astype(np.int32)
    else:
        sparse = [rng.integers(0, 2**31 - 1, (n, s)).astype(np.int32) for s in sizes]
    return dense, sparse, labels


def test_mlperf_features_are_the_reference_sizes():
    feats = data.criteo_features()
    assert len(feats) == 26 and feats[0].name == "cat_0" and feats[-1].name == "cat_25"
    assert sum(f.cardinality for f in feats) == 204_184_588
    assert max(f.cardinality for f in feats) == 40_000_000
    assert all(f.nnz == 1 for f in feats)
    multi = data.criteo_features(multi_hot=True)
    assert sum(f.nnz for f in multi) == 214 and max(f.nnz for f in multi) == 100
    # 104.5 GB of float32 rows at D 128.
    assert sum(f.cardinality for f in feats) * 128 * 4 == pytest.approx(104.54e9, rel=1e-3)


def test_scaled_features_shrink_but_keep_small_tables():
    feats = data.criteo_features(scale=1e-3)
    rows = {f.name: f.cardinality for f in feats}
    assert rows["cat_0"] == 40_000 and rows["cat_5"] == 3 and rows["cat_8"] == 16
    with pytest.raises(ValueError, match="scale"):
        data.criteo_features(scale=0)


@pytest.mark.parametrize("days", [[0], [0, 1]])
def test_one_hot_reader_reads_what_was_written(tmp_path, days):
    rng = np.random.default_rng(0)
    lengths = [100, 57]
    written = [_day(rng, lengths[d]) for d in days]
    for d, (dense, sparse, labels) in zip(days, written):
        paths = data.write_day(str(tmp_path), d, dense, sparse, labels)
        assert paths[1].endswith(f"day_{d}_sparse.npy")
    feats = data.criteo_features(scale=1e-4)
    reader = data.CriteoNumpy(str(tmp_path), days, 32, features=feats)
    total = sum(lengths[d] for d in days)
    assert reader.num_batches == len(reader) == total // 32
    dense = np.concatenate([w[0] for w in written])
    sparse = np.concatenate([w[1] for w in written])
    labels = np.concatenate([w[2] for w in written])
    batches = list(reader)
    assert len(batches) == total // 32
    for step, b in enumerate(batches):  # the batch across the day boundary too
        rows = slice(32 * step, 32 * (step + 1))
        assert b.dense.dtype == np.float32 and b.dense.shape == (32, 13)
        np.testing.assert_array_equal(b.dense, dense[rows])
        assert b.labels.dtype == np.float32 and b.labels.shape == (32,)
        np.testing.assert_array_equal(b.labels, labels[rows])
        assert sorted(b.sparse) == sorted(f.name for f in feats)
        for k, f in enumerate(feats):
            ids = b.sparse[f.name]
            assert ids.dtype == np.int32 and ids.shape == (32, 1)
            np.testing.assert_array_equal(ids[:, 0], sparse[rows, k] % f.cardinality)
    with pytest.raises(IndexError):
        reader.batch(reader.num_batches)


def test_multi_hot_reader_memory_maps_the_npz(tmp_path):
    rng = np.random.default_rng(1)
    sizes = data.MLPERF_MULTI_HOT_SIZES
    dense, sparse, labels = _day(rng, 70, sizes)
    sparse[3][5, 1] = -1  # a padding id stays padding
    paths = data.write_day(str(tmp_path), 23, dense, sparse, labels)
    assert paths[1].endswith("day_23_sparse_multi_hot.npz")
    with zipfile.ZipFile(paths[1]) as zf:  # the layout the MLPerf reader expects
        assert sorted(zf.namelist(), key=lambda s: int(s.split(".")[0]))[:2] == ["0.npy", "1.npy"]
    member = criteo._npz_member(paths[1], "20.npy")
    assert isinstance(member, np.memmap) and member.shape == (70, 100)
    np.testing.assert_array_equal(member, sparse[20])

    feats = data.criteo_features(scale=1e-3, multi_hot=True)
    reader = data.CriteoNumpy(str(tmp_path), [23], 16, features=feats, multi_hot=True)
    assert reader.num_batches == 4
    b = reader.batch(2)
    rows = slice(32, 48)
    np.testing.assert_array_equal(b.dense, dense[rows])
    np.testing.assert_array_equal(b.labels, labels[rows])
    for k, f in enumerate(feats):
        assert b.sparse[f.name].shape == (16, sizes[k])
        np.testing.assert_array_equal(b.sparse[f.name], sparse[k][rows] % f.cardinality)
    assert reader.batch(0).sparse["cat_3"][5, 1] == -1


def test_reader_rows_and_processes(tmp_path):
    rng = np.random.default_rng(2)
    dense, sparse, labels = _day(rng, 64)
    data.write_day(str(tmp_path), 0, dense, sparse, labels)
    half = data.CriteoNumpy(str(tmp_path), [0], 8, rows=(32, 64))  # e.g. day 23's test half
    assert half.num_batches == 4
    np.testing.assert_array_equal(half.batch(0).dense, dense[32:40])
    parts = [
        data.CriteoNumpy(str(tmp_path), [0], 8, process_index=i, process_count=2).batch(1)
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([p.dense for p in parts]), dense[8:16])


def test_reader_errors(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(FileNotFoundError, match="day 0"):
        data.CriteoNumpy(str(tmp_path), [0], 8)
    dense, sparse, labels = _day(rng, 16)
    data.write_day(str(tmp_path), 0, dense, sparse, labels)
    with pytest.raises(ValueError, match="nnz 1"):
        data.CriteoNumpy(str(tmp_path), [0], 8, features=data.criteo_features(multi_hot=True))
    np.savez_compressed(
        tmp_path / "day_1_sparse_multi_hot.npz", **{str(k): sparse[:, k : k + 1] for k in range(26)}
    )
    np.save(tmp_path / "day_1_dense.npy", dense)
    np.save(tmp_path / "day_1_labels.npy", labels.reshape(-1, 1))
    feats = data.criteo_features(multi_hot=[1] * 26)
    with pytest.raises(ValueError, match="compressed"):
        data.CriteoNumpy(str(tmp_path), [1], 8, features=feats, multi_hot=True)
