"""`DistributedEmbedding`: SOK's one table shared by all slots, sharded over
a mesh axis. It checks its arguments, builds the state, wraps the per-device
data path (`exchange.py`) in `shard_map`, and offers SOK's and sok_jax's
public methods; the row strategy (`rows.py`, direct or hash) is chosen once,
here, at construction.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax import ids as ids_lib
from sok_jax import initializers
from sok_jax._compat import shard_map
from sok_jax.distributed.exchange import DeviceLookup, Exchange
from sok_jax.distributed.rows import DirectRows, HashRows
from sok_jax.distributed.state import EmbeddingState, EmbeddingStats, raise_on_stats
from sok_jax.ops import checks, embed_ops, resolve
from sok_jax.ops.embed_ops import SparseRowGrad


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
      use_hashtable: map arbitrary keys to rows through a per-shard hash
        table with dynamic insertion (see `sok_jax.ops.hash_ops`).
      key_dtype: int32, uint32 or int64 (int64 needs jax_enable_x64).
      embedding_initializer: a name ("random_uniform", "zeros", ...) or a
        callable `init(key, (D,), dtype)`, applied per key.
    Keyword-only:
      mesh: the mesh (default: a 1-D mesh over all devices).
      axis_name: the mesh axis the table and the batch are sharded over.
      capacity_factor: None (safe: every destination can take every local
        key) or c > 0: each destination bucket holds
        ceil(c * max_feature_num * local_batch / n) keys.
      dtype: table storage dtype (float32, bfloat16, float16).
      check: raise at run time when a call overflowed a bucket, met invalid
        ids or a full hash shard (the counts are in `state.stats` either way).
      implementation: "ffi" (the custom calls) or "reference" (pure JAX
        everywhere, the hash table included).
    """

    def __init__(
        self,
        combiner: str = "mean",
        max_vocabulary_size_per_gpu: int = 1024,
        embedding_vec_size: int = 16,
        slot_num: int = 1,
        max_nnz: int = 1,
        max_feature_num: int | None = None,
        use_hashtable: bool = False,
        key_dtype=jnp.int32,
        embedding_initializer="random_uniform",
        *,
        mesh: Mesh | None = None,
        axis_name: str | None = None,
        capacity_factor: float | None = None,
        dtype=jnp.float32,
        check: bool = False,
        implementation: str = "ffi",
    ):
        embed_ops.combiner_code(combiner)
        for name, v in (
            ("max_vocabulary_size_per_gpu", max_vocabulary_size_per_gpu),
            ("embedding_vec_size", embedding_vec_size),
            ("slot_num", slot_num),
            ("max_nnz", max_nnz),
        ):
            if int(v) <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if mesh is None:
            mesh = Mesh(np.array(jax.devices()), ("sok",))
        if axis_name is None:
            axis_name = mesh.axis_names[0]
        if axis_name not in mesh.axis_names:
            raise ValueError(
                f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}"
            )
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        ops = resolve(implementation)
        self.combiner = combiner
        self.max_vocabulary_size_per_gpu = int(max_vocabulary_size_per_gpu)
        self.embedding_vec_size = int(embedding_vec_size)
        self.slot_num = int(slot_num)
        self.max_nnz = int(max_nnz)
        self.max_feature_num = int(max_feature_num or slot_num * max_nnz)
        self.use_hashtable = bool(use_hashtable)
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
        shards = dict(
            mesh=mesh,
            axis_name=axis_name,
            num_devices=self.num_devices,
            rows_per_device=self.max_vocabulary_size_per_gpu,
            dim=self.embedding_vec_size,
            dtype=self.dtype,
            initializer=self.initializer,
        )
        if self.use_hashtable:
            self._rows = HashRows(**shards, key_dtype=self.key_dtype, ops=ops)
        else:
            self._rows = DirectRows(**shards)
        self._exchange = Exchange(self._rows, axis_name, combiner, implementation, self.key_dtype)

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
        row = self.batch_sharding
        return EmbeddingState(
            table=self.table_sharding,
            slot_keys=row if self.use_hashtable else None,
            seed=repl,
            stats=EmbeddingStats(row, row, row),
        )

    def optimizer_shardings(self, opt_state):
        """NamedShardings of a sparse optimizer state (slots like the table)."""
        specs = self._slot_specs(opt_state)
        return type(opt_state)(
            tuple(NamedSharding(self.mesh, s) for s in specs), NamedSharding(self.mesh, P())
        )

    def init(self, seed) -> EmbeddingState:
        """Creates the sharded state. The same seed gives every key the same
        initial vector on any number of devices."""
        key_data = jax.random.key_data(initializers.as_key(seed))
        axis = self.axis_name

        def shard_init(key_data):
            return self._rows.init_shard(key_data, jax.lax.axis_index(axis))

        fn = shard_map(shard_init, self.mesh, (P(),), (P(axis, None), P(axis)))
        table, slot_keys = jax.jit(fn)(key_data)
        # Three distinct buffers: a donated state must not hold one twice.
        n = self.num_devices
        counters = [
            jax.device_put(jnp.zeros((n,), jnp.int32), self.batch_sharding) for _ in range(3)
        ]
        return EmbeddingState(table, slot_keys, key_data, EmbeddingStats(*counters))

    # ------------------------------------------------------------- the batch
    def _capacity(self, local_batch: int) -> int:
        full = self.max_feature_num * local_batch
        if self.capacity_factor is None:
            return max(full, 1)
        c = math.ceil(self.capacity_factor * full / self.num_devices)
        return int(min(max(c, 1), full))

    def _local(self, local_batch: int) -> bool:
        """One device in direct mode with a capacity that holds the whole
        batch: nothing to exchange (`Exchange.local_forward`). A capacity
        below the batch keeps the exchange path, so that its overflow counts
        stay the same."""
        return (
            self.num_devices == 1
            and not self.use_hashtable
            and self._capacity(local_batch) >= self.max_feature_num * local_batch
        )

    def _check_ids(self, ids, weights) -> ids_lib.Bags:
        """The batch as padded bags (its one conversion), checked against the
        layer: [batch, slot_num, max_nnz or fewer] of key_dtype, the batch
        divisible by the devices."""
        if isinstance(ids, ids_lib.RaggedIds):
            raise ValueError(
                "DistributedEmbedding takes padded ids [batch, slot_num, max_nnz] or a BCOO; "
                "convert ragged ids to padded ones first"
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

    def _device_bags(self, ids, weights) -> ids_lib.Bags:
        """Inside shard_map: this device's slice [b, S, nnz] of the padded
        batch (and its weights, or None) as bags."""
        flat_w = None if weights is None else weights.reshape(-1)
        return ids_lib.Bags.padded(ids.reshape(-1), flat_w, ids.shape[:2], ids.shape[2])

    def _run(self, state: EmbeddingState, ids, weights, training: bool, sparse: bool):
        bags = self._check_ids(ids, weights)
        shape = (*bags.batch_shape, bags.fixed_nnz)
        padded = bags.ids.reshape(shape)
        padded_w = bags.weights.reshape(shape) if bags.weights.shape[0] else None
        axis = self.axis_name

        def body(table, slot_keys, seed, ids, weights):
            dev_bags = self._device_bags(ids, weights)
            local_batch = ids.shape[0]
            if self._local(local_batch):
                res = self._exchange.local_forward(table, dev_bags, sparse)
            else:
                capacity = self._capacity(local_batch)
                res = self._exchange.forward(
                    table, slot_keys, seed, dev_bags, capacity, training, sparse
                )
            if self.check:
                # Every device raises on the same (gathered) counts: a check
                # that failed on one device only would leave the others
                # waiting in a collective.
                s = res.stats
                gathered = [
                    jax.lax.all_gather(c, axis, tiled=True)
                    for c in (s.overflow, s.invalid, s.hash_full)
                ]
                jax.debug.callback(raise_on_stats, *gathered)
            return res

        row, mat = P(axis), P(axis, None)
        # `row` is a prefix of the stats and the context: every array in them
        # is per device.
        out_specs = DeviceLookup(out=row, table=mat, slot_keys=row, stats=row, ctx=row)
        fn = shard_map(body, self.mesh, (mat, row, P(), row, row), out_specs)
        res = fn(state.table, state.slot_keys, state.seed, padded, padded_w)
        new_state = EmbeddingState(
            table=state.table if res.table is None else res.table,
            slot_keys=state.slot_keys if res.slot_keys is None else res.slot_keys,
            seed=state.seed,
            stats=res.stats,
        )
        return res.out, new_state, res.ctx

    # ------------------------------------------------------------- public API
    def apply(self, state: EmbeddingState, ids, weights=None, *, training: bool = True):
        """Looks up a batch sharded over the axis: (out [B, S, D], new_state).

        Differentiable with respect to `state.table` (the dense-compatible
        path: `jax.grad` gives the sharded [n*rows, D] cotangent). In hash
        mode `training=True` inserts unseen keys; False only looks up (an
        unseen key gives zeros)."""
        out, new_state, _ = self._run(state, ids, weights, training, sparse=False)
        return out, new_state

    __call__ = apply

    def lookup(self, state: EmbeddingState, ids, weights=None, *, training: bool = True):
        """The sparse training path: (out, ctx, new_state); `out` carries no
        gradient to the table. Feed the cotangent of `out` to
        `sparse_grad(ctx, d_out)` or `sparse_update`."""
        out, new_state, ctx = self._run(state, ids, weights, training, sparse=True)
        return out, ctx, new_state

    def sparse_grad(self, ctx, d_out) -> SparseRowGrad:
        """Per-device row gradients (stacked over the axis: rows [n*cap],
        grads [n*cap, D], count [n]) for the rows the batch touched, reduced
        on their owners. Never builds a [rows, D] array."""
        ops = resolve(self.implementation)
        rows = self.max_vocabulary_size_per_gpu

        def body(ctx, g):
            r = ops.lookup_combine_bwd(*self._exchange.owner_bags(ctx, g), rows)
            return r.rows, r.grads, r.count

        row = P(self.axis_name)
        fn = shard_map(body, self.mesh, (row, row), (row, P(self.axis_name, None), row))
        return SparseRowGrad(*fn(ctx, d_out))

    def required_capacity_factor(self, ids) -> jax.Array:
        """The smallest `capacity_factor` under which this batch overflows
        nowhere: the most distinct keys any device sends to one destination
        (its own slice included), times n, over the local key positions
        (`max_feature_num` x local batch). A float32 scalar; jit-able.

        Measure it on a few real batches and build the layer with a margin
        above it (a tight factor shrinks every exchange buffer; see
        benchmarks/RESULTS.md). A factor of 1.0 or more can still overflow
        for skewed batches; `capacity_factor=None` never does."""
        bags = self._check_ids(ids, None)
        shape = (*bags.batch_shape, bags.fixed_nnz)
        n, axis = self.num_devices, self.axis_name
        full = self.max_feature_num * (shape[0] // n)

        def body(ids):
            plan = self._exchange.plan(ids.reshape(-1), self._capacity(ids.shape[0]))
            return jax.lax.pmax(plan.largest_bucket, axis).reshape(1)

        largest = shard_map(body, self.mesh, (P(axis),), P(axis))(bags.ids.reshape(shape))[0]
        return largest.astype(jnp.float32) * n / max(full, 1)

    # ------------------------------------------------------------- optimizers
    def _slot_specs(self, opt_state):
        axis = self.axis_name
        return tuple(P(axis) if s.ndim == 1 else P(axis, None) for s in opt_state.slots)

    def init_optimizer(self, optimizer, state: EmbeddingState):
        """The sparse optimizer's state, its slots sharded like the table.

        Each slot comes from a program of its own, so that every slot owns
        its buffer (a step donates them all)."""
        axis = self.axis_name
        probe = jax.eval_shape(
            optimizer.init, jax.ShapeDtypeStruct(state.table.shape, state.table.dtype)
        )
        slot_specs = self._slot_specs(probe)

        def part(pick, spec):
            fn = shard_map(lambda t: pick(optimizer.init(t)), self.mesh, (P(axis, None),), spec)
            return jax.jit(fn)(state.table)

        slots = tuple(part(lambda s, i=i: s.slots[i], spec) for i, spec in enumerate(slot_specs))
        count = part(lambda s: s.count, P())
        return type(probe)(slots, count)

    def _owner_update(self, body, state: EmbeddingState, opt_state, args, arg_specs):
        """Runs `body(table, opt_state, *args) -> (table, opt_state)` on each
        owner's shard and slots."""
        axis = self.axis_name
        opt_specs = type(opt_state)(self._slot_specs(opt_state), P())
        fn = shard_map(
            body,
            self.mesh,
            (P(axis, None), opt_specs, *arg_specs),
            (P(axis, None), opt_specs),
        )
        table, opt_state = fn(state.table, opt_state, *args)
        return dataclasses.replace(state, table=table), opt_state

    def apply_gradients(self, state: EmbeddingState, optimizer, opt_state, grad: SparseRowGrad):
        """Applies `optimizer` to the rows in `grad` (from `sparse_grad`) on
        each owner, in place (donate `state` and `opt_state` in your step).
        Returns (new_state, new_opt_state)."""
        row = P(self.axis_name)

        specs = (SparseRowGrad(row, P(self.axis_name, None), row),)
        return self._owner_update(optimizer.update, state, opt_state, (grad,), specs)

    def sparse_update(self, state: EmbeddingState, optimizer, opt_state, ctx, d_out):
        """`sparse_grad` and `apply_gradients` in one pass over the touched
        rows: each owner sums its rows' gradients and applies `optimizer` to
        them in place (`optimizer.update_bags`: for sgd, adagrad, adam and
        ftrl one fused kernel that never writes the [N, D] row gradient).
        The same function as
        `apply_gradients(state, optimizer, opt_state, sparse_grad(ctx, d_out))`;
        use that form to transform the row gradients first (e.g. clipping).
        Donate `state` and `opt_state` in your step. Returns (new_state,
        new_opt_state)."""
        if optimizer.update_bags is None:  # a SparseOptimizer built without it
            return self.apply_gradients(state, optimizer, opt_state, self.sparse_grad(ctx, d_out))

        def body(table, opt_state, ctx, g):
            return optimizer.update_bags(table, opt_state, *self._exchange.owner_bags(ctx, g))

        row = P(self.axis_name)
        return self._owner_update(body, state, opt_state, (ctx, d_out), (row, row))

    # ------------------------------------------------------- export / import
    def export_pairs(self, state: EmbeddingState):
        """All (key, vector) pairs of a state as host numpy arrays, keys
        ascending (SOK's dump). Direct mode: every key of the table; hash
        mode: the keys inserted so far."""
        keys, vectors = self._rows.export_pairs(state)
        keys = keys.astype(self.key_dtype)
        order = np.argsort(keys, kind="stable")
        return keys[order], vectors[order]

    def import_pairs(self, keys, vectors, seed=0) -> EmbeddingState:
        """A state on this layer's mesh holding the given (key, vector) pairs
        (SOK's load), whatever device count they were exported from. Direct
        mode: keys absent from `keys` keep their seed's initial vectors.

        Raises:
          ValueError: shapes disagree, keys repeat, a key is out of range
            (direct mode), or a shard cannot hold its keys (hash mode).
        """
        return self._rows.import_pairs(self.init(seed), keys, vectors)

    # ----------------------------------------------------------- inspection
    def logical_rows(self, state: EmbeddingState, keys):
        """Direct mode: the vectors of the given global keys (host helper for
        tests and export)."""
        if self.use_hashtable:
            raise ValueError("logical_rows is for direct mode; use export_pairs in hash mode")
        table = np.asarray(jax.device_get(state.table))
        return table[self._rows.global_rows(keys)]
