"""`EmbeddingCollection`: many tables of their own sizes, dims, modes and
placements, looked up by many features in one program with one exchange.

    tables = [TableSpec("item", 40_000_000, 128), TableSpec("country", 300, 16,
              combiner="mean", placement="replicated"), ...]
    features = [FeatureSpec("item_id", "item"), FeatureSpec("clicked", "item", 50), ...]
    coll = EmbeddingCollection(tables, features, mesh=mesh, axis_name="x")
    print(coll.plan)
    state = coll.init(seed=0)
    outs, state = coll.apply(state, batch)      # batch {feature: ids}, outs {feature: [B, D]}
    outs, ctx, state = coll.lookup(state, batch)
    state, opt_state = coll.sparse_update(state, opt, opt_state, ctx, d_outs)

The planner (`planner.py`) places each table ("row", "table" or
"replicated") and packs them into storage units; `ShardedTables` runs them
(`tables.py`). All non-replicated tables share one `all_to_all` per
direction. The logical tables never depend on the plan or the device count:
a key's initial vector depends on the seed, its table's name and the key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax import ids as ids_lib
from sok_jax import initializers
from sok_jax.distributed import exchange, planner, quantized
from sok_jax.distributed.eager import compiled_when_eager
from sok_jax.distributed.exchange import LookupSpec, Unit
from sok_jax.distributed.online import (
    TableExport,
    evict_stale_shards,
    export_table,
    host_step,
    import_table,
    join_hash_part,
    resolve_seed,
    split_hash_part,
)
from sok_jax.distributed.rows import STRATEGIES, Member
from sok_jax.distributed.specs import FeatureSpec, TableSpec, check_specs
from sok_jax.distributed.state import (
    EmbeddingStats,
    accumulate,
    check_like,
    check_opt_state,
)
from sok_jax.distributed.storage import HbmStorage
from sok_jax.distributed.tables import LookupInput, ShardedTables, mesh_and_axis
from sok_jax.ops import checks, resolve
from sok_jax.optim import check_sparse_optimizer


@dataclasses.dataclass(frozen=True)
class TableShard:
    """One storage unit's arrays: `table` [n * R, D] sharded over the axis
    ([R, D] on every device when replicated) and, in hash mode, `slot_keys`
    (None in direct mode), and an online hash table's `scores` (None
    otherwise; `scores.HashScores`)."""

    table: Any
    slot_keys: Any
    scores: Any = None


@dataclasses.dataclass(frozen=True)
class CollectionState:
    """Functional state of an `EmbeddingCollection`: the storage units'
    arrays by unit name (`coll.plan` says which table lives where; a table
    not packed with others has a unit of its own name), the seed's key data,
    and per table the `EmbeddingStats` of the last call."""

    shards: dict
    seed: Any
    stats: dict


jax.tree_util.register_dataclass(
    TableShard, data_fields=["table", "slot_keys", "scores"], meta_fields=[]
)
jax.tree_util.register_dataclass(
    CollectionState, data_fields=["shards", "seed", "stats"], meta_fields=[]
)


def _slot_bytes(optimizer, dim: int) -> int:
    """Bytes of `optimizer`'s slots per row of a table of `dim` (each slot at
    its slot_dtype's size)."""
    if optimizer is None:
        return 4 * dim  # the default assumption: one float32 [R, D] slot (Adagrad)
    check_sparse_optimizer(optimizer)
    probe = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct((8, dim), jnp.float32))
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in probe.slots) // 8


