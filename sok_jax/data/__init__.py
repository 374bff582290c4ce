"""Data for the training programs: Criteo-shaped batches.

* `SyntheticCriteo`: batches generated on the device inside `jax.jit`
  (power-law ids, lognormal dense features, labels from a planted model).
* `CriteoNumpy`: the preprocessed NumPy Criteo files of TorchRec and the
  MLPerf reference (one-hot and MLPerf's multi-hot), memory-mapped.
* `criteo_features`: the 26 sparse features of MLPerf DLRM-DCNv2 (or any
  cardinalities), scaled and one- or multi-hot.

Both sources implement `Loader`: `batch(step) -> Batch(dense, sparse, labels)`.
`import sok_jax` does not import this package.
"""

from sok_jax.data.base import Batch, Loader, SparseFeature
from sok_jax.data.criteo import (
    DENSE_NAMES,
    KAGGLE_CARDINALITIES,
    MLPERF_CARDINALITIES,
    MLPERF_MULTI_HOT_SIZES,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_NAMES,
    CriteoNumpy,
    criteo_features,
    scaled_rows,
    write_day,
)
from sok_jax.data.metrics import roc_auc
from sok_jax.data.synthetic import SyntheticCriteo

__all__ = [
    "Batch",
    "CriteoNumpy",
    "DENSE_NAMES",
    "KAGGLE_CARDINALITIES",
    "Loader",
    "MLPERF_CARDINALITIES",
    "MLPERF_MULTI_HOT_SIZES",
    "NUM_DENSE",
    "NUM_SPARSE",
    "SPARSE_NAMES",
    "SparseFeature",
    "SyntheticCriteo",
    "criteo_features",
    "roc_auc",
    "scaled_rows",
    "write_day",
]
