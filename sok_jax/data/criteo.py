"""Criteo: the feature sets of MLPerf's DLRM-DCNv2 and of the Kaggle data,
and a reader for the preprocessed NumPy format of TorchRec and the MLPerf
reference.

The format (TorchRec `torchrec.datasets.criteo.BinaryCriteoUtils`, MLPerf
Training `recommendation_v2/torchrec_dlrm`), one set of files per day `d`:

  * `day_{d}_dense.npy`   float32 [N, 13]: log(count + 3) of each integer
    feature (missing values counted as 0);
  * `day_{d}_sparse.npy`  int32 [N, 26]: one id per categorical feature
    (contiguous ids after TorchRec's preprocessing); the reader reduces them
    modulo the feature's rows, as the reference does with
    `num_embeddings_per_feature`;
  * `day_{d}_labels.npy`  int32 [N, 1]: the click, 0 or 1;
  * multi-hot (MLPerf DLRM v2's materialized synthetic multi-hot data):
    `day_{d}_sparse_multi_hot.npz` instead of the sparse file, an
    uncompressed npz holding `0.npy` ... `25.npy`, feature k int32
    [N, multi_hot_size_k].

Days 0-22 are the training set of Criteo 1TB; day 23 is split in halves,
validation then test.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from typing import Sequence

import numpy as np

from sok_jax.data.base import Batch, SparseFeature

NUM_DENSE = 13
NUM_SPARSE = 26
# TorchRec's column names (torchrec.datasets.criteo.DEFAULT_INT_NAMES / DEFAULT_CAT_NAMES).
DENSE_NAMES = tuple(f"int_{i}" for i in range(NUM_DENSE))
SPARSE_NAMES = tuple(f"cat_{i}" for i in range(NUM_SPARSE))

# MLPerf Training DLRM v2 (DLRM-DCNv2): the Criteo 1TB cardinalities capped at
# 40M rows (`--num_embeddings_per_feature` of the reference): 204,184,588 rows.
MLPERF_CARDINALITIES = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
# Its multi-hot bag sizes (`--multi_hot_sizes`): 214 ids per sample.
MLPERF_MULTI_HOT_SIZES = (
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1,
)  # fmt: skip
# Per-feature cardinalities of the Criteo Kaggle display-advertising data set.
KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip


def scaled_rows(cardinality: int, scale: float, min_rows: int = 16) -> int:
    """A table of `cardinality` rows shrunk by `scale` (0 < scale <= 1):
    ceil(cardinality * scale), but never below min(cardinality, min_rows), so
    that small features keep their values at tiny scales."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    return int(max(math.ceil(cardinality * scale), min(cardinality, min_rows)))


def criteo_features(
    cardinalities: Sequence[int] = MLPERF_CARDINALITIES,
    *,
    scale: float = 1.0,
    multi_hot: bool | Sequence[int] = False,
    min_rows: int = 16,
) -> tuple[SparseFeature, ...]:
    """The 26 sparse features: `SparseFeature(cat_k, rows, nnz)`.

    Args:
      cardinalities: rows per feature (default MLPerf DLRM-DCNv2's).
      scale: shrinks every table (`scaled_rows`); 1.0 is full size.
      multi_hot: False (one id per feature), True (MLPerf's bag sizes) or the
        bag sizes themselves.
      min_rows: the smallest table a scaled feature gets (see `scaled_rows`).
    """
    cardinalities = tuple(int(c) for c in cardinalities)
    if multi_hot is True:
        sizes = MLPERF_MULTI_HOT_SIZES
    elif multi_hot is False:
        sizes = (1,) * len(cardinalities)
    else:
        sizes = tuple(int(s) for s in multi_hot)
    if len(sizes) != len(cardinalities):
        raise ValueError(f"{len(cardinalities)} cardinalities but {len(sizes)} bag sizes")
    names = SPARSE_NAMES if len(cardinalities) == NUM_SPARSE else None
    return tuple(
        SparseFeature(names[k] if names else f"cat_{k}", scaled_rows(c, scale, min_rows), nnz)
        for k, (c, nnz) in enumerate(zip(cardinalities, sizes))
    )


