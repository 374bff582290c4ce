"""Storage tiers: where a table's rows (and their optimizer slots) live,
chosen once per storage unit beside its row strategy (`rows.py`).

* `HbmStorage` ("hbm", the default): the rows in the devices' memory; the
  strategy's rows are read and updated in place.
* `HostStorage` ("host"): the rows and slots in pinned host memory on a GPU
  (the custom calls read and update them over the host link, in place); on
  the CPU the same arrays in host memory. The baseline a cache must beat.
* `CachedStorage` ("host_cached"): every row and slot in a host store, and
  `cache_rows` rows per device with their slots in an HBM cache in front of
  it, kept by `cache_policy` "lru" (least recently used leaves first) or "lfu"
  (least often used). Per lookup, on each owner (`bring_in`): the batch's
  distinct rows missing from the cache take victim slots from a window swept
  round the cache like a clock, in policy order inside it (`_victims`; never a
  slot this batch uses); the leaving rows are written back to the host store
  and the missing ones read from it, each list in host-row order
  (`by_host_row`), with `overlap_moves` beside each other (`swap_rows`); then
  the lookup and the fused update run on the cache exactly as on an HBM table.
  The optimizer slots follow at the update (`sync_slots`): those of the slots
  the one lookup before it moved, or after several lookups those of every slot
  whose row changed. The work per lookup and update grows with the batch (K
  key positions), not with the cache.
  A lookup may also `prefetch` the next batch: its missing rows take victim
  slots that the lookup's own positions do not use, and move (on a GPU) on a
  side stream while the step goes on; the next `bring_in` joins them first.
  The pending update never touches those slots, and a row not cached is
  current in the host store, so a prefetch changes no result, only where
  the rows wait.

A cached table computes exactly what the HBM table computes (the same rows
and the same arithmetic on them), whatever the cache size and policy: the
tests compare the two bit for bit. Its shard is a `CachedShard`, its
optimizer state a `CachedOptState`; export, import and checkpoints see the
logical table (`logical_table`, `logical_slots`: host and cache merged).

Invariants of a `CachedShard` on each device: `tags[s]` is the local row
cache slot s holds (-1: empty) and `slot_of[r]` the cache slot of local row
r (-1: not cached), inverse maps of each other; a cached row's current
vector is in `cache`, its `host` row is stale until it leaves the cache. A
`CachedOptState`'s `tags` say the same of its slot caches and equal the
shard's after every update (`step`: the shard's step they match).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax._compat import shard_map
from sok_jax.distributed import scores
from sok_jax.distributed.host import to_host
from sok_jax.ops import checks

STORAGES = ("hbm", "host", "host_cached")
CACHE_POLICIES = ("lru", "lfu")
CACHE_COUNTS = ("cache_hits", "cache_misses", "cache_evictions")
_EMPTY = -1
_PINNED = np.iinfo(np.int32).max  # the victim order key of a slot this batch uses


def host_memory_kind() -> str | None:
    """The memory kind of a host store: pinned host memory where the default
    backend is a GPU (the custom calls reach it over the host link), the
    default memory on the CPU (already host memory)."""
    return "pinned_host" if jax.default_backend() == "gpu" else None


class CachedShard(NamedTuple):
    """A cached table's shard (each array sharded over the axis; inside
    `shard_map` one device's part).

    host: [n * R, D] every row (pinned host memory on a GPU).
    cache: [n * C, D] the cached rows' vectors.
    tags: int32 [n * C]: the local row each cache slot holds, -1: none.
    slot_of: int32 [n * R]: the cache slot of each local row, -1: none.
    score: int32 [n * C]: "lru": the step that last used the slot; "lfu":
      the lookups that used its row since it came in; -1: empty.
    step: int32 [n]: the lookups this shard has served.
    hand: int32 [n]: where the next victim window starts (`_victims`).
    """

    host: Any
    cache: Any
    tags: Any
    slot_of: Any
    score: Any
    step: Any
    hand: Any


class CachedOptState(NamedTuple):
    """A cached table's sparse optimizer state.

    cache: the optimizer's own state (its type, e.g. `SparseOptState`) over
      the cache: slots [n * C, ...] and the update count.
    host: every row's slots, [n * R, ...] each (pinned host memory on a GPU).
    tags: int32 [n * C]: the local row whose slots each cache slot holds.
    step: int32 [n]: the shard's `step` when the slots were last synced.
    """

    cache: Any
    host: tuple
    tags: Any
    step: Any


class CacheHeld(NamedTuple):
    """What a cached table's lookup leaves in its context on one device.

    Per key position: `slots`, its cache slot (int32, -1: none); `rows`,
    the local row that slot held; for a hash table that evicts, `keys`, the
    key the row held, and `new`, whether the lookup gave the row to it (None
    otherwise). The update skips the slots whose row or key changed since
    (`CachedStorage.stale_slots`).
    `moved`: int32 [K] (with a prefetch [K + K']): the cache slots the lookup
    and its prefetch gave new rows (-1 pad); `step`: int32 [1]: the shard's
    step after the lookup. An update right after it syncs the optimizer
    slots of `moved` only (`sync_slots`)."""

    slots: Any
    rows: Any
    keys: Any
    new: Any
    moved: Any
    step: Any


class BroughtIn(NamedTuple):
    """`bring_in`'s result on one device: the shard after the moves, the
    cache slot of each position (-1 where the position named no row), the
    slots given new rows (-1 pad), and the call's {cache_hits,
    cache_misses, cache_evictions}."""

    shard: CachedShard
    slots: jax.Array
    moved: jax.Array
    counts: dict


# ------------------------------------------------------------------ tiers


@dataclasses.dataclass(frozen=True)
class HbmStorage:
    """The rows in HBM: the row strategy's table, read and updated in place."""

    kind = "hbm"
    cached = False

    def check_strategy(self, rows, implementation: str) -> None:
        return None

    def owner_rows(self, rows, table, hash_part, seed, received, training, ops):
        return rows.owner_rows(table, hash_part, seed, received, training)

    def local_rows(self, rows, table, hash_part, seed, flat_ids, members, training, ops):
        return rows.local_rows(table, hash_part, seed, flat_ids, members, training)

    def lookup_source(self, table):
        """The array the lookup reads (the FFI gather): the table itself."""
        return table

    def table_spec(self, axis, replicated: bool):
        return P(None, None) if replicated else P(axis, None)

    def logical(self, table, opt_state, num_devices: int):
        """(the [n * R, D] logical table, the optimizer state over it) of a
        shard: here the shard's own."""
        return table, opt_state

    def fresh_logical(self, table, opt_state):
        """`logical` of a freshly initialized shard without moving it: where
        an import writes its pairs (in the tier's own memory)."""
        return table, opt_state

    def table_sharding(self, rows):
        return rows.table_sharding

    def slot_sharding(self, rows, spec):
        return NamedSharding(rows.mesh, spec)


@dataclasses.dataclass(frozen=True)
class HostStorage(HbmStorage):
    """The rows and slots in host memory (pinned on a GPU), read and updated
    in place by the custom calls over the host link. On a GPU only the "ffi"
    implementation can reach them (XLA's gather takes no host operand)."""

    kind = "host"

    def check_strategy(self, rows, implementation: str) -> None:
        _check_tiered(rows, self.kind, implementation)

    def owner_rows(self, rows, table, hash_part, seed, received, training, ops):
        """The strategy's rows; new keys' initial vectors written by the row
        mover (XLA's scatter takes no host operand)."""
        found, fresh = rows.find_rows(hash_part, seed, received, training, table)
        if not rows.hashed:  # a direct lookup leaves the table as it was
            return found
        if fresh is not None:
            table = fresh.write(jax.lax.stop_gradient(table), found.rows, ops.scatter_rows)
        return found._replace(table=table)

    def lookup_source(self, table):
        """The table, refusing `jax.grad` (see `sparse_only`)."""
        return sparse_only(table)

    def table_sharding(self, rows):
        return _with_host_memory(rows.table_sharding)

    def slot_sharding(self, rows, spec):
        return _with_host_memory(NamedSharding(rows.mesh, spec))


@jax.custom_vjp
def _refuse_grad(value, source):
    """`value` (computed from `source` outside autodiff), refusing to pass a
    gradient back to `source`: a host table's gradient would be a dense
    [rows, D] array in HBM, which is what host storage avoids."""
    return value


def _refuse_grad_fwd(value, source):
    return value, None


def _refuse_grad_bwd(_, g):
    raise ValueError(
        'a table with storage="host" or "host_cached" trains through lookup + sparse_update '
        "(or sparse_grad + apply_gradients), not through jax.grad of apply"
    )


_refuse_grad.defvjp(_refuse_grad_fwd, _refuse_grad_bwd)


def sparse_only(table):
    """`table`, refusing to be differentiated (see `_refuse_grad`)."""
    return _refuse_grad(jax.lax.stop_gradient(table), table)


def _with_host_memory(sharding: NamedSharding) -> NamedSharding:
    kind = host_memory_kind()
    return sharding if kind is None else sharding.with_memory_kind(kind)


def _check_tiered(rows, kind, implementation):
    """A host-stored table: placed "row" or "table", and on a GPU reached by
    the custom calls only (XLA's own gather and scatter refuse a host
    operand)."""
    if implementation != "ffi" and host_memory_kind() is not None:
        raise ValueError(
            f'storage="{kind}" on a GPU needs implementation="ffi": the pure-JAX '
            "reference cannot read rows in pinned host memory (XLA's gather takes no host "
            "operand)"
        )
    if rows.replicated:
        raise ValueError(
            f'storage="{kind}" is for placements "row" and "table": a replicated table is '
            "held whole by every device and read without an exchange; keep it in HBM or "
            "place it by row"
        )


@dataclasses.dataclass(frozen=True)
class CachedStorage:
    """Rows and slots in a host store behind an HBM cache of `cache_rows`
    rows per device, kept by `policy` ("lru" or "lfu"); `overlap_moves`:
    the rows leaving and entering the cache move by `swap_rows` (both
    directions of the host link at once) instead of `_back_then_in`."""

    cache_rows: int
    policy: str = "lru"
    overlap_moves: bool = False

    kind = "host_cached"
    cached = True

    def check_strategy(self, rows, implementation: str) -> None:
        _check_tiered(rows, self.kind, implementation)
        if self.cache_rows >= rows.rows_per_device:
            raise ValueError(
                f"cache_rows ({self.cache_rows}) must be smaller than the rows each device holds "
                f"({rows.rows_per_device}); for a table that fits, use storage='hbm'"
            )

    # ------------------------------------------------------------ shapes
    def table_spec(self, axis, replicated: bool):
        row, mat = P(axis), P(axis, None)
        return CachedShard(mat, mat, row, row, row, row, row)

    def table_sharding(self, rows):
        row, mat = rows.row_sharding, rows.table_sharding
        return CachedShard(_with_host_memory(mat), mat, row, row, row, row, row)

    def slot_sharding(self, rows, spec):
        """The optimizer slots the update works on: the cache's, in HBM."""
        return NamedSharding(rows.mesh, spec)

    def host_slot_sharding(self, rows, spec):
        """Every row's optimizer slots: in the host store."""
        return _with_host_memory(NamedSharding(rows.mesh, spec))

    def empty_cache(self, rows_per_device: int, dim: int, dtype) -> CachedShard:
        """One device: an empty cache, its host store None (made apart, in
        host memory: `host_rows`)."""
        c = self.cache_rows
        return CachedShard(
            host=None,
            cache=jnp.zeros((c, dim), dtype),
            tags=jnp.full((c,), _EMPTY, jnp.int32),
            slot_of=jnp.full((rows_per_device,), _EMPTY, jnp.int32),
            score=jnp.full((c,), _EMPTY, jnp.int32),
            step=jnp.zeros((1,), jnp.int32),
            hand=jnp.zeros((1,), jnp.int32),
        )

    def place(self, shard: CachedShard) -> CachedShard:
        """The shard with its host store in host memory (pinned on a GPU)."""
        host = jax.device_put(shard.host, _with_host_memory(shard.host.sharding))
        return shard._replace(host=host)

    def lookup_source(self, shard: CachedShard):
        return shard.cache

    # ------------------------------------------------------------ lookup
    def check_positions(self, positions: int, rows_per_device: int) -> None:
        """Trace time: the cache holds every distinct row one lookup can
        bring to a device (at most min(positions, R) of them)."""
        most = min(positions, rows_per_device)
        if self.cache_rows < most:
            raise ValueError(
                f"cache_rows ({self.cache_rows}) is smaller than the {most} distinct rows one "
                "lookup may bring to a device at this batch size (the key positions it can "
                "receive); raise cache_rows, or lower the batch or capacity_factor"
            )

    def owner_rows(self, rows, shard, hash_part, seed, received, training, ops):
        """The strategy's rows of the received keys, brought into the cache;
        their cache slots stand for the rows from here on (the context, the
        update), and new keys' initial vectors are written there."""
        self.check_positions(received.shape[0], rows.rows_per_device)
        found, fresh = rows.find_rows(hash_part, seed, received, training, shard.host)
        return self._into_cache(found, fresh, shard, ops)

    def local_rows(self, rows, shard, hash_part, seed, flat_ids, members, training, ops):
        positions = sum(f.shape[0] for f in flat_ids)
        self.check_positions(positions, rows.rows_per_device)
        found = rows.local_rows(None, hash_part, seed, flat_ids, members, training)
        return self._into_cache(found, None, shard, ops)

    def _into_cache(self, found, fresh, shard, ops):
        got = self.bring_in(jax.tree.map(jax.lax.stop_gradient, shard), found.rows, ops)
        shard = got.shard._replace(cache=_refuse_grad(got.shard.cache, shard.cache))
        if fresh is not None:  # new keys' initial vectors, in their cache slots
            cache = fresh.write(jax.lax.stop_gradient(shard.cache), got.slots, ops.scatter_rows)
            shard = shard._replace(cache=_refuse_grad(cache, shard.cache))
        held = found.held
        cache_held = CacheHeld(
            got.slots,
            found.rows,
            None if held is None else held.keys,
            None if held is None else held.new,
            got.moved,
            shard.step,
        )
        return found._replace(table=shard, rows=got.slots, held=cache_held, cache=got.counts)

    def bring_in(self, shard: CachedShard, rows, ops) -> BroughtIn:
        """One device: the distinct local rows of `rows` (int32 [K], -1:
        none) into the cache, after any prefetch's moves have finished. The
        M missing rows (ascending) take the victim slots (`_victims`) in
        order; each victim's row is written back first."""
        with jax.named_scope("cache_bring_in"):
            done = shard._replace(host=ops.join_rows(shard.host), cache=ops.join_rows(shard.cache))
            return self._place(done, rows, ops)

    def check_prefetch(self, positions: int, held_positions: int) -> None:
        """Trace time: the cache holds a prefetched batch's distinct rows
        beside those of the lookup whose update is pending."""
        need = positions + held_positions
        if self.cache_rows < need:
            raise ValueError(
                f"cache_rows ({self.cache_rows}) is smaller than the {need} key positions a "
                f"prefetch must place on a device: the {positions} it may receive for the next "
                f"batch beside the {held_positions} of the lookup whose update is pending; raise "
                "cache_rows, or lower the batch or capacity_factor"
            )

    def prefetch(self, shard: CachedShard, rows, held: CacheHeld, ops) -> BroughtIn:
        """One device: the distinct local rows of `rows` (a later batch's,
        int32 [K'], -1: none) into the cache ahead of their lookup, in slots
        that no position of `held` (the lookup whose update is pending) uses.
        The moves run on a GPU's side stream (`copy_rows_async`) until the
        next `bring_in`; the rows they touch are none the pending update
        reads or writes. The shard's step is left as it was (the update
        still follows its one lookup); a row brought in counts as a miss,
        and at its lookup as a hit."""
        self.check_prefetch(rows.shape[0], held.slots.shape[0])
        with jax.named_scope("cache_prefetch"):
            return self._place(shard, rows, ops, pinned=held.slots)

    def _place(self, shard: CachedShard, rows, ops, pinned=None) -> BroughtIn:
        """`bring_in` (pinned None) or `prefetch` (`pinned`: cache slots no
        victim may take)."""
        prefetch = pinned is not None
        r, c, k = shard.host.shape[0], shard.cache.shape[0], rows.shape[0]
        key = jnp.where((rows >= 0) & (rows < r), rows, r)
        order = jnp.argsort(key, stable=True)
        srt = key[order]
        present = srt < r
        first = present & jnp.concatenate([jnp.ones((1,), bool), srt[1:] != srt[:-1]])
        cached_at = jnp.where(present, shard.slot_of[jnp.minimum(srt, r - 1)], _EMPTY)
        hit = first & (cached_at >= 0)
        miss = first & (cached_at < 0)

        with jax.named_scope("victims"):
            victim, hand = self._victims(shard, hit, miss, cached_at, pinned)
        leaving = jnp.where(miss, shard.tags[jnp.maximum(victim, 0)], _EMPTY)

        # The leaving rows (cached) and the missing ones (not, ascending) are
        # disjoint; the write-backs go in host-row order too.
        with jax.named_scope("moves"):
            incoming = jnp.where(miss, srt, _EMPTY)
            out_slots, leaving = by_host_row(victim, leaving)
            move = _moves_async if prefetch else self._swap
            host, cache = move(shard.host, shard.cache, out_slots, leaving, victim, incoming, ops)

        slot_of = shard.slot_of.at[jnp.where(leaving >= 0, leaving, r)].set(_EMPTY, mode="drop")
        slot_of = slot_of.at[jnp.where(miss, srt, r)].set(victim, mode="drop")
        tags = shard.tags.at[jnp.where(miss, victim, c)].set(srt, mode="drop")

        # The slot of every position: its distinct row's (the run's first).
        slot_first = jnp.where(hit, cached_at, victim)
        run = jnp.cumsum(first) - 1
        per_run = jnp.full((k,), _EMPTY, jnp.int32).at[jnp.where(first, run, k)].set(
            slot_first, mode="drop"
        )
        sorted_slots = jnp.where(present, per_run[jnp.maximum(run, 0)], _EMPTY)
        slots = jnp.zeros((k,), jnp.int32).at[order].set(sorted_slots)

        step = shard.step if prefetch else shard.step + 1
        if prefetch:  # rows in ahead of their lookup, not yet used
            came = jnp.where(miss, victim, c)
            score = shard.score.at[came].set(step[0] if self.policy == "lru" else 0, mode="drop")
        elif self.policy == "lru":
            score = shard.score.at[jnp.where(first, slot_first, c)].set(step[0], mode="drop")
        else:  # lfu: a row's uses since it came in
            used = jnp.where(first, slot_first, c)
            kept = jnp.where(miss, 0, shard.score[jnp.minimum(used, c - 1)])
            score = shard.score.at[used].set(kept + 1, mode="drop")
        counts = {
            "cache_hits": jnp.sum(hit & (not prefetch), dtype=jnp.int32),
            "cache_misses": jnp.sum(miss, dtype=jnp.int32),
            "cache_evictions": jnp.sum(leaving >= 0, dtype=jnp.int32),
        }
        shard = CachedShard(host, cache, tags, slot_of, score, step, hand)
        return BroughtIn(shard, slots, jnp.where(miss, victim, _EMPTY), counts)

    def _victims(self, shard: CachedShard, hit, miss, cached_at, pinned=None):
        """(the victim slot of each missing row, -1 elsewhere; the new hand).

        The window: the W = min(C, 2K + P) slots from the hand on
        (cyclically; P: the `pinned` slots' count, 0 when None). Its slots
        that neither this call's hits nor `pinned` use are ranked by (score,
        offset from the hand), empty slots (score -1) first; the n-th
        missing row takes the n-th. The window always holds enough (K >=
        hits + misses, and C >= K + P), so every missing row gets a slot; the
        hand moves past the last slot taken. Within the window this is the
        policy's order (least recently / least often used first); over the
        whole cache it is a clock sweep (O(K + P) work per call, not O(C))."""
        c, k = shard.cache.shape[0], hit.shape[0]
        p = 0 if pinned is None else pinned.shape[0]
        w = min(c, 2 * k + p)
        hand = shard.hand[0]
        window = (hand + jnp.arange(w, dtype=jnp.int32)) % c
        offset = jnp.where(hit, (cached_at - hand) % c, w)
        if pinned is not None:
            offset = jnp.concatenate([offset, jnp.where(pinned >= 0, (pinned - hand) % c, w)])
        taken = jnp.zeros((w,), bool).at[offset].set(True, mode="drop")
        rank = jnp.argsort(jnp.where(taken, _PINNED, shard.score[window]), stable=True)[:k]
        m = jnp.sum(miss, dtype=jnp.int32)
        nth = jnp.clip(jnp.cumsum(miss) - 1, 0, k - 1)
        victim = jnp.where(miss, window[rank[nth]], _EMPTY)
        last = jnp.max(jnp.where(jnp.arange(k) < m, rank, -1))
        return victim, ((hand + last + 1) % c)[None].astype(jnp.int32)

    # ------------------------------------------------------------ update
    def stale_slots(self, tags, slot_keys, held: CacheHeld):
        """One device: the cache slots of `held`'s positions whose row (or,
        in a table that evicts, the row's key) changed since the lookup that
        made it: a `scores.StaleRows` over cache slots (an update with that
        lookup's context skips them, and resets the slots of the rows that
        lookup gave to new keys)."""
        now = tags.at[held.slots].get(mode="fill", fill_value=_EMPTY)
        stale = (held.slots >= 0) & (now != held.rows)
        if held.keys is not None:
            pad = checks.padding_value(slot_keys.dtype)
            key_now = slot_keys.at[held.rows].get(mode="fill", fill_value=pad)
            stale |= (held.slots >= 0) & (key_now != held.keys.astype(slot_keys.dtype))
        return scores.stale_rows(held.slots, stale, held.new)

    def sync_slots(self, opt: CachedOptState, shard: CachedShard, held: CacheHeld, ops):
        """One device: the optimizer state with its slot caches holding the
        slots of the rows the shard's cache holds. After the update that
        follows the one lookup since the last sync (the training step), only
        that lookup's victims (`held.moved`, K) changed rows: their slots
        are moved (`_swap`: the rows leaving and entering are
        disjoint). Otherwise (lookups without updates between) every cache
        slot whose row changed since is written back, then read in (O(C); a
        row may leave one slot and enter another).

        Only the rare path's plan (its slot list, O(C)) is made under
        `lax.cond`: a conditional whose branches take the host stores makes
        XLA copy them whole (8 GiB per step for a 8 GiB table's accumulator
        on a GPU), so both moves run outside it. The rare path's list leads
        with its live slots and carries their count, so when it is not taken
        its copy kernels read no index."""
        with jax.named_scope("cache_sync_slots"):
            after_one = (opt.step[0] + 1 == held.step[0]) & (shard.step[0] == held.step[0])
            last = _slot_moves(
                opt.tags, shard.tags, jnp.where(after_one, held.moved, _EMPTY), ordered=True
            )
            opt = self._move_slots(opt, last, shard.step, ops, self._swap)
            rare = jax.lax.cond(
                after_one,
                lambda: _no_slot_moves(opt.tags),
                lambda: _slot_moves(opt.tags, shard.tags, *_differing(opt.tags, shard.tags)),
            )
            return self._move_slots(
                opt, rare, shard.step, ops, functools.partial(_back_then_in, count=rare.count)
            )

    @property
    def _swap(self):
        """How rows leaving and entering the cache (disjoint) move."""
        return swap_rows if self.overlap_moves else _back_then_in

    def _move_slots(self, opt: CachedOptState, moves: SlotMoves, step, ops, move):
        """`opt` with the slots of cache slots `moves.at` written back to the
        rows they held and read in from the rows they now hold, by `move`
        (`_swap` or `_back_then_in`)."""
        host, cache = [], []
        for h, s in zip(opt.host, opt.cache.slots):
            h, s = move(h, s, moves.out_at, moves.old, moves.at, moves.new, ops)
            host.append(h)
            cache.append(s)
        inner = type(opt.cache)(tuple(cache), opt.cache.count)
        return CachedOptState(inner, tuple(host), moves.tags, step)

    # ------------------------------------------------------------ host side
    def logical(self, shard: CachedShard, opt_state, num_devices: int):
        """(the logical table, an optimizer state of the optimizer's own type
        over it, or None), on the host: host store and cache merged."""
        table = self.logical_table(shard, num_devices)
        if opt_state is None:
            return table, None
        slots = self.logical_slots(opt_state, num_devices)
        return table, type(opt_state.cache)(slots, opt_state.cache.count)

    def fresh_logical(self, shard: CachedShard, opt_state):
        """`logical` of a freshly initialized shard, whose cache is empty: its
        host stores themselves (so an import writes a table larger than the
        devices' memory in host memory, never passing through HBM)."""
        if opt_state is None:
            return shard.host, None
        return shard.host, type(opt_state.cache)(opt_state.host, opt_state.cache.count)

    def logical_table(self, shard: CachedShard, num_devices: int) -> np.ndarray:
        """Host: the [n * R, D] logical table (the cached rows' vectors over
        the host store's)."""
        settle(shard.cache)
        return _merge(to_host(shard.host), to_host(shard.cache), to_host(shard.tags), num_devices)

    def logical_slots(self, opt: CachedOptState, num_devices: int) -> tuple:
        tags = to_host(opt.tags)  # slots move on the XLA stream only: nothing to settle
        return tuple(
            _merge(to_host(h), to_host(s), tags, num_devices)
            for h, s in zip(opt.host, opt.cache.slots)
        )


def settle(tree) -> None:
    """Host: waits until the row moves a prefetch left running on the side
    streams of the GPUs holding `tree`'s arrays have finished (nothing runs
    there on the CPU), so that what the host reads next is complete."""
    if host_memory_kind() is None:
        return
    from sok_jax.ops import rows_ops  # the FFI targets exist on a GPU

    devices = {d for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) for d in x.devices()}
    for device in devices:
        jax.block_until_ready(_join(jax.device_put(np.zeros((1,), np.int32), device), rows_ops))


