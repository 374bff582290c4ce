"""The models and the embedding side of `train_dlrm.py` (benchmarks/bench_dlrm.py
imports them too, so that both time the same program).

* `DLRM`: the small model of the quickstart: bottom MLP, pairwise dots of the
  27 vectors, top MLP.
* `DCNv2`: MLPerf Training's DLRM-DCNv2 (TorchRec's `DLRM_DCN` as the MLPerf
  reference runs it): bottom MLP 13 -> 512-256-128, the 128 concatenated
  with the 26 pooled embeddings (x0, 3456 wide), a low-rank (512) DCNv2
  cross network of 3 layers, top MLP 1024-1024-512-256-1.
Both are flax NNX modules with float32 parameters (`param_dtype`) and a
compute dtype (`dtype`, bfloat16 for DCNv2); they get the looked-up
embeddings [B, 26, D] as an input and never see a table.

* `TableEmbedding`: every sparse feature in one `sok_jax.DistributedEmbedding`
  (SOK's one shared table, feature k's ids offset by the rows of the features
  before it); `CollectionEmbedding`: one table per feature in a
  `sok_jax.EmbeddingCollection`. Both drive their layer through the NNX
  module `sok_jax.flax.ShardedEmbedding` (its variables hold the tables and
  the optimizer slots), trained with the sparse path (`lookup` +
  `sparse_update`).
* `memory_plan`: the bytes the training state takes (tables, their
  optimizer slots, the dense state), from its shapes, before anything is
  allocated.
* `make_train_step`: one jitted, donating training step of both halves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sok_jax
import sok_jax.flax
from sok_jax import initializers
from sok_jax._compat import shard_map
from sok_jax.data import SparseFeature


# ---------------------------------------------------------------- models
class MLP(nnx.Module):
    """Linear layers `sizes[0] -> sizes[1] -> ...`, ReLU after each (after the
    last one too unless `final_relu=False`)."""

    def __init__(self, sizes: Sequence[int], *, final_relu=True, dtype, param_dtype, rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i, o in zip(sizes[:-1], sizes[1:])
            ]
        )
        self.final_relu = final_relu

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers) or self.final_relu:
                x = nnx.relu(x)
        return x


class DLRM(nnx.Module):
    """The small DLRM: bottom MLP (64, D), the pairwise dots of the 27 vectors
    (bottom output + one per feature), top MLP (128, 64, 1)."""

    def __init__(
        self,
        num_dense: int,
        num_features: int,
        dim: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bottom = MLP((num_dense, 64, dim), **kw)
        pairs = (num_features + 1) * num_features // 2
        self.top = MLP((dim + pairs, 128, 64, 1), final_relu=False, **kw)
        self.dtype = dtype

    def __call__(self, dense, emb):
        bottom = self.bottom(dense)
        x = jnp.concatenate([bottom[:, None], emb.astype(bottom.dtype)], axis=1)  # [B, F+1, D]
        dots = jnp.einsum("bid,bjd->bij", x, x)
        i, j = np.triu_indices(x.shape[1], k=1)  # each pair once, no self-dots
        top_in = jnp.concatenate([bottom, dots[:, i, j]], axis=1)
        return self.top(top_in)[:, 0].astype(jnp.float32)


class LowRankCross(nnx.Module):
    """DCNv2's cross network with low-rank weights (TorchRec's
    `LowRankCrossNet`): x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l, with
    V_l [width -> rank] and W_l [rank -> width]."""

    def __init__(self, width: int, rank: int, num_layers: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.v = nnx.List(
            [nnx.Linear(width, rank, use_bias=False, **kw) for _ in range(num_layers)]
        )
        self.w = nnx.List([nnx.Linear(rank, width, **kw) for _ in range(num_layers)])

    def __call__(self, x0):
        x = x0
        for v, w in zip(self.v, self.w):
            x = x0 * w(v(x)) + x
        return x


class DCNv2(nnx.Module):
    """MLPerf DLRM-DCNv2 (see the module docstring). Defaults are MLPerf's."""

    def __init__(
        self,
        num_dense: int,
        num_features: int,
        dim: int,
        *,
        bottom: Sequence[int] = (512, 256, 128),
        top: Sequence[int] = (1024, 1024, 512, 256, 1),
        cross_layers: int = 3,
        cross_rank: int = 512,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bottom = MLP((num_dense, *bottom), **kw)
        width = bottom[-1] + num_features * dim
        self.cross = LowRankCross(width, cross_rank, cross_layers, **kw)
        self.top = MLP((width, *top), final_relu=False, **kw)
        self.dtype = dtype

    def __call__(self, dense, emb):
        bottom = self.bottom(dense)
        x0 = jnp.concatenate([bottom, emb.reshape(emb.shape[0], -1).astype(bottom.dtype)], axis=1)
        return self.top(self.cross(x0))[:, 0].astype(jnp.float32)


def dense_flops(model_name: str, num_dense: int, num_features: int, dim: int, **kw) -> float:
    """Matmul FLOPs per sample of the dense model's forward (backward ~2x)."""
    if model_name == "dcnv2":
        bottom = (num_dense, *kw.get("bottom", (512, 256, 128)))
        top = kw.get("top", (1024, 1024, 512, 256, 1))
        width = bottom[-1] + num_features * dim
        layers = list(zip(bottom[:-1], bottom[1:])) + list(zip((width, *top[:-1]), top))
        cross = kw.get("cross_layers", 3) * 2 * width * kw.get("cross_rank", 512)
        return 2.0 * (sum(i * o for i, o in layers) + cross)
    pairs = (num_features + 1) * num_features // 2
    layers = [(num_dense, 64), (64, dim), (dim + pairs, 128), (128, 64), (64, 1)]
    return 2.0 * (sum(i * o for i, o in layers) + (num_features + 1) ** 2 * dim)


# ------------------------------------------------------------- embeddings
def pack_width(nnzs: Sequence[int], dim: int) -> int:
    """Ids per lookup slot for bags of sizes `nnzs` in one padded layer.

    The layer takes [B, slots, P] ids (-1 padding); a feature with nnz ids
    takes ceil(nnz / P) slots whose vectors are summed afterwards. P = max(nnz)
    pads every bag to the largest one (MLPerf's 100: 2600 positions for 214
    ids); P = 1 writes one output vector per id. The P chosen minimizes the
    bytes a step moves for it, per sample: 16 * D per slot (its output
    written, read, its gradient written, read) and 32 per position (the ids
    and their sort in the backward; every sparse optimizer updates in the
    fused backward kernel, so no [positions, D] row gradient is written)."""
    costs = {
        p: sum(math.ceil(n / p) for n in nnzs) * (16 * dim + 32 * p)
        for p in range(1, max(nnzs) + 1)
    }
    return min(costs, key=lambda p: (costs[p], p))


def tree_bytes(tree) -> int:
    """Bytes of the arrays (or shape structs) of a pytree."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def optimizer_slots(optimizer, rows: int, dim: int, dtype) -> tuple[int, str]:
    """(bytes, dtype names) of a sparse optimizer's slots for a [rows, dim]
    table of `dtype`, from their shapes (nothing is allocated)."""
    probe = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct((rows, dim), dtype))
    return tree_bytes(probe.slots), "/".join(sorted({s.dtype.name for s in probe.slots})) or "-"


class MemoryPlan(NamedTuple):
    """The bytes the training state takes, from its shapes: the tables, the
    tables' optimizer slots (both split over the devices) and the dense
    parameters with their optimizer state (replicated). The step's
    temporaries come on top (the compiled step's memory analysis says how
    many)."""

    rows: int
    dim: int
    table_dtype: str
    table_bytes: int
    optimizer: str
    slot_dtype: str
    slot_bytes: int
    dense_bytes: int
    devices: int

    @property
    def per_device(self) -> float:
        return (self.table_bytes + self.slot_bytes) / self.devices + self.dense_bytes

    def describe(self, capacity: float, card: str) -> str:
        """The plan as text, with whether a device's share fits `capacity`
        bytes (a `card`'s memory)."""
        gb = lambda b: f"{b / 1e9:10.2f} GB"  # noqa: E731
        left = capacity - self.per_device
        verdict = (
            f"fits one {card} ({capacity / 1e9:.0f} GB), {left / 1e9:.2f} GB left for the step"
            if left > 0
            else f"does NOT fit one {card} ({capacity / 1e9:.0f} GB): {-left / 1e9:.2f} GB over"
        )
        rows = [
            (f"tables: {self.rows:,} rows x {self.dim} {self.table_dtype}", self.table_bytes),
            (f"{self.optimizer} slots: {self.slot_dtype}", self.slot_bytes),
            ("dense parameters + optimizer (replicated)", self.dense_bytes),
            (f"per device, on {self.devices} device(s)", self.per_device),
        ]
        lines = ["memory plan (from the state's shapes; the step's temporaries come on top):"]
        lines += [f"  {name:<52}{gb(b)}" for name, b in rows]
        return "\n".join(lines + [f"  {verdict}"])


def memory_plan(
    features: Sequence[SparseFeature],
    dim: int,
    dtype,
    optimizer,
    optimizer_name: str,
    dense_bytes: int,
    devices: int,
) -> MemoryPlan:
    """The `MemoryPlan` of tables of `features` x `dim` in `dtype` trained by
    the sparse `optimizer`, beside `dense_bytes` of dense state."""
    rows = int(sum(f.cardinality for f in features))
    slot_bytes, slot_dtype = optimizer_slots(optimizer, rows, dim, dtype)
    return MemoryPlan(
        rows=rows,
        dim=int(dim),
        table_dtype=jnp.dtype(dtype).name,
        table_bytes=rows * int(dim) * jnp.dtype(dtype).itemsize,
        optimizer=optimizer_name,
        slot_dtype=slot_dtype,
        slot_bytes=slot_bytes,
        dense_bytes=int(dense_bytes),
        devices=int(devices),
    )


class _ShardedSide:
    """What both embedding sides share: the layer is driven through the NNX
    module `sok_jax.flax.ShardedEmbedding`, whose variables hold its tables
    (`EmbeddingTables`) and the sparse optimizer's slots (`EmbeddingSlots`).
    `init` builds the module and splits its state off (`nnx.State`,
    jax.Arrays only): what a step carries and donates. Inside the step
    `module(state)` merges it with the module's `graphdef` (no copy: the
    same arrays) and `state_of(module)` gives the updated state back. Any
    state of the same layout merges (bench_dlrm's multi-hot side trains the
    state its one-hot side made).

    A subclass sets `layer` (the sharded layer) and `optimizer`, and says how
    a batch's sparse features become the layer's ids (`_ids`), how the
    layer's outputs become [B, F, D] (`_pool`) and the way back (`_unpool`)."""

    @functools.cached_property
    def graphdef(self):
        """The module's structure (its layer and optimizer), from an abstract
        build: no array is made."""

        def build():
            return sok_jax.flax.ShardedEmbedding(self.layer, optimizer=self.optimizer)

        return nnx.split(nnx.eval_shape(build))[0]

    def initial_state(self, seed):
        """The layer's state at `seed` (default `layer.init`)."""
        return self.layer.init(seed)

    def init(self, seed):
        """The module's state (tables and optimizer slots, sharded over the
        axis) at `seed`."""
        module = sok_jax.flax.ShardedEmbedding(
            self.layer, optimizer=self.optimizer, state=self.initial_state(seed)
        )
        return nnx.state(module)

    def module(self, state) -> sok_jax.flax.ShardedEmbedding:
        """The module holding `state` (a state `init` made, or a step gave)."""
        return nnx.merge(self.graphdef, state)

    @staticmethod
    def state_of(module):
        return nnx.state(module)

    def shardings(self, state):
        """NamedShardings of the module's state, for jit."""
        return self.module(state).state_shardings()

    def lookup(self, module, sparse: dict, upcoming: dict | None = None):
        """The sparse training path: (pooled [B, F, D], ctx); the module holds
        the state after the lookup (hash tables: keys inserted). `upcoming`:
        the next batch's sparse features, whose rows the host-cached tables
        prefetch."""
        prefetch = None if upcoming is None else self._ids(upcoming)
        out, ctx = module.lookup(self._ids(sparse), prefetch=prefetch)
        return self._pool(out), ctx

    def update(self, module, ctx, d_pooled):
        """Applies the optimizer to the rows the batch touched, in place in
        the module (donate its state in the step). `d_pooled`: d loss / d
        pooled."""
        module.sparse_update(ctx, self._unpool(d_pooled))

    def apply(self, module, sparse: dict, *, training: bool = False):
        """Pooled [B, F, D] (evaluation: no insertion, no update)."""
        return self._pool(module(self._ids(sparse), training=training))

    def apply_table(self, state, sparse: dict, *, training: bool = False):
        """(pooled [B, F, D], new_state) of the layer's own state (a plain or
        a served, `sok_jax.serving.quantize`d one), differentiable w.r.t. a
        plain state's tables (the dense-compatible path)."""
        out, state = self.layer.apply(state, self._ids(sparse), training=training)
        return self._pool(out), state


class TableEmbedding(_ShardedSide):
    """The embedding side of the model: every sparse feature in one
    `sok_jax.DistributedEmbedding` (SOK's one shared table), row-sharded
    over `axis_name` (key k on device k % n), direct mode, sum combiner,
    trained with the sparse path through `sok_jax.flax.ShardedEmbedding`.

    Feature k owns rows [offset_k, offset_k + rows_k) of the table. Its ids
    [B, nnz_k] are packed into ceil(nnz_k / P) lookup slots of P ids
    (`pack_width`); the vectors of a feature's slots are summed into its one
    pooled vector, so `lookup` gives [B, num_features, D] whatever the bag
    sizes.

    The interface (`init`, `module`, `lookup`, `update`, `apply`, `plan`) is
    `CollectionEmbedding`'s, which holds one table per feature.
    """

    def __init__(
        self,
        features: Sequence[SparseFeature],
        dim: int,
        *,
        mesh,
        axis_name: str,
        optimizer,
        dtype=jnp.float32,
        capacity_factor: float | None = 1.0,
        check: bool = False,
        pack: int | None = None,
        init_chunk_rows: int = 1 << 22,
    ):
        self.features = tuple(features)
        self.dim = int(dim)
        self.optimizer = optimizer
        self.mesh, self.axis_name = mesh, axis_name
        rows = [f.cardinality for f in self.features]
        self.offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        self.total_rows = int(sum(rows))
        nnzs = [f.nnz for f in self.features]
        self.pack = int(pack or pack_width(nnzs, self.dim))
        slots = [math.ceil(n / self.pack) for n in nnzs]
        # Lookup slot -> its feature (slots of one feature are adjacent).
        self.slot_feature = np.repeat(np.arange(len(self.features)), slots).astype(np.int32)
        self.num_slots = int(sum(slots))
        n = int(mesh.shape[axis_name])
        self.num_devices = n
        self.layer = sok_jax.DistributedEmbedding(
            combiner="sum",
            max_vocabulary_size_per_gpu=math.ceil(self.total_rows / n),
            embedding_vec_size=self.dim,
            slot_num=self.num_slots,
            max_nnz=self.pack,
            mesh=mesh,
            axis_name=axis_name,
            capacity_factor=capacity_factor,
            dtype=dtype,
            check=check,
            use_hashtable=False,
        )
        self.init_chunk_rows = int(init_chunk_rows)

    # ------------------------------------------------------------------ state
    def init_table(self, seed) -> sok_jax.EmbeddingState:
        """The layer's state, the same table as `layer.init(seed)` (each key's
        vector from the seed and the key), built on the devices chunk by
        chunk so that a 100 GB table needs no table-sized temporary."""
        layer = self.layer
        n, rows, dim = self.num_devices, layer.max_vocabulary_size_per_gpu, self.dim
        chunk = min(self.init_chunk_rows, rows)
        key_data = jax.random.key_data(initializers.as_key(seed))
        axis = self.axis_name

        def shard(key_data):
            device = jax.lax.axis_index(axis)

            def body(i, table):
                start = jnp.minimum(i * chunk, rows - chunk)
                keys = (start + jnp.arange(chunk, dtype=jnp.int32)) * n + device
                block = initializers.init_rows(layer.initializer, key_data, keys, dim, layer.dtype)
                return jax.lax.dynamic_update_slice(table, block, (start, 0))

            table = jnp.zeros((rows, dim), layer.dtype)
            return jax.lax.fori_loop(0, math.ceil(rows / chunk), body, table)

        fn = shard_map(shard, self.mesh, (P(),), P(axis, None))
        table = jax.jit(fn)(key_data)
        stats = layer.zero_stats()
        seed_data = jax.device_put(key_data, NamedSharding(self.mesh, P()))
        return sok_jax.EmbeddingState(table, None, seed_data, stats)

    initial_state = init_table  # the module starts from the chunked init

    # ------------------------------------------------------------- the batch
    def _ids(self, sparse: dict):
        """{feature: ids [B, nnz]} -> the layer's int32 [B, slots, P] (global
        row ids, -1 padding)."""
        parts = []
        for f, off in zip(self.features, self.offsets):
            ids = jnp.asarray(sparse[f.name]).astype(jnp.int32)
            b, nnz = ids.shape
            slots = math.ceil(nnz / self.pack)
            if slots * self.pack != nnz:
                ids = jnp.pad(ids, ((0, 0), (0, slots * self.pack - nnz)), constant_values=-1)
            parts.append(jnp.where(ids >= 0, ids + int(off), -1).reshape(b, slots, self.pack))
        return jnp.concatenate(parts, axis=1)

    def _slot_ranges(self):
        """(first, stop) lookup slots of each feature."""
        ends = np.cumsum(np.bincount(self.slot_feature, minlength=len(self.features)))
        return list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist()))

    def _pool(self, out):
        """[B, slots, D] -> [B, features, D]: a feature's slots summed (static
        slices: one fusion that reads the slots once)."""
        if self.num_slots == len(self.features):
            return out
        return jnp.stack([out[:, a:b].sum(axis=1) for a, b in self._slot_ranges()], axis=1)

    def _unpool(self, d_pooled):
        """The cotangent of `_pool`: each feature's gradient to each of its slots."""
        if self.num_slots == len(self.features):
            return d_pooled
        b, _, d = d_pooled.shape
        parts = [
            jnp.broadcast_to(d_pooled[:, k : k + 1], (b, stop - first, d))
            for k, (first, stop) in enumerate(self._slot_ranges())
        ]
        return jnp.concatenate(parts, axis=1)

    @staticmethod
    def dropped(module):
        """Ids dropped since init (the counters accumulate), over every device."""
        return module.state.stats.total()

    # ----------------------------------------------------------- inspection
    def slot_bytes(self) -> int:
        return optimizer_slots(self.optimizer, self.layer.num_rows, self.dim, self.layer.dtype)[0]

    def plan(self, optimizer_name: str = "") -> str:
        """The plan as text: features, rows, bytes, memory per device."""
        item = jnp.dtype(self.layer.dtype).itemsize
        n = self.num_devices
        lines = [
            f"embedding plan: one sok_jax.DistributedEmbedding (one shared table, sum combiner, "
            f"direct mode), rows sharded over {self.axis_name!r} on {n} device(s): key k on "
            f"device k % {n}",
            f"  {'feature':<8} {'rows':>12} {'first row':>12} {'ids/sample':>10} {'MB':>10}",
        ]
        for f, off in zip(self.features, self.offsets):
            lines.append(
                f"  {f.name:<8} {f.cardinality:>12,} {int(off):>12,} {f.nnz:>10} "
                f"{f.cardinality * self.dim * item / 1e6:>10,.1f}"
            )
        table = self.layer.num_rows * self.dim * item
        slots = self.slot_bytes()
        lines.append(
            f"  table {self.total_rows:,} rows x {self.dim} {jnp.dtype(self.layer.dtype).name} = "
            f"{self.total_rows * self.dim * item / 1e9:.2f} GB; per device "
            f"{self.layer.max_vocabulary_size_per_gpu:,} rows = {table / n / 1e9:.2f} GB + "
            f"{slots / n / 1e9:.2f} GB {optimizer_name} slots"
        )
        ids = sum(f.nnz for f in self.features)
        if self.pack == 1:
            layout = f"[B, {self.num_slots}, 1] ids"
        else:
            layout = (
                f"{ids} ids/sample packed as [B, {self.num_slots} slots, {self.pack}] "
                f"({self.num_slots * self.pack} positions; a feature's slots summed)"
            )
        lines.append(f"  lookup layout: {layout}")
        return "\n".join(lines)