# ----------------------------------------------------------------- the files
def day_paths(path: str, day: int, multi_hot: bool) -> tuple[str, str, str]:
    """(dense, sparse, labels) file names of one day."""
    sparse = f"day_{day}_sparse_multi_hot.npz" if multi_hot else f"day_{day}_sparse.npy"
    return tuple(
        os.path.join(path, f) for f in (f"day_{day}_dense.npy", sparse, f"day_{day}_labels.npy")
    )


def write_day(path: str, day: int, dense, sparse, labels) -> tuple[str, str, str]:
    """Writes one day in the preprocessed format (for tests and conversions).

    Args:
      dense: float32 [N, 13] (already log(count + 3)).
      sparse: int [N, 26] (one-hot: `day_{d}_sparse.npy`) or a sequence of
        26 int arrays [N, nnz_k] (multi-hot: `day_{d}_sparse_multi_hot.npz`).
      labels: [N] or [N, 1] clicks.
    Returns: the three paths written.
    """
    multi_hot = not isinstance(sparse, np.ndarray)
    paths = day_paths(path, day, multi_hot)
    os.makedirs(path, exist_ok=True)
    np.save(paths[0], np.asarray(dense, np.float32))
    if multi_hot:
        np.savez(paths[1], **{str(k): np.asarray(a, np.int32) for k, a in enumerate(sparse)})
    else:
        np.save(paths[1], np.asarray(sparse, np.int32))
    np.save(paths[2], np.asarray(labels, np.int32).reshape(-1, 1))
    return paths