@functools.partial(jax.jit, static_argnums=1)
def _join(x, rows_ops):
    return rows_ops.join_rows(x)


def by_host_row(slots, rows):
    """The pairs (slots[i], rows[i]) ordered by host row, those naming no
    row (-1) last: a row mover walking host rows in address order reaches
    about 3x the rate of a random order over the host link (H100,
    `tools/host_link_rows.py`), in both directions."""
    last = jnp.iinfo(jnp.int32).max
    key, slots = jax.lax.sort((jnp.where(rows >= 0, rows, last), slots), num_keys=1)
    return slots, jnp.where(key == last, _EMPTY, key)


def swap_rows(host, cache, out_slots, leaving, in_slots, incoming, ops):
    """(host, cache) with each cache slot `out_slots[i]` written back to host
    row `leaving[i]`, and host row `incoming[i]` read into cache slot
    `in_slots[i]` (-1: no such move; each list's rows and slots distinct,
    the two lists' rows disjoint, a row leaving is cached, a row entering
    is not, and the slots read into are those written back or free).

    The leaving rows are first copied out of the cache (HBM to HBM), so
    their write-back can run, on a GPU, on a side stream beside the load:
    the host link carries both directions at once."""
    leaving = jnp.where((out_slots >= 0) & (out_slots < cache.shape[0]), leaving, _EMPTY)
    staged = ops.gather_rows(cache, jnp.where(leaving >= 0, out_slots, _EMPTY))
    host = ops.scatter_rows_async(host, leaving, staged)
    cache = ops.copy_rows(cache, in_slots, host, incoming)
    return ops.join_rows(host, cache, leaving, staged), cache


