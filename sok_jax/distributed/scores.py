"""Hash tables for online training: eviction, admission and the per-row
scores behind them, kept where the hash shard lives.

A hash table built with `eviction="lru"` / `"lfu"`, `admit_after=k` or
`HashOptions(track_scores=True)` keeps, beside its `slot_keys`, a
`HashScores` pytree per shard (None otherwise, so such tables keep the state
and checkpoints of a plain hash table):

* `last_seen` [R]: the step of the last training lookup that saw the row's
  key (0: never; a free row); `count` [R]: in how many training lookups it
  was seen. LRU evicts the lowest `last_seen`, LFU the lowest `count`, ties
  to the smaller key, among the rows of the new key's bucket that the call
  did not see (xla_ffi/hash_math.h has the rule).
* `step` [1]: the training lookups so far. A training lookup stamps the
  rows it sees with `step + 1`; the sparse update that follows writes
  exactly those rows, so a row's step is that of its last update.
* `used` [1]: the rows holding a key (kept up to date by every call, so the
  load in the stats costs nothing per step).
* `sketch` [depth * width] (admission only): a count-min sketch of how many
  training lookups saw each key while it had no row; a key becomes a row in
  the lookup that brings its estimate to `admit_after`. Its memory is
  `4 * depth * width` bytes per shard, whatever the key space (512 KiB with
  the defaults); the estimate never undercounts, and overcounts by more
  than e N / width (N: the counts added) with probability at most
  exp(-depth), so a key is never admitted later than after `admit_after`
  sightings, at worst earlier.
* `log_keys`, `log_steps` [L], `log_total`, `log_floor` [1] (eviction only,
  L = `HashOptions.eviction_log` > 0): a ring of the last L keys evicted
  (by insertion or by `evict_stale`) and when, for the deltas of
  `export_pairs(since_step=t)`; `log_floor` is the latest step whose
  evictions the ring no longer holds in full (deltas since an earlier step
  are refused).

Moving a table to another device count or key placement (`import_pairs` of
a `TableExport`) restores rows, slots, scores and step exactly, and the
sketches as `merge_sketches` says: a key not yet admitted may then be admitted sooner
than it would have been on the old count, never later.

An evicted row is re-initialized for its new key (from the seed and the
key, as any new key) by the lookup, and its optimizer slots are reset by the
sparse update that follows (`reset_slots`, fed by the lookup's context).

Only a table that evicts ever gives a row to another key (without eviction
rows are taken only while free, and `evict_stale` needs eviction), so only
its lookups record the key each of their rows held (`HeldRows`). The update
that uses a lookup's context skips the rows whose key changed since (a later
lookup evicted it): `find_stale` and `drop_stale`, counted in
`stats.stale`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax.ops import checks, hash_ops

EVICTIONS = (None, "lru", "lfu")
DEFAULT_SKETCH_WIDTH = 1 << 16


def _positive(value) -> bool:
    return not isinstance(value, bool) and int(value) == value and value > 0


@dataclasses.dataclass(frozen=True)
class HashOptions:
    """How a hash table trains online.

    Attributes:
      eviction: None (a new key that finds its shard full gets no row, as
        ever), "lru" or "lfu": it replaces the row of lowest score in its
        bucket of 16 rows (see the module docstring).
      admit_after: None, or k >= 1: a new key becomes a row only in the k-th
        training lookup that sees it; until then it gives zeros, gets no
        update and is counted in `stats.not_admitted`.
      sketch_depth, sketch_width: the count-min sketch of admission, per
        shard (4 * depth * width bytes).
      eviction_log: evicted keys kept per shard for deltas; None: as many as
        the shard has rows; 0: none (deltas then report no evicted keys and
        refuse any `since_step` once a key was evicted).
      track_scores: keep the scores without eviction or admission (for
        deltas).
    """

    eviction: str | None = None
    admit_after: int | None = None
    sketch_depth: int = 2
    sketch_width: int = DEFAULT_SKETCH_WIDTH
    eviction_log: int | None = None
    track_scores: bool = False

    def __post_init__(self):
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be None, 'lru' or 'lfu', got {self.eviction!r}")
        if self.admit_after is not None and not _positive(self.admit_after):
            raise ValueError(
                f"admit_after must be a positive integer (or None: admit every key), got "
                f"{self.admit_after!r}"
            )
        if not _positive(self.sketch_depth) or self.sketch_depth > hash_ops.MAX_SKETCH_DEPTH:
            raise ValueError(
                f"sketch_depth must lie in [1, {hash_ops.MAX_SKETCH_DEPTH}], got "
                f"{self.sketch_depth!r}"
            )
        if not _positive(self.sketch_width) or self.sketch_depth * self.sketch_width > 2**30:
            raise ValueError(
                f"sketch_width must be positive, with sketch_depth * sketch_width <= 2^30, got "
                f"{self.sketch_width!r}"
            )
        if self.eviction_log is not None and (
            isinstance(self.eviction_log, bool)
            or int(self.eviction_log) != self.eviction_log
            or self.eviction_log < 0
        ):
            raise ValueError(
                f"eviction_log must be a non-negative integer or None, got {self.eviction_log!r}"
            )

    @property
    def scored(self) -> bool:
        """Whether the table keeps `HashScores`."""
        return self.eviction is not None or self.admit_after is not None or self.track_scores

    def log_size(self, rows_per_device: int) -> int:
        if self.eviction is None:
            return 0
        return rows_per_device if self.eviction_log is None else int(self.eviction_log)


def make_options(eviction, admit_after, hash_options, hashed: bool, where: str = ""):
    """The options of a table from its keyword arguments (`eviction` and
    `admit_after` override `hash_options`), None where the table keeps a
    plain hash table's state. Raises ValueError naming a bad argument, and
    for online options on a direct-mode table."""
    if hash_options is not None and not isinstance(hash_options, HashOptions):
        raise ValueError(f"{where}hash_options must be a HashOptions, got {type(hash_options)}")
    try:
        opts = hash_options or HashOptions()
        over = {}
        if eviction is not None:
            over["eviction"] = eviction
        if admit_after is not None:
            over["admit_after"] = admit_after
        opts = dataclasses.replace(opts, **over)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    if not opts.scored:
        return None
    if not hashed:
        raise ValueError(
            f"{where}eviction, admit_after and scores need use_hashtable=True (a direct-mode "
            "table holds every key)"
        )
    return opts


@dataclasses.dataclass(frozen=True)
class HashScores:
    """The per-shard state of an online hash table (module docstring);
    arrays of one shard inside shard_map, stacked over the axis outside."""

    last_seen: Any
    count: Any
    step: Any
    used: Any
    sketch: Any = None
    log_keys: Any = None
    log_steps: Any = None
    log_total: Any = None
    log_floor: Any = None


@dataclasses.dataclass(frozen=True)
class HashShard:
    """A scored hash shard as the engine carries it: the keys and their
    scores (the layers hold them as `state.slot_keys` and `state.scores`)."""

    slot_keys: Any
    scores: HashScores


_SCORE_FIELDS = [f.name for f in dataclasses.fields(HashScores)]
jax.tree_util.register_dataclass(HashScores, data_fields=_SCORE_FIELDS, meta_fields=[])
jax.tree_util.register_dataclass(HashShard, data_fields=["slot_keys", "scores"], meta_fields=[])


def empty_scores(rows: int, key_dtype, options: HashOptions) -> HashScores:
    """One shard's scores before any lookup."""
    z = jnp.zeros((rows,), jnp.int32)
    one = jnp.zeros((1,), jnp.int32)
    sketch = None
    if options.admit_after is not None:
        sketch = jnp.zeros((options.sketch_depth * options.sketch_width,), jnp.int32)
    log = options.log_size(rows)
    if not log:
        return HashScores(z, jnp.zeros((rows,), jnp.int32), one, jnp.zeros((1,), jnp.int32), sketch)
    pad = checks.padding_value(key_dtype)
    return HashScores(
        z,
        jnp.zeros((rows,), jnp.int32),
        one,
        jnp.zeros((1,), jnp.int32),
        sketch,
        jnp.full((log,), pad, key_dtype),
        jnp.zeros((log,), jnp.int32),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1,), jnp.int32),
    )


