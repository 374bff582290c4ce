"""The pytrees of the sharded layer (its state and its counters) and the
host-side check of the counters."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax.distributed.host import to_host


@dataclasses.dataclass(frozen=True)
class EmbeddingStats:
    """Per-device counts of the last call, int32 [n] each.

    overflow: distinct keys that did not fit their destination's exchange
      bucket (they got zeros and no gradient). Raise `capacity_factor`.
    invalid: ids that are neither padding nor a key of the table (direct
      mode: outside [0, n * max_vocabulary_size_per_gpu)).
    hash_full: keys that found no row because their owner's shard was full
      (with eviction: its bucket held only rows the same call saw).
    nonfinite: set by `sparse_update` (zeros after a lookup): the cotangent
      vectors of each device's share of the batch that held a NaN or Inf.
      They reach every row their bags looked up; with `skip_nonfinite=True`
      on the optimizer those rows and slots were left as they were,
      otherwise they now hold NaN.
    Online hash tables only (`HashOptions`; None otherwise):
    evicted: rows whose key the call (or `evict_stale`) evicted, per shard
      (replicas of a replicated table report the same).
    not_admitted: keys that got no row because admission has not seen them
      in `admit_after` training lookups yet.
    load: float32, the fraction of each shard's rows that hold a key after
      the call.
    """

    overflow: Any
    invalid: Any
    hash_full: Any
    nonfinite: Any = None
    evicted: Any = None
    not_admitted: Any = None
    load: Any = None

    def total(self):
        return jnp.sum(self.overflow) + jnp.sum(self.invalid) + jnp.sum(self.hash_full)


@dataclasses.dataclass(frozen=True)
class EmbeddingState:
    """Functional state of a `DistributedEmbedding`.

    table: [n * rows_per_gpu, D], sharded over the axis; device d holds the
      rows of the keys it owns, k % n == d (hash mode with key_placement
      "hashed": `key_owner(k)` == d; direct mode: key k at local row
      k // n; `rows.DirectRows.global_rows` is that layout).
    slot_keys: hash mode only: [n * rows_per_gpu] keys stored in each row
      (the padding value where free), sharded like the table; None in direct
      mode.
    seed: uint32[2] PRNG key data; initial vectors of new keys derive from it.
    stats: `EmbeddingStats` of the last call.
    scores: online hash tables only (`HashOptions`): their
      `scores.HashScores` (per-row last_seen and count, the step, the
      admission sketch, the eviction log), sharded like slot_keys; None
      otherwise.
    """

    table: Any
    slot_keys: Any
    seed: Any
    stats: EmbeddingStats
    scores: Any = None


jax.tree_util.register_dataclass(
    EmbeddingStats,
    data_fields=[
        "overflow",
        "invalid",
        "hash_full",
        "nonfinite",
        "evicted",
        "not_admitted",
        "load",
    ],
    meta_fields=[],
)
jax.tree_util.register_dataclass(
    EmbeddingState, data_fields=["table", "slot_keys", "seed", "stats", "scores"], meta_fields=[]
)


class EmbeddingError(ValueError):
    """A call dropped ids (overflowed buckets, invalid ids, full hash shards).

    `state`: where a layer's own host check raised it, the state that call
    returned; it is valid (nothing was lost): inspect it, skip the batch or
    save it."""

    def __init__(self, message: str, state=None):
        super().__init__(message)
        self.state = state


class EmbeddingWarning(UserWarning):
    """What `check=True` reports from inside a jitted computation, which must
    not raise (that would lose the donated state)."""


def stats_problems(
    overflow, invalid, hash_full, table: str | None = None, nonfinite=None
) -> list[str]:
    """One sentence per kind of dropped id (and of non-finite cotangent),
    with the per-device counts."""
    where = f"table {table!r}: " if table else ""
    problems = []
    for counts, what in (
        (overflow, "key(s) overflowed their exchange bucket; raise capacity_factor"),
        (invalid, "id(s) are neither padding nor a key of the table"),
        (hash_full, "key(s) found no row: a hash shard is full"),
        (
            0 if nonfinite is None else nonfinite,
            "cotangent vector(s) held NaN or Inf (their rows now hold NaN unless the "
            "optimizer has skip_nonfinite=True)",
        ),
    ):
        counts = np.asarray(counts)
        if int(np.sum(counts)):
            problems.append(f"{where}{int(np.sum(counts))} {what} (per device {counts.tolist()})")
    return problems


def _all_stats(state) -> dict:
    """{table name or None: EmbeddingStats} of a layer's or a collection's state."""
    stats = state.stats
    return stats if isinstance(stats, dict) else {None: stats}


def check_stats(state) -> None:
    """Host-side check of the counters of the last call that made `state`
    (of a `DistributedEmbedding` or an `EmbeddingCollection`).

    Raises:
      EmbeddingError: the call dropped anything (overflow, invalid ids, full
        hash shards) or, for a `sparse_update`, got a NaN or Inf cotangent,
        naming each count per device (and table); `state` stays valid.
    """
    problems = []
    for table, s in _all_stats(state).items():
        counts = (to_host(s.overflow), to_host(s.invalid), to_host(s.hash_full))
        nonfinite = None if s.nonfinite is None else to_host(s.nonfinite)
        problems += stats_problems(*counts, table, nonfinite)
    if problems:
        raise EmbeddingError("sok_jax: " + "; ".join(problems), state)


def warn_on_stats(*counts) -> None:
    """The callback of `check=True` inside a computation: warns (never
    raises) with what was dropped; `counts` are (overflow, invalid,
    hash_full) gathered over the axis, per table in order."""
    problems = []
    for i in range(0, len(counts), 3):
        problems += stats_problems(*counts[i : i + 3])
    if problems:
        warnings.warn(
            "sok_jax: " + "; ".join(problems) + " (call sok_jax.check_stats(state) to raise)",
            EmbeddingWarning,
            stacklevel=1,
        )
