"""The pytrees of the sharded layer: its state, its counters, what a lookup
saves for the sparse backward, and the host-side check of the counters."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class EmbeddingStats:
    """Per-device counts of the last call, int32 [n] each.

    overflow: distinct keys that did not fit their destination's exchange
      bucket (they got zeros and no gradient). Raise `capacity_factor`.
    invalid: ids that are neither padding nor a key of the table (direct
      mode: outside [0, n * max_vocabulary_size_per_gpu)).
    hash_full: keys that found no row because their owner's shard was full.
    """

    overflow: Any
    invalid: Any
    hash_full: Any

    def total(self):
        return jnp.sum(self.overflow) + jnp.sum(self.invalid) + jnp.sum(self.hash_full)


@dataclasses.dataclass(frozen=True)
class EmbeddingState:
    """Functional state of a `DistributedEmbedding`.

    table: [n * rows_per_gpu, D], sharded over the axis; device d holds the
      rows of the keys k with k % n == d (direct mode: key k at local row
      k // n; `rows.DirectRows.global_rows` is that layout).
    slot_keys: hash mode only: [n * rows_per_gpu] keys stored in each row
      (the padding value where free), sharded like the table; None in direct
      mode.
    seed: uint32[2] PRNG key data; initial vectors of new keys derive from it.
    stats: `EmbeddingStats` of the last call.
    """

    table: Any
    slot_keys: Any
    seed: Any
    stats: EmbeddingStats


jax.tree_util.register_dataclass(
    EmbeddingStats, data_fields=["overflow", "invalid", "hash_full"], meta_fields=[]
)
jax.tree_util.register_dataclass(
    EmbeddingState, data_fields=["table", "slot_keys", "seed", "stats"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class ExchangeContext:
    """What a lookup through the exchange saved for its sparse backward. Every
    array is per device, stacked over the axis.

    owner_rows: int32 [n * n*C]: on the owner, the local row of every key it
      received (-1: an empty bucket slot, or a key without a row).
    recv_index: int32 [n * N]: on the requesting device, for each of its id
      positions, the slot of that id's vector in the buffer the owners sent
      back (-1: padding, invalid or overflowed).
    offsets: int32 [n * (M + 1)]: the requesting device's bag offsets.
    weights: float32 [n * N], or None when unweighted.
    """

    owner_rows: Any
    recv_index: Any
    offsets: Any
    weights: Any


jax.tree_util.register_dataclass(
    ExchangeContext,
    data_fields=["owner_rows", "recv_index", "offsets", "weights"],
    meta_fields=[],
)


def raise_on_stats(overflow, invalid, hash_full) -> None:
    """Raises ValueError naming what the counters say was dropped (host side;
    also the body of the `check=True` callback)."""
    problems = []
    if int(np.sum(overflow)):
        problems.append(
            f"{int(np.sum(overflow))} key(s) overflowed their exchange bucket "
            f"(per device {np.asarray(overflow).tolist()}); raise capacity_factor"
        )
    if int(np.sum(invalid)):
        problems.append(f"{int(np.sum(invalid))} id(s) are neither padding nor a key of the table")
    if int(np.sum(hash_full)):
        problems.append(f"{int(np.sum(hash_full))} key(s) found no row: a hash shard is full")
    if problems:
        raise ValueError("sok_jax.DistributedEmbedding: " + "; ".join(problems))


def check_stats(state: EmbeddingState) -> None:
    """Host-side opt-in check: raises ValueError if the last call dropped
    anything (overflow, invalid ids, full hash shard)."""
    stats = state.stats
    raise_on_stats(
        np.asarray(stats.overflow), np.asarray(stats.invalid), np.asarray(stats.hash_full)
    )
