"""Read-only inference tables: a trained `DistributedEmbedding` state with
its rows stored in fewer bytes, looked up by the same sharded data path.

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
hash, its key placement) is the trained layer's. A quantized state cannot
be trained, exported as pairs or given an optimizer: the layer refuses it
(`refuse_outside_lookup`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sok_jax.distributed.online import join_hash_part, split_hash_part
from sok_jax.distributed.state import EmbeddingStats, check_like
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


# ------------------------------------------------------------ the layer


def _unit(layer):
    (unit,) = layer._tables.units
    return unit


def quantize(layer, state, dtype="int8") -> QuantizedState:
    """`state` (of `layer`, a `DistributedEmbedding`, any storage tier)
    with its logical table in the row format `dtype`, on the layer's mesh.

    Raises:
      ValueError: an unknown dtype, a state that is not the layer's, or a
        table holding NaN or Inf (no row format holds it faithfully).
    """
    if isinstance(state, QuantizedState):
        raise ValueError("quantize: the state is quantized already (quantize the float state)")
    tier = make_storage(dtype)
    layer._check_state(state)
    table, _ = layer.storage.logical(state.table, None, layer.num_devices)
    rows = _unit(layer).rows
    table = jax.device_put(table, rows.table_sharding)
    if not bool(jnp.all(jnp.isfinite(table))):
        raise ValueError("quantize: the table holds NaN or Inf; no inference row format holds it")
    sharding = tier.table_sharding(rows)
    converted = jax.jit(tier.convert, out_shardings=sharding)(table)
    stats = read_only_tables(layer._tables, tier.dtype).zero_stats()[_unit(layer).name]
    return QuantizedState(
        converted, state.slot_keys, state.seed, stats, state.scores, tier.dtype
    )


def state_like(layer, dtype) -> QuantizedState:
    """Shapes and dtypes of every leaf of the layer's quantized state."""
    float_state = layer._state_like
    tier = make_storage(dtype)
    table = jax.eval_shape(tier.convert, float_state.table)
    stats = jax.eval_shape(
        lambda: read_only_tables(layer._tables, tier.dtype).zero_stats()[_unit(layer).name]
    )
    return QuantizedState(
        table, float_state.slot_keys, float_state.seed, stats, float_state.scores, tier.dtype
    )


def refuse_outside_lookup(state) -> None:
    """A quantized state is read-only: any method of the layer but its
    inference lookup raises, naming what to do."""
    if isinstance(state, QuantizedState):
        raise ValueError(
            f"this state holds a read-only {state.dtype} inference table (from "
            "sok_jax.serving.quantize): it is only looked up, with apply(..., training=False); "
            "train, export or optimize the float state it was made from"
        )


def lookup(layer, qstate: QuantizedState, ids, weights, training: bool):
    """The layer's `_run` on a quantized state: (out float32, new qstate,
    ctx). Raises ValueError for a training lookup or a state of another
    layer, table or dim (at trace time)."""
    if training:
        raise ValueError(
            f"a {qstate.dtype} inference table is read-only: look it up with training=False "
            "(train the float state, then quantize it again)"
        )
    check_like(state_like(layer, qstate.dtype), qstate, "quantized state")
    unit = _unit(layer)
    tables = read_only_tables(layer._tables, qstate.dtype)
    outs, shards, stats, ctx = tables.run(
        {unit.name: (qstate.table, join_hash_part(qstate.slot_keys, qstate.scores))},
        qstate.seed,
        {unit.name: qstate.stats},
        layer._inputs(ids, weights),
        False,
        True,
    )
    table, hash_part = shards[unit.name]
    slot_keys, scores = split_hash_part(hash_part)
    new = dataclasses.replace(
        qstate, table=table, slot_keys=slot_keys, scores=scores, stats=stats[unit.name]
    )
    (out,) = outs.values()
    return out.astype(jnp.float32), new, ctx


def bytes_per_row(dim: int, dtype) -> int:
    """Bytes one row of width `dim` takes in the row format `dtype`."""
    name = check_dtype(dtype)
    return dim + 8 if name == "int8" else 2 * dim


def memory_of(qstate: QuantizedState) -> int:
    """Bytes of the table of a quantized state (its rows and their scales)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(qstate.table))