def append_log(scores: HashScores, keys, mask, step) -> HashScores:
    """`keys[mask]` (in position order) appended to the eviction ring with
    `step`; a call evicting more keys than the ring holds keeps the last.
    Raises `log_floor` to the latest step an overwritten entry had."""
    if scores.log_keys is None:
        return scores
    size = scores.log_keys.shape[0]
    mask = mask.astype(bool)
    k = jnp.cumsum(mask.astype(jnp.int32)) - 1
    total = jnp.sum(mask, dtype=jnp.int32)  # int32 under x64 too: the state keeps its dtypes
    keep = mask & (k >= total - size)
    at = scores.log_total[0] + k
    target = jnp.where(keep, jnp.remainder(at, size), size)
    lost = keep & (at >= size)
    old = scores.log_steps.at[target].get(mode="fill", fill_value=0)
    floor = jnp.maximum(scores.log_floor[0], jnp.max(jnp.where(lost, old, 0)))
    dropped = mask & ~keep  # evicted by this very call, beyond the ring
    floor = jnp.where(jnp.any(dropped), jnp.maximum(floor, step), floor)
    return dataclasses.replace(
        scores,
        log_keys=scores.log_keys.at[target].set(keys.astype(scores.log_keys.dtype), mode="drop"),
        log_steps=scores.log_steps.at[target].set(step, mode="drop"),
        log_total=scores.log_total + total,
        log_floor=floor.reshape(1).astype(jnp.int32),
    )


