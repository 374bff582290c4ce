"""Read-only inference tables: a trained `DistributedEmbedding` or
`EmbeddingCollection` state with its rows stored in fewer bytes, looked up
by the same sharded data path.

    qstate = sok_jax.serving.quantize(emb, state, "int8")
    out, qstate = emb.apply(qstate, ids, training=False)   # under jit, exportable

Row formats (`QUANTIZED_DTYPES`), bytes per row of width D against 4 D for
float32:
  * "int8": `QuantizedRows`, D uint8 codes and a float32 (scale, bias), D + 8
    bytes: scale = (max - min) / 255 and bias = min of the row, code
    q = round((w - bias) / scale) in 0..255, so each element is within
    scale / 2 of the trained one (a constant row has scale 0 and is exact).
    Looked up by `sok_quant_fwd`, which dequantizes as it combines.
  * "bfloat16" / "float16": the rows rounded to nearest, 2 D bytes, looked
    up by the float lookup itself (it takes 16-bit tables); each lookup's
    output is rounded once more to that dtype.
Outputs are float32. Padding, ids out of range, hash keys never trained
(zeros) and the combiners behave exactly as on the float table looked up
with `training=False`; a hash table also counts its unseen keys
(`stats.unseen`).

The tier of a quantized unit is a storage strategy (`Int8Storage`,
`HalfStorage`) beside `storage.py`'s; the unit's row strategy (direct or
hash, its placement) is the trained model's. A quantized state cannot be
trained, exported as pairs or given an optimizer: the layers refuse it
(`refuse_outside_lookup`).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sok_jax.distributed.online import join_hash_part, split_hash_part
from sok_jax.distributed.state import EmbeddingState, EmbeddingStats, check_like
from sok_jax.embedding import _lookup
from sok_jax.ops import checks, resolve
from sok_jax.ops.quant_ops import QuantizedRows

QUANTIZED_DTYPES = ("int8", "bfloat16", "float16")
_CODES = 255  # int8 codes are 0..255


@dataclasses.dataclass(frozen=True)
class QuantizedState:
    """A `DistributedEmbedding`'s state with its table in a read-only row
    format (`dtype`, one of `QUANTIZED_DTYPES`): `table` a `QuantizedRows`
    ("int8") or a 16-bit [n * R, D] array, sharded as the float table was;
    `slot_keys`, `seed`, `scores` the trained state's; `stats` the counters
    of the lookups made since `quantize`."""

    table: Any
    slot_keys: Any
    seed: Any
    stats: EmbeddingStats
    scores: Any = None
    dtype: str = "int8"


jax.tree_util.register_dataclass(
    QuantizedState,
    data_fields=["table", "slot_keys", "seed", "stats", "scores"],
    meta_fields=["dtype"],
)


# ------------------------------------------------------------ row formats


def check_dtype(dtype) -> str:
    """The row format's name, checked ("int8", "bfloat16" or "float16";
    jnp.bfloat16 and jnp.float16 are taken for their names)."""
    name = dtype if isinstance(dtype, str) else getattr(jnp.dtype(dtype), "name", None)
    if name not in QUANTIZED_DTYPES:
        raise ValueError(
            f"inference table dtype must be one of {QUANTIZED_DTYPES}, got {dtype!r}"
        )
    return name


def quantize_int8(table) -> QuantizedRows:
    """Rows [R, D] (any float dtype) as int8 codes with a per-row (scale,
    bias): bias the row's minimum, scale its range / 255."""
    t = table.astype(jnp.float32)
    lo, hi = jnp.min(t, axis=1), jnp.max(t, axis=1)
    scale = (hi - lo) / _CODES
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.round((t - lo[:, None]) / safe[:, None])
    q = jnp.where(scale[:, None] > 0, jnp.clip(q, 0, _CODES), 0).astype(jnp.uint8)
    return QuantizedRows(q, jnp.stack([scale, lo], axis=1))


def dequantize(table):
    """float32 rows of an inference table (a `QuantizedRows` or 16-bit rows)."""
    if isinstance(table, QuantizedRows):
        sb = table.scale_bias
        return table.q.astype(jnp.float32) * sb[:, :1] + sb[:, 1:]
    return table.astype(jnp.float32)


