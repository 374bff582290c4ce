"""The model-parallel path: one table sharded over a mesh axis.

* `layer.py`: `DistributedEmbedding` (SOK's arguments; state creation,
  the `shard_map` wrapping, the public methods);
* `exchange.py`: the per-device data path, plan -> all_to_all keys ->
  owner rows -> gather -> all_to_all vectors -> combine, and its backward;
* `rows.py`: the row strategies, direct (key = row) and hash;
* `state.py`: `EmbeddingState`, `EmbeddingStats`, `ExchangeContext`,
  `check_stats`.
"""

from sok_jax._compat import shard_map
from sok_jax.distributed.layer import DistributedEmbedding
from sok_jax.distributed.state import (
    EmbeddingState,
    EmbeddingStats,
    ExchangeContext,
    check_stats,
)

__all__ = [
    "DistributedEmbedding",
    "EmbeddingState",
    "EmbeddingStats",
    "ExchangeContext",
    "check_stats",
    "shard_map",
]