class EmbeddingCollection:
    """Many tables looked up by many features, sharded over a mesh axis.

    Args:
      tables: `TableSpec`s (unique names).
      features: `FeatureSpec`s (unique names, each reading one table; every
        table is read by at least one feature).
    Keyword-only:
      mesh: the mesh (default: a 1-D mesh over all devices).
      axis_name: the mesh axis the tables and the batch are sharded over.
      batch_size: the global batch the planner's costs assume (default
        `planner.DEFAULT_BATCH_PER_DEVICE`, 16384, per device; `print(plan)`
        says which); the layer takes any batch.
      capacity_factor: None (safe: a bucket holds every local key) or
        c > 0: a row-wise table's bucket holds ceil(c * keys / n) keys, a
        column of table-wise tables ceil(c * keys) of its largest member.
      memory_per_device: the planner's budget in bytes (default: the
        device's own, where it says).
      hbm_budget: bytes of HBM per device the tables may take; when they
        do not fit, the planner moves tables whose `TableSpec.storage` is
        None to host memory behind an HBM cache, cheapest first, and says
        so in `print(coll.plan)` (`sok_jax.distributed.planner`).
      optimizer: the sparse optimizer the planner counts slots for (default:
        one float32 slot per table value, as Adagrad).
      check: as `DistributedEmbedding`'s: an eager call raises
        `sok_jax.EmbeddingError` on dropped ids, a jitted one warns.
      implementation: "ffi" (the custom calls) or "reference" (pure JAX).

    Raises:
      ValueError: bad specs (named), or tables that do not fit the devices.
    """

    def __init__(
        self,
        tables,
        features,
        *,
        mesh: Mesh | None = None,
        axis_name: str | None = None,
        batch_size: int | None = None,
        capacity_factor: float | None = None,
        memory_per_device: int | None = None,
        hbm_budget: int | None = None,
        optimizer=None,
        check: bool = False,
        implementation: str = "ffi",
    ):
        self.table_specs = check_specs(tables, features)
        self.feature_specs = {f.name: f for f in features}
        mesh, axis_name = mesh_and_axis(mesh, axis_name, capacity_factor)
        ops = resolve(implementation)
        self.mesh, self.axis_name = mesh, axis_name
        self.num_devices = int(mesh.shape[axis_name])
        self.check = check
        self.implementation = implementation
        self.default_optimizer = optimizer
        keys_per_sample = {t: 0 for t in self.table_specs}
        for f in features:
            keys_per_sample[f.table] += f.max_nnz
        slots = {
            name: _slot_bytes(spec.optimizer or optimizer, spec.embedding_dim)
            for name, spec in self.table_specs.items()
        }
        self.plan = planner.make_plan(
            self.table_specs,
            keys_per_sample,
            num_devices=self.num_devices,
            batch_size=batch_size or planner.DEFAULT_BATCH_PER_DEVICE * self.num_devices,
            capacity_factor=capacity_factor,
            memory_per_device=memory_per_device,
            slot_bytes_per_row=slots,
            hbm_budget=hbm_budget,
        )
        units = [self._unit(u, features, ops) for u in self.plan.units]
        self._tables = ShardedTables(
            tuple(units), mesh, axis_name, implementation, capacity_factor, check
        )
        self._unit_of = {t.table: t.unit for t in self.plan.tables}

    def unit_rows(self, unit_plan, mesh=None, ops=None):
        """The row strategy of a planned unit (`planner.UnitPlan`) on `mesh`
        (default the collection's; an abstract mesh of another device count
        gives the host layout of a plan made for it, as a checkpoint's)."""
        names = [m for m in unit_plan.members if m is not None]
        first = self.table_specs[names[0]]
        members = tuple(
            None
            if m is None
            else Member(m, self.table_specs[m].vocabulary_size, initializers.table_id(m))
            for m in unit_plan.members
        )
        return STRATEGIES[(unit_plan.placement, first.use_hashtable)](
            mesh=self.mesh if mesh is None else mesh,
            axis_name=self.axis_name,
            rows_per_device=unit_plan.rows_per_device,
            dim=first.embedding_dim,
            dtype=first.dtype,
            initializer=initializers.resolve(first.initializer),
            members=members,
            key_dtype=first.key_dtype,
            ops=resolve(self.implementation) if ops is None else ops,
            online=first.online,
            key_placement=first.key_placement,
        )

    def _unit(self, unit_plan, features, ops) -> Unit:
        rows = self.unit_rows(unit_plan, ops=ops)
        members = rows.members
        index = {m.name: i for i, m in enumerate(members) if m is not None}
        lookups = tuple(
            LookupSpec(
                f.name,
                f.table,
                index[f.table],
                self.table_specs[f.table].combiner or "sum",
                self.table_specs[f.table].combiner is None,
                f.max_nnz,
            )
            for f in features
            if f.table in index
        )
        tier = unit_plan.storage or HbmStorage()
        tier.check_strategy(rows, self.implementation)
        return Unit(unit_plan.name, rows, lookups, tier)

    # ------------------------------------------------------------ state
    def init(self, seed) -> CollectionState:
        """The sharded state; every unit from a program of its own."""
        key_data = self._tables.seed_data(seed)
        shards = {
            name: TableShard(t, *split_hash_part(h))
            for name, (t, h) in self._tables.init_shards(key_data).items()
        }
        return CollectionState(shards, key_data, self.zero_stats())

    def zero_stats(self) -> dict:
        """{table: the counters of a fresh state} (zeros, sharded over the
        axis): to reset the counters, which accumulate from `init`
        (`dataclasses.replace(state, stats=coll.zero_stats())`)."""
        return self._tables.zero_stats()

    @functools.cached_property
    def _state_like(self) -> CollectionState:
        """Shapes and dtypes of every leaf of this collection's state."""
        return jax.eval_shape(lambda: self.init(0))

    def _check_state(self, state, opt_state=None, optimizers=None):
        """Trace-time: `state` (and `opt_state`, {unit: state}) fit this
        collection; ValueError naming the field otherwise."""
        quantized.refuse_outside_lookup(state)
        check_like(self._state_like, state, "state")
        if opt_state is None:
            return
        units = sorted(self._state_like.shards)
        if not isinstance(opt_state, dict) or sorted(opt_state) != units:
            got = sorted(opt_state) if isinstance(opt_state, dict) else type(opt_state).__name__
            raise ValueError(f"opt_state must be a dict over the units {units}, got {got}")
        for unit, o in opt_state.items():
            table = self._state_like.shards[unit].table
            opt = None if optimizers is None else optimizers[unit]
            check_opt_state(table, o, opt, f"opt_state[{unit!r}]")

    def state_shardings(self) -> CollectionState:
        """NamedShardings of every leaf of the state, for jit's in/out_shardings."""
        shards = {
            k: TableShard(t, *split_hash_part(h))
            for k, (t, h) in self._tables.shard_shardings().items()
        }
        repl = NamedSharding(self.mesh, P())
        return CollectionState(shards, repl, self._tables.stats_shardings())

    # ------------------------------------------------------------ batch
    def _inputs(self, batch, weights) -> dict:
        """Each feature's ids (any form `embed` takes, [batch, max_nnz]) as a
        padded `LookupInput`, checked: every feature present, key dtypes,
        widths, one batch size divisible by the devices."""
        if not isinstance(batch, dict):
            raise ValueError(
                f"the batch must be a dict {{feature: ids}}, got {type(batch).__name__}"
            )
        weights = weights or {}
        unknown = sorted(set(batch) - set(self.feature_specs))
        missing = sorted(set(self.feature_specs) - set(batch))
        if unknown or missing:
            raise ValueError(f"the batch has unknown features {unknown} and lacks {missing}")
        bad_w = sorted(set(weights) - set(self.feature_specs))
        if bad_w:
            raise ValueError(f"weights given for unknown features {bad_w}")
        inputs, sizes = {}, set()
        for name, f in self.feature_specs.items():
            inputs[name] = self._input(f, batch[name], weights.get(name))
            sizes.add(inputs[name].ids.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"every feature needs the same batch size, got {sorted(sizes)}")
        size = sizes.pop()
        if size % self.num_devices:
            raise ValueError(
                f"the batch ({size}) must be divisible by the {self.num_devices} devices of "
                f"axis {self.axis_name!r}"
            )
        return inputs

    def _input(self, f: FeatureSpec, ids, weights) -> LookupInput:
        spec = self.table_specs[f.table]
        sequence = spec.combiner is None
        if sequence and weights is not None:
            raise ValueError(
                f"feature {f.name!r}: its table {f.table!r} has combiner None (a sequence "
                "output), which takes no weights"
            )
        where = f"feature {f.name!r}"
        dropped = None
        if isinstance(ids, ids_lib.RaggedIds):
            if ids.slot_num != 1:
                raise ValueError(f"{where}: ragged ids must have slot_num=1, got {ids.slot_num}")
            padded, w, dropped = ids_lib.ragged_to_padded(ids, weights, f.max_nnz)
        else:
            if isinstance(ids, jsparse.BCOO):
                if ids.ndim != 2:
                    raise ValueError(f"{where}: BCOO ids must be [batch, max_nnz], got {ids.shape}")
                bags = ids_lib.to_bags(ids, weights, 1)
            else:
                ids = checks.as_key_array(ids, f"{where}: ids")
                if ids.ndim != 2:
                    raise ValueError(
                        f"{where}: ids must be [batch, max_nnz={f.max_nnz}] (-1 for no key), "
                        f"got shape {tuple(ids.shape)}"
                    )
                bags = ids_lib.to_bags(
                    ids[:, None, :], None if weights is None else jnp.asarray(weights)[:, None, :]
                )
            shape = (*bags.batch_shape, bags.fixed_nnz)
            padded = bags.ids.reshape(shape)
            w = bags.weights.reshape(shape) if bags.weights.shape[0] else None
        if padded.shape[2] > f.max_nnz:
            raise ValueError(
                f"{where}: ids are {padded.shape[2]} wide, more than its max_nnz={f.max_nnz}"
            )
        if jnp.dtype(padded.dtype) != spec.key_dtype:
            raise ValueError(
                f"{where}: ids must have its table's key_dtype {spec.key_dtype}, got {padded.dtype}"
            )
        if sequence and padded.shape[2] < f.max_nnz:  # the output is [batch, max_nnz, D]
            pad = checks.padding_value(padded.dtype)
            extra = f.max_nnz - padded.shape[2]
            padded = jnp.pad(padded, ((0, 0), (0, 0), (0, extra)), constant_values=pad)
        return LookupInput(padded, w, dropped, sequence)

    def _outs(self, outs):
        """The engine's [B, 1, D] pooled outputs as [B, D]."""
        return {
            name: out
            if self.table_specs[self.feature_specs[name].table].combiner is None
            else out.reshape(out.shape[0], out.shape[-1])
            for name, out in outs.items()
        }

    def _shards(self, state: CollectionState, opt_state=None, optimizers=None):
        self._check_state(state, opt_state, optimizers)
        return {
            k: (v.table, join_hash_part(v.slot_keys, v.scores)) for k, v in state.shards.items()
        }

    def _state(self, state, shards, stats=None):
        return CollectionState(
            {k: TableShard(t, *split_hash_part(h)) for k, (t, h) in shards.items()},
            state.seed,
            state.stats if stats is None else stats,
        )

    def _run(self, state, batch, weights, training, sparse, prefetch=None):
        if isinstance(state, quantized.QuantizedCollectionState):  # read-only inference tables
            return quantized.lookup_collection(self, state, batch, weights, training)
        inputs = self._inputs(batch, weights)
        if prefetch is not None:
            prefetch = self._tables.check_prefetch(inputs, self._inputs(prefetch, None))
        outs, shards, stats, ctx = self._tables.run(
            self._shards(state), state.seed, state.stats, inputs, training, sparse, prefetch
        )
        new_state = self._state(state, shards, stats)
        return self._outs(outs), new_state, ctx

    # ------------------------------------------------------------- public
    # As DistributedEmbedding's: compiled once per instance when eager.
    @compiled_when_eager(("training",), checked_state=lambda r: r[1])
    def apply(self, state: CollectionState, batch, weights=None, *, training: bool = True):
        """Looks up every feature: ({feature: [B, D] or [B, max_nnz, D]},
        new_state). Differentiable with respect to the state's tables (the
        dense-compatible path). `training` as in
        `DistributedEmbedding.apply`: True by default (hash tables insert,
        online ones admit, evict and stamp scores); evaluate with
        `training=False`, which only looks up."""
        outs, new_state, _ = self._run(state, batch, weights, training, sparse=False)
        return outs, new_state

    __call__ = apply

    @compiled_when_eager(("training",), checked_state=lambda r: r[2])
    def lookup(
        self, state: CollectionState, batch, weights=None, *, training: bool = True, prefetch=None
    ):
        """The sparse training path: (outs, ctx, new_state); the outputs carry
        no gradient to the tables. Feed their cotangents to `sparse_update`.
        `prefetch`: the next batch (a dict as `batch`, each feature shaped as
        this one's), whose rows the host-cached tables bring in while the
        step runs, as `DistributedEmbedding.lookup`'s."""
        outs, new_state, ctx = self._run(state, batch, weights, training, True, prefetch)
        return outs, ctx, new_state

    def _optimizers(self, optimizer) -> dict:
        out = {}
        for u in self._tables.units:
            own = self.table_specs[u.lookups[0].table].optimizer
            opt = own or optimizer
            if opt is None:
                raise ValueError(
                    f"no sparse optimizer for the tables of unit {u.name!r}: pass one, or set "
                    "TableSpec.optimizer"
                )
            out[u.name] = opt
        return out

    def init_optimizer(self, optimizer, state: CollectionState) -> dict:
        """{unit: the sparse optimizer's state} (a table's own optimizer where
        its TableSpec has one), slots laid out like the unit's table."""
        return self._tables.init_optimizer(self._optimizers(optimizer), self._shards(state))

    def optimizer_shardings(self, opt_state: dict) -> dict:
        return self._tables.optimizer_shardings(opt_state)

    @compiled_when_eager()
    def sparse_grad(self, ctx, d_outs) -> dict:
        """{unit: SparseRowGrad} of the rows the batch touched, reduced on
        their owners (per device, stacked over the axis)."""
        return self._tables.sparse_grad(ctx, self._grads(d_outs))

    def _grads(self, d_outs):
        missing = sorted(set(self.feature_specs) - set(d_outs))
        if missing:
            raise ValueError(f"cotangents missing for features {missing}")
        return {k: d_outs[k] for k in self.feature_specs}

    @compiled_when_eager(("optimizer",))
    def apply_gradients(self, state, optimizer, opt_state, grads):
        """Applies each unit's optimizer to its rows in `grads` (from
        `sparse_grad`), in place. Returns (new_state, new_opt_state)."""
        optimizers = self._optimizers(optimizer)
        shards, opt, stats = self._tables.apply_gradients(
            self._shards(state, opt_state, optimizers), optimizers, opt_state, state.stats, grads
        )
        return self._state(state, shards, stats), opt

    @compiled_when_eager(("optimizer",))
    def sparse_update(self, state, optimizer, opt_state, ctx, d_outs):
        """`sparse_grad` and `apply_gradients` in one pass over the touched
        rows of every table (fused kernels where the optimizer has them).
        Donate `state` and `opt_state` in your step. Returns (new_state,
        new_opt_state)."""
        grads = self._grads(d_outs)
        optimizers = self._optimizers(optimizer)
        shards, opt, stats = self._tables.sparse_update(
            self._shards(state, opt_state, optimizers),
            optimizers,
            opt_state,
            state.stats,
            ctx,
            grads,
        )
        return self._state(state, shards, self._tables.with_nonfinite(stats, grads)), opt

    # ------------------------------------------------------ export/import
    def _strategy(self, table: str):
        if table not in self._unit_of:
            raise ValueError(f"no table {table!r}; the tables are {sorted(self._unit_of)}")
        return self._tables.unit(self._unit_of[table]).rows

    def export_pairs(
        self, state: CollectionState, table: str | None = None, opt_state=None, *, since_step=None
    ):
        """One table's (key, vector) pairs as host numpy arrays, keys
        ascending. Direct mode: every key; hash mode: the keys inserted.
        With `opt_state` (the collection's, {unit: state}) or `since_step`, a
        `TableExport` as `DistributedEmbedding.export_pairs` gives.

        `table=None`: every table's, {table: pairs}, the form `import_pairs`
        takes (`import_pairs(coll.export_pairs(state))` rebuilds the
        state on any plan or mesh; with `opt_state`, pass the optimizer to
        `import_pairs` too)."""
        if table is None:
            return {
                t: self.export_pairs(state, t, opt_state, since_step=since_step)
                for t in self.table_specs
            }
        rows = self._strategy(table)
        unit = self._unit_of[table]
        self._check_state(state, opt_state)
        shard = state.shards[unit]
        logical, opt = self._tables.unit(unit).storage.logical(
            shard.table, None if opt_state is None else opt_state[unit], self.num_devices
        )
        return export_table(
            rows,
            table,
            logical,
            join_hash_part(shard.slot_keys, shard.scores),
            opt,
            since_step,
            self.table_specs[table].key_dtype,
            state.seed,
        )

    def import_pairs(self, pairs: dict, seed=None, *, share: bool = False, optimizer=None):
        """A state holding the given pairs, {table: (keys, vectors) or a
        `TableExport`}, on this collection's mesh and plan, whatever they
        were exported from; other keys keep their seed's initial vectors
        (direct mode). Under several processes every process passes the same
        pairs (checked), or with `share=True` each its own share of them.
        With `optimizer` (or the tables' own) the result is (state,
        opt_state), the exports' slots restored. `seed`: the new state's;
        None: the (first) export's, else 0."""
        state = self.init(resolve_seed(next(iter(pairs.values()), None), seed))
        shards = self._shards(state)
        optimizers = self._optimizers(optimizer) if optimizer is not None else None
        # Every unit's optimizer state (zeros of the tables' shapes), filled
        # with the exports' slots as the tables are imported.
        opt_states = {} if optimizers is None else self._tables.init_optimizer(optimizers, shards)
        # Host-stored units are imported into their logical table (and a
        # plain optimizer state over it), in host memory, then laid out in
        # their tier.
        fresh = dict(shards)
        tiered = [u.name for u in self._tables.units if u.storage.kind != "hbm"]
        for unit in tiered:
            u = self._tables.unit(unit)
            logical, plain = u.storage.fresh_logical(shards[unit][0], opt_states.get(unit))
            shards[unit] = (logical, shards[unit][1])
            if plain is not None:
                opt_states[unit] = plain
        for table, given in pairs.items():
            rows = self._strategy(table)
            unit = self._unit_of[table]
            keys, vectors = (given, None) if isinstance(given, TableExport) else given
            opt = None if optimizers is None else optimizers[unit]
            t, h, o = import_table(
                rows,
                table,
                *shards[unit],
                keys,
                vectors,
                share,
                opt,
                lambda _, unit=unit: opt_states[unit],
            )
            shards[unit] = (t, h)
            if o is not None:
                opt_states[unit] = o
        for unit in tiered:
            opt = None if optimizers is None else optimizers[unit]
            t, o = self._tables.adopt(
                unit, fresh[unit][0], shards[unit][0], opt, opt_states.get(unit)
            )
            shards[unit] = (t, shards[unit][1])
            if o is not None:
                opt_states[unit] = o
        state = self._state(state, shards)
        return state if optimizers is None else (state, opt_states)

    # ---------------------------------------------------------- online hash
    def step(self, state: CollectionState) -> int:
        """The training lookups the online hash tables have seen (0 without)."""
        self._check_state(state)
        return max((host_step(s.scores) for s in state.shards.values()), default=0)

    def evict_stale(self, state: CollectionState, max_age: int) -> CollectionState:
        """`DistributedEmbedding.evict_stale` on every hash table that evicts;
        the result's stats add the rows freed to `evicted`."""
        shards = self._shards(state)
        stats = dict(state.stats)
        units = [u.name for u in self._tables.units if getattr(u.rows, "evicting", False)]
        if not units:
            raise ValueError("evict_stale needs a hash table with eviction ('lru' or 'lfu')")
        for unit in units:
            hash_part, got = evict_stale_shards(self._tables, unit, shards[unit][1], max_age)
            shards[unit] = (shards[unit][0], hash_part)
            stats.update({t: accumulate(stats[t], s) for t, s in got.items()})
        return self._state(state, shards, stats)

    def exchange_sizes(self, batch_size: int) -> dict:
        """Per device and destination, what one lookup exchanges at a global
        batch of `batch_size`: {"key_words": uint32 words of keys,
        "vector_values": float values of vectors} (the sparse update sends
        the vector values again, as float32 cotangents)."""
        local_batch = batch_size // self.num_devices
        buckets = self._tables.bucket_sizes(local_batch)
        words = values = 0
        for u in self._tables.units:
            if exchange.is_local(u, self._tables.capacity(u, local_batch), local_batch):
                continue
            key_bytes = u.rows.send_format()[0].itemsize
            words += buckets[u.name] * max(key_bytes // 4, 1)
            values += buckets[u.name] * u.rows.dim
        return {"key_words": words, "vector_values": values}

    @compiled_when_eager()
    def required_capacity_factor(self, batch) -> dict:
        """{unit: the smallest capacity_factor under which this batch
        overflows nowhere in that unit} (row-wise: the most distinct keys any
        device sends one destination, times n, over its local key positions;
        a column: over its largest member's positions)."""
        inputs = self._inputs(batch, None)
        n = self.num_devices
        local_batch = next(iter(inputs.values())).ids.shape[0] // n
        out = {}
        for name, largest in self._tables.largest_buckets(inputs).items():
            u = self._tables.unit(name)
            per_member = {}
            for spec in u.lookups:
                per_member[spec.member] = per_member.get(spec.member, 0) + spec.ids_per_sample
            if u.rows.placement == "table":
                full = local_batch * max(per_member.values())
                out[name] = largest.astype(jnp.float32) / max(full, 1)
            else:
                full = local_batch * sum(per_member.values())
                out[name] = largest.astype(jnp.float32) * n / max(full, 1)
        return out


__all__ = [
    "CollectionState",
    "EmbeddingCollection",
    "EmbeddingStats",
    "FeatureSpec",
    "TableShard",
    "TableSpec",
]