# ------------------------------------------------------------------ tiers


def _count_unseen(rows, found, keys):
    """`found` with, for a hash table, its keys that hold no row counted in
    `unseen` (an inference lookup inserts nothing, so a key without a row
    was never trained; padding is no key)."""
    if not rows.hashed:
        return found
    unseen = jnp.sum((found.rows < 0) & ~checks.is_padding(keys), dtype=jnp.int32)
    return found._replace(online={**(found.online or {}), "unseen": unseen})


@dataclasses.dataclass(frozen=True)
class _ReadOnlyStorage:
    """What every inference tier shares: rows in HBM, found by the unit's
    row strategy without insertion (lookups run with training=False)."""

    kind = "inference"
    cached = False

    def check_strategy(self, rows, implementation: str) -> None:
        return None

    def owner_rows(self, rows, table, hash_part, seed, received, training, ops):
        """The strategy's rows of the received keys (distinct per sender)."""
        found = rows.owner_rows(table, hash_part, seed, received, training)
        return _count_unseen(rows, found, received)

    def local_rows(self, rows, table, hash_part, seed, flat_ids, members, training, ops):
        found = rows.local_rows(table, hash_part, seed, flat_ids, members, training)
        return _count_unseen(rows, found, jnp.concatenate(flat_ids))

    def lookup_source(self, table):
        return table

    def _spec(self, axis, replicated: bool):
        return P(None, None) if replicated else P(axis, None)


@dataclasses.dataclass(frozen=True)
class Int8Storage(_ReadOnlyStorage):
    """int8 rows: a `QuantizedRows` shard, dequantized by `sok_quant_fwd`
    as it combines."""

    dtype = "int8"

    def convert(self, table) -> QuantizedRows:
        return quantize_int8(table)

    def table_spec(self, axis, replicated: bool):
        spec = self._spec(axis, replicated)
        return QuantizedRows(spec, spec)

    def table_sharding(self, rows):
        return QuantizedRows(rows.table_sharding, rows.table_sharding)

    def combine(self, combiner, implementation, fixed_nnz, table, ids, offsets, weights):
        """The exchange's lookup of this tier's source (`exchange._reader`)."""
        return resolve(implementation).lookup_combine_int8(
            table, ids, offsets, weights, combiner, fixed_nnz
        )


@dataclasses.dataclass(frozen=True)
class HalfStorage(_ReadOnlyStorage):
    """16-bit rows ("bfloat16" or "float16"): the float lookup reads them."""

    dtype: str = "bfloat16"

    def convert(self, table):
        return table.astype(self.dtype)

    def table_spec(self, axis, replicated: bool):
        return self._spec(axis, replicated)

    def table_sharding(self, rows):
        return rows.table_sharding

    def combine(self, combiner, implementation, fixed_nnz, table, ids, offsets, weights):
        return _lookup(
            combiner, implementation, fixed_nnz, jax.lax.stop_gradient(table), ids, offsets,
            weights,
        )


def make_storage(dtype) -> _ReadOnlyStorage:
    name = check_dtype(dtype)
    return Int8Storage() if name == "int8" else HalfStorage(name)


def read_only_tables(tables, dtype):
    """A layer's `ShardedTables` with every unit on the inference tier of
    `dtype` (same units, row strategies and lookups)."""
    tier = make_storage(dtype)
    units = tuple(dataclasses.replace(u, storage=tier) for u in tables.units)
    return dataclasses.replace(tables, units=units)


# ----------------------------------------------------- layer and collection
# Both sharded layers keep their shards as {unit: (table, hash part)} for
# `ShardedTables`; what follows works on that form, and `quantize` /
# `lookup` translate each layer's state to and from it.


