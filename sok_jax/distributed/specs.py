"""What a collection of tables is made of: `TableSpec` (a logical table) and
`FeatureSpec` (an input that reads one table), plain frozen dataclasses as
in jax-tpu-embedding. They are checked when made; nothing here depends on
the mesh or the placement."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from sok_jax import initializers
from sok_jax.distributed.owners import check_key_placement
from sok_jax.distributed.scores import make_options
from sok_jax.distributed.storage import make_storage
from sok_jax.ops import checks, embed_ops
from sok_jax.optim import check_sparse_optimizer

PLACEMENTS = ("auto", "row", "table", "replicated")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A logical embedding table.

    Attributes:
      name: unique among the collection's tables.
      vocabulary_size: rows of the table (direct mode: its keys are
        [0, vocabulary_size)); in hash mode, its capacity in keys.
      embedding_dim: D, any positive size.
      combiner: how a feature's ids of one sample are reduced: "sum",
        "mean", "sqrtn", or None for the un-pooled sequence output
        [batch, max_nnz, D].
      dtype: storage dtype (float32, bfloat16, float16; math in float32).
      initializer: a name ("random_uniform", "zeros", ...) or a callable
        `init(key, (D,), dtype)`, applied per key; a key's initial vector
        depends on the collection's seed, this table's name and the key.
      use_hashtable: map arbitrary integer keys to rows by a hash table with
        dynamic insertion.
      key_dtype: int32, uint32 or int64 (int64 needs jax_enable_x64).
      placement: "auto" (the planner chooses), "row" (key k on device
        k % n, see key_placement), "table" (the whole table on one device) or "replicated"
        (every device holds it; data parallel).
      optimizer: a `sok_jax.optim.SparseOptimizer` for this table, or None
        for the one passed to `sparse_update`.
      eviction, admit_after, hash_options: an online hash table (hash mode
        only), as `DistributedEmbedding`'s arguments of those names.
      storage, cache_rows, cache_policy, cache_overlap_moves: where the rows and their optimizer
        slots live ("hbm", "host" or "host_cached" with `cache_rows` rows of
        HBM cache per device), as `DistributedEmbedding`'s arguments of
        those names; None: "hbm", unless the collection's `hbm_budget`
        makes the planner offload the table (`sok_jax.distributed.planner`).
      key_placement: the device that owns key k under placement "row":
        "mod" (k % n) or "hashed" (mix(k) % n; hash tables placed "row" or
        "auto" only), as `DistributedEmbedding`'s argument.
    """

    name: str
    vocabulary_size: int
    embedding_dim: int
    combiner: str | None = "sum"
    dtype: Any = jnp.float32
    initializer: Any = "random_uniform"
    use_hashtable: bool = False
    key_dtype: Any = jnp.int32
    placement: str = "auto"
    optimizer: Any = None
    eviction: str | None = None
    admit_after: int | None = None
    hash_options: Any = None
    storage: str | None = None
    cache_rows: int | None = None
    cache_policy: str = "lru"
    cache_overlap_moves: bool = False
    key_placement: str = "mod"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TableSpec.name must be a non-empty string, got {self.name!r}")
        size = checks.positive_int(
            f"TableSpec {self.name!r}: vocabulary_size", self.vocabulary_size
        )
        if size >= checks.MAX_ROWS:
            raise ValueError(
                f"TableSpec {self.name!r}: vocabulary_size must stay below 2^31 - 1, got {size}"
            )
        object.__setattr__(self, "vocabulary_size", size)
        object.__setattr__(
            self,
            "embedding_dim",
            checks.positive_int(f"TableSpec {self.name!r}: embedding_dim", self.embedding_dim),
        )
        if self.combiner is not None:
            embed_ops.combiner_code(self.combiner)
        dt = jnp.dtype(self.dtype)
        if dt not in checks.TABLE_DTYPES:
            raise ValueError(
                f"TableSpec {self.name!r}: dtype must be float32, bfloat16 or float16, got {dt}"
            )
        object.__setattr__(self, "dtype", dt)
        key = checks.check_key_dtype(self.key_dtype, f"TableSpec {self.name!r}: key_dtype")
        object.__setattr__(self, "key_dtype", jnp.dtype(key))
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"TableSpec {self.name!r}: placement must be one of {PLACEMENTS}, "
                f"got {self.placement!r}"
            )
        initializers.resolve(self.initializer)
        if self.optimizer is not None:
            check_sparse_optimizer(self.optimizer, f"TableSpec {self.name!r}: optimizer")
        _ = self.online  # raises on bad online hash options
        if self.storage is not None or self.cache_rows is not None:
            try:
                _ = self.tier  # raises on a bad storage, cache size or policy
            except ValueError as e:
                raise ValueError(f"TableSpec {self.name!r}: {e}") from None
        if self.storage not in (None, "hbm") and self.placement == "replicated":
            raise ValueError(
                f'TableSpec {self.name!r}: storage="{self.storage}" is for placements "row" and '
                '"table" (a replicated table is held whole by every device)'
            )
        where = f"TableSpec {self.name!r}: "
        check_key_placement(self.key_placement, self.use_hashtable, where)
        if self.key_placement == "hashed" and self.placement not in ("auto", "row"):
            raise ValueError(
                f"{where}key_placement='hashed' places keys of a table sharded by row; "
                f"placement {self.placement!r} puts every key of the table on "
                f"{'one device' if self.placement == 'table' else 'every device'}"
            )

    @property
    def online(self):
        """The table's `scores.HashOptions`, None for a plain table."""
        return make_options(
            self.eviction,
            self.admit_after,
            self.hash_options,
            self.use_hashtable,
            f"TableSpec {self.name!r}: ",
        )

    @property
    def row_bytes(self) -> int:
        return self.embedding_dim * self.dtype.itemsize

    @property
    def tier(self):
        """The table's storage tier (`storage.py`) as given (None: "hbm")."""
        return make_storage(
            self.storage or "hbm", self.cache_rows, self.cache_policy, self.cache_overlap_moves
        )


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """An input of the batch that reads one table.

    Attributes:
      name: unique among the features; the key of its ids in the batch and
        of its output.
      table: the name of the table it reads.
      max_nnz: most ids of one sample (the width of its padded ids
        [batch, max_nnz]; ragged bags longer than this are counted invalid).
    """

    name: str
    table: str
    max_nnz: int = 1

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"FeatureSpec.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(
            self,
            "max_nnz",
            checks.positive_int(f"FeatureSpec {self.name!r}: max_nnz", self.max_nnz),
        )


def check_specs(tables, features):
    """The tables by name, checked against the features that read them."""
    tables, features = tuple(tables), tuple(features)
    if not tables:
        raise ValueError("a collection needs at least one TableSpec")
    by_name = {}
    for t in tables:
        if not isinstance(t, TableSpec):
            raise ValueError(f"tables must be TableSpecs, got {type(t).__name__}")
        if t.name in by_name:
            raise ValueError(f"two tables are named {t.name!r}")
        by_name[t.name] = t
    names = set()
    for f in features:
        if not isinstance(f, FeatureSpec):
            raise ValueError(f"features must be FeatureSpecs, got {type(f).__name__}")
        if f.name in names:
            raise ValueError(f"two features are named {f.name!r}")
        names.add(f.name)
        if f.table not in by_name:
            raise ValueError(
                f"feature {f.name!r} reads table {f.table!r}, which is not among the tables "
                f"{sorted(by_name)}"
            )
    unread = sorted(set(by_name) - {f.table for f in features})
    if unread:
        raise ValueError(f"no feature reads the table(s) {unread}")
    return by_name
