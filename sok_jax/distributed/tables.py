"""`ShardedTables`: the `shard_map` around the per-device data path
(`exchange.py`) for a fixed set of storage units and lookups, shared by
`DistributedEmbedding` (one unit, one lookup of `slot_num` slots) and
`EmbeddingCollection` (many tables, one lookup per feature).

It owns what both layers do alike: create the shards, size the exchange
buckets, run the lookup, the sparse backward, the optimizer updates and the
checks, always as one program over the mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax import initializers
from sok_jax._compat import shard_map
from sok_jax.distributed import eager, exchange
from sok_jax.distributed.exchange import DeviceLookup, Unit
from sok_jax.distributed.scores import HashRowGrad, drop_stale, find_stale, reset_slots
from sok_jax.distributed.state import EmbeddingStats, accumulate, warn_on_stats
from sok_jax.distributed.storage import (
    CACHE_COUNTS,
    CachedOptState,
    CachedShard,
    host_slots,
    host_table,
    pin_host,
)
from sok_jax.ids import Bags
from sok_jax.ops import resolve
from sok_jax.ops.embed_ops import SparseRowGrad
from sok_jax.optim import check_sparse_optimizer


def mesh_and_axis(mesh, axis_name, capacity_factor):
    """The layers' common arguments, checked: (the mesh, default one 1-D
    mesh "sok" over every device; the axis, default its first)."""
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()), ("sok",))
    if axis_name is None:
        axis_name = mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return mesh, axis_name


def _check_optimizers(optimizers: dict) -> None:
    """TypeError naming the unit whose optimizer is no `SparseOptimizer`."""
    for name, opt in optimizers.items():
        check_sparse_optimizer(opt, f"the sparse optimizer of {name!r}")


@dataclasses.dataclass(frozen=True)
class LookupInput:
    """One lookup's batch as it enters `shard_map` (global arrays sharded over
    the batch): padded ids [B, S, w], their weights or None, and per sample
    the ids dropped before the lookup (ragged: see `ids.ragged_to_padded`) or
    None. `sequence`: every position is its own bag."""

    ids: Any
    weights: Any
    dropped: Any
    sequence: bool = False


jax.tree_util.register_dataclass(
    LookupInput, data_fields=["ids", "weights", "dropped"], meta_fields=["sequence"]
)


def _slot_keys(hash_part):
    """The slot_keys of a shard's hash part (keys alone, or a HashShard)."""
    return getattr(hash_part, "slot_keys", hash_part)


def device_bags(x: LookupInput) -> Bags:
    """Inside shard_map: one device's slice of a lookup input as bags."""
    ids, w = x.ids, x.weights
    flat_w = None if w is None else w.reshape(-1)
    if x.sequence:  # [b, 1, w]: every position its own bag, out [b, w, D]
        b, _, width = ids.shape
        bags = Bags.padded(ids.reshape(-1), flat_w, (b * width, 1), 1)
        return bags._replace(batch_shape=(b, width))
    return Bags.padded(ids.reshape(-1), flat_w, ids.shape[:2], ids.shape[2])


def _after_moves(res, cached: list):
    """`res` with its outputs passed through one optimization barrier with
    the caches of the units `cached` (HBM arrays, the last a prefetch's
    moves write): whatever uses an output is then scheduled after those
    moves were launched, so it runs beside them."""
    caches = {k: res.shards[k][0].cache for k in cached}
    outs, caches = jax.lax.optimization_barrier((res.outs, caches))
    shards = dict(res.shards)
    for k, cache in caches.items():
        table, hash_part = shards[k]
        shards[k] = (table._replace(cache=cache), hash_part)
    return res._replace(outs=outs, shards=shards)