def _npz_member(path: str, member: str) -> np.ndarray:
    """A memory map of one array of an uncompressed npz (np.load would read
    it whole): the array's bytes sit at a fixed offset of the zip file."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(
            f"{path}: {member} is compressed; the multi-hot files must be written by "
            "np.savez (not savez_compressed) to be memory-mapped"
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: no zip local header for {member}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def _hash_ids(ids, rows: int) -> np.ndarray:
    """Ids modulo the table's rows (the reference's hashing); -1 stays -1."""
    return np.where(ids < 0, -1, ids % rows).astype(np.int32)


class CriteoNumpy:
    """Batches of the preprocessed NumPy Criteo files (see the module
    docstring), memory-mapped, in file order: batch `step` is samples
    [step * batch_size, (step + 1) * batch_size) of the days concatenated
    (an incomplete last batch is dropped). Ids are reduced modulo each
    feature's rows. Implements `sok_jax.data.Loader` with host arrays.

    Args:
      path: the directory of the `day_*` files.
      days: the days to read, in order (e.g. range(23) for training).
      batch_size: the global batch.
      features: the sparse features (rows and bag sizes); default
        `criteo_features(multi_hot=multi_hot)`, MLPerf's.
      multi_hot: read `day_{d}_sparse_multi_hot.npz` instead of
        `day_{d}_sparse.npy`.
      rows: (first, stop) rows of the concatenated days to use (e.g. the
        validation half of day 23); default all.
      process_index, process_count: this process reads its
        batch_size / process_count samples of every global batch.
    """

    on_device = False
    num_dense = NUM_DENSE

    def __init__(
        self,
        path: str,
        days: Sequence[int],
        batch_size: int,
        *,
        features: Sequence[SparseFeature] | None = None,
        multi_hot: bool = False,
        rows: tuple[int, int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.features = tuple(features or criteo_features(multi_hot=multi_hot))
        if len(self.features) != NUM_SPARSE:
            raise ValueError(f"Criteo has {NUM_SPARSE} sparse features, got {len(self.features)}")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must divide by {process_count} processes")
        self.batch_size = int(batch_size)
        self.multi_hot = bool(multi_hot)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self._dense, self._sparse, self._labels = [], [], []
        for day in days:
            dense_p, sparse_p, labels_p = day_paths(path, day, self.multi_hot)
            for p in (dense_p, sparse_p, labels_p):
                if not os.path.exists(p):
                    raise FileNotFoundError(f"Criteo day {day}: {p} is missing")
            dense = np.load(dense_p, mmap_mode="r")
            labels = np.load(labels_p, mmap_mode="r")
            if self.multi_hot:
                sparse = [_npz_member(sparse_p, f"{k}.npy") for k in range(NUM_SPARSE)]
            else:
                sparse = np.load(sparse_p, mmap_mode="r")
            self._check_day(day, dense, sparse, labels)
            self._dense.append(dense)
            self._sparse.append(sparse)
            self._labels.append(labels)
        lengths = [d.shape[0] for d in self._dense]
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        first, stop = rows if rows is not None else (0, int(self._starts[-1]))
        if not 0 <= first <= stop <= self._starts[-1]:
            raise ValueError(f"rows {rows} outside the {int(self._starts[-1])} rows of the days")
        self._first, self._stop = int(first), int(stop)

    def _check_day(self, day, dense, sparse, labels):
        n = dense.shape[0]
        if dense.ndim != 2 or dense.shape[1] != NUM_DENSE or dense.dtype != np.float32:
            raise ValueError(
                f"day {day}: dense must be float32 [N, 13], got {dense.dtype} {dense.shape}"
            )
        if labels.shape[0] != n:
            raise ValueError(f"day {day}: {labels.shape[0]} labels for {n} samples")
        if self.multi_hot:
            for k, (a, f) in enumerate(zip(sparse, self.features)):
                if a.shape != (n, f.nnz):
                    raise ValueError(
                        f"day {day}: multi-hot feature {k} must be [{n}, {f.nnz}], got {a.shape}"
                    )
        elif sparse.shape != (n, NUM_SPARSE):
            raise ValueError(f"day {day}: sparse must be [{n}, 26], got {sparse.shape}")
        elif any(f.nnz != 1 for f in self.features):
            raise ValueError("one-hot files (day_*_sparse.npy) need features with nnz 1")

    @property
    def num_batches(self) -> int:
        return (self._stop - self._first) // self.batch_size

    def __len__(self) -> int:
        return self.num_batches

    def _rows(self, arrays, start, count):
        """Rows [start, start + count) of the concatenated days."""
        parts = []
        while count > 0:
            f = int(np.searchsorted(self._starts, start, side="right")) - 1
            local = start - int(self._starts[f])
            take = min(count, int(self._starts[f + 1]) - start)
            parts.append(np.asarray(arrays[f][local : local + take]))
            start, count = start + take, count - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, step) -> Batch:
        """Batch `step` (this process's share of it) as host numpy arrays."""
        step = int(step)
        if not 0 <= step < self.num_batches:
            raise IndexError(f"batch {step} of {self.num_batches}")
        local = self.batch_size // self.process_count
        start = self._first + step * self.batch_size + self.process_index * local
        dense = self._rows(self._dense, start, local)
        labels = self._rows(self._labels, start, local).reshape(-1).astype(np.float32)
        sparse = {}
        if self.multi_hot:
            for k, f in enumerate(self.features):
                ids = self._rows([day[k] for day in self._sparse], start, local)
                sparse[f.name] = _hash_ids(ids, f.cardinality)
        else:
            ids = self._rows(self._sparse, start, local)
            for k, f in enumerate(self.features):
                sparse[f.name] = _hash_ids(ids[:, k : k + 1], f.cardinality)
        return Batch(np.ascontiguousarray(dense, np.float32), sparse, labels)

    def __iter__(self):
        for step in range(self.num_batches):
            yield self.batch(step)