class CollectionEmbedding(_ShardedSide):
    """The embedding side as `sok_jax.EmbeddingCollection`: one table per
    feature (its own cardinality, sum combiner), placed by the planner
    (`plan()` prints its choices), trained with the sparse path through
    `sok_jax.flax.ShardedEmbedding`. The same interface as `TableEmbedding`,
    whose one shared table with per-feature key offsets is SOK v1's form of
    the same work."""

    def __init__(
        self,
        features: Sequence[SparseFeature],
        dim: int,
        *,
        mesh,
        axis_name: str,
        optimizer,
        batch_size: int,
        dtype=jnp.float32,
        capacity_factor: float | None = None,
        check: bool = False,
        hbm_budget: int | None = None,
    ):
        self.features = tuple(features)
        self.dim = int(dim)
        self.optimizer = optimizer
        self.mesh, self.axis_name = mesh, axis_name
        self.total_rows = int(sum(f.cardinality for f in self.features))
        self.collection = sok_jax.EmbeddingCollection(
            [
                sok_jax.TableSpec(f.name, f.cardinality, self.dim, combiner="sum", dtype=dtype)
                for f in self.features
            ],
            [sok_jax.FeatureSpec(f.name, f.name, f.nnz) for f in self.features],
            mesh=mesh,
            axis_name=axis_name,
            batch_size=batch_size,
            capacity_factor=capacity_factor,
            optimizer=optimizer,
            check=check,
            hbm_budget=hbm_budget,
        )
        self.layer = self.collection

    def _ids(self, sparse):
        return {f.name: jnp.asarray(sparse[f.name]).astype(jnp.int32) for f in self.features}

    def _pool(self, outs):
        return jnp.stack([outs[f.name] for f in self.features], axis=1)

    def _unpool(self, d_pooled):
        return {f.name: d_pooled[:, k] for k, f in enumerate(self.features)}

    @staticmethod
    def dropped(module):
        """Ids dropped since init (the counters accumulate), over every table
        and device."""
        return sum(s.total() for s in module.state.stats.values())

    def plan(self, optimizer_name: str = "") -> str:
        ids = sum(f.nnz for f in self.features)
        return (
            f"embedding plan: sok_jax.EmbeddingCollection, one table per feature, "
            f"{self.total_rows:,} rows x {self.dim}, {optimizer_name} slots, "
            f"{ids} ids/sample in {len(self.features)} features\n" + str(self.collection.plan)
        )


