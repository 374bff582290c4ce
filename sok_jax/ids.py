"""The id forms `embed` accepts, and their reduction to one canonical layout.

Forms:
  * padded: an integer array [batch, slot_num, max_nnz], -1 (0xFFFFFFFF for
    uint32) for "no key";
  * `RaggedIds`: flat values with a static capacity plus per-(sample, slot)
    lengths or offsets;
  * `jax.experimental.sparse.BCOO` of dense shape [batch * slot_num, max_nnz]
    (SOK's SparseTensor input) or [batch, slot_num, max_nnz].

Canonical layout (`Bags`): flat ids [N], int32 offsets [M + 1] with
M = batch * slot_num, float32 weights [N] or [0], and the output's leading
shape (batch, slot_num).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from sok_jax.ops import checks


class Bags(NamedTuple):
    """Flat `ids` [N], int32 `offsets` [M + 1], float32 `weights` [N] or [0],
    the output's leading shape (batch, slot_num), and `fixed_nnz`: > 0 when
    bag b is exactly positions [b * fixed_nnz, (b + 1) * fixed_nnz) (padded
    and BCOO forms), so that the forward kernel reads no offsets."""

    ids: jax.Array
    offsets: jax.Array
    weights: jax.Array
    batch_shape: tuple[int, int]
    fixed_nnz: int = 0

    @classmethod
    def padded(cls, flat_ids, flat_weights, batch_shape: tuple[int, int], nnz: int) -> "Bags":
        """The bags of padded ids [*batch_shape, nnz], flattened, and their flat
        float32 weights (None: unweighted): bag b is [b * nnz, (b + 1) * nnz)."""
        m = batch_shape[0] * batch_shape[1]
        offsets = jnp.arange(m + 1, dtype=jnp.int32) * nnz
        w = jnp.zeros((0,), jnp.float32) if flat_weights is None else flat_weights
        return cls(flat_ids, offsets, w, tuple(batch_shape), nnz)


@dataclasses.dataclass(frozen=True)
class RaggedIds:
    """Ragged ids: `values` [capacity] and int32 `offsets` [batch*slot_num + 1].

    Bag (b, s) holds values[offsets[b*slot_num + s] : offsets[b*slot_num + s + 1]];
    entries past offsets[-1] are unused capacity. Build it with
    `RaggedIds.from_lengths(values, lengths)` from lengths [batch, slot_num].
    """

    values: Any
    offsets: Any
    slot_num: int

    @classmethod
    def from_lengths(cls, values, lengths) -> "RaggedIds":
        """Ragged ids from `values` [capacity] and integer `lengths`
        [batch, slot_num] (bag (b, s) holds the next lengths[b, s] values).

        Raises:
          ValueError: lengths of another rank or a non-integer dtype; and
            where `lengths` are concrete (not traced), a negative length or
            lengths summing past the capacity. Traced lengths cannot be
            checked here: the ids such lengths lose are counted where the
            ragged ids are used (`stats.invalid`, `count_invalid_ids`).
        """
        lengths = jnp.asarray(lengths)
        if lengths.ndim != 2:
            raise ValueError(f"lengths must be [batch, slot_num], got shape {tuple(lengths.shape)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be integers, got {lengths.dtype}")
        concrete = not isinstance(lengths, jax.core.Tracer)
        if concrete and (np.asarray(lengths) < 0).any():
            first = np.argwhere(np.asarray(lengths) < 0)[0]
            raise ValueError(
                f"lengths must be >= 0; lengths[{first[0]}, {first[1]}] is "
                f"{int(np.asarray(lengths)[tuple(first)])}"
            )
        flat = lengths.reshape(-1).astype(jnp.int32)
        offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(flat, dtype=jnp.int32)])
        if concrete and np.ndim(values) == 1:
            _check_offsets(offsets, np.shape(values)[0])
        return cls(values, offsets, int(lengths.shape[1]))


def _check_offsets(offsets, capacity: int) -> None:
    """Concrete offsets: non-negative, non-decreasing, ending within the
    capacity (ValueError naming the first bag that is not)."""
    o = np.asarray(offsets).astype(np.int64)
    if o.size and o[0] < 0:
        raise ValueError(f"ids.offsets must be >= 0, got offsets[0] = {int(o[0])}")
    down = np.diff(o) < 0
    if down.any():
        b = int(np.argmax(down))
        raise ValueError(
            f"ids.offsets must be non-decreasing (no negative length); bag {b} runs from "
            f"{int(o[b])} to {int(o[b + 1])}"
        )
    if o.size and o[-1] > capacity:
        raise ValueError(
            f"the ragged bags end at {int(o[-1])} (offsets[-1], the sum of the lengths) but the "
            f"values hold only {capacity}: the ids past the capacity would be lost"
        )


jax.tree_util.register_dataclass(
    RaggedIds, data_fields=["values", "offsets"], meta_fields=["slot_num"]
)


def _weights(weights, shape, name="weights"):
    if weights is None:
        return jnp.zeros((0,), jnp.float32)
    weights = jnp.asarray(weights)
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of the ids {tuple(shape)}, got {tuple(weights.shape)}"
        )
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {weights.dtype}")
    return weights.astype(jnp.float32).reshape(-1)


def to_bags(ids, weights=None, slot_num: int | None = None) -> Bags:
    """Reduces any accepted id form (and its weights) to `Bags`."""
    if isinstance(ids, RaggedIds):
        values = checks.as_key_array(ids.values, "ids.values")
        offsets = jnp.asarray(ids.offsets)
        if values.ndim != 1:
            raise ValueError(f"ids.values must be rank 1, got shape {tuple(values.shape)}")
        if offsets.ndim != 1 or not jnp.issubdtype(offsets.dtype, jnp.integer):
            raise ValueError(f"ids.offsets must be an integer vector, got {offsets.dtype}")
        m = offsets.shape[0] - 1
        if not isinstance(offsets, jax.core.Tracer):
            _check_offsets(offsets, values.shape[0])
        if ids.slot_num <= 0 or m % ids.slot_num:
            raise ValueError(
                f"ids.offsets describes {m} bags, not a multiple of slot_num={ids.slot_num}"
            )
        w = weights.values if isinstance(weights, RaggedIds) else weights
        return Bags(
            values,
            offsets.astype(jnp.int32),
            _weights(w, values.shape),
            (m // ids.slot_num, ids.slot_num),
        )
    if isinstance(ids, jsparse.BCOO):
        return _bcoo_to_bags(ids, weights, slot_num)
    ids = checks.as_key_array(ids)
    if ids.ndim != 3:
        raise ValueError(
            "padded ids must be [batch, slot_num, max_nnz] (use -1 for no key), "
            f"got shape {tuple(ids.shape)}"
        )
    w = None if weights is None else _weights(weights, ids.shape)
    return Bags.padded(ids.reshape(-1), w, ids.shape[:2], ids.shape[2])


def _bcoo_to_bags(ids, weights, slot_num):
    """BCOO [batch*slot_num, max_nnz] (or [batch, slot_num, max_nnz]) -> padded bags."""
    shape = tuple(ids.shape)
    if ids.n_batch != 0 or ids.n_dense != 0:
        raise ValueError("BCOO ids must have n_batch=0 and n_dense=0")
    if len(shape) == 3:
        b, s, nnz = shape
    elif len(shape) == 2:
        if slot_num is None:
            raise ValueError("BCOO ids of dense shape [batch*slot_num, max_nnz] need slot_num=")
        if shape[0] % slot_num:
            raise ValueError(f"BCOO rows {shape[0]} are not a multiple of slot_num={slot_num}")
        b, s, nnz = shape[0] // slot_num, slot_num, shape[1]
    else:
        raise ValueError(f"BCOO ids must be rank 2 or 3, got shape {shape}")
    data = checks.as_key_array(ids.data, "ids.data")
    idx = ids.indices.reshape(-1, len(shape))
    flat = jnp.ravel_multi_index(tuple(idx[:, i] for i in range(len(shape))), shape, mode="clip")
    # BCOO pads with out-of-bounds indices: send those to a dropped slot.
    inb = jnp.all(idx < jnp.asarray(shape), axis=1)
    flat = jnp.where(inb, flat, b * s * nnz)
    dense = jnp.full((b * s * nnz,), checks.padding_value(data.dtype), data.dtype)
    dense = dense.at[flat].set(data, mode="drop")
    w = None
    if weights is not None:
        wdata = weights.data if isinstance(weights, jsparse.BCOO) else jnp.asarray(weights)
        if wdata.shape != ids.data.shape:
            raise ValueError(
                f"weights must match the BCOO's data shape {tuple(ids.data.shape)}, "
                f"got {tuple(wdata.shape)}"
            )
        w = (
            jnp.zeros((b * s * nnz,), jnp.float32)
            .at[flat]
            .set(wdata.astype(jnp.float32), mode="drop")
        )
    return Bags.padded(dense, w, (b, s), nnz)


def invalid_id_mask(bags: Bags, num_rows: int):
    """Ids in some bag that are neither padding nor a row in [0, num_rows)."""
    valid, _ = checks.valid_rows(bags.ids, num_rows)
    _, inside = checks.bag_of_positions(bags.offsets, bags.ids.shape[0])
    return inside & ~valid & ~checks.is_padding(bags.ids)


class RaggedBags(NamedTuple):
    """What of each ragged bag [M] can be read: `start`, `kept` (how many of
    its ids, from `start`, are read) and `lost` (the ids it names but that
    are not read: past the width or the capacity, or all of a malformed
    bag's; a negative length counts 1)."""

    start: jax.Array
    kept: jax.Array
    lost: jax.Array


def ragged_bags(offsets, capacity: int, width: int | None = None) -> RaggedBags:
    """Traced offsets [M + 1] checked against the bag rule: bag b is
    well-formed when its length is >= 0 and it starts at or past every
    earlier offset, at 0 or later (else it overlaps ids of earlier bags or
    lies before the values: none of it is read). A well-formed bag keeps
    its ids within the capacity and the first `width` of them (None: no
    limit)."""
    start, end = offsets[:-1], offsets[1:]
    length = end - start
    reach = jax.lax.cummax(offsets)[:-1]
    ok = (length >= 0) & (start >= reach) & (start >= 0)
    kept = jnp.clip(jnp.minimum(end, capacity) - start, 0, None)
    if width is not None:
        kept = jnp.minimum(kept, width)
    kept = jnp.where(ok, kept, 0)
    lost = jnp.where(ok, length - kept, jnp.where(length < 0, 1, length))
    return RaggedBags(start, kept.astype(jnp.int32), lost.astype(jnp.int32))


def count_lost_ragged(ids) -> jax.Array:
    """How many ids a `RaggedIds` names but no lookup reads (lengths past
    the values' capacity, negative lengths and the bags they shift): int32
    scalar, 0 for every other id form."""
    if not isinstance(ids, RaggedIds):
        return jnp.zeros((), jnp.int32)
    offsets = jnp.asarray(ids.offsets).astype(jnp.int32)
    return jnp.sum(ragged_bags(offsets, int(jnp.shape(ids.values)[0])).lost)


def ragged_to_padded(ids: RaggedIds, weights=None, width: int | None = None):
    """Ragged ids as padded ones: (ids [batch, slot_num, width], weights of
    that shape or None, dropped [batch]: per sample the ids that did not
    make it: of bags longer than `width`, past the values' capacity, or of
    malformed bags, see `ragged_bags`). `width` defaults to the longest bag
    the capacity allows (the capacity itself)."""
    bags = to_bags(ids, weights)
    b, s = bags.batch_shape
    capacity = bags.ids.shape[0]
    width = int(capacity if width is None else width)
    rb = ragged_bags(bags.offsets, capacity, width)
    j = jnp.arange(width, dtype=jnp.int32)
    inside = j[None, :] < rb.kept[:, None]
    pos = jnp.clip(rb.start[:, None] + j[None, :], 0, max(capacity - 1, 0))
    pad = checks.padding_value(bags.ids.dtype)
    padded = jnp.where(inside, bags.ids[pos], jnp.asarray(pad, bags.ids.dtype))
    w = None
    if bags.weights.shape[0]:
        w = jnp.where(inside, bags.weights[pos], 0.0).reshape(b, s, width)
    dropped = rb.lost.reshape(b, s).sum(axis=1).astype(jnp.int32)
    return padded.reshape(b, s, width), w, dropped


def check_ids(ids, key_dtype):
    """Host check of a batch before it enters a jitted step: the ids as
    numpy arrays of the table's key dtype, or a ValueError naming what does
    not fit. Under `jit` (and in `jnp.asarray`) JAX without jax_enable_x64
    turns int64 ids into int32 before any layer sees them, so 2^33 + 1
    silently becomes 1; floats, likewise, are no keys. Padding (-1,
    0xFFFFFFFF for uint32) is allowed.

    Args:
      ids: padded ids (any integer array-like), a `RaggedIds` (its values
        are checked), a BCOO (its data), or for an `EmbeddingCollection` a
        dict {feature: ids}.
      key_dtype: a key dtype, or what has one: a `DistributedEmbedding`, a
        `TableSpec`, or (with a dict of ids) an `EmbeddingCollection`.

    Returns:
      `ids` in the same form, its values numpy arrays of the key dtype.

    Raises:
      ValueError: a value is not an integer or does not fit the key dtype.
    """
    if isinstance(ids, dict):
        specs = getattr(key_dtype, "feature_specs", None)
        if specs is None:
            return {k: check_ids(v, key_dtype) for k, v in ids.items()}
        unknown = sorted(set(ids) - set(specs))
        if unknown:
            raise ValueError(f"check_ids: no features {unknown}; the features are {sorted(specs)}")
        tables = key_dtype.table_specs
        return {k: _checked_values(v, tables[specs[k].table].key_dtype, k) for k, v in ids.items()}
    return _checked_values(ids, getattr(key_dtype, "key_dtype", key_dtype), None)


def _checked_values(ids, key_dtype, feature):
    what = "ids" if feature is None else f"feature {feature!r}: ids"
    if isinstance(ids, RaggedIds):
        values = checks.host_keys(ids.values, key_dtype, f"{what}.values", padding_ok=True)
        return dataclasses.replace(ids, values=values)
    if isinstance(ids, jsparse.BCOO):
        data = checks.host_keys(ids.data, key_dtype, f"{what}.data", padding_ok=True)
        return jsparse.BCOO((data, ids.indices), shape=ids.shape)
    return checks.host_keys(ids, key_dtype, what, padding_ok=True)