def _quantized_shards(model, shards, tier) -> dict:
    """{unit: (rows in `tier`'s format, hash part)}: each unit's logical
    table (host store and cache merged for a host tier) converted on the
    devices, sharded as the float table is in HBM."""
    out = {}
    for u in model._tables.units:
        table, hash_part = shards[u.name]
        logical, _ = u.storage.logical(table, None, model.num_devices)
        logical = jax.device_put(logical, u.rows.table_sharding)
        if not bool(jnp.all(jnp.isfinite(logical))):
            raise ValueError(
                f"quantize: table {u.name!r} holds NaN or Inf; no inference row format holds it"
            )
        convert = jax.jit(tier.convert, out_shardings=tier.table_sharding(u.rows))
        out[u.name] = (convert(logical), hash_part)
    return out


def _run(model, dtype, shards, seed, stats, inputs):
    """The model's lookup of `inputs` on read-only shards (training=False)."""
    return read_only_tables(model._tables, dtype).run(shards, seed, stats, inputs, False, True)


def _zero_stats(model, dtype) -> dict:
    return read_only_tables(model._tables, dtype).zero_stats()


def _refuse_training(dtype):
    raise ValueError(
        f"a {dtype} inference table is read-only: look it up with training=False "
        "(train the float state, then quantize it again)"
    )


# DistributedEmbedding: a QuantizedState.


def _only_unit(layer):
    (unit,) = layer._tables.units
    return unit.name


def _hash_part(state) -> dict:
    return join_hash_part(state.slot_keys, state.scores)


def _quantize_layer(layer, state, tier) -> QuantizedState:
    name = _only_unit(layer)
    shards = {name: (state.table, _hash_part(state))}
    table, _ = _quantized_shards(layer, shards, tier)[name]
    stats = _zero_stats(layer, tier.dtype)[name]
    return QuantizedState(table, state.slot_keys, state.seed, stats, state.scores, tier.dtype)


def _layer_like(layer, dtype) -> QuantizedState:
    tier = make_storage(dtype)
    return jax.eval_shape(lambda state: _quantize_like(layer, state, tier), layer._state_like)


def _logical_like(model, unit: str):
    """Zeros shaped as a unit's logical table in HBM, what `quantize`
    converts whatever the unit's storage tier (for abstract evaluation)."""
    rows = model._tables.unit(unit).rows
    lead = rows.rows_per_device * (1 if rows.replicated else rows.num_devices)
    return jnp.zeros((lead, rows.dim), rows.dtype)


def _quantize_like(layer, state, tier) -> QuantizedState:
    """`_quantize_layer`'s shapes, traceable (no host check)."""
    name = _only_unit(layer)
    stats = _zero_stats(layer, tier.dtype)[name]
    table = tier.convert(_logical_like(layer, name))
    return QuantizedState(table, state.slot_keys, state.seed, stats, state.scores, tier.dtype)


def lookup(layer, qstate: QuantizedState, ids, weights, training: bool):
    """`DistributedEmbedding._run` on a quantized state: (out float32, new
    qstate, ctx). Raises ValueError for a training lookup or a state of
    another layer, table or dim (at trace time)."""
    if training:
        _refuse_training(qstate.dtype)
    check_quantized(layer, qstate)
    name = _only_unit(layer)
    outs, shards, stats, ctx = _run(
        layer,
        qstate.dtype,
        {name: (qstate.table, _hash_part(qstate))},
        qstate.seed,
        {name: qstate.stats},
        layer._inputs(ids, weights),
    )
    table, hash_part = shards[name]
    slot_keys, scores = split_hash_part(hash_part)
    new = dataclasses.replace(
        qstate, table=table, slot_keys=slot_keys, scores=scores, stats=stats[name]
    )
    (out,) = outs.values()
    return out.astype(jnp.float32), new, ctx


# EmbeddingCollection: a QuantizedCollectionState.


@dataclasses.dataclass(frozen=True)
class QuantizedCollectionState:
    """An `EmbeddingCollection`'s state with every table in the read-only
    row format `dtype`: `shards` {unit: `QuantizedShard`}, the trained
    state's seed, and per table the counters since `quantize`."""

    shards: dict
    seed: Any
    stats: dict
    dtype: str = "int8"


class QuantizedShard(NamedTuple):
    """One unit of a quantized collection: its rows (`QuantizedRows` or
    16-bit), and the trained unit's slot_keys and scores (None where it has
    none)."""

    table: Any
    slot_keys: Any = None
    scores: Any = None


