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
from sok_jax.distributed.storage import CachedOptState, CachedShard


@dataclasses.dataclass(frozen=True)
class EmbeddingStats:
    """Per-device counters, int32 [n] each, that accumulate from `init`:
    every call adds what it counted, so a `check_stats` every N steps sees
    the drops of all N. `load` alone is a gauge (of the last call). Reset
    them with the layer's `zero_stats()`:
    `state = dataclasses.replace(state, stats=layer.zero_stats())` (a
    collection's: `stats=coll.zero_stats()`).

    overflow: distinct keys that did not fit their destination's exchange
      bucket (they got zeros and no gradient). Raise `capacity_factor`.
    invalid: ids that are neither padding nor a key of the table (direct
      mode: outside [0, n * max_vocabulary_size_per_gpu)).
    hash_full: keys that found no row because their owner's shard was full
      (with eviction: its bucket held only rows the same call saw).
    nonfinite: counted by `sparse_update`: the cotangent vectors of each
      device's share of the batch that held a NaN or Inf.
      They reach every row their bags looked up; with `skip_nonfinite=True`
      on the optimizer those rows and slots were left as they were,
      otherwise they now hold NaN.
    Online hash tables only (`HashOptions`; None otherwise):
    evicted: rows whose key the call (or `evict_stale`) evicted, per shard
      (replicas of a replicated table report the same).
    not_admitted: keys that got no row because admission has not seen them
      in `admit_after` training lookups yet.
    load: float32, the fraction of each shard's rows that hold a key after
      the last call.
    Hash tables that evict only (None otherwise):
    stale: rows that an update (`sparse_update`, `apply_gradients`) skipped
      because a lookup after the one that made its context evicted their
      key: the update left them and their optimizer slots as they were.
    Host-cached tables only (`storage="host_cached"`; None otherwise):
    cache_hits, cache_misses: distinct rows of each owner's lookups found in
      its HBM cache, and those brought in from the host store.
    cache_evictions: rows that left the cache (written back to the host
      store) to make room.
    Read-only inference hash tables only (`sok_jax.serving.quantize`; None
    otherwise):
    unseen: keys that hold no row (never trained), which got zeros: on each
      owner, the distinct keys each device asked it for (a replicated
      table: the key positions).
    """

    overflow: Any
    invalid: Any
    hash_full: Any
    nonfinite: Any = None
    evicted: Any = None
    not_admitted: Any = None
    load: Any = None
    stale: Any = None
    cache_hits: Any = None
    cache_misses: Any = None
    cache_evictions: Any = None
    unseen: Any = None

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
    data_fields=[f.name for f in dataclasses.fields(EmbeddingStats)],
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


_STALE = (
    "row update(s) skipped: the update used a context from before a lookup that evicted "
    "its rows' keys; call sparse_update (or sparse_grad) right after its lookup"
)


def stats_problems(
    overflow,
    invalid,
    hash_full,
    table: str | None = None,
    nonfinite=None,
    stale=None,
) -> list[str]:
    """One sentence per kind of dropped id (and of non-finite cotangent and
    skipped stale row), with the per-device counts."""
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
        (0 if stale is None else stale, _STALE),
    ):
        counts = np.asarray(counts)
        if int(np.sum(counts)):
            problems.append(f"{where}{int(np.sum(counts))} {what} (per device {counts.tolist()})")
    return problems


# The counters that accumulate (`load` is a gauge).
COUNTS = (
    "overflow",
    "invalid",
    "hash_full",
    "nonfinite",
    "evicted",
    "not_admitted",
    "stale",
    "cache_hits",
    "cache_misses",
    "cache_evictions",
    "unseen",
)


def accumulate(old: EmbeddingStats, new: EmbeddingStats) -> EmbeddingStats:
    """`old` plus the counts of a call (`new`), with the call's `load`; a
    field absent from one side is taken from the other."""

    def add(a, b):
        if a is None or b is None:
            return b if a is None else a
        return a + b

    sums = {k: add(getattr(old, k), getattr(new, k)) for k in COUNTS}
    return EmbeddingStats(**sums, load=old.load if new.load is None else new.load)


def _all_stats(state) -> dict:
    """{table name or None: EmbeddingStats} of a layer's or a collection's state."""
    stats = state.stats
    return stats if isinstance(stats, dict) else {None: stats}


def _problems(stats: dict, before: dict | None = None) -> list[str]:
    problems = []
    for table, s in stats.items():
        b = None if before is None else before[table]

        def host(k, s=s, b=b):
            x = getattr(s, k)
            if x is None:
                return None
            x = to_host(x)
            prior = None if b is None else getattr(b, k)
            return x if prior is None else x - to_host(prior)

        problems += stats_problems(
            host("overflow"), host("invalid"), host("hash_full"), table, host("nonfinite"),
            host("stale"),
        )
    return problems


