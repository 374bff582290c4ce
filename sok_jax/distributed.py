"""`DistributedEmbedding`: one table sharded over a mesh axis, SOK style.

Key k lives on device k % n; in direct mode at local row k // n. A batch
sharded over the same axis is looked up with one `shard_map` program:

  1. per device, bucket the valid keys by owner and remove duplicates per
     destination (sort), so each distinct key crosses the network once;
  2. `all_to_all` the keys (static capacity per destination; keys beyond it
     are counted in `stats.overflow`, never silently lost);
  3. on the owner, gather the rows with the FFI lookup (in hash mode, first
     find-or-insert the keys in the shard's hash table);
  4. `all_to_all` the vectors back;
  5. combine per (sample, slot) with the FFI combine, reading the received
     vectors through the inverse index of step 1.

Steps 3 and 5 are `sok_jax.embedding._lookup` (custom_vjp), and the
all_to_all transposes to itself, so `jax.grad` runs the same exchange in
reverse: gradients of duplicate keys are summed on the requesting side
(step 5's backward), sent back, and reduced per row on the owner (step 3's
backward: sort + run-length). The sparse path (`lookup` + `sparse_grad`)
runs the same reverse exchange without building the dense gradient.

On one device in direct mode, with a capacity that holds the whole batch,
there is nothing to exchange: the lookup is `_lookup` on the local table and
the sparse backward is one sort + run-length (the same function and counters
as the exchange path, without its plan).

No zero-size array crosses a `shard_map` boundary here (absent weights are
None): under Shardy, jax 0.11.2's GPU compiler segfaults on one that travels
from a forward manual computation to its backward (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax import ids as ids_lib
from sok_jax import initializers
from sok_jax.embedding import _lookup, _ops
from sok_jax.ops import embed_ops
from sok_jax.ops.embed_ops import SparseRowGrad


def shard_map(f, mesh, in_specs, out_specs):
    """`jax.shard_map` without replication checks, on old and new jax alike."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


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
      k // n, i.e. global row (k % n) * rows_per_gpu + k // n).
    slot_keys: hash mode only: [n * rows_per_gpu] keys stored in each row
      (EMPTY where free), sharded like the table; None in direct mode.
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
    """What a distributed lookup saved for its sparse backward (all per
    device, stacked over the axis)."""

    recv_rows: Any  # int32 [n * n*C]: local row of every received key (-1 none);
    #                 on one device in direct mode, the ids themselves [N]
    recv_index: Any  # int32 [n * N]: per position, the slot of its vector;
    #                  None on one device in direct mode (no exchange)
    offsets: Any  # int32 [n * (M + 1)]
    weights: Any  # float32 [n * N], or None without weights