def _moves_async(host, cache, out_slots, leaving, in_slots, incoming, ops):
    """`swap_rows`'s moves (same lists) on a GPU's side stream, write-backs
    then loads, both left running until a later `join_rows` (on the CPU
    complete at once)."""
    host = ops.copy_rows_async(host, leaving, cache, out_slots)
    return host, ops.copy_rows_async(cache, in_slots, host, incoming)


def _back_then_in(host, cache, out_slots, leaving, in_slots, incoming, ops, count=None):
    """`swap_rows` without the side stream, for lists that may also share
    rows (one leaving a slot and entering another): every write-back, then
    every load, one after the other, in place. Only the moves before
    `count` (all when None) are read; a -1 moves nothing but still costs
    the copy kernels a look at it."""
    host = ops.copy_rows(host, leaving, cache, out_slots, count)  # skips pairs naming no row
    return host, ops.copy_rows(cache, in_slots, host, incoming, count)


class SlotMoves(NamedTuple):
    """One device's optimizer-slot moves: cache slot `at[i]` gets the slots
    of row `new[i]`, and cache slot `out_at[i]` gives back those of row
    `old[i]` (-1: no move; the same slots as `at`, perhaps in another
    order); `tags`, the optimizer's cache tags after them; only the moves
    before `count` may be live."""

    out_at: jax.Array
    old: jax.Array
    at: jax.Array
    new: jax.Array
    tags: jax.Array
    count: jax.Array


