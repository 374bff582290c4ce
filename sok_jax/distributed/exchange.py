"""The per-device data path of a sharded lookup over many tables, read top to
bottom. Every function here runs inside `shard_map`, on one device's slice
of the batch. The tables live in storage *units* (one array and its row
strategy, `rows.py`); a unit is read by one or more *lookups* (a feature, or
`DistributedEmbedding`'s slots).

Forward, for every unit that exchanges (placement "row" or "table"):
  1. `plan`: bucket the valid keys of all the unit's lookups by owner and
     remove duplicates per destination (one sort), so each distinct key
     crosses the network once; a destination's bucket holds `capacity`
     keys, the rest are counted in `stats.overflow`, never silently lost;
  2. one `all_to_all` carries the buckets of every unit (`exchange_words`);
  3. on the owner, the rows of the received keys (`owner_rows`: in hash mode
     find-or-insert them), gathered with the FFI lookup;
  4. one `all_to_all` carries every unit's vectors back (`exchange_vectors`);
  5. per lookup, the FFI combine over the received vectors, read through
     the plan's inverse index.
A unit that does not exchange (placement "replicated", or one device with
a bucket for the whole batch) finds the rows of its keys locally and
combines them there. On one device a hash table (evicting or not) still
plans (step 1) and finds its distinct keys as an owner would (step 3), so
its table and counts come out as the exchange leaves them; each position
then reads its key's row directly, a mean or sqrtn bag going to the
kernels as a weighted sum that counts keys without a row as zeros
(`_misses_counted`).

Steps 3 and 5 are `sok_jax.embedding._lookup` (custom_vjp) and both
exchanges transpose to themselves, so `jax.grad` runs this path in reverse.
The sparse backward (`owner_bags`) runs the reverse exchange without the
dense gradient: each requesting device sums its positions' gradients per
received slot, one `all_to_all` sends every unit's sums to the owners, and
each owner's bags are one slot each. A replicated unit's touched rows and
their gradients are gathered over the axis, so every replica applies the
same update.

No zero-size array crosses a `shard_map` boundary (absent pieces are None);
guarded by tests/test_distributed.py::test_no_zero_size_array_crosses_shard_map.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sok_jax.distributed.state import EmbeddingStats
from sok_jax.distributed.storage import CACHE_COUNTS, HbmStorage
from sok_jax.embedding import _lookup
from sok_jax.ids import Bags
from sok_jax.ops import checks, reference, resolve

# ------------------------------------------------------------------ specs


@dataclasses.dataclass(frozen=True)
class LookupSpec:
    """One lookup of the batch: its output name, the table it reads (and that
    table's index among its unit's members), its combiner ("sum", "mean",
    "sqrtn"; a sequence lookup is "sum" over one-position bags) and how many
    ids one sample may hold (sizes the exchange buckets)."""

    name: str
    table: str
    member: int
    combiner: str
    sequence: bool
    ids_per_sample: int


@dataclasses.dataclass(frozen=True)
class Unit:
    """A storage array (its row strategy, `rows.py`), the lookups that read
    it, in a fixed order, and its storage tier (`storage.py`)."""

    name: str
    rows: Any
    lookups: tuple
    storage: Any = HbmStorage()


class ExchangePlan(NamedTuple):
    """Where each distinct key of one device's lookups of a unit goes.

    send: [n * capacity] the values for each destination's bucket (keys in
      hash mode, the owner's local rows in direct mode; empty slots hold the
      send format's empty value).
    recv_index: int32 [N]: per id position, the slot of its vector in the
      [n * capacity] buffer that comes back (-1: padding, invalid, overflow).
    dropped: bool [N]: the first position of each distinct key that found
      its bucket full (one per overflowed key).
    invalid: bool [N]: ids that are neither padding nor keys of the table.
    largest_bucket: int32: the most distinct keys bound for one destination.
    """

    send: jax.Array
    recv_index: jax.Array
    dropped: jax.Array
    invalid: jax.Array
    largest_bucket: jax.Array


class UnitContext(NamedTuple):
    """What one unit's lookup saved for its sparse backward (per device).

    owner_rows: int32 [n * C]: on the owner, the local row of every key it
      received (-1: none); None where the unit did not exchange.
    index: per lookup, int32 [N_f]: the slot of each position's vector in the
      returned buffer (exchanged), or the local row of each position.
    offsets: per lookup, int32 [M_f + 1].
    weights: per lookup, float32 [N_f], or None when unweighted.
    held: a table that evicts: the owner's `scores.HeldRows` (its rows, the
      keys they held at this lookup, those given to new keys), by which the
      sparse update resets the new keys' slots and skips the rows a later
      lookup gave to other keys; None otherwise (no other table ever gives
      a row to another key).
    """

    owner_rows: Any
    index: tuple
    offsets: tuple
    weights: tuple
    held: Any = None


class DeviceLookup(NamedTuple):
    """One device's lookup: per lookup its output, per unit the shard after
    any insertion ((table, slot_keys), None when unchanged), per table its
    counters, and per unit the context for the sparse backward."""

    outs: dict
    shards: dict
    stats: dict
    ctx: dict


class OwnerBags(NamedTuple):
    """The backward as bags over the owner's table rows: the cotangent per
    bag, the bags (ids, offsets, weights in the ops' layout) and the combiner
    to differentiate."""

    grad_out: jax.Array
    ids: jax.Array
    offsets: jax.Array
    weights: jax.Array
    combiner: str


def _no_weights():
    return jnp.zeros((0,), jnp.float32)


def _singles(n: int):
    return jnp.arange(n + 1, dtype=jnp.int32)


# ------------------------------------------------------------- exchanges


def _to_words(x):
    """`x` [n, ...] as uint32 words [n, W] (int64: two words per value; 16-bit
    floats: two values per word, padded to an even count)."""
    n = x.shape[0]
    x = x.reshape(n, -1)
    if x.dtype.itemsize == 2:
        if x.shape[1] % 2:
            x = jnp.concatenate([x, jnp.zeros((n, 1), x.dtype)], axis=1)
        x = x.reshape(n, -1, 2)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(n, -1)


def _from_words(words, like):
    """Inverse of `_to_words` for an array shaped and typed like `like`."""
    n = words.shape[0]
    dtype, size = like.dtype, int(like.size) // like.shape[0]
    if dtype.itemsize == 8:
        words = words.reshape(n, size, 2)
    x = jax.lax.bitcast_convert_type(words, dtype).reshape(n, -1)
    return x[:, :size].reshape(like.shape)


def _word_count(x) -> int:
    per = int(x.size) // x.shape[0]
    if x.dtype.itemsize == 2:
        return (per + 1) // 2
    return per * (x.dtype.itemsize // 4)


def exchange_words(axis_name: str, n: int, parts):
    """One `all_to_all` over the `n` devices of `axis_name` for every array
    of `parts` (each [n * C_i, ...], destination-major): chunk d of every
    part goes to device d, and the received chunks come back in the same
    layout, source-major."""
    if not parts:
        return []
    parts = [p.reshape(n, p.shape[0] // n, *p.shape[1:]) for p in parts]
    buf = jnp.concatenate([_to_words(p) for p in parts], axis=1)
    buf = jax.lax.all_to_all(buf.reshape(-1), axis_name, 0, 0, tiled=True).reshape(n, -1)
    out, start = [], 0
    for p in parts:
        w = _word_count(p)
        got = _from_words(buf[:, start : start + w], p)
        out.append(got.reshape(-1, *p.shape[2:]))
        start += w
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def exchange_vectors(axis_name: str, n: int, parts: tuple):
    """`exchange_words` for float arrays, differentiable: the exchange is its
    own transpose, so the cotangents travel back the same way."""
    return tuple(exchange_words(axis_name, n, list(parts)))


def _exchange_vectors_fwd(axis_name, n, parts):
    return exchange_vectors(axis_name, n, parts), None


def _exchange_vectors_bwd(axis_name, n, _, cotangents):
    return (tuple(exchange_words(axis_name, n, list(cotangents))),)


exchange_vectors.defvjp(_exchange_vectors_fwd, _exchange_vectors_bwd)


# ------------------------------------------------------------------ plan


def plan(rows, lookups, flat_ids, capacity: int) -> ExchangePlan:
    """Step 1 for one unit: bucket by owner and dedup per destination (one
    sort) the concatenated ids of its lookups (`flat_ids[i]` of lookup i)."""
    n = rows.num_devices
    pieces = [rows.bucket_keys(ids, spec.member) for spec, ids in zip(lookups, flat_ids)]
    valid = jnp.concatenate([p.valid for p in pieces])
    owner = jnp.concatenate([p.owner for p in pieces])
    value = jnp.concatenate([p.value for p in pieces])
    ids = jnp.concatenate(flat_ids)
    bound = pieces[0].value_bound
    N = ids.shape[0]
    invalid = ~valid & ~checks.is_padding(ids)
    iota = jnp.arange(N, dtype=jnp.int32)
    if bound is not None:
        # (owner, value) packed into one int32 below n * bound: a plain
        # key/value sort (a radix sort on the GPU), not a comparator sort.
        packed = jnp.where(valid, owner * bound + value, n * bound).astype(jnp.int32)
        s_packed, perm = jax.lax.sort((packed, iota), num_keys=1)
        s_owner = jnp.minimum(s_packed // bound, n).astype(jnp.int32)
        s_value = s_packed - s_owner * bound
        differs = s_packed[1:] != s_packed[:-1]
    else:
        # Keys that span their dtype: no packing. Stable one-key sorts (each
        # a radix sort on the GPU, where a two-key sort is a comparator
        # sort): by key, then, with several owners, by owner.
        _, perm = jax.lax.sort((value, iota), num_keys=1, is_stable=True)
        if n > 1:
            _, perm = jax.lax.sort((owner[perm], perm), num_keys=1, is_stable=True)
        s_owner, s_value = owner[perm], value[perm]
        differs = (s_owner[1:] != s_owner[:-1]) | (s_value[1:] != s_value[:-1])
    real = s_owner < n
    first = jnp.concatenate([jnp.ones((1,), bool), differs]) & real
    run = jnp.cumsum(first.astype(jnp.int32)) - 1
    per_owner = jax.ops.segment_sum(first.astype(jnp.int32), s_owner, n + 1)[:n]
    start = jnp.cumsum(per_owner) - per_owner
    rank = run - start[jnp.minimum(s_owner, n - 1)]
    fits = real & (rank < capacity)
    slot = jnp.where(fits, s_owner * capacity + rank, -1)
    send_dtype, empty = rows.send_format()
    target = jnp.where(first & fits, slot, n * capacity)
    send = (
        jnp.full((n * capacity,), empty, send_dtype)
        .at[target]
        .set(s_value.astype(send_dtype), mode="drop")
    )
    recv_index = jnp.zeros((N,), jnp.int32).at[perm].set(slot)
    dropped = jnp.zeros((N,), bool).at[perm].set(first & ~fits)
    return ExchangePlan(send, recv_index, dropped, invalid, jnp.max(per_owner))


def bucket_capacity(unit: Unit, capacity: int) -> int:
    """The bucket size actually used: `capacity`, or fewer where a
    destination can never receive that many distinct keys (direct mode: the
    rows it holds), which changes no result."""
    bound = unit.rows.max_distinct()
    return max(1, min(capacity, bound)) if bound is not None else capacity


# --------------------------------------------------------------- forward


def _split(x, lengths):
    out, start = [], 0
    for k in lengths:
        out.append(x[start : start + k])
        start += k
    return out


def _weights_or_none(bags: Bags):
    return bags.weights if bags.weights.shape[0] else None


def _reader(unit: Unit):
    """The lookup of a unit's source (`storage.lookup_source`): the tier's
    own `combine` where its rows are not float rows (the inference tiers of
    `quantized.py`), else the float lookup. Same arguments as `_lookup`."""
    return getattr(unit.storage, "combine", _lookup)


def _combine(lookups, implementation, vectors, index, bags, lookup=_lookup) -> dict:
    """Step 5 for a unit's lookups: {lookup: its output [*batch_shape, D]}.
    Lookups of one combiner and bag shape are combined in one call over
    their concatenated bags (one kernel for the 26 one-hot features of a
    DLRM, say), then split. `lookup`: how `vectors` is read (`_reader` of a
    unit's own source; the float lookup of exchanged vectors)."""
    groups = {}
    for spec, idx in zip(lookups, index):
        b = bags[spec.name]
        key = (spec.combiner, b.fixed_nnz, b.weights.shape[0] > 0)
        groups.setdefault(key, []).append((spec, idx, b))
    out = {}
    for (combiner, nnz, _), members in groups.items():
        if len(members) == 1 or nnz == 0:  # ragged bags: one call each
            for spec, idx, b in members:
                got = lookup(combiner, implementation, nnz, vectors, idx, b.offsets, b.weights)
                out[spec.name] = got.reshape(*b.batch_shape, got.shape[1])
            continue
        ids = jnp.concatenate([idx for _, idx, _ in members])
        weights = jnp.concatenate([b.weights for _, _, b in members])
        offsets = jnp.arange(ids.shape[0] // nnz + 1, dtype=jnp.int32) * nnz
        got = lookup(combiner, implementation, nnz, vectors, ids, offsets, weights)
        start = 0
        for spec, idx, b in members:
            m = idx.shape[0] // nnz
            out[spec.name] = got[start : start + m].reshape(*b.batch_shape, got.shape[1])
            start += m
    return out


def member_tables(unit: Unit) -> list[str]:
    return [m.name for m in unit.rows.members if m is not None]


def full_positions(unit: Unit, local_batch: int) -> int:
    """Key positions of a device's batch over a unit's lookups."""
    return local_batch * sum(spec.ids_per_sample for spec in unit.lookups)


def is_local(unit: Unit, capacity: int, local_batch: int) -> bool:
    """Whether a unit needs no exchange: replicated, or one device with a
    bucket that holds the whole batch (a smaller one keeps the exchange, so
    that its overflow counts stay the same). On one device a hash table
    goes local too (`_one_device_hash_rows`), in every storage tier alike,
    so that the tiers compute the same bits."""
    rows = unit.rows
    if not rows.exchanged:
        return True
    return rows.num_devices == 1 and capacity >= full_positions(unit, local_batch)


def _reads_own_hash_rows(unit: Unit, ctx) -> bool:
    """Whether the unit's lookup was a one-device hash lookup without the
    exchange (is_local): its bags then went to the kernels as "sum" with
    `_misses_counted` weights."""
    return unit.rows.hashed and unit.rows.exchanged and ctx.owner_rows is None


def _misses_counted(bags: Bags, combiner: str) -> Bags:
    """A mean or sqrtn bag as a weighted sum that counts every key: weight
    w_i * f_b, f_b the bag's factor over all its keys (1 / sum w, or
    1 / sqrt(sum w^2)). Through the exchange a key that found no row (a
    full table, a key not admitted, an unseen key) still counts as a zero
    vector; read locally its row is -1, which the kernels leave out of the
    bag's factor. "sum" bags are the same either way."""
    if combiner == "sum":
        return bags
    keys = ~checks.is_padding(bags.ids)
    seg, w, f = reference.bag_factors(bags.offsets, bags.weights, keys, combiner)
    factor = jnp.concatenate([f, jnp.zeros((1,), f.dtype)])[seg]  # 0 past the bags
    return bags._replace(weights=w * factor)


def _one_device_hash_rows(unit: Unit, table, hash_part, seed, flat_ids, capacity, training, ops):
    """(OwnerRows with each position's row, the plan) of a hash unit on one
    device without the exchange: the batch's distinct keys found (with
    `training`, inserted) exactly as an owner finds the keys it receives,
    so the table, its counts and its scores come out as the exchange leaves
    them; each position then reads its key's row, as a direct lookup does,
    with no [distinct keys, D] buffer between."""
    p = plan(unit.rows, unit.lookups, flat_ids, capacity)
    owner = unit.storage.owner_rows(unit.rows, table, hash_part, seed, p.send, training, ops)
    at = p.recv_index
    rows = jnp.where(at >= 0, owner.rows[jnp.maximum(at, 0)], -1)
    return owner._replace(rows=rows), p


ONLINE_COUNTS = ("evicted", "not_admitted", "load")


class _Counters:
    """Per table, this device's counts of the call (and an online hash
    table's evictions, unadmitted keys and load, the stale rows of one whose
    rows change hands, and a cached one's cache counts)."""

    def __init__(self, tables, online=(), evicting=(), cached=(), inference=()):
        zero = jnp.zeros((), jnp.int32)
        self.counts = {t: {"overflow": zero, "invalid": zero, "hash_full": zero} for t in tables}
        for t in online:
            self.counts[t].update(evicted=zero, not_admitted=zero, load=jnp.zeros((), jnp.float32))
        for t in evicting:
            self.counts[t]["stale"] = zero
        for t in cached:
            self.counts[t].update({k: zero for k in CACHE_COUNTS})
        for t in inference:
            self.counts[t]["unseen"] = zero

    def add(self, table, what, value):
        c = self.counts[table][what]
        self.counts[table][what] = c + jnp.asarray(value, c.dtype)

    def add_per_lookup(self, lookups, what, masks):
        for spec, m in zip(lookups, masks):
            self.add(spec.table, what, jnp.sum(m))

    def add_hash_full(self, unit: Unit, hash_full):
        """A unit's full-shard count on this device, credited to the table
        whose keys this device owns (a column: its member there)."""
        self._credit(unit, "hash_full", hash_full)

    def add_online(self, unit: Unit, counts):
        """A unit's counts {counter: value} on this device (an online hash
        table's, a cache's, an update's stale rows; None: none)."""
        for k, v in (counts or {}).items():
            self._credit(unit, k, v)

    def _credit(self, unit: Unit, what, value):
        members = unit.rows.members
        if len(members) == 1:
            self.add(members[0].name, what, value)
            return
        me = jax.lax.axis_index(unit.rows.axis_name)
        for d, m in enumerate(members):
            if m is not None:
                self.add(m.name, what, jnp.where(me == d, value, 0))

    def stats(self):
        return {
            t: EmbeddingStats(
                *(c[k].reshape(1) for k in ("overflow", "invalid", "hash_full")),
                nonfinite=jnp.zeros((1,), jnp.int32),
                **{
                    k: c[k].reshape(1)
                    for k in (*ONLINE_COUNTS, "stale", *CACHE_COUNTS, "unseen")
                    if k in c
                },
            )
            for t, c in self.counts.items()
        }


def _context(owner_rows, unit, index, bags, held=None):
    specs = unit.lookups
    return UnitContext(
        owner_rows,
        tuple(index),
        tuple(bags[s.name].offsets for s in specs),
        tuple(_weights_or_none(bags[s.name]) for s in specs),
        held,
    )


def online_tables(units) -> list:
    """The tables of the units that are online hash tables."""
    return [t for u in units if getattr(u.rows, "scored", False) for t in member_tables(u)]


def changing_tables(units) -> list:
    """The tables whose rows can change hands between a lookup and its
    update (so whose contexts can go stale, counted in `stale`): those that
    evict, and those behind a cache (its slots change rows)."""
    return [t for u in units if u.rows.evicting or u.storage.cached for t in member_tables(u)]


def cached_tables(units) -> list:
    """The tables of the units kept in a host store behind an HBM cache."""
    return [t for u in units if u.storage.cached for t in member_tables(u)]


def unseen_tables(units) -> list:
    """The read-only inference hash tables, which count their unseen keys."""
    units = [u for u in units if u.storage.kind == "inference" and u.rows.hashed]
    return [t for u in units for t in member_tables(u)]


def forward(
    units, shards, seed, bags, capacities, local, implementation, training, sparse, prefetch=None
):
    """Steps 1-5 on one device for every unit: a `DeviceLookup`.

    shards: {unit: (table, slot_keys or None)}; bags: {lookup: Bags};
    capacities: {unit: bucket size}; local: {unit: True when it does not
    exchange}; `sparse`: the outputs carry no gradient to the tables;
    `prefetch`: the next batch's {lookup: Bags}, whose rows the cached units
    then bring in (`_prefetch`), or None."""
    outs, new_shards, ctxs = {}, {}, {}
    ops = resolve(implementation)
    counters = _Counters(
        [t for u in units for t in member_tables(u)],
        online_tables(units),
        changing_tables(units),
        cached_tables(units),
        unseen_tables(units),
    )

    def read(unit, rows_found):
        table, slot_keys = shards[unit.name]
        if rows_found.table is not None:
            table, slot_keys = rows_found.table, rows_found.slot_keys
            new_shards[unit.name] = (table, slot_keys)
        source = unit.storage.lookup_source(table)
        return jax.lax.stop_gradient(source) if sparse else source

    exchanged = [u for u in units if not local[u.name]]
    if exchanged:
        rows0 = exchanged[0].rows
        axis, n = rows0.axis_name, rows0.num_devices
        # 1-2: plan every exchanged unit; one all_to_all for all the keys.
        plans = [
            plan(u.rows, u.lookups, [bags[s.name].ids for s in u.lookups], capacities[u.name])
            for u in exchanged
        ]
        received = exchange_words(axis, n, [p.send for p in plans])
        # 3: on the owners, the rows and their vectors.
        found, vectors, helds = [], [], []
        for u, got in zip(exchanged, received):
            table, slot_keys = shards[u.name]
            owner = u.storage.owner_rows(u.rows, table, slot_keys, seed, got, training, ops)
            src = read(u, owner)
            singles = _singles(got.shape[0])
            vectors.append(
                _reader(u)("sum", implementation, 1, src, owner.rows, singles, _no_weights())
            )
            counters.add_hash_full(u, owner.hash_full)
            counters.add_online(u, owner.online)
            counters.add_online(u, owner.cache)
            found.append(owner.rows)
            helds.append(owner.held)
        # 4: one all_to_all brings every unit's vectors back.
        back = exchange_vectors(axis, n, tuple(vectors))
        # 5: combine per lookup.
        for u, p, owner_rows, vecs, held in zip(exchanged, plans, found, back, helds):
            lengths = [bags[s.name].ids.shape[0] for s in u.lookups]
            index = _split(p.recv_index, lengths)
            outs.update(_combine(u.lookups, implementation, vecs, index, bags))
            counters.add_per_lookup(u.lookups, "overflow", _split(p.dropped, lengths))
            counters.add_per_lookup(u.lookups, "invalid", _split(p.invalid, lengths))
            ctxs[u.name] = _context(owner_rows, u, index, bags, held)
    for u in units:
        if not local[u.name]:
            continue
        table, slot_keys = shards[u.name]
        flat = [bags[s.name].ids for s in u.lookups]
        lengths = [f.shape[0] for f in flat]
        lookups, unit_bags = u.lookups, bags
        if u.rows.hashed and u.rows.exchanged:
            got, p = _one_device_hash_rows(
                u, table, slot_keys, seed, flat, capacities[u.name], training, ops
            )
            counters.add_per_lookup(u.lookups, "overflow", _split(p.dropped, lengths))
            unit_bags = {s.name: _misses_counted(bags[s.name], s.combiner) for s in lookups}
            lookups = [dataclasses.replace(s, combiner="sum") for s in lookups]
        else:
            members = [s.member for s in u.lookups]
            got = u.storage.local_rows(u.rows, table, slot_keys, seed, flat, members, training, ops)
        src = read(u, got)
        index = _split(got.rows, lengths)
        outs.update(_combine(lookups, implementation, src, index, unit_bags, _reader(u)))
        if not u.rows.hashed:  # hash mode: every non-padding id is a key
            invalid = [(idx < 0) & ~checks.is_padding(ids) for idx, ids in zip(index, flat)]
            counters.add_per_lookup(u.lookups, "invalid", invalid)
        counters.add_hash_full(u, got.hash_full)
        counters.add_online(u, got.online)
        counters.add_online(u, got.cache)
        ctxs[u.name] = _context(None, u, index, unit_bags, got.held)
    if prefetch is not None:
        _prefetch(units, shards, new_shards, ctxs, seed, prefetch, capacities, local, ops, counters)
    return DeviceLookup(outs, new_shards, counters.stats(), ctxs)


def _prefetch(units, shards, new_shards, ctxs, seed, bags, capacities, local, ops, counters):
    """After the lookup, on this device: each cached unit's rows of the next
    batch (`bags`) brought into its cache (`CachedStorage.prefetch`) beside
    those of the lookup, whose context then lists the slots moved. The keys
    are those the exchange would bring this owner, found without inserting
    (a hash key not in the table yet is left to its own lookup). `new_shards`
    and `ctxs` are updated, the moves counted."""
    cached = [u for u in units if u.storage.cached]
    received = {}
    exchanged = [u for u in cached if not local[u.name]]
    if exchanged:
        rows0 = exchanged[0].rows
        plans = [
            plan(u.rows, u.lookups, [bags[s.name].ids for s in u.lookups], capacities[u.name])
            for u in exchanged
        ]
        got = exchange_words(rows0.axis_name, rows0.num_devices, [p.send for p in plans])
        received = {u.name: keys for u, keys in zip(exchanged, got)}
    for u in cached:
        table, slot_keys = new_shards.get(u.name, shards[u.name])
        flat = [bags[s.name].ids for s in u.lookups]
        if u.name in received or u.rows.hashed:  # keys to find (one device: the distinct ones)
            keys = received.get(u.name)
            if keys is None:
                keys = plan(u.rows, u.lookups, flat, capacities[u.name]).send
            rows = u.rows.find_rows(slot_keys, seed, keys, False, table.cache)[0].rows
        else:
            members = [s.member for s in u.lookups]
            rows = u.rows.local_rows(None, slot_keys, seed, flat, members, False).rows
        ctx = ctxs[u.name]
        moved = u.storage.prefetch(table, rows, ctx.held, ops)
        new_shards[u.name] = (moved.shard, slot_keys)
        both = jnp.concatenate([ctx.held.moved, moved.moved])
        ctxs[u.name] = ctx._replace(held=ctx.held._replace(moved=both))
        counters.add_online(u, moved.counts)


# -------------------------------------------------------------- backward


def _concat_bags(grads, index, offsets, weights):
    """One bag set from several padded ones (offsets[0] == 0 and
    offsets[-1] == len(ids) in each): positions and bags concatenated."""
    w = weights[0] if len(weights) == 1 else None
    if len(index) == 1:
        return grads[0], index[0], offsets[0], _no_weights() if w is None else w
    shifted, base = [offsets[0]], index[0].shape[0]
    for i, off in zip(index[1:], offsets[1:]):
        shifted.append(off[1:] + base)
        base += i.shape[0]
    if any(w is not None for w in weights):
        ones = [jnp.ones(i.shape, jnp.float32) if w is None else w for i, w in zip(index, weights)]
        w = jnp.concatenate(ones)
    else:
        w = _no_weights()
    return jnp.concatenate(grads), jnp.concatenate(index), jnp.concatenate(shifted), w


def _by_combiner(unit: Unit, ctx: UnitContext, d_outs):
    """(combiner, bags) of the unit's lookups, one bag set per combiner."""
    groups = {}
    as_sums = _reads_own_hash_rows(unit, ctx)
    for k, spec in enumerate(unit.lookups):
        groups.setdefault("sum" if as_sums else spec.combiner, []).append(k)
    for combiner, ks in groups.items():
        g = [d_outs[unit.lookups[k].name] for k in ks]
        yield (
            combiner,
            _concat_bags(
                [x.reshape(-1, x.shape[-1]) for x in g],
                [ctx.index[k] for k in ks],
                [ctx.offsets[k] for k in ks],
                [ctx.weights[k] for k in ks],
            ),
        )


def owner_bags(units, ctx, d_outs, implementation) -> dict:
    """The sparse backward up to each unit's owners: {unit: OwnerBags} over
    this device's rows of the unit's table. One all_to_all sends every
    exchanged unit's per-slot gradient sums to the owners; a replicated unit
    gathers its touched rows' gradients over the axis. A unit's context
    says which its lookup was: an exchanged one holds the owners' rows."""
    ops = resolve(implementation)
    out, sums, exchanged = {}, [], []
    for u in units:
        groups = list(_by_combiner(u, ctx[u.name], d_outs))
        if ctx[u.name].owner_rows is None:
            out[u.name] = _local_owner_bags(u, groups, ops)
            continue
        slots = ctx[u.name].owner_rows.shape[0]
        d_back = None
        for combiner, (g, idx, off, w) in groups:  # each slot's row written once, in place
            dense = ops.lookup_combine_bwd_dense(g, idx, off, w, combiner, slots)
            d_back = dense if d_back is None else d_back + dense
        sums.append(d_back)
        exchanged.append(u)
    if exchanged:
        rows0 = exchanged[0].rows
        for u, d_vectors in zip(
            exchanged, exchange_words(rows0.axis_name, rows0.num_devices, sums)
        ):
            rows = ctx[u.name].owner_rows
            out[u.name] = OwnerBags(d_vectors, rows, _singles(rows.shape[0]), _no_weights(), "sum")
    return out


def _local_owner_bags(unit: Unit, groups, ops) -> OwnerBags:
    """A unit without exchange. One device: its own bags. Several
    (replicated): every replica must apply the same update, so the touched
    rows' gradients are summed over the axis, as a dense [R, D] sum (psum)
    where that moves fewer bytes than gathering every device's touched
    rows, else gathered in device order and summed per row on each device.
    Both are the same sums on every replica."""
    rows = unit.rows
    if rows.num_devices == 1 and len(groups) == 1:
        combiner, (g, idx, off, w) = groups[0]
        return OwnerBags(g, idx, off, w, combiner)
    n, r = rows.num_devices, rows.rows_per_device
    parts = [ops.lookup_combine_bwd(*bags, c, r) for c, bags in groups]
    positions = sum(p.rows.shape[0] for p in parts)
    if r < n * positions // 2:  # dense: 2 (n-1)/n r words against (n-1) positions
        dense = sum(ops.rows_to_dense(p, r, jnp.float32) for p in parts)
        touched = sum(
            jnp.zeros((r,), jnp.int32).at[jnp.where(p.rows >= 0, p.rows, r)].add(1, mode="drop")
            for p in parts
        )
        dense = jax.lax.psum(dense, rows.axis_name)
        touched = jax.lax.psum(touched, rows.axis_name)
        ids = jnp.where(touched > 0, jnp.arange(r, dtype=jnp.int32), -1)
        return OwnerBags(dense, ids, _singles(r), _no_weights(), "sum")
    touched = jnp.concatenate([p.rows for p in parts])
    grads = jnp.concatenate([p.grads for p in parts])
    touched = jax.lax.all_gather(touched, rows.axis_name, tiled=True)
    grads = jax.lax.all_gather(grads, rows.axis_name, tiled=True)
    return OwnerBags(grads, touched, _singles(touched.shape[0]), _no_weights(), "sum")


def one_row_bags(bags: OwnerBags, num_rows: int, ops) -> OwnerBags:
    """An owner's bags with one row each: a mean or sqrtn combiner's first
    reduced (sum bags already are), so that an update that skips some rows
    (stale ones, -1) leaves the other rows' gradients as they were."""
    if bags.combiner == "sum":
        return bags
    g = ops.lookup_combine_bwd(*bags, num_rows)
    return OwnerBags(g.grads, g.rows, _singles(g.rows.shape[0]), _no_weights(), "sum")