def check_stats(state) -> None:
    """Host-side check of the counters of `state` (of a
    `DistributedEmbedding` or an `EmbeddingCollection`): everything counted
    since `init` (or the last `zero_stats()`).

    Raises:
      EmbeddingError: a call dropped anything (overflow, invalid ids, full
        hash shards), a `sparse_update` got a NaN or Inf cotangent, or an
        update skipped rows of a stale context, naming each count per
        device (and table); `state` stays valid.
    """
    problems = _problems(_all_stats(state))
    if problems:
        raise EmbeddingError("sok_jax: " + "; ".join(problems), state)


def check_call(before, state) -> None:
    """`check_stats` of what one call added to the counters (`before`: the
    stats it was given), for a layer's `check=True` eager calls."""
    before = before if isinstance(before, dict) else {None: before}
    problems = _problems(_all_stats(state), before)
    if problems:
        raise EmbeddingError("sok_jax: " + "; ".join(problems), state)


def _shape_dtype(x) -> tuple:
    """(shape, dtype) of an array, a tracer or a ShapeDtypeStruct (never
    reading a tracer's values), or of anything numpy converts."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    return tuple(x.shape), np.dtype(x.dtype)


def _outside(paths, others) -> list:
    """The shortest prefix of each path of `paths` that no path of `others`
    starts with (e.g. `.scores` for a whole subtree one side lacks), once
    each, in order."""
    out = []
    for p in paths:
        for i in range(1, len(p) + 1):
            if not any(q[:i] == p[:i] for q in others):
                if p[:i] not in out:
                    out.append(p[:i])
                break
    return out


def check_like(expected, got, what: str) -> None:
    """Trace-time check that the pytree `got` has the structure, shapes and
    dtypes of `expected` (a pytree of `jax.ShapeDtypeStruct`s), e.g. a state
    against the layer that is given it.

    Raises:
      ValueError: naming the fields one side has and the other lacks, or the
        first field whose shape or dtype differs with both.
    """
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    have = dict(jax.tree_util.tree_flatten_with_path(got)[0])

    def names(paths):
        return ", ".join(what + jax.tree_util.keystr(p) for p in paths)

    lacking = _outside([p for p in want if p not in have], list(have))
    if lacking:
        raise ValueError(
            f"{what}: this layer has {names(lacking)}, the given {what} has not (is it "
            "another layer's, or built by hand?)"
        )
    extra = _outside([p for p in have if p not in want], list(want))
    if extra:
        raise ValueError(
            f"{what}: the given {what} has {names(extra)}, which this layer has not (is it "
            "another layer's?)"
        )
    for path, w in want.items():
        h = have[path]
        if _shape_dtype(h) != _shape_dtype(w):
            (shape, dtype), (got_shape, got_dtype) = _shape_dtype(w), _shape_dtype(h)
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)}: this layer expects {shape} {dtype}, got "
                f"{got_shape} {got_dtype} (is the {what} another layer's?)"
            )


def check_opt_state(table_like, opt_state, optimizer, what: str) -> None:
    """Trace-time check of a sparse optimizer state against the table it
    updates (`table_like`: its shape and dtype): with `optimizer`, the
    structure, shapes and dtypes of `optimizer.init(table)`; without, every
    slot's leading dimension (the table's rows).

    Raises:
      ValueError: naming the slot that differs.
    """
    if isinstance(table_like, CachedShard):  # slots in the cache and in the host store
        if not isinstance(opt_state, CachedOptState):
            raise ValueError(
                f"{what}: a host_cached table's optimizer state is the CachedOptState its "
                f"layer's init_optimizer makes, got {type(opt_state).__name__}"
            )
        check_opt_state(table_like.cache, opt_state.cache, optimizer, f"{what}.cache")
        host = type(opt_state.cache)(opt_state.host, opt_state.cache.count)
        check_opt_state(table_like.host, host, optimizer, f"{what}.host")
        return
    if optimizer is not None and callable(getattr(optimizer, "init", None)):
        check_like(jax.eval_shape(optimizer.init, table_like), opt_state, what)
        return
    for i, slot in enumerate(getattr(opt_state, "slots", ())):
        shape, _ = _shape_dtype(slot)
        if not shape or shape[0] != table_like.shape[0]:
            raise ValueError(
                f"{what}.slots[{i}]: this layer's table has {table_like.shape[0]} rows, the slot "
                f"is {shape} (is the {what} another layer's?)"
            )


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