@dataclasses.dataclass(frozen=True)
class ShardedTables:
    units: tuple  # of exchange.Unit
    mesh: Any
    axis_name: str
    implementation: str
    capacity_factor: float | None = None
    check: bool = False

    @property
    def num_devices(self) -> int:
        return int(self.mesh.shape[self.axis_name])

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def tables(self) -> list[str]:
        return [t for u in self.units for t in exchange.member_tables(u)]

    # ------------------------------------------------------------ shapes
    def capacity(self, unit: Unit, local_batch: int) -> int:
        """The bucket size of a unit for a device's batch. Row-wise: all the
        unit's key positions (None) or ceil(c * positions / n); a column of
        table-wise tables: its largest member's positions, or c times them
        (all of a member's keys go to one device). Clamped where a
        destination cannot receive that many distinct keys."""
        c = self.capacity_factor
        if unit.rows.placement != "table":
            full = exchange.full_positions(unit, local_batch)
            cap = full if c is None else min(max(math.ceil(c * full / self.num_devices), 1), full)
        else:
            per_member = {}
            for spec in unit.lookups:
                per_member[spec.member] = per_member.get(spec.member, 0) + spec.ids_per_sample
            full = local_batch * max(per_member.values())
            cap = full if c is None else min(max(math.ceil(c * full), 1), full)
        return max(cap, 1)

    def bucket_sizes(self, local_batch: int) -> dict:
        """{unit: the bucket size the exchange uses}: the capacity, clamped
        where a destination can never receive that many distinct keys."""
        return {
            u.name: exchange.bucket_capacity(u, self.capacity(u, local_batch)) for u in self.units
        }

    def _local(self, local_batch):
        return {
            u.name: exchange.is_local(u, self.capacity(u, local_batch), local_batch)
            for u in self.units
        }

    # ----------------------------------------------------------- specs
    def _shard_specs(self):
        axis = self.axis_name
        return {
            u.name: (
                u.storage.table_spec(axis, u.rows.replicated),
                P(None) if u.rows.replicated else P(axis),
            )
            for u in self.units
        }

    def shard_shardings(self) -> dict:
        """{unit: (table sharding, slot_keys sharding or None)}."""
        return {
            u.name: (
                u.storage.table_sharding(u.rows),
                u.rows.hash_sharding() if u.rows.hashed else None,
            )
            for u in self.units
        }

    def _extra_counts(self, table) -> tuple:
        """The optional counters a table reports (online hash, cache)."""
        extra = ()
        if table in set(exchange.online_tables(self.units)):
            extra += exchange.ONLINE_COUNTS
        if table in set(exchange.changing_tables(self.units)):
            extra += ("stale",)
        if table in set(exchange.cached_tables(self.units)):
            extra += CACHE_COUNTS
        if table in set(exchange.unseen_tables(self.units)):
            extra += ("unseen",)
        return extra

    def stats_shardings(self) -> dict:
        row = NamedSharding(self.mesh, P(self.axis_name))
        return jax.tree.map(lambda _: row, jax.eval_shape(self.zero_stats))

    def slot_specs(self, unit: Unit, opt_state):
        """The PartitionSpecs of a unit's optimizer state's slots (a cached
        unit's: of its `CachedOptState`)."""
        lead = None if unit.rows.replicated else self.axis_name

        def specs(slots):
            return tuple(P(lead) if s.ndim == 1 else P(lead, None) for s in slots)

        if isinstance(opt_state, CachedOptState):
            inner = type(opt_state.cache)(specs(opt_state.cache.slots), P())
            return CachedOptState(inner, specs(opt_state.host), P(lead), P(lead))
        return specs(opt_state.slots)

    def _opt_spec(self, unit: Unit, opt_state):
        specs = self.slot_specs(unit, opt_state)
        return specs if isinstance(opt_state, CachedOptState) else type(opt_state)(specs, P())

    def _opt_specs(self, opt_states):
        return {name: self._opt_spec(self.unit(name), s) for name, s in opt_states.items()}

    def _update_rows(self, unit: Unit) -> int:
        """The rows the optimizer's update indexes on each device: the cache's
        for a cached unit, else the shard's."""
        return unit.storage.cache_rows if unit.storage.cached else unit.rows.rows_per_device

    # ------------------------------------------------------------ state
    def seed_data(self, seed):
        """The key data of `seed` (an int or a key) replicated over the mesh,
        the sharding `state_shardings` gives it, so that a state from `init`
        and one a call returned share one compiled program."""
        key_data = jax.random.key_data(initializers.as_key(seed))
        return jax.device_put(key_data, NamedSharding(self.mesh, P()))

    def init_shards(self, seed) -> dict:
        """{unit: (table, slot_keys or None)}, every unit's shard from one
        program (each unit's rows from its strategy's initializer)."""
        axis = self.axis_name

        specs = self._shard_specs()
        in_hbm = [u for u in self.units if u.storage.kind == "hbm"]
        cached = [u for u in self.units if u.storage.cached]
        hosted_hash = [u for u in self.units if u.storage.kind != "hbm" and u.rows.hashed]

        def body(seed):
            device = jax.lax.axis_index(axis)
            return (
                {u.name: u.rows.init_shard(seed, device) for u in in_hbm},
                {u.name: self._empty_cache(u)[1:] for u in cached},
                {u.name: u.rows.fresh_hash_part() for u in hosted_hash},
            )

        out_specs = (
            {u.name: specs[u.name] for u in in_hbm},
            {u.name: tuple(specs[u.name][0])[1:] for u in cached},
            {u.name: specs[u.name][1] for u in hosted_hash},
        )
        shards, caches, hash_parts = jax.jit(shard_map(body, self.mesh, (P(),), out_specs))(seed)
        for u in self.units:  # host stores, built in host memory
            if u.storage.kind == "hbm":
                continue
            table = host_table(u.rows, seed)
            if u.storage.cached:
                table = CachedShard(table, *caches[u.name])
            shards[u.name] = (table, hash_parts.get(u.name))
        return {u.name: shards[u.name] for u in self.units}

    def _empty_cache(self, u: Unit):
        return u.storage.empty_cache(u.rows.rows_per_device, u.rows.dim, u.rows.dtype)

    def zero_stats(self) -> dict:
        """Per table, distinct [n] counters (a donated state must not hold one
        buffer twice)."""
        row = NamedSharding(self.mesh, P(self.axis_name))
        n = self.num_devices

        def zeros(k="count"):
            dtype = jnp.float32 if k == "load" else jnp.int32
            return jax.device_put(jnp.zeros((n,), dtype), row)

        return {
            t: EmbeddingStats(
                zeros(), zeros(), zeros(), zeros(), **{k: zeros(k) for k in self._extra_counts(t)}
            )
            for t in self.tables
        }

    def with_nonfinite(self, stats: dict, d_outs: dict) -> dict:
        """`stats` with each table's `nonfinite` raised by, per device, the
        vectors of its share of the cotangents (the batch's leading axis, in
        device order) of the lookups reading the table that hold a NaN or
        Inf."""
        reading = {}
        for u in self.units:
            for s in u.lookups:
                reading.setdefault(s.table, []).append(s.name)

        def body(d_outs, stats):
            out = dict(stats)
            for t, features in reading.items():
                bad = sum(
                    jnp.sum(~jnp.all(jnp.isfinite(d_outs[f]), axis=-1), dtype=jnp.int32)
                    for f in features
                )
                out[t] = accumulate(stats[t], EmbeddingStats(None, None, None, bad.reshape(1)))
            return out

        row = P(self.axis_name)
        return shard_map(body, self.mesh, (row, row), row)({f: d_outs[f] for f in d_outs}, stats)

    # ----------------------------------------------------------- lookup
    def check_prefetch(self, inputs: dict, upcoming: dict) -> dict:
        """`upcoming` (the next batch's inputs, as `inputs`) for `run`'s
        `prefetch`, checked: some unit is host-cached, and every lookup's ids
        are shaped as this batch's (the exchange buffers are sized by it)."""
        if not any(u.storage.cached for u in self.units):
            raise ValueError(
                'prefetch is for storage="host_cached": it brings the next batch\'s rows into '
                "the HBM cache (these tables' rows are read where they live)"
            )
        for name, x in inputs.items():
            now, then = x.ids.shape, upcoming[name].ids.shape
            if now != then:
                raise ValueError(
                    f"prefetch must be the next batch, shaped as this one: {name!r} ids "
                    f"{list(now)}, prefetch {list(then)}"
                )
        return upcoming

    def run(self, shards, seed, stats, inputs: dict, training: bool, sparse: bool, prefetch=None):
        """The lookup of every lookup input: (outs, new shards, stats, ctx),
        each a dict (outs by lookup, shards and ctx by unit, stats by table:
        `stats` plus this call's counts). Shards the lookup left as they
        were come back as they went in. `prefetch`: the next batch's inputs
        (like `inputs`), whose rows the cached units bring in after the
        lookup; the outputs are then held back until those moves have been
        launched, so that what consumes them runs beside the moves."""
        axis = self.axis_name
        local_batch = next(iter(inputs.values())).ids.shape[0] // self.num_devices
        local = self._local(local_batch)
        capacities = self.bucket_sizes(local_batch)
        # Under the caller's trace its host check cannot run: report from
        # inside (an eager call's compiled program raises on the host instead).
        report = self.check and not eager.compiling() and any(
            isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((shards, seed, inputs))
        )

        def body(shards, seed, before, inputs, prefetch):
            bags = {name: device_bags(x) for name, x in inputs.items()}
            res = exchange.forward(
                self.units,
                shards,
                seed,
                bags,
                capacities,
                local,
                self.implementation,
                training,
                sparse,
                None if prefetch is None else {k: device_bags(x) for k, x in prefetch.items()},
            )
            if prefetch is not None:  # the outputs' users come after the moves' launch
                res = _after_moves(res, [u.name for u in self.units if u.storage.cached])
            stats = dict(res.stats)
            for name, x in inputs.items():  # ids dropped before the lookup
                if x.dropped is not None:
                    t = self._table_of(name)
                    extra = jnp.sum(x.dropped).astype(jnp.int32).reshape(1)
                    stats[t] = dataclasses.replace(stats[t], invalid=stats[t].invalid + extra)
            if report:
                # Reported once (from device 0), never raised: raising inside
                # the computation would lose the caller's donated state.
                gathered = [
                    jax.lax.all_gather(c, axis, tiled=True)
                    for s in stats.values()
                    for c in (s.overflow, s.invalid, s.hash_full)
                ]
                jax.lax.cond(
                    jax.lax.axis_index(axis) == 0,
                    lambda g: jax.debug.callback(warn_on_stats, *g),
                    lambda g: None,
                    gathered,
                )
            total = {t: accumulate(before[t], s) for t, s in stats.items()}
            return DeviceLookup(res.outs, res.shards, total, res.ctx)

        row = P(axis)
        changed = {u.name for u in self.units if u.rows.hashed or u.storage.cached}
        shard_specs = self._shard_specs()
        out_specs = DeviceLookup(
            outs=row,
            shards={k: shard_specs[k] for k in changed},
            stats=row,
            ctx=row,
        )
        fn = shard_map(body, self.mesh, (shard_specs, P(), row, row, row), out_specs)
        res = fn(shards, seed, stats, inputs, prefetch)
        new_shards = dict(shards)
        for name, (table, hash_part) in res.shards.items():
            u = self.unit(name)
            new_shards[name] = (pin_host(u.storage, u.rows, table)[0], hash_part)
        return res.outs, new_shards, res.stats, res.ctx

    def _table_of(self, lookup_name):
        for u in self.units:
            for spec in u.lookups:
                if spec.name == lookup_name:
                    return spec.table
        raise KeyError(lookup_name)

    def _ctx_specs(self, ctx):
        return jax.tree.map(lambda _: P(self.axis_name), ctx)

    # --------------------------------------------------------- backward
    def _owner_bags(self, ctx, d_outs):
        return exchange.owner_bags(self.units, ctx, d_outs, self.implementation)

    def sparse_grad(self, ctx, d_outs) -> dict:
        """{unit: SparseRowGrad} per device, stacked over the axis (a
        replicated unit's is the same on every device); an evicting unit's
        is a `HashRowGrad` carrying its lookup's `HeldRows`."""
        ops = resolve(self.implementation)
        row = P(self.axis_name)

        def body(ctx, d_outs):
            bags = self._owner_bags(ctx, d_outs)
            out = {}
            for u in self.units:
                r = ops.lookup_combine_bwd(*bags[u.name], self._update_rows(u))
                out[u.name] = SparseRowGrad(r.rows, r.grads, r.count)
                if ctx[u.name].held is not None:  # an evicting hash table
                    out[u.name] = HashRowGrad(*out[u.name], ctx[u.name].held)
            return out

        specs = {
            u.name: (HashRowGrad if ctx[u.name].held is not None else SparseRowGrad)(
                row,
                P(self.axis_name, None),
                row,
                *([row] if ctx[u.name].held is not None else []),
            )
            for u in self.units
        }
        return shard_map(body, self.mesh, (row, row), specs)(ctx, d_outs)

    def _updates(self, shards, opt_states, stats, body, args, arg_specs):
        """One program applying `body(tables, opt_states, slot_keys, *args)`
        -> (tables, opt_states, {unit: {counter: [1] count}}) on every
        device; the slot_keys enter only for units that evict. Returns
        (shards, opt_states, stats plus what the update counted: the stale
        rows of evicting and cached units, the unsynced ones of cached
        units)."""
        shard_specs = self._shard_specs()
        opt_specs = self._opt_specs(opt_states)
        tables = {k: v[0] for k, v in shards.items() if k in opt_states}
        t_specs = {k: shard_specs[k][0] for k in tables}
        evicting = [u for u in self.units if u.rows.evicting and u.name in tables]
        counting = [u for u in self.units if u.name in tables and exchange.changing_tables([u])]
        keys = {u.name: _slot_keys(shards[u.name][1]) for u in evicting}
        k_specs = {u.name: shard_specs[u.name][1] for u in evicting}
        names = [t for u in counting for t in exchange.member_tables(u)]
        cached = exchange.cached_tables(counting)
        row = P(self.axis_name)

        def run(tables, opt_states, keys, stats, *args):
            new_t, new_o, counts = body(tables, opt_states, keys, *args)
            counters = exchange._Counters(names, (), names, cached)
            for u in counting:
                counters.add_online(u, counts[u.name])
            added = counters.stats()
            return new_t, new_o, {t: accumulate(stats[t], added[t]) for t in names}

        fn = shard_map(
            run,
            self.mesh,
            (t_specs, opt_specs, k_specs, row, *arg_specs),
            (t_specs, opt_specs, row),
        )
        new_tables, new_opt, counted = fn(
            tables, opt_states, keys, {t: stats[t] for t in names}, *args
        )
        out, new_opt = dict(shards), dict(new_opt)
        for k, t in new_tables.items():
            u = self.unit(k)
            t, new_opt[k] = pin_host(u.storage, u.rows, t, new_opt[k])
            out[k] = (t, shards[k][1])
        return out, new_opt, {**stats, **counted}

    def _update_unit(self, name, optimizer, table, opt_state, keys, held, update):
        """One device, one unit: `update(table, opt_state, keep)` on the rows
        the optimizer updates (`keep(rows)`: the rows with those that must be
        skipped set to -1), after resetting the slots of the rows the lookup
        gave to new keys. `held`: the lookup's record of its rows (None for
        a unit whose rows cannot change hands). Returns (table, opt_state,
        {counter: count}).

        An evicting unit skips the rows whose key a later lookup evicted
        (`stale`). A cached unit syncs its optimizer slots into the cache
        first and skips the cache slots whose row or key changed since the
        lookup (`stale`)."""
        unit = self.unit(name)
        target, slots, stale = table, opt_state, None
        if unit.storage.cached:  # the update runs on the cache
            opt_state = unit.storage.sync_slots(opt_state, table, held, resolve(self.implementation))
            target, slots = table.cache, opt_state.cache
            with jax.named_scope("cache_stale"):
                stale = unit.storage.stale_slots(table.tags, keys, held)
        elif held is not None:
            stale = find_stale(keys, held)
        counts, reset, keep = {}, None, lambda rows: rows
        if stale is not None:
            counts["stale"] = stale.count
            reset, keep = stale.reset_rows, functools.partial(drop_stale, stale)
        slots = reset_slots(optimizer, slots, reset, target.shape[1])
        new_target, new_slots = update(target, slots, keep)
        if not unit.storage.cached:
            return new_target, new_slots, counts
        return table._replace(cache=new_target), opt_state._replace(cache=new_slots), counts

    def sparse_update(self, shards, optimizers: dict, opt_states: dict, stats, ctx, d_outs):
        """Each unit's owners sum its rows' gradients and apply the unit's
        optimizer to them in place (`update_bags`, fused where it can). An
        evicting unit skips the rows a lookup after `ctx`'s gave to other
        keys, counted in their tables' `stale`. Returns (shards, opt_states,
        stats)."""
        _check_optimizers(optimizers)
        ops = resolve(self.implementation)
        row = P(self.axis_name)

        def body(tables, opt_states, keys, ctx, d_outs):
            bags = self._owner_bags(ctx, d_outs)
            new_t, new_o, counts = {}, {}, {}
            for name in tables:
                opt, held, unit = optimizers[name], ctx[name].held, self.unit(name)
                unit_bags = bags[name]
                if held is not None:  # rows may be skipped: one row per bag first
                    unit_bags = exchange.one_row_bags(unit_bags, self._update_rows(unit), ops)

                def update(table, opt_state, keep, opt=opt, unit_bags=unit_bags, unit=unit):
                    b = unit_bags._replace(ids=keep(unit_bags.ids))
                    if opt.update_bags is None:  # a SparseOptimizer built without it
                        g = ops.lookup_combine_bwd(*b, self._update_rows(unit))
                        return opt.update(table, opt_state, g)
                    return opt.update_bags(table, opt_state, *b)

                new_t[name], new_o[name], counts[name] = self._update_unit(
                    name, opt, tables[name], opt_states[name], keys.get(name), held, update
                )
            return new_t, new_o, counts

        return self._updates(shards, opt_states, stats, body, (ctx, d_outs), (row, row))

    def apply_gradients(self, shards, optimizers: dict, opt_states: dict, stats, grads: dict):
        """Applies each unit's optimizer to its `SparseRowGrad` on each owner
        (an evicting unit's `HashRowGrad`: without its stale rows, counted).
        Returns (shards, opt_states, stats)."""
        _check_optimizers(optimizers)
        row = P(self.axis_name)

        def body(tables, opt_states, keys, grads):
            new_t, new_o, counts = {}, {}, {}
            for name in tables:
                g, opt = grads[name], optimizers[name]
                held = g.held if isinstance(g, HashRowGrad) else None

                def update(table, opt_state, keep, g=g, opt=opt):
                    return opt.update(table, opt_state, SparseRowGrad(keep(g.rows), g.grads, g.count))

                new_t[name], new_o[name], counts[name] = self._update_unit(
                    name, opt, tables[name], opt_states[name], keys.get(name), held, update
                )
            return new_t, new_o, counts

        specs = {
            k: type(g)(row, P(self.axis_name, None), row, *([row] if len(g) > 3 else []))
            for k, g in grads.items()
        }
        return self._updates(shards, opt_states, stats, body, (grads,), (specs,))

    def init_optimizer(self, optimizers: dict, shards) -> dict:
        """{unit: the sparse optimizer's state}, slots laid out like the unit's
        table. Each slot comes from a program of its own, so that every slot
        owns its buffer (a step donates them all)."""
        _check_optimizers(optimizers)
        out = {}
        for u in self.units:
            optimizer = optimizers[u.name]
            table = shards[u.name][0]
            if u.storage.kind == "hbm":
                out[u.name] = self._init_slots(u, optimizer, table)
                continue
            host = table.host if u.storage.cached else table
            slots = host_slots(u.rows, optimizer, host.shape, host.dtype)
            if not u.storage.cached:
                probe = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct(host.shape, host.dtype))
                count = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(self.mesh, P()))
                out[u.name] = type(probe)(slots, count)
                continue
            inner = self._init_slots(u, optimizer, table.cache)
            out[u.name] = CachedOptState(inner, slots, *self._empty_sync(u, table))
        return out

    def adopt(self, unit_name: str, shard, table, optimizer=None, opt_state=None):
        """(the unit's shard, its optimizer state or None) holding the
        logical `table` [n * R, D] and the optimizer state `opt_state` over
        it (of the plain kind `optimizer.init` gives), e.g. from an import;
        `shard`: a fresh shard of the unit (a cached unit's cache empty)."""
        u = self.unit(unit_name)
        if not u.storage.cached:
            table = jax.device_put(table, u.storage.table_sharding(u.rows))
            if opt_state is None:
                return table, None
            slots = tuple(
                jax.device_put(s, u.storage.slot_sharding(u.rows, s.sharding.spec))
                for s in opt_state.slots
            )
            return table, type(opt_state)(slots, opt_state.count)
        shard = u.storage.place(shard._replace(host=table))
        if opt_state is None:
            return shard, None
        inner = self._init_slots(u, optimizer, shard.cache)
        inner = type(inner)(inner.slots, opt_state.count)
        host = tuple(
            jax.device_put(s, u.storage.host_slot_sharding(u.rows, s.sharding.spec))
            for s in opt_state.slots
        )
        return shard, CachedOptState(inner, host, *self._empty_sync(u, shard))

    @staticmethod
    def _empty_sync(u: Unit, shard):
        """(tags, step) of a cached unit's optimizer state that has synced
        nothing, for a `shard` whose cache is empty."""
        row = u.rows.row_sharding
        tags = jax.device_put(jnp.full(shard.tags.shape, -1, jnp.int32), row)
        return tags, jax.device_put(jnp.zeros(shard.step.shape, jnp.int32), row)

    def _init_slots(self, u: Unit, optimizer, table):
        """`optimizer.init` over `table` (laid out as the unit's tables), each
        slot from a program of its own."""
        probe = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct(table.shape, table.dtype))
        slot_specs = self.slot_specs(u, probe)
        t_spec = P(None, None) if u.rows.replicated else P(self.axis_name, None)

        def part(pick, spec):
            fn = shard_map(lambda t: pick(optimizer.init(t)), self.mesh, (t_spec,), spec)
            return jax.jit(fn)(table)

        slots = tuple(part(lambda s, i=i: s.slots[i], spec) for i, spec in enumerate(slot_specs))
        return type(probe)(slots, part(lambda s: s.count, P()))

    def optimizer_shardings(self, opt_states: dict) -> dict:
        def sharding(u, spec):
            return NamedSharding(self.mesh, spec)

        out = {}
        for name, s in opt_states.items():
            u = self.unit(name)
            specs = self.slot_specs(u, s)
            if isinstance(s, CachedOptState):
                inner = type(s.cache)(
                    tuple(sharding(u, p) for p in specs.cache.slots), sharding(u, P())
                )
                host = tuple(u.storage.host_slot_sharding(u.rows, p) for p in specs.host)
                out[name] = CachedOptState(
                    inner, host, sharding(u, specs.tags), sharding(u, specs.step)
                )
            else:
                slots = tuple(u.storage.slot_sharding(u.rows, p) for p in specs)
                out[name] = type(s)(slots, sharding(u, P()))
        return out

    # --------------------------------------------------------- capacity
    def largest_buckets(self, inputs: dict) -> dict:
        """{unit: the most distinct keys any device sends one destination}."""
        axis = self.axis_name
        local_batch = next(iter(inputs.values())).ids.shape[0] // self.num_devices
        exchanged = [u for u in self.units if u.rows.exchanged]

        def body(inputs):
            bags = {name: device_bags(x) for name, x in inputs.items()}
            out = {}
            for u in exchanged:
                p = exchange.plan(
                    u.rows,
                    u.lookups,
                    [bags[s.name].ids for s in u.lookups],
                    exchange.full_positions(u, local_batch),
                )
                out[u.name] = jax.lax.pmax(p.largest_bucket, axis).reshape(1)
            return out

        row = P(axis)
        got = shard_map(body, self.mesh, (row,), row)(inputs)
        return {k: v[0] for k, v in got.items()}