jax.tree_util.register_dataclass(
    QuantizedCollectionState, data_fields=["shards", "seed", "stats"], meta_fields=["dtype"]
)


def _collection_shards(state) -> dict:
    return {k: (v.table, join_hash_part(v.slot_keys, v.scores)) for k, v in state.shards.items()}


def _as_shards(shards) -> dict:
    return {k: QuantizedShard(t, *split_hash_part(h)) for k, (t, h) in shards.items()}


def _quantize_collection(coll, state, tier) -> QuantizedCollectionState:
    shards = _quantized_shards(coll, _collection_shards(state), tier)
    return QuantizedCollectionState(
        _as_shards(shards), state.seed, _zero_stats(coll, tier.dtype), tier.dtype
    )


def _collection_like(coll, dtype) -> QuantizedCollectionState:
    tier = make_storage(dtype)

    def build(state):
        shards = {
            k: (tier.convert(_logical_like(coll, k)), h)
            for k, (_, h) in _collection_shards(state).items()
        }
        return QuantizedCollectionState(
            _as_shards(shards), state.seed, _zero_stats(coll, tier.dtype), tier.dtype
        )

    return jax.eval_shape(build, coll._state_like)


def lookup_collection(coll, qstate: QuantizedCollectionState, batch, weights, training: bool):
    """`EmbeddingCollection._run` on a quantized state: ({feature: float32
    output}, new qstate, ctx); raises as `lookup`."""
    if training:
        _refuse_training(qstate.dtype)
    check_quantized(coll, qstate)
    outs, shards, stats, ctx = _run(
        coll,
        qstate.dtype,
        _collection_shards(qstate),
        qstate.seed,
        qstate.stats,
        coll._inputs(batch, weights),
    )
    new = dataclasses.replace(qstate, shards=_as_shards(shards), stats=stats)
    outs = {k: v.astype(jnp.float32) for k, v in coll._outs(outs).items()}
    return outs, new, ctx


# The serving API.

QUANTIZED_STATES = (QuantizedState, QuantizedCollectionState)


def quantize(model, state, dtype="int8"):
    """`state` of `model` (a `DistributedEmbedding` or an
    `EmbeddingCollection`; any storage tier, placement, direct or hash)
    with every table in the read-only row format `dtype`, on the model's
    mesh: a `QuantizedState` or `QuantizedCollectionState`, looked up by
    `model.apply(qstate, ids, training=False)`.

    Raises:
      ValueError: an unknown dtype, a state that is not the model's, or a
        table holding NaN or Inf (no row format holds it faithfully).
    """
    if isinstance(state, QUANTIZED_STATES):
        raise ValueError("quantize: the state is quantized already (quantize the float state)")
    tier = make_storage(dtype)
    model._check_state(state)
    if isinstance(state, EmbeddingState):
        return _quantize_layer(model, state, tier)
    return _quantize_collection(model, state, tier)


# {model: {row format: the shapes of its quantized state}}, dying with the model
_LIKES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_quantized(model, qstate) -> None:
    """Trace-time: `qstate` is a quantized state of `model` (its layer or
    collection, tables, dims and row format); ValueError naming the field
    otherwise."""
    likes = _LIKES.setdefault(model, {})
    if qstate.dtype not in likes:
        layer = isinstance(model._state_like, EmbeddingState)
        likes[qstate.dtype] = (_layer_like if layer else _collection_like)(model, qstate.dtype)
    check_like(likes[qstate.dtype], qstate, "quantized state")


def refuse_outside_lookup(state) -> None:
    """A quantized state is read-only: any method of the layer but its
    inference lookup raises, naming what to do."""
    if isinstance(state, QUANTIZED_STATES):
        raise ValueError(
            f"this state holds read-only {state.dtype} inference tables (from "
            "sok_jax.serving.quantize): it is only looked up, with apply(..., training=False); "
            "train, export or optimize the float state it was made from"
        )


def bytes_per_row(dim: int, dtype) -> int:
    """Bytes one row of width `dim` takes in the row format `dtype`."""
    name = check_dtype(dtype)
    return dim + 8 if name == "int8" else 2 * dim