def _slot_moves(opt_tags, tags, at, count=None, ordered=False) -> SlotMoves:
    """The moves that give cache slots `at` (-1: none) the optimizer slots
    of the rows `tags` says they hold, from the rows `opt_tags` says; with
    `ordered`, the write-backs in host-row order (`by_host_row`: one sort
    of `at`'s length)."""
    c = tags.shape[0]
    valid = at >= 0
    safe = jnp.clip(at, 0, c - 1)
    old = jnp.where(valid, opt_tags[safe], _EMPTY)
    new = jnp.where(valid, tags[safe], _EMPTY)
    new_tags = opt_tags.at[jnp.where(valid, at, c)].set(new, mode="drop")
    count = jnp.int32(at.shape[0]) if count is None else count
    out_at, old = by_host_row(at, old) if ordered else (at, old)
    return SlotMoves(out_at, old, at, new, new_tags, count)


def _no_slot_moves(opt_tags) -> SlotMoves:
    """`_slot_moves` with nothing to move, shaped as the rare path's."""
    none = jnp.full(opt_tags.shape, _EMPTY, jnp.int32)
    return SlotMoves(none, none, none, none, opt_tags, jnp.int32(0))


def _differing(opt_tags, tags):
    """(the cache slots whose optimizer slots belong to another row than
    the shard's, ascending, padded to C with -1; how many there are)."""
    c = tags.shape[0]
    differ = opt_tags != tags
    idx = jnp.nonzero(differ, size=c, fill_value=c)[0].astype(jnp.int32)
    return jnp.where(idx < c, idx, _EMPTY), jnp.sum(differ, dtype=jnp.int32)


