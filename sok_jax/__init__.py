"""sok_jax: SparseOperationKit-style embeddings for JAX.

Lookup and combine run in CUDA (or CPU) kernels registered as XLA FFI custom
calls; tables are plain jax.Arrays, sharded over a mesh axis by
`DistributedEmbedding`.
"""

from sok_jax import optim, serving
from sok_jax._native import has_cuda, target_names
from sok_jax.batching import PaddedBatch, pad_batch
from sok_jax.distributed import (
    CollectionState,
    DistributedEmbedding,
    EmbeddingCollection,
    EmbeddingError,
    EmbeddingState,
    EmbeddingStats,
    EmbeddingWarning,
    FeatureSpec,
    HashOptions,
    TableExport,
    TableSpec,
    check_stats,
)
from sok_jax.embedding import (
    LookupContext,
    count_invalid_ids,
    count_nonfinite,
    embed,
    lookup,
    sparse_grad,
    sparse_update,
)
from sok_jax.ids import RaggedIds, check_ids
from sok_jax.ops.embed_ops import SparseRowGrad

__all__ = [
    "CollectionState",
    "DistributedEmbedding",
    "EmbeddingCollection",
    "EmbeddingError",
    "EmbeddingState",
    "EmbeddingStats",
    "EmbeddingWarning",
    "FeatureSpec",
    "HashOptions",
    "TableExport",
    "TableSpec",
    "check_ids",
    "check_stats",
    "LookupContext",
    "PaddedBatch",
    "RaggedIds",
    "SparseRowGrad",
    "count_invalid_ids",
    "count_nonfinite",
    "embed",
    "has_cuda",
    "lookup",
    "pad_batch",
    "optim",
    "sparse_grad",
    "serving",
    "sparse_update",
    "target_names",
]

__version__ = "0.1.0"