class OnlineLookup:
    """One device's scored find-or-insert: `run` -> (shard, HashLookup,
    counts {evicted, not_admitted, load} of this device)."""

    def __init__(self, ops, options: HashOptions):
        self.ops, self.options = ops, options

    def run(self, shard: HashShard, keys, training: bool):
        sc, o = shard.scores, self.options
        step = sc.step[0] + 1 if training else sc.step[0]
        r = self.ops.hash_lookup(
            shard.slot_keys,
            keys,
            insert=training,
            last_seen=sc.last_seen,
            count=sc.count,
            sketch=sc.sketch,
            step=step,
            policy=o.eviction,
            admit_after=o.admit_after,
            sketch_depth=o.sketch_depth,
        )
        empty = jnp.asarray(checks.padding_value(keys.dtype), keys.dtype)
        evicted = r.evicted != empty
        n_evicted = jnp.sum(evicted).astype(jnp.int32)
        # Every new key took a free row or an evicted one.
        used = sc.used + jnp.sum(r.is_new).astype(jnp.int32) - n_evicted
        new = dataclasses.replace(
            sc,
            last_seen=r.last_seen,
            count=r.count,
            sketch=r.sketch,
            step=step.reshape(1),
            used=used.reshape(1),
        )
        if training:
            new = append_log(new, r.evicted, evicted, step)
        counts = {
            "evicted": n_evicted,
            "not_admitted": jnp.sum(r.status == hash_ops.NOT_ADMITTED).astype(jnp.int32),
            "load": load_of(new, shard.slot_keys.shape[0]),
        }
        return HashShard(r.slot_keys, new), r, counts


def load_of(sc: HashScores, rows: int):
    """float32: the fraction of the shard's rows that hold a key."""
    return sc.used[0].astype(jnp.float32) / np.float32(rows)


def count_used(slot_keys):
    """int32 [1]: the rows of a shard that hold a key (a pass over them)."""
    pad = jnp.asarray(checks.padding_value(slot_keys.dtype), slot_keys.dtype)
    return jnp.sum(slot_keys != pad).astype(jnp.int32).reshape(1)


def free_rows(shard: HashShard, gone) -> tuple:
    """One device: the rows where `gone` (bool [R]) holds a key made free
    (EMPTY, scores 0), unlogged. Returns (shard, rows freed)."""
    sc = shard.scores
    pad = jnp.asarray(checks.padding_value(shard.slot_keys.dtype), shard.slot_keys.dtype)
    gone = gone & (shard.slot_keys != pad)
    freed = jnp.sum(gone).astype(jnp.int32)
    new = dataclasses.replace(
        sc,
        last_seen=jnp.where(gone, 0, sc.last_seen),
        count=jnp.where(gone, 0, sc.count),
        used=sc.used - freed,
    )
    return HashShard(jnp.where(gone, pad, shard.slot_keys), new), freed


def evict_stale(shard: HashShard, max_age) -> tuple:
    """One device: frees every row whose key no training lookup saw in the
    last `max_age` steps (last_seen <= step - max_age), logging its key.
    Returns (shard, rows freed)."""
    sc = shard.scores
    step = sc.step[0]
    stale = sc.last_seen <= step - max_age
    freed_shard, freed = free_rows(shard, stale)
    pad = jnp.asarray(checks.padding_value(shard.slot_keys.dtype), shard.slot_keys.dtype)
    logged = append_log(freed_shard.scores, shard.slot_keys, stale & (shard.slot_keys != pad), step)
    return HashShard(freed_shard.slot_keys, logged), freed