def _merge(host, cache, tags, n):
    """host [n * R, ...] with each device's cached rows written over it."""
    out = host.copy()
    r, c = host.shape[0] // n, cache.shape[0] // n
    for d in range(n):
        t = tags[d * c : (d + 1) * c]
        held = t >= 0
        out[d * r + t[held]] = cache[d * c : (d + 1) * c][held]
    return out


def make_storage(storage: str, cache_rows=None, cache_policy: str = "lru", overlap_moves=False):
    """The tier of a table from its arguments, checked."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if storage != "host_cached":
        if cache_rows is not None:
            raise ValueError(f'cache_rows is for storage="host_cached", not "{storage}"')
        if overlap_moves:
            raise ValueError(f'cache_overlap_moves is for storage="host_cached", not "{storage}"')
        return HbmStorage() if storage == "hbm" else HostStorage()
    if cache_policy not in CACHE_POLICIES:
        raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, got {cache_policy!r}")
    if isinstance(cache_rows, bool) or not isinstance(cache_rows, (int, np.integer)):
        raise ValueError(
            f'storage="host_cached" needs cache_rows, a positive integer (rows of HBM cache '
            f"per device), got {cache_rows!r}"
        )
    if cache_rows < 1:
        raise ValueError(f"cache_rows must be a positive integer, got {cache_rows}")
    if not isinstance(overlap_moves, bool):
        raise ValueError(f"cache_overlap_moves must be a bool, got {overlap_moves!r}")
    return CachedStorage(int(cache_rows), cache_policy, overlap_moves)


def pin_host(tier, rows, table, opt_state=None):
    """Inside a jitted program: the host stores of a shard (and of its
    optimizer state) annotated as living in host memory, so that a jit
    without out_shardings keeps them there (the custom calls update them
    in place; XLA would otherwise expect its outputs in HBM)."""
    kind = host_memory_kind()
    if kind is None or tier.kind == "hbm":
        return table, opt_state

    def put(x, sharding):
        return x if sharding.memory_kind != kind else jax.device_put(x, sharding)

    table = jax.tree.map(put, table, tier.table_sharding(rows))
    if opt_state is not None:
        opt_state = jax.tree.map(put, opt_state, _opt_sharding(tier, rows, opt_state))
    return table, opt_state


def _opt_sharding(tier, rows, opt_state):
    """The shardings of a unit's optimizer state (memory kinds included)."""
    lead = rows.axis_name

    def spec(x):
        return P(lead) if x.ndim == 1 else P(lead, *([None] * (x.ndim - 1)))

    def slots(xs, where):
        return tuple(where(rows, spec(x)) for x in xs)

    repl = NamedSharding(rows.mesh, P())
    if isinstance(opt_state, CachedOptState):
        inner = type(opt_state.cache)(slots(opt_state.cache.slots, tier.slot_sharding), repl)
        host = slots(opt_state.host, tier.host_slot_sharding)
        row = NamedSharding(rows.mesh, P(lead))
        return CachedOptState(inner, host, row, row)
    return type(opt_state)(slots(opt_state.slots, tier.slot_sharding), repl)


