"""`DistributedEmbedding`: SOK's one table shared by all slots, sharded over
a mesh axis. It checks its arguments, builds the state, wraps the per-device
data path (`exchange.py`) in `shard_map`, and offers SOK's and sok_jax's
public methods; the row strategy (`rows.py`, direct or hash) is chosen once,
here, at construction.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax import ids as ids_lib
from sok_jax import initializers
from sok_jax.distributed import quantized
from sok_jax.distributed.eager import compiled_when_eager
from sok_jax.distributed.exchange import LookupSpec, Unit
from sok_jax.distributed.host import to_host
from sok_jax.distributed.online import (
    evict_stale_shards,
    export_table,
    host_step,
    import_table,
    join_hash_part,
    resolve_seed,
    split_hash_part,
)
from sok_jax.distributed.owners import check_key_placement
from sok_jax.distributed.rows import Member, RowHashRows, RowRows
from sok_jax.distributed.scores import make_options
from sok_jax.distributed.state import (
    EmbeddingState,
    EmbeddingStats,
    accumulate,
    check_like,
    check_opt_state,
)
from sok_jax.distributed.storage import make_storage
from sok_jax.distributed.tables import LookupInput, ShardedTables, mesh_and_axis
from sok_jax.ops import checks, embed_ops, resolve
from sok_jax.ops.embed_ops import SparseRowGrad

# The one table and the one lookup (slot_num slots) of the layer.
_TABLE, _IDS = "table", "ids"


class DistributedEmbedding:
    """SOK's `DistributedEmbedding` over one axis of a `jax.sharding.Mesh`.

    Args (SOK's names):
      combiner: "sum", "mean" or "sqrtn".
      max_vocabulary_size_per_gpu: rows of each device's shard.
      embedding_vec_size: D.
      slot_num: fields per sample.
      max_nnz: most keys in one (sample, slot).
      max_feature_num: most valid keys in one sample (default
        slot_num * max_nnz); sizes the exchange buffers.
      use_hashtable: True (SOK's default): arbitrary keys, mapped to rows
        by a per-shard hash table with dynamic insertion (see
        `sok_jax.ops.hash_ops`); False: direct mode, key k is row k of the
        logical table (keys in [0, n * max_vocabulary_size_per_gpu)).
      key_dtype: int32, uint32 or int64 (int64 needs jax_enable_x64). The
        default (None), as SOK's: int64 where jax_enable_x64 is on when the
        layer is built, int32 otherwise.
      embedding_initializer: a name ("random_uniform", "zeros", ...) or a
        callable `init(key, (D,), dtype)`, applied per key.
    Keyword-only:
      mesh: the mesh (default: a 1-D mesh over all devices).
      axis_name: the mesh axis the table and the batch are sharded over.
      capacity_factor: None (safe: every destination can take every local
        key) or c > 0: each destination bucket holds
        ceil(c * max_feature_num * local_batch / n) keys.
      dtype: table storage dtype (float32, bfloat16, float16).
      check: check what every call counts (the counters accumulate in
        `state.stats` either way): an eager call that dropped ids raises `sok_jax.EmbeddingError` (its
        `.state` is the valid new state); inside jit nothing may raise (the
        donated state would be lost), so a call warns
        (`sok_jax.EmbeddingWarning`): call `sok_jax.check_stats(state)` on
        the step's result to raise there.
      implementation: "ffi" (the custom calls) or "reference" (pure JAX
        everywhere, the hash table included).
      eviction: hash mode: None (a new key that finds its shard full gets
        no row), "lru" or "lfu": it replaces the least recently / least
        often seen row of its bucket (see `sok_jax.distributed.scores`).
      admit_after: hash mode: a new key becomes a row only in the k-th
        training lookup that sees it (None: at once).
      hash_options: a `HashOptions` for the rest (sketch size, eviction log,
        scores without eviction); `eviction` and `admit_after` override it.
      storage: where the rows and their optimizer slots live: "hbm" (the
        default), "host" (pinned host memory, read and updated over the host
        link) or "host_cached" (a host store behind an HBM cache of
        `cache_rows` rows per device, kept by `cache_policy` "lru" or
        "lfu"; `cache_overlap_moves=True` writes the leaving rows back on a
        side stream while the missing ones are read in: the same values,
        both directions of the host link at once, not yet measured on a
        GPU); see `sok_jax.distributed.storage`. A host table trains
        through `lookup` + `sparse_update` (or `sparse_grad` +
        `apply_gradients`), not through `jax.grad` of `apply`.
      key_placement: hash mode: the device that owns key k: "mod" (SOK's,
        k % n) or "hashed" (mix(k) % n, `sok_jax.distributed.key_owner`),
        which spreads keys with a common stride (e.g. all multiples of n)
        that "mod" piles onto one device's shard. Direct mode takes "mod"
        only.
    """

    def __init__(
        self,
        combiner: str = "mean",
        max_vocabulary_size_per_gpu: int = 1024,
        embedding_vec_size: int = 16,
        slot_num: int = 1,
        max_nnz: int = 1,
        max_feature_num: int | None = None,
        use_hashtable: bool = True,
        key_dtype=None,
        embedding_initializer="random_uniform",
        *,
        mesh: Mesh | None = None,
        axis_name: str | None = None,
        capacity_factor: float | None = None,
        dtype=jnp.float32,
        check: bool = False,
        implementation: str = "ffi",
        eviction: str | None = None,
        admit_after: int | None = None,
        hash_options=None,
        storage: str = "hbm",
        cache_rows: int | None = None,
        cache_policy: str = "lru",
        cache_overlap_moves: bool = False,
        key_placement: str = "mod",
    ):
        embed_ops.combiner_code(combiner)
        online = make_options(eviction, admit_after, hash_options, bool(use_hashtable))
        self.key_placement = check_key_placement(key_placement, bool(use_hashtable))
        for name, v in (
            ("max_vocabulary_size_per_gpu", max_vocabulary_size_per_gpu),
            ("embedding_vec_size", embedding_vec_size),
            ("slot_num", slot_num),
            ("max_nnz", max_nnz),
        ):
            checks.positive_int(name, v)
        if max_feature_num is not None:
            checks.positive_int("max_feature_num", max_feature_num)
        mesh, axis_name = mesh_and_axis(mesh, axis_name, capacity_factor)
        ops = resolve(implementation)
        self.combiner = combiner
        self.max_vocabulary_size_per_gpu = int(max_vocabulary_size_per_gpu)
        self.embedding_vec_size = int(embedding_vec_size)
        self.slot_num = int(slot_num)
        self.max_nnz = int(max_nnz)
        self.max_feature_num = int(max_feature_num or slot_num * max_nnz)
        self.use_hashtable = bool(use_hashtable)
        if key_dtype is None:
            key_dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        self.key_dtype = jnp.dtype(checks.check_key_dtype(key_dtype, "key_dtype"))
        self.initializer = initializers.resolve(embedding_initializer)
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_devices = int(mesh.shape[axis_name])
        self.capacity_factor = capacity_factor
        self.dtype = jnp.dtype(dtype)
        self.check = check
        self.implementation = implementation
        if self.max_vocabulary_size_per_gpu * self.num_devices >= checks.MAX_ROWS:
            raise ValueError(
                "max_vocabulary_size_per_gpu * devices must stay below 2^31 - 1 rows "
                f"(got {self.max_vocabulary_size_per_gpu} * {self.num_devices})"
            )
        strategy = (RowHashRows if self.use_hashtable else RowRows)(
            mesh=mesh,
            axis_name=axis_name,
            rows_per_device=self.max_vocabulary_size_per_gpu,
            dim=self.embedding_vec_size,
            dtype=self.dtype,
            initializer=self.initializer,
            members=(Member(_TABLE, self.num_rows),),
            key_dtype=self.key_dtype,
            ops=ops,
            online=online,
            key_placement=self.key_placement,
        )
        self.online = online
        self._rows = strategy
        self.storage = make_storage(storage, cache_rows, cache_policy, cache_overlap_moves)
        self.storage.check_strategy(strategy, implementation)
        lookup = LookupSpec(_IDS, _TABLE, 0, combiner, False, self.max_feature_num)
        self._tables = ShardedTables(
            (Unit(_TABLE, strategy, (lookup,), self.storage),),
            mesh,
            axis_name,
            implementation,
            capacity_factor,
            check,
        )

    # ------------------------------------------------------------------ state
    @property
    def table_sharding(self) -> NamedSharding:
        """The table's rows (and every [rows, D] optimizer slot) over the axis."""
        return self._rows.table_sharding

    @property
    def batch_sharding(self) -> NamedSharding:
        """The batch (and every per-device vector) over the axis."""
        return self._rows.row_sharding

    @property
    def num_rows(self) -> int:
        return self.num_devices * self.max_vocabulary_size_per_gpu

    def state_shardings(self) -> EmbeddingState:
        """NamedShardings of every leaf of the state, for jit's in/out_shardings."""
        repl = NamedSharding(self.mesh, P())
        table, hash_part = self._tables.shard_shardings()[_TABLE]
        slot_keys, scores = split_hash_part(hash_part)
        return EmbeddingState(
            table=table,
            slot_keys=slot_keys,
            seed=repl,
            stats=self._tables.stats_shardings()[_TABLE],
            scores=scores,
        )

    def init(self, seed) -> EmbeddingState:
        """Creates the sharded state. The same seed gives every key the same
        initial vector on any number of devices."""
        key_data = self._tables.seed_data(seed)
        table, hash_part = self._tables.init_shards(key_data)[_TABLE]
        slot_keys, scores = split_hash_part(hash_part)
        return EmbeddingState(table, slot_keys, key_data, self.zero_stats(), scores)

    def zero_stats(self) -> EmbeddingStats:
        """The counters of a fresh state (every field this layer reports,
        zeros, sharded over the axis): to reset the counters, which
        accumulate from `init` (`dataclasses.replace(state,
        stats=layer.zero_stats())`), or for a state built by hand, e.g. a
        table initialized by the user's own program."""
        return self._tables.zero_stats()[_TABLE]

    @functools.cached_property
    def _state_like(self) -> EmbeddingState:
        """Shapes and dtypes of every leaf of this layer's state."""
        return jax.eval_shape(lambda: self.init(0))

    def _check_state(self, state, opt_state=None, optimizer=None):
        """Trace-time: `state` (and `opt_state`) fit this layer; ValueError
        naming the field otherwise."""
        quantized.refuse_outside_lookup(state)
        check_like(self._state_like, state, "state")
        if opt_state is not None:
            check_opt_state(self._state_like.table, opt_state, optimizer, "opt_state")

    # ------------------------------------------------------------- the batch
    def _capacity(self, local_batch: int) -> int:
        """The exchange bucket size for a device's batch of `local_batch`
        samples (before clamping to the rows a destination holds)."""
        return self._tables.capacity(self._tables.units[0], local_batch)

    def _check_ids(self, ids, weights) -> ids_lib.Bags:
        """The batch as padded bags (its one conversion), checked against the
        layer: [batch, slot_num, max_nnz or fewer] of key_dtype, the batch
        divisible by the devices."""
        if isinstance(ids, ids_lib.RaggedIds):
            raise ValueError(
                "DistributedEmbedding takes padded ids [batch, slot_num, max_nnz] or a BCOO; "
                "convert ragged ids to padded ones first (EmbeddingCollection takes ragged ids)"
            )
        bags = ids_lib.to_bags(ids, weights, self.slot_num)
        shape = (*bags.batch_shape, bags.fixed_nnz)
        if shape[1] != self.slot_num or not 1 <= shape[2] <= self.max_nnz:
            raise ValueError(
                f"ids must be [batch, slot_num={self.slot_num}, max_nnz<={self.max_nnz}], "
                f"got shape {shape}"
            )
        if jnp.dtype(bags.ids.dtype) != self.key_dtype:
            raise ValueError(f"ids must have key_dtype {self.key_dtype}, got {bags.ids.dtype}")
        if shape[0] % self.num_devices:
            raise ValueError(
                f"the batch ({shape[0]}) must be divisible by the {self.num_devices} "
                f"devices of axis {self.axis_name!r}"
            )
        return bags

    def _inputs(self, ids, weights) -> dict:
        bags = self._check_ids(ids, weights)
        shape = (*bags.batch_shape, bags.fixed_nnz)
        w = bags.weights.reshape(shape) if bags.weights.shape[0] else None
        return {_IDS: LookupInput(bags.ids.reshape(shape), w, None)}

    def _shards(self, state: EmbeddingState, opt_state=None, optimizer=None):
        self._check_state(state, opt_state, optimizer)
        return {_TABLE: (state.table, join_hash_part(state.slot_keys, state.scores))}

    def _run(self, state: EmbeddingState, ids, weights, training: bool, sparse: bool, prefetch=None):
        if isinstance(state, quantized.QuantizedState):  # a read-only inference table
            return quantized.lookup(self, state, ids, weights, training)
        inputs = self._inputs(ids, weights)
        if prefetch is not None:
            prefetch = self._tables.check_prefetch(inputs, self._inputs(prefetch, None))
        outs, shards, stats, ctx = self._tables.run(
            self._shards(state), state.seed, {_TABLE: state.stats}, inputs, training, sparse, prefetch
        )
        table, hash_part = shards[_TABLE]
        slot_keys, scores = split_hash_part(hash_part)
        new_state = EmbeddingState(table, slot_keys, state.seed, stats[_TABLE], scores)
        return outs[_IDS], new_state, ctx

    # ------------------------------------------------------------- public API
    # Every method that runs a shard_map is compiled once per instance when
    # called eagerly (`eager.py`); the checked ones raise there on `check`.
    @compiled_when_eager(("training",), checked_state=lambda r: r[1])
    def apply(self, state: EmbeddingState, ids, weights=None, *, training: bool = True):
        """Looks up a batch sharded over the axis: (out [B, S, D], new_state).

        Differentiable with respect to `state.table` (the dense-compatible
        path: `jax.grad` gives the sharded [n*rows, D] cotangent).

        `training` is True by default, here, in `lookup`, in
        `EmbeddingCollection` and in the Flax and Haiku modules, as in SOK
        (its layer inserts when called in training): in hash mode a training
        lookup inserts unseen keys and, on an online table, admits, evicts
        and stamps scores. Evaluate with `training=False`: it only looks up
        (an unseen key gives zeros) and leaves the table as it was. Direct
        mode computes the same either way."""
        out, new_state, _ = self._run(state, ids, weights, training, sparse=False)
        return out, new_state

    __call__ = apply

    @compiled_when_eager(("training",), checked_state=lambda r: r[2])
    def lookup(
        self, state: EmbeddingState, ids, weights=None, *, training: bool = True, prefetch=None
    ):
        """The sparse training path: (out, ctx, new_state); `out` carries no
        gradient to the table. Feed the cotangent of `out` to
        `sparse_grad(ctx, d_out)` or `sparse_update`. `training` as in
        `apply`.

        `prefetch` (storage="host_cached" only): the next batch's ids, shaped
        as `ids`. After the lookup, that batch's rows are brought into the
        cache in slots this batch does not use, on a GPU while the rest of
        the step runs (what uses `out`, the update); its own lookup then
        finds them there. It changes no result, only the time: a row it
        missed (a hash key not yet inserted, ids other than the next batch's)
        is brought in by its lookup as usual. Pass the new state on (to the
        update, the next lookup): the moves write into it until the next
        lookup waits for them (`export_pairs`, `logical_rows` and
        `checkpoint.save` wait too; `jax.block_until_ready` does not). The
        cache must hold both batches' key positions on a device."""
        out, new_state, ctx = self._run(state, ids, weights, training, True, prefetch)
        return out, ctx, new_state

    @compiled_when_eager()
    def sparse_grad(self, ctx, d_out) -> SparseRowGrad:
        """Per-device row gradients (stacked over the axis: rows [n*cap],
        grads [n*cap, D], count [n]) for the rows the batch touched, reduced
        on their owners. Never builds a [rows, D] array. A table that evicts
        gives a `HashRowGrad`, which also carries the keys its lookup found
        (`apply_gradients` skips the rows a later lookup gave away)."""
        return self._tables.sparse_grad(ctx, {_IDS: d_out})[_TABLE]

    @compiled_when_eager()
    def required_capacity_factor(self, ids) -> jax.Array:
        """The smallest `capacity_factor` under which this batch overflows
        nowhere: the most distinct keys any device sends to one destination
        (its own slice included), times n, over the local key positions
        (`max_feature_num` x local batch). A float32 scalar; jit-able.

        Measure it on a few real batches and build the layer with a margin
        above it (a tight factor shrinks every exchange buffer; see
        benchmarks/RESULTS.md). A factor of 1.0 or more can still overflow
        for skewed batches; `capacity_factor=None` never does."""
        inputs = self._inputs(ids, None)
        n = self.num_devices
        full = self.max_feature_num * (inputs[_IDS].ids.shape[0] // n)
        largest = self._tables.largest_buckets(inputs)[_TABLE]
        return largest.astype(jnp.float32) * n / max(full, 1)

    # ------------------------------------------------------------- optimizers
    def init_optimizer(self, optimizer, state: EmbeddingState):
        """The sparse optimizer's state, its slots sharded like the table.

        Each slot comes from a program of its own, so that every slot owns
        its buffer (a step donates them all)."""
        return self._tables.init_optimizer({_TABLE: optimizer}, self._shards(state))[_TABLE]

    def optimizer_shardings(self, opt_state):
        """NamedShardings of a sparse optimizer state (slots like the table)."""
        return self._tables.optimizer_shardings({_TABLE: opt_state})[_TABLE]

    def _updated(self, state, shards, stats):
        table, hash_part = shards[_TABLE]
        slot_keys, scores = split_hash_part(hash_part)
        return EmbeddingState(table, slot_keys, state.seed, stats[_TABLE], scores)

    @compiled_when_eager(("optimizer",))
    def apply_gradients(self, state: EmbeddingState, optimizer, opt_state, grad: SparseRowGrad):
        """Applies `optimizer` to the rows in `grad` (from `sparse_grad`) on
        each owner, in place (donate `state` and `opt_state` in your step).
        A table that evicts skips the rows a lookup after `grad`'s gave to
        other keys (`stats.stale`). Returns (new_state, new_opt_state)."""
        shards, opt, stats = self._tables.apply_gradients(
            self._shards(state, opt_state, optimizer),
            {_TABLE: optimizer},
            {_TABLE: opt_state},
            {_TABLE: state.stats},
            {_TABLE: grad},
        )
        return self._updated(state, shards, stats), opt[_TABLE]

    @compiled_when_eager(("optimizer",))
    def sparse_update(self, state: EmbeddingState, optimizer, opt_state, ctx, d_out):
        """`sparse_grad` and `apply_gradients` in one pass over the touched
        rows: each owner sums its rows' gradients and applies `optimizer` to
        them in place (`optimizer.update_bags`: for sgd, adagrad,
        rowwise_adagrad, adam and ftrl one fused kernel that never writes the
        [N, D] row gradient).
        The same function as
        `apply_gradients(state, optimizer, opt_state, sparse_grad(ctx, d_out))`;
        use that form to transform the row gradients first (e.g. clipping).
        A table that evicts skips the rows that a lookup after `ctx`'s gave
        to other keys, counted in `stats.stale` (call it right after its
        lookup). Donate `state` and `opt_state` in your step. Returns
        (new_state, new_opt_state)."""
        shards, opt, stats = self._tables.sparse_update(
            self._shards(state, opt_state, optimizer),
            {_TABLE: optimizer},
            {_TABLE: opt_state},
            {_TABLE: state.stats},
            ctx,
            {_IDS: d_out},
        )
        stats = self._tables.with_nonfinite(stats, {_IDS: d_out})
        return self._updated(state, shards, stats), opt[_TABLE]

    # ------------------------------------------------------- export / import
    def export_pairs(self, state: EmbeddingState, opt_state=None, *, since_step=None):
        """All (key, vector) pairs of a state as host numpy arrays, keys
        ascending (SOK's dump). Direct mode: every key of the table; hash
        mode: the keys inserted so far.

        With `opt_state` (this layer's sparse optimizer state) or
        `since_step`, a `TableExport` instead: also each key's optimizer
        slots, its scores, the step and the admission sketches (online hash
        tables), everything `import_pairs` needs to continue the run on any
        device count. `since_step=t` keeps only the rows inserted or updated
        after step t (a training lookup at step s stamps the rows it sees
        with s, `step(state)` is the last one) and lists the keys evicted
        since then that hold no row now (the deltas a serving copy needs
        after an export at step t); it needs scores.

        Raises:
          ValueError: `since_step` on a table without scores, or before the
            oldest step the eviction log still covers.
        """
        self._check_state(state, opt_state)
        table, opt_state = self.storage.logical(state.table, opt_state, self.num_devices)
        return export_table(
            self._rows,
            _TABLE,
            table,
            join_hash_part(state.slot_keys, state.scores),
            opt_state,
            since_step,
            self.key_dtype,
            state.seed,
        )

    def import_pairs(
        self, keys, vectors=None, seed=None, *, share: bool = False, optimizer=None
    ) -> EmbeddingState:
        """A state on this layer's mesh holding the given (key, vector) pairs
        (SOK's load), whatever device count they were exported from. Direct
        mode: keys absent from `keys` keep their seed's initial vectors.
        Under several processes every process passes the same pairs
        (checked), or with `share=True` each its own share of them.

        `keys` may be a `TableExport` (from `export_pairs(state, opt_state)`):
        its scores, step and sketches are restored too, and with `optimizer`
        its slots: the result is then (state, opt_state), and training goes
        on as it would have where it was exported. `seed`: that of the new
        state (new keys' initial vectors); None: the export's, else 0.
        Growing a hash table is an import into a layer with more rows per
        device.

        Raises:
          ValueError: shapes disagree, keys repeat, a key is out of range
            (direct mode), a shard (with eviction: a bucket) cannot hold its
            keys (hash mode), the export has slots but no optimizer is
            given, or the processes passed different pairs.
        """
        state = self.init(resolve_seed(keys, seed))
        fresh_opt = None if optimizer is None else self.init_optimizer(optimizer, state)
        logical, plain_opt = self.storage.fresh_logical(state.table, fresh_opt)
        table, hash_part, opt_state = import_table(
            self._rows,
            _TABLE,
            logical,
            join_hash_part(state.slot_keys, state.scores),
            keys,
            vectors,
            share,
            optimizer,
            lambda _: plain_opt,
        )
        table, opt_state = self._tables.adopt(_TABLE, state.table, table, optimizer, opt_state)
        slot_keys, scores = split_hash_part(hash_part)
        state = dataclasses.replace(state, table=table, slot_keys=slot_keys, scores=scores)
        return state if optimizer is None else (state, opt_state)

    # ---------------------------------------------------------- online hash
    def step(self, state: EmbeddingState) -> int:
        """The training lookups an online hash table's state has seen (the
        step of its last one; 0 before any)."""
        self._check_state(state)
        return host_step(state.scores)

    def evict_stale(self, state: EmbeddingState, max_age: int) -> EmbeddingState:
        """Frees every row that no training lookup saw in the last `max_age`
        steps (an online hash table with eviction), logging its key for the
        deltas; `stats.evicted` of the result adds them per shard. Their
        vectors and slots are reset when a new key takes the row."""
        self._check_state(state)
        hash_part, stats = evict_stale_shards(
            self._tables, _TABLE, join_hash_part(state.slot_keys, state.scores), max_age
        )
        slot_keys, scores = split_hash_part(hash_part)
        stats = accumulate(state.stats, stats[_TABLE])
        return dataclasses.replace(state, slot_keys=slot_keys, scores=scores, stats=stats)

    # ----------------------------------------------------------- inspection
    def logical_rows(self, state: EmbeddingState, keys):
        """Direct mode: the vectors of the given global keys (host helper for
        tests and export)."""
        if self.use_hashtable:
            raise ValueError("logical_rows is for direct mode; use export_pairs in hash mode")
        self._check_state(state)
        keys = checks.host_keys(keys, self.key_dtype, "logical_rows: keys", padding_ok=False)
        self._rows._check_direct_keys(keys, self._rows.member)
        table, _ = self.storage.logical(state.table, None, self.num_devices)
        return to_host(table)[self._rows.global_rows(keys)]