jax.tree_util.register_dataclass(
    ExchangeContext,
    data_fields=["recv_rows", "recv_index", "offsets", "weights"],
    meta_fields=[],
)


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
      implementation: "ffi" or "reference" for the per-device ops.
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
        key_dtype = jnp.dtype(key_dtype)
        if key_dtype not in embed_ops.KEY_DTYPES:
            raise ValueError(f"key_dtype must be int32, uint32 or int64, got {key_dtype}")
        if key_dtype == jnp.int64 and not jax.config.jax_enable_x64:
            raise ValueError(
                "key_dtype=int64 needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))"
            )
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        self.combiner = combiner
        self.max_vocabulary_size_per_gpu = int(max_vocabulary_size_per_gpu)
        self.embedding_vec_size = int(embedding_vec_size)
        self.slot_num = int(slot_num)
        self.max_nnz = int(max_nnz)
        self.max_feature_num = int(max_feature_num or slot_num * max_nnz)
        self.use_hashtable = bool(use_hashtable)
        self.key_dtype = key_dtype
        self.initializer = initializers.resolve(embedding_initializer)
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_devices = int(mesh.shape[axis_name])
        self.capacity_factor = capacity_factor
        self.dtype = jnp.dtype(dtype)
        self.check = check
        self.implementation = implementation
        if self.max_vocabulary_size_per_gpu * self.num_devices >= 2**31 - 1:
            raise ValueError(
                "max_vocabulary_size_per_gpu * devices must stay below 2^31 - 1 rows "
                f"(got {self.max_vocabulary_size_per_gpu} * {self.num_devices})"
            )

    # ------------------------------------------------------------------ state
    @property
    def table_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.axis_name, None))

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.axis_name))

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
        n, rows, d = self.num_devices, self.max_vocabulary_size_per_gpu, self.embedding_vec_size
        axis = self.axis_name

        def shard_init(key_data):
            dev = jax.lax.axis_index(axis)
            if self.use_hashtable:
                from sok_jax.ops import hash_ops

                # Rows of a hash shard are handed out on insertion and
                # initialized then; start from zeros.
                return (
                    jnp.zeros((rows, d), self.dtype),
                    hash_ops.empty_slot_keys(rows, self.key_dtype),
                )
            local = jnp.arange(rows, dtype=jnp.int32)
            keys = local.astype(jnp.uint32) * jnp.uint32(n) + dev.astype(jnp.uint32)
            if self.num_rows > 2**32 - 1:
                keys = local.astype(jnp.int64) * n + dev
            return (initializers.init_rows(self.initializer, key_data, keys, d, self.dtype),)

        out_specs = (P(axis, None), P(axis)) if self.use_hashtable else (P(axis, None),)
        fn = shard_map(shard_init, self.mesh, in_specs=(P(),), out_specs=out_specs)
        table, *slot_keys = jax.jit(fn)(key_data)
        slot_keys = slot_keys[0] if self.use_hashtable else None
        # Three distinct buffers: a donated state must not hold one twice.
        counters = [
            jax.device_put(jnp.zeros((n,), jnp.int32), self.batch_sharding) for _ in range(3)
        ]
        return EmbeddingState(
            table=table,
            slot_keys=slot_keys if self.use_hashtable else None,
            seed=key_data,
            stats=EmbeddingStats(*counters),
        )

    # --------------------------------------------------------------- exchange
    def _capacity(self, local_batch: int) -> int:
        full = self.max_feature_num * local_batch
        if self.capacity_factor is None:
            return max(full, 1)
        c = math.ceil(self.capacity_factor * full / self.num_devices)
        return int(min(max(c, 1), full))

    def _check_ids(self, ids, weights):
        if isinstance(ids, ids_lib.RaggedIds):
            raise ValueError(
                "DistributedEmbedding takes padded ids [batch, slot_num, max_nnz] or a BCOO; "
                "convert ragged ids with sok_jax.ids.ragged_to_padded first"
            )
        bags = None
        if not hasattr(ids, "ndim") or isinstance(ids, jsparse.BCOO):
            bags = ids_lib.to_bags(ids, weights, self.slot_num)
            b = bags.batch_shape[0]
            ids = bags.ids.reshape(b, self.slot_num, -1)
            weights = bags.weights.reshape(ids.shape) if bags.weights.shape[0] else None
        ids = ids_lib.check_key_array(ids)
        if ids.ndim != 3 or ids.shape[1] != self.slot_num or ids.shape[2] > self.max_nnz:
            raise ValueError(
                f"ids must be [batch, slot_num={self.slot_num}, max_nnz<={self.max_nnz}], "
                f"got shape {tuple(ids.shape)}"
            )
        if jnp.dtype(ids.dtype) != self.key_dtype:
            raise ValueError(f"ids must have key_dtype {self.key_dtype}, got {ids.dtype}")
        if ids.shape[0] % self.num_devices:
            raise ValueError(
                f"the batch ({ids.shape[0]}) must be divisible by the {self.num_devices} "
                f"devices of axis {self.axis_name!r}"
            )
        if weights is not None:
            weights = jnp.asarray(weights, jnp.float32)
            if weights.shape != ids.shape:
                raise ValueError(
                    f"weights must have the ids' shape {tuple(ids.shape)}, got {tuple(weights.shape)}"
                )
        return ids, weights

    def _plan(self, flat_ids, capacity):
        """Bucket by owner and dedup per destination (pure JAX sort).

        Returns (send [n*C] values to send, recv_index [N] slot of each
        position's vector or -1, overflow count, invalid count, largest
        bucket: the most distinct keys bound for one destination)."""
        n, rows = self.num_devices, self.max_vocabulary_size_per_gpu
        N = flat_ids.shape[0]
        pad = ids_lib._padding_value(flat_ids.dtype)
        is_pad = ids_lib.is_padding(flat_ids)
        if self.use_hashtable:
            valid = ~is_pad
            send_dtype = flat_ids.dtype
            empty = pad
        else:
            valid = _valid_direct(flat_ids, n * rows)
            send_dtype = jnp.int32
            empty = -1
        invalid = jnp.sum(~valid & ~is_pad).astype(jnp.int32)
        owner = jnp.where(valid, jnp.remainder(flat_ids, n).astype(jnp.int32), n)
        iota = jnp.arange(N, dtype=jnp.int32)
        if self.use_hashtable:
            s_owner, s_key, perm = jax.lax.sort((owner, flat_ids, iota), num_keys=2)
            differs = (s_owner[1:] != s_owner[:-1]) | (s_key[1:] != s_key[:-1])
        else:
            # (owner, local row) packed into one int32 below n * rows, so the
            # sort is a plain key/value sort (a radix sort on the GPU)
            # instead of a multi-operand comparator sort.
            local = jnp.where(valid, flat_ids // n, 0).astype(jnp.int32)
            packed = jnp.where(valid, owner * rows + local, n * rows).astype(jnp.int32)
            s_packed, perm = jax.lax.sort((packed, iota), num_keys=1)
            s_owner = jnp.minimum(s_packed // rows, n).astype(jnp.int32)
            s_key = s_packed - s_owner * rows  # the local row
            differs = s_packed[1:] != s_packed[:-1]
        first = jnp.concatenate([jnp.ones((1,), bool), differs])
        real = s_owner < n
        first = first & real
        run = jnp.cumsum(first.astype(jnp.int32)) - 1
        per_owner = jax.ops.segment_sum(first.astype(jnp.int32), s_owner, n + 1)[:n]
        start = jnp.cumsum(per_owner) - per_owner
        rank = run - start[jnp.minimum(s_owner, n - 1)]
        fits = real & (rank < capacity)
        slot = jnp.where(fits, s_owner * capacity + rank, -1)
        overflow = jnp.sum(first & ~fits).astype(jnp.int32)
        value = s_key  # hash mode: the key; direct mode: the owner's local row
        target = jnp.where(first & fits, slot, n * capacity)
        send = (
            jnp.full((n * capacity,), empty, send_dtype)
            .at[target]
            .set(value.astype(send_dtype), mode="drop")
        )
        recv_index = jnp.zeros((N,), jnp.int32).at[perm].set(slot)
        return send, recv_index, overflow, invalid, jnp.max(per_owner)

    def _a2a(self, x):
        return jax.lax.all_to_all(x, self.axis_name, 0, 0, tiled=True)

    def _local(self, local_batch: int) -> bool:
        """One device in direct mode with a capacity that holds the whole
        batch: no exchange at all; the lookup is the single-shard kernel on
        the local table (the same function: invalid keys are skipped and
        counted, and nothing could overflow). A capacity below the batch
        keeps the exchange path, so its overflow counts stay the same."""
        return (
            self.num_devices == 1
            and not self.use_hashtable
            and self._capacity(local_batch) >= self.max_feature_num * local_batch
        )

    def _device_forward(self, table, slot_keys, seed, ids, weights, training, sparse):
        """Per-device body of the lookup (inside shard_map)."""
        b_local = ids.shape[0]
        capacity = self._capacity(b_local)
        bags = ids_lib.to_bags(ids, weights)
        # Absent weights stay None in the context: no zero-size array may
        # leave the shard_map (see embedding._lookup_fwd on why).
        w_or_none = bags.weights if weights is not None else None
        impl = self.implementation
        if self._local(b_local):
            src = jax.lax.stop_gradient(table) if sparse else table
            flat = bags.ids
            valid = _valid_direct(flat, self.max_vocabulary_size_per_gpu)
            invalid = jnp.sum(~valid & ~ids_lib.is_padding(flat)).astype(jnp.int32)
            out = _lookup(
                self.combiner, impl, bags.fixed_nnz, src, flat, bags.offsets, bags.weights
            )
            out = out.reshape(*bags.batch_shape, table.shape[1])
            zero = jnp.zeros((1,), jnp.int32)
            stats = (zero, invalid.reshape(1), zero)
            # recv_index None marks the local context (see sparse_grad).
            ctx = ExchangeContext(flat, None, bags.offsets, w_or_none)
            return out, table, slot_keys, stats, ctx
        send, recv_index, overflow, invalid, _ = self._plan(bags.ids, capacity)
        recv = self._a2a(send)  # [n*C] keys (hash) or local rows (direct)
        hash_full = jnp.zeros((), jnp.int32)
        if self.use_hashtable:
            table, slot_keys, rows, hash_full = self._hash_rows(
                table, slot_keys, seed, recv, training
            )
        else:
            rows = recv
        gather_offsets = jnp.arange(rows.shape[0] + 1, dtype=jnp.int32)
        no_w = jnp.zeros((0,), jnp.float32)
        # After the hash insertion: new rows carry their initial vectors.
        src = jax.lax.stop_gradient(table) if sparse else table
        vecs = _lookup("sum", impl, 1, src, rows, gather_offsets, no_w)  # a gather
        back = self._a2a(vecs)  # [n*C, D], slot-major by destination
        out = _lookup(
            self.combiner, impl, bags.fixed_nnz, back, recv_index, bags.offsets, bags.weights
        )
        out = out.reshape(*bags.batch_shape, table.shape[1])
        stats = (overflow.reshape(1), invalid.reshape(1), hash_full.reshape(1))
        ctx = ExchangeContext(rows, recv_index, bags.offsets, w_or_none)
        return out, table, slot_keys, stats, ctx

    def _hash_rows(self, table, slot_keys, seed, keys, training):
        from sok_jax.ops import hash_ops

        slot_keys, rows, is_new, failed = hash_ops.find_or_insert(slot_keys, keys, insert=training)
        if training:
            cap = table.shape[0]
            fresh = initializers.init_rows(
                self.initializer, seed, keys, table.shape[1], table.dtype
            )
            target = jnp.where(is_new.astype(bool) & (rows >= 0), rows, cap)
            table = _insert_rows(table, target, fresh)
        return table, slot_keys, rows, failed.reshape(()).astype(jnp.int32)

    def _run(self, state: EmbeddingState, ids, weights, training: bool, sparse: bool):
        ids, weights = self._check_ids(ids, weights)
        axis = self.axis_name
        has_w = weights is not None
        has_keys = self.use_hashtable

        # Only real arrays cross the shard_map boundary: no zero-size
        # placeholders for absent weights or a direct-mode slot table (see
        # embedding._lookup_fwd on why).
        row = P(axis)

        def body(table, seed, ids, *opt):
            slot_keys = opt[0] if has_keys else None
            w = opt[-1] if has_w else None
            out, table, slot_keys, stats, ctx = self._device_forward(
                table, slot_keys, seed, ids, w, training, sparse
            )
            if self.check:
                # Every device raises on the same (gathered) counts: a check
                # that failed on one device only would leave the others
                # waiting in a collective (an abort on multi-device CPU).
                gathered = [jax.lax.all_gather(c, axis, tiled=True) for c in stats]
                jax.debug.callback(_stats_callback, *gathered)
            keyed = (table, slot_keys) if has_keys else ()
            return (out, stats, ctx) + keyed

        args, in_specs = [state.table, state.seed, ids], [P(axis, None), P(), row]
        if has_keys:
            args.append(state.slot_keys)
            in_specs.append(row)
        if has_w:
            args.append(weights)
            in_specs.append(row)
        # `row` is a prefix of the context: every array in it is per device.
        out_specs = (row, (row, row, row), row) + ((P(axis, None), row) if has_keys else ())
        fn = shard_map(body, self.mesh, tuple(in_specs), out_specs)
        out, stats, ctx, *keyed = fn(*args)
        stats = EmbeddingStats(*stats)
        new_state = EmbeddingState(
            table=keyed[0] if has_keys else state.table,
            slot_keys=keyed[1] if has_keys else None,
            seed=state.seed,
            stats=stats,
        )
        return out, new_state, ctx

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
        `sparse_grad(ctx, d_out)`."""
        out, new_state, ctx = self._run(state, ids, weights, training, sparse=True)
        return out, ctx, new_state

    def _owner_bags(self, ctx: ExchangeContext, g):
        """Per-device (inside shard_map): the backward as bags on the owner,
        (grad_out, ids, offsets, weights, combiner) over this device's table
        rows. One device with no exchange: the lookup's own bags. Otherwise
        the requesting side sums its positions' gradients per received slot,
        sends them to the owners, and the owner's bags are one slot each."""
        g = g.reshape(-1, g.shape[-1])
        weights = ctx.weights if ctx.weights is not None else jnp.zeros((0,), jnp.float32)
        if ctx.recv_index is None:  # one device, no exchange: recv_rows are the ids
            return g, ctx.recv_rows, ctx.offsets, weights, self.combiner
        ops = _ops(self.implementation)
        cap = ctx.recv_rows.shape[0]  # n*C slots received vectors occupy
        # 1. requesting side: per received slot, sum its positions' grads.
        s = ops.lookup_combine_bwd(g, ctx.recv_index, ctx.offsets, weights, self.combiner, cap)
        d_back = ops.rows_to_dense(s, cap, jnp.float32)
        # 2. send them to the owners.
        d_vecs = self._a2a(d_back)
        # 3. (the caller) owner: sum over sources per local row.
        singles = jnp.arange(cap + 1, dtype=jnp.int32)
        return d_vecs, ctx.recv_rows, singles, jnp.zeros((0,), jnp.float32), "sum"

    def sparse_grad(self, ctx: ExchangeContext, d_out) -> SparseRowGrad:
        """Per-device row gradients (stacked over the axis: rows [n*cap],
        grads [n*cap, D], count [n]) for the rows the batch touched, reduced
        on their owners. Never builds a [rows, D] array."""
        ops = _ops(self.implementation)
        rows = self.max_vocabulary_size_per_gpu

        def body(ctx, g):
            r = ops.lookup_combine_bwd(*self._owner_bags(ctx, g), rows)
            return r.rows, r.grads, r.count

        row = P(self.axis_name)
        fn = shard_map(body, self.mesh, (row, row), (row, P(self.axis_name, None), row))
        rows, grads, count = fn(ctx, d_out)
        return SparseRowGrad(rows, grads, count)

    def required_capacity_factor(self, ids) -> jax.Array:
        """The smallest `capacity_factor` under which this batch overflows
        nowhere: the most distinct keys any device sends to one destination
        (its own slice included), times n, over the local key positions
        (`max_feature_num` x local batch). A float32 scalar; jit-able.

        Measure it on a few real batches and build the layer with a margin
        above it (a tight factor shrinks every exchange buffer; see
        benchmarks/RESULTS.md). A factor of 1.0 or more can still overflow
        for skewed batches; `capacity_factor=None` never does."""
        ids, _ = self._check_ids(ids, None)
        n, axis = self.num_devices, self.axis_name
        full = self.max_feature_num * (ids.shape[0] // n)

        def body(ids):
            bags = ids_lib.to_bags(ids, None)
            largest = self._plan(bags.ids, self._capacity(ids.shape[0]))[4]
            return jax.lax.pmax(largest, axis).reshape(1)

        largest = shard_map(body, self.mesh, (P(axis),), P(axis))(ids)[0]
        return largest.astype(jnp.float32) * n / max(full, 1)

    def _slot_specs(self, opt_state):
        axis = self.axis_name
        return tuple(P(axis) if s.ndim == 1 else P(axis, None) for s in opt_state.slots)

    def init_optimizer(self, optimizer, state: EmbeddingState):
        """The sparse optimizer's state, its slots sharded like the table.

        Each slot comes from a program of its own, so that no two slots can
        come back in one buffer (a step donates them all). This is the form
        measured on one H100 at 20 GiB per slot (benchmarks/RESULTS.md)."""
        axis = self.axis_name
        probe = jax.eval_shape(
            optimizer.init, jax.ShapeDtypeStruct(state.table.shape, state.table.dtype)
        )
        slot_specs = self._slot_specs(probe)

        def part(pick, spec):
            fn = shard_map(lambda t: pick(optimizer.init(t)), self.mesh, (P(axis, None),), spec)
            return jax.jit(fn)(state.table)

        slots = tuple(part(lambda s, i=i: s.slots[i], spec) for i, spec in enumerate(slot_specs))
        return type(probe)(slots, part(lambda s: s.count, P()))

    def apply_gradients(self, state: EmbeddingState, optimizer, opt_state, grad: SparseRowGrad):
        """Applies `optimizer` to the rows in `grad` (from `sparse_grad`) on
        each owner, in place (donate `state` and `opt_state` in your step).
        Returns (new_state, new_opt_state)."""
        axis = self.axis_name
        slot_specs = self._slot_specs(opt_state)
        opt_specs = type(opt_state)(slot_specs, P())

        def body(table, opt_state, rows, grads, count):
            return optimizer.update(table, opt_state, SparseRowGrad(rows, grads, count))

        fn = shard_map(
            body,
            self.mesh,
            (P(axis, None), opt_specs, P(axis), P(axis, None), P(axis)),
            (P(axis, None), opt_specs),
        )
        table, opt_state = fn(state.table, opt_state, grad.rows, grad.grads, grad.count)
        return dataclasses.replace(state, table=table), opt_state

    def sparse_update(
        self, state: EmbeddingState, optimizer, opt_state, ctx: ExchangeContext, d_out
    ):
        """`sparse_grad` and `apply_gradients` in one pass over the touched
        rows: each owner sums its rows' gradients and applies `optimizer` to
        them in place (`optimizer.update_bags`: for sgd, adagrad, adam and
        ftrl one fused kernel that never writes the [N, D] row gradient).
        The same function as
        `apply_gradients(state, optimizer, opt_state, sparse_grad(ctx, d_out))`;
        use that form to transform the row gradients first (e.g. clipping).
        Donate `state` and `opt_state` in your step. Returns (new_state,
        new_opt_state)."""
        axis = self.axis_name
        opt_specs = type(opt_state)(self._slot_specs(opt_state), P())
        update = optimizer.update_bags
        if update is None:  # a SparseOptimizer built without it
            return self.apply_gradients(state, optimizer, opt_state, self.sparse_grad(ctx, d_out))

        def body(table, opt_state, ctx, g):
            return update(table, opt_state, *self._owner_bags(ctx, g))

        row = P(axis)
        fn = shard_map(
            body, self.mesh, (P(axis, None), opt_specs, row, row), (P(axis, None), opt_specs)
        )
        table, opt_state = fn(state.table, opt_state, ctx, d_out)
        return dataclasses.replace(state, table=table), opt_state

    # ------------------------------------------------------- export / import
    def export_pairs(self, state: EmbeddingState):
        """All (key, vector) pairs of a state as host numpy arrays, keys
        ascending (SOK's dump). Direct mode: every key of the table; hash
        mode: the keys inserted so far."""
        n, rows = self.num_devices, self.max_vocabulary_size_per_gpu
        table = np.asarray(jax.device_get(state.table))
        if self.use_hashtable:
            from sok_jax.ops import hash_ops

            slot_keys = np.asarray(jax.device_get(state.slot_keys))
            used = slot_keys != hash_ops.EMPTY(self.key_dtype)
            keys, vectors = slot_keys[used], table[used]
        else:
            keys = np.arange(n * rows, dtype=np.int64)
            vectors = table[(keys % n) * rows + keys // n]
            keys = keys.astype(self.key_dtype)
        order = np.argsort(keys, kind="stable")
        return keys[order], vectors[order]

    def import_pairs(self, keys, vectors, seed=0) -> EmbeddingState:
        """A state on this layer's mesh holding the given (key, vector) pairs
        (SOK's load), whatever device count they were exported from. Direct
        mode: keys absent from `keys` keep their seed's initial vectors.

        Raises:
          ValueError: shapes disagree, a key is out of range (direct mode),
            or a shard cannot hold its keys (hash mode).
        """
        keys = np.asarray(keys)
        vectors = np.asarray(vectors)
        d = self.embedding_vec_size
        if keys.ndim != 1 or vectors.shape != (keys.shape[0], d):
            raise ValueError(
                f"keys must be [K] and vectors [K, {d}], got {keys.shape} and {vectors.shape}"
            )
        if len(np.unique(keys)) != len(keys):
            raise ValueError("keys must be distinct")
        state = self.init(seed)
        n, rows = self.num_devices, self.max_vocabulary_size_per_gpu
        owner = np.remainder(keys.astype(np.int64), n)
        if not self.use_hashtable:
            k = keys.astype(np.int64)
            if k.size and (k.min() < 0 or k.max() >= n * rows):
                raise ValueError(f"direct-mode keys must lie in [0, {n * rows})")
            table = np.asarray(jax.device_get(state.table)).copy()
            table[owner * rows + k // n] = vectors
            return dataclasses.replace(
                state, table=jax.device_put(table.astype(self.dtype), self.table_sharding)
            )
        from sok_jax.ops import hash_ops

        per_owner = np.bincount(owner, minlength=n)
        if per_owner.max(initial=0) > rows:
            raise ValueError(
                f"a shard would hold {per_owner.max()} keys but has {rows} rows "
                "(max_vocabulary_size_per_gpu)"
            )
        width = max(int(per_owner.max(initial=0)), 1)
        empty = hash_ops.EMPTY(self.key_dtype)
        send_keys = np.full((n, width), empty, dtype=self.key_dtype)
        send_vecs = np.zeros((n, width, d), np.float32)
        for dev in range(n):
            mine = owner == dev
            send_keys[dev, : mine.sum()] = keys[mine]
            send_vecs[dev, : mine.sum()] = vectors[mine]
        axis = self.axis_name

        def load(slot_keys, table, k, v):
            slot_keys, rows_, _, failed = hash_ops.find_or_insert(slot_keys, k, insert=True)
            target = jnp.where(rows_ >= 0, rows_, table.shape[0])
            return (
                slot_keys,
                table.at[target].set(v.astype(table.dtype), mode="drop"),
                failed.reshape(1),
            )

        fn = shard_map(
            load,
            self.mesh,
            (P(axis), P(axis, None), P(axis), P(axis, None)),
            (P(axis), P(axis, None), P(axis)),
        )
        slot_keys, table, failed = jax.jit(fn)(
            state.slot_keys,
            state.table,
            jax.device_put(send_keys.reshape(-1), self.batch_sharding),
            jax.device_put(send_vecs.reshape(n * width, d), self.table_sharding),
        )
        if int(np.sum(jax.device_get(failed))):
            raise ValueError("import_pairs: a hash shard could not place all of its keys")
        return dataclasses.replace(state, table=table, slot_keys=slot_keys)

    # ----------------------------------------------------------- inspection
    def logical_rows(self, state: EmbeddingState, keys):
        """Direct mode: the vectors of the given global keys (host helper for
        tests and export)."""
        keys = np.asarray(keys)
        n, rows = self.num_devices, self.max_vocabulary_size_per_gpu
        table = np.asarray(jax.device_get(state.table))
        return table[(keys % n) * rows + keys // n]


@jax.custom_vjp
def _insert_rows(table, target, fresh):
    """table.at[target].set(fresh) (drop out of range), with a straight-through
    gradient: the cotangent of a freshly initialized row goes to the same row
    of the input table. Without it, `jax.grad` w.r.t. `state.table` would be
    zero for every key inserted in this call (its row was overwritten), so
    the dense path would miss each new key's first gradient while the sparse
    path (`sparse_grad`) applies it. The rows handed out were free (unused
    by any key), so nothing else depends on their old values."""
    return table.at[target].set(fresh, mode="drop")


def _insert_rows_fwd(table, target, fresh):
    return _insert_rows(table, target, fresh), None


def _insert_rows_bwd(_, g):
    return g, None, None


_insert_rows.defvjp(_insert_rows_fwd, _insert_rows_bwd)


def _valid_direct(ids, total_rows):
    if jnp.issubdtype(ids.dtype, jnp.unsignedinteger):
        valid = ids < jnp.asarray(min(total_rows, 2**32 - 1), ids.dtype)
    else:
        valid = (ids >= 0) & (ids < total_rows)
    return valid


def _stats_callback(overflow, invalid, hash_full):
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
    _stats_callback(
        np.asarray(state.stats.overflow),
        np.asarray(state.stats.invalid),
        np.asarray(state.stats.hash_full),
    )