# ------------------------------------------------------------------ steps
class TrainState(NamedTuple):
    """Everything a step updates (donated): the dense parameters and their
    optax state, the embedding module's state (`nnx.State`: its tables and
    sparse optimizer slots) and, on the dense-compatible path only, the
    table's optax state (None on the sparse path)."""

    params: Any
    dense_opt: Any
    emb: Any
    table_opt: Any = None


def bce(logits, labels):
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def make_train_step(graphdef, embed: _ShardedSide, dense_tx, *, table_tx=None):
    """`step(state: TrainState, batch, upcoming=None) -> (state, loss, keys
    dropped so far)`; `upcoming`: the next batch, whose rows the host-cached
    tables prefetch while this step runs (sparse path only).

    Sparse path (table_tx None): the embedding module's lookup gives the
    pooled vectors without a table gradient; the loss is differentiated
    w.r.t. the dense parameters and the pooled vectors; the module's
    optimizer updates the touched rows in place. `table_tx` (an optax
    optimizer; one-table form only): the dense-compatible path instead,
    jax.grad w.r.t. the whole table (O(table) per step)."""

    def apply_model(params, dense, pooled):
        return nnx.merge(graphdef, params)(dense, pooled)

    def step(state: TrainState, batch, upcoming=None):
        emb = embed.module(state.emb)
        table_opt = state.table_opt
        if table_tx is None:
            ahead = None if upcoming is None else upcoming.sparse
            pooled, ctx = embed.lookup(emb, batch.sparse, ahead)
            loss, (g_params, g_pooled) = jax.value_and_grad(
                lambda p, e: bce(apply_model(p, batch.dense, e), batch.labels), (0, 1)
            )(state.params, pooled)
            # Touched rows only, summed on their owners, updated in place.
            embed.update(emb, ctx, g_pooled)
        else:
            tables = emb.state

            def loss_fn(params, table):
                pooled, new = embed.apply_table(
                    dataclasses.replace(tables, table=table), batch.sparse, training=True
                )
                return bce(apply_model(params, batch.dense, pooled), batch.labels), new.stats

            (loss, stats), (g_params, g_table) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
                state.params, tables.table
            )
            upd, table_opt = table_tx.update(g_table, table_opt, tables.table)
            table = optax.apply_updates(tables.table, upd)
            emb.set_state(dataclasses.replace(tables, table=table, stats=stats))
        # Replicated parameters + a sharded batch: XLA all-reduces g_params.
        upd, dense_opt = dense_tx.update(g_params, state.dense_opt, state.params)
        params = optax.apply_updates(state.params, upd)
        new = TrainState(params, dense_opt, embed.state_of(emb), table_opt)
        return new, loss, embed.dropped(emb)

    return step