# ------------------------------------------------------------ host stores

_INIT_BLOCK_ROWS = 1 << 18


def host_rows(rows, shape, dtype, spec, block_fn=None):
    """A host store (pinned host memory on a GPU) of `shape` laid out as
    `spec` over the strategy's mesh, built without holding it on a device:
    zeros from lazily zeroed host pages, then, where `block_fn(device,
    start, count)` gives values (None: zeros), filled `_INIT_BLOCK_ROWS`
    local rows at a time by the row mover, in place."""
    sharding = _with_host_memory(NamedSharding(rows.mesh, spec))
    zeros = np.zeros(shape, dtype)  # no memory is touched until written
    store = jax.make_array_from_callback(shape, sharding, lambda index: zeros[index])
    local = shape[0] if spec[0] is None else shape[0] // rows.num_devices
    count = min(_INIT_BLOCK_ROWS, local)
    if block_fn is None:
        return store

    def body(store, start):
        device = jax.lax.axis_index(rows.axis_name)
        at = start + jnp.arange(count, dtype=jnp.int32)
        values = block_fn(device, start, count).astype(store.dtype).reshape((count,) + shape[1:])
        return rows.ops.scatter_rows(store, jnp.where(at < local, at, _EMPTY), values)

    fill = jax.jit(
        shard_map(body, rows.mesh, (spec, P()), spec), donate_argnums=0, out_shardings=sharding
    )
    for start in range(0, local, count):
        store = fill(store, jnp.int32(start))
    return store