def reset_slots(optimizer, opt_state, rows, dim: int):
    """`opt_state` with the slots of `rows` (int32, -1: none) set to their
    initial values (`optimizer.init` of a zero row of width `dim`): the slots
    of the rows the lookup (re)initialized for new keys."""
    if rows is None or not opt_state.slots:
        return opt_state
    init = optimizer.init(jnp.zeros((1, dim), jnp.float32)).slots
    out = []
    for slot, value in zip(opt_state.slots, init):
        target = jnp.where(rows >= 0, rows, slot.shape[0])
        out.append(slot.at[target].set(value[0].astype(slot.dtype), mode="drop"))
    return type(opt_state)(tuple(out), opt_state.count)


class HeldRows(NamedTuple):
    """What one device's lookup of a table that evicts found, per key it
    looked up: the row (int32, -1: none), the key (which the row held then)
    and whether the lookup gave the row to that key (`new`: its optimizer
    slots are reset by the update that follows)."""

    rows: Any
    keys: Any
    new: Any


class StaleRows(NamedTuple):
    """The rows of a `HeldRows` whose key changed since its lookup.

    sorted: int32 [H]: the stale rows ascending, then int32 max.
    count: int32: how many distinct rows are stale.
    reset_rows: int32 [H]: the rows given to new keys that are not stale
      (-1 elsewhere), whose optimizer slots the update resets.
    """

    sorted: Any
    count: Any
    reset_rows: Any


_NO_ROW = np.iinfo(np.int32).max


def find_stale(slot_keys, held: HeldRows) -> StaleRows:
    """One device: the rows of `held` that hold another key in `slot_keys`
    now (a lookup after the one that made `held` evicted their key)."""
    rows = held.rows
    now = slot_keys.at[rows].get(mode="fill", fill_value=checks.padding_value(slot_keys.dtype))
    stale = (rows >= 0) & (now != held.keys.astype(slot_keys.dtype))
    return stale_rows(rows, stale, held.new.astype(bool))


def stale_rows(rows, stale, new=None) -> StaleRows:
    """The `StaleRows` of per-position `rows` (int32, -1: none) of which
    `stale` (bool) are stale; `new`: which the lookup gave to new keys (None:
    none)."""
    s = jnp.sort(jnp.where(stale, rows, _NO_ROW))
    first = jnp.concatenate([s[:1] != _NO_ROW, (s[1:] != s[:-1]) & (s[1:] != _NO_ROW)])
    reset = None
    if new is not None:
        reset = jnp.where(new & ~stale & (rows >= 0), rows, -1)
    return StaleRows(s, jnp.sum(first).astype(jnp.int32), reset)


def drop_stale(stale: StaleRows, rows):
    """`rows` (int32, -1: none) with the stale ones set to -1 (an update
    skips them: their vectors and slots stay as they are)."""
    s = stale.sorted
    # one sort, not a loop of log2(H) dependent gathers (one launch each on a GPU)
    at = jnp.clip(jnp.searchsorted(s, rows, method="sort"), 0, s.shape[0] - 1)
    return jnp.where((rows >= 0) & (s[at] == rows), -1, rows)


class HashRowGrad(NamedTuple):
    """`sparse_grad` of a hash table that evicts: a `SparseRowGrad` (rows,
    grads, count) and its lookup's `HeldRows`: `apply_gradients` skips the
    rows whose key changed since that lookup (counted in `stats.stale`) and
    resets the slots of the others it gave to new keys."""

    rows: Any
    grads: Any
    count: Any
    held: Any


def merge_sketches(sketches: np.ndarray, m: int, same_placement: bool = True) -> np.ndarray:
    """Per-shard sketches [n, depth * width] of an n-shard table -> those of
    its m-shard layout. Under one key placement (`same_placement`) key k
    moves from shard w(k) % n to w(k) % m (w(k) = k, or its mixed word), and
    a counter holds the sum of its keys' counts, so where m divides n the
    new shard d gets the sum of the old shards d' with d' % m == d: exactly
    the counters m shards would have built from the same stream. Its
    estimates can exceed the n shards' where keys of several old shards
    share a counter (a key may be admitted sooner, never later); with a
    sketch much wider than the keys it counts, as the default, that is
    rare. Otherwise (m does not divide n, or the placement changes) every
    new shard gets the sum of all, an upper bound too."""
    n = sketches.shape[0]
    if same_placement and n % m == 0:
        return np.stack([sketches[d::m].sum(axis=0) for d in range(m)]).astype(np.int32)
    return np.repeat(sketches.sum(axis=0, keepdims=True), m, axis=0).astype(np.int32)