def make_predict(graphdef, embed: _ShardedSide):
    """`predict(params, emb_state, batch) -> logits [B]` (no insertion, no
    update); `emb_state` is `TrainState.emb`."""

    def predict(params, emb_state, batch):
        pooled = embed.apply(embed.module(emb_state), batch.sparse, training=False)
        return nnx.merge(graphdef, params)(batch.dense, pooled)

    return predict


# --------------------------------------------- sub-steps (the time split)
def make_embedding_step(embed: _ShardedSide):
    """The embedding half of a step: lookup + sparse update with a given
    cotangent of the pooled vectors. `(emb, sparse, d_pooled) -> emb` on the
    module's state (`TrainState.emb`); donate it."""

    def step(emb, sparse, d_pooled):
        module = embed.module(emb)
        _, ctx = embed.lookup(module, sparse)
        embed.update(module, ctx, d_pooled)
        return embed.state_of(module)

    return step


def make_dense_step(graphdef, dense_tx):
    """The dense half of a step: forward, backward and optimizer of the
    dense model given the pooled vectors. `(params, dense_opt, dense, pooled,
    labels) -> (params, dense_opt, loss, d_pooled)`; donate the first two."""

    def step(params, dense_opt, dense, pooled, labels):
        loss, (g_params, g_pooled) = jax.value_and_grad(
            lambda p, e: bce(nnx.merge(graphdef, p)(dense, e), labels), (0, 1)
        )(params, pooled)
        upd, dense_opt = dense_tx.update(g_params, dense_opt, params)
        return optax.apply_updates(params, upd), dense_opt, loss, g_pooled

    return step


