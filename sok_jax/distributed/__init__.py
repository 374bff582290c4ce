"""The model-parallel path: tables sharded over a mesh axis.

* `layer.py`: `DistributedEmbedding`, SOK's one table shared by all slots;
* `collection.py`: `EmbeddingCollection`, many tables with their own
  placements (`specs.py`: `TableSpec`, `FeatureSpec`; `planner.py`: the
  placement planner);
* `tables.py`: the `shard_map` both run in; `exchange.py`: the per-device
  data path, plan -> all_to_all keys -> owner rows -> gather -> all_to_all
  vectors -> combine, and its backward;
* `rows.py`: the row strategies (row, table, replicated; direct and hash);
  `owners.py`: which device owns a key of a row-sharded table (`key_owner`,
  "mod" or "hashed" key placement);
* `scores.py`: online hash tables (eviction, admission, per-row scores;
  `HashOptions`), `online.py` their export with optimizer state and
  deltas (`TableExport`), import on any device count and maintenance;
* `quantized.py`: read-only inference tables (int8, 16-bit rows);
  `deltas.py`: `export_pairs(since_step=t)` deltas applied to a serving
  state (`sok_jax.serving.apply_delta`);
* `state.py`: `EmbeddingState`, `EmbeddingStats`, `check_stats` and its
  `EmbeddingError`;
* `eager.py`: the layers' methods called outside `jit`, compiled once.
"""

from sok_jax._compat import shard_map
from sok_jax.distributed.collection import CollectionState, EmbeddingCollection, TableShard
from sok_jax.distributed.layer import DistributedEmbedding
from sok_jax.distributed.online import TableExport
from sok_jax.distributed.owners import KEY_PLACEMENTS, key_owner
from sok_jax.distributed.scores import HashOptions, HashRowGrad, HashScores
from sok_jax.distributed.specs import FeatureSpec, TableSpec
from sok_jax.distributed.state import (
    EmbeddingError,
    EmbeddingState,
    EmbeddingStats,
    EmbeddingWarning,
    check_stats,
)

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
    "HashRowGrad",
    "HashScores",
    "KEY_PLACEMENTS",
    "TableExport",
    "TableShard",
    "TableSpec",
    "check_stats",
    "key_owner",
    "shard_map",
]