def host_table(rows, seed):
    """A strategy's initial table [n * R, D] as a host store."""
    r, d = rows.rows_per_device, rows.dim
    fill = None
    if not rows.hashed:  # a fresh hash shard's rows are zeros

        def fill(device, start, count):
            return rows.init_block(seed, device, start, count)

    return host_rows(rows, (rows.num_devices * r, d), rows.dtype, P(rows.axis_name, None), fill)


def host_slots(rows, optimizer, table_shape, dtype) -> tuple:
    """The optimizer's initial slots of a table of `table_shape` as host
    stores: each row holds `optimizer.init`'s value for a row."""
    with jax.ensure_compile_time_eval():  # concrete even when traced (e.g. nnx.eval_shape)
        one = optimizer.init(jnp.zeros((1,) + tuple(table_shape[1:]), dtype)).slots
    out = []
    for value in one:
        spec = P(rows.axis_name, *([None] * (value.ndim - 1)))
        shape = (table_shape[0],) + tuple(value.shape[1:])
        constant = np.asarray(value)
        fill = None
        if np.any(constant != 0):
            fill = lambda device, start, count, v=value: jnp.broadcast_to(  # noqa: E731
                v, (count,) + v.shape[1:]
            )
        out.append(host_rows(rows, shape, value.dtype, spec, fill))
    return tuple(out)