def make_exchange_step(embed, batch_size: int):
    """The traffic of one step's exchange alone: the all_to_all of the keys,
    of the vectors and of their gradients, at the layer's bucket sizes.
    `(keys, vectors) -> (keys, vectors)`; None on one device (the layer
    then looks up locally: no exchange). Returns (step, example args)."""
    n = int(embed.mesh.shape[embed.axis_name])
    if n == 1:
        return None, None
    if isinstance(embed, CollectionEmbedding):
        sizes = embed.collection.exchange_sizes(batch_size)
        key_words, values = sizes["key_words"], sizes["vector_values"]
    else:
        layer = embed.layer
        local = batch_size // n
        full = layer.max_feature_num * local
        cap = (
            full
            if layer.capacity_factor is None
            else min(full, math.ceil(layer.capacity_factor * full / n))
        )
        key_words, values = cap, cap * embed.dim
    if key_words == 0:  # every table replicated: nothing crosses
        return None, None
    axis = embed.axis_name

    def body(keys, vectors):
        a2a = lambda x: jax.lax.all_to_all(x, axis, 0, 0, tiled=True)  # noqa: E731
        keys = a2a(keys)
        back = a2a(vectors)  # the looked-up vectors
        grads = a2a(back * 0.5)  # their gradients, the other way
        return keys, grads

    row = P(axis)
    fn = shard_map(body, embed.mesh, (row, row), (row, row))
    sh = NamedSharding(embed.mesh, row)
    keys = jax.device_put(jnp.zeros((n * n * key_words,), jnp.uint32), sh)
    vecs = jax.device_put(jnp.zeros((n * n * values,), jnp.float32), sh)
    return fn, (keys, vecs)
