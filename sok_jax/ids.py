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
        lengths = jnp.asarray(lengths)
        if lengths.ndim != 2:
            raise ValueError(f"lengths must be [batch, slot_num], got shape {tuple(lengths.shape)}")
        flat = lengths.reshape(-1).astype(jnp.int32)
        offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(flat, dtype=jnp.int32)])
        return cls(values, offsets, int(lengths.shape[1]))


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


def ragged_to_padded(ids: RaggedIds, weights=None, width: int | None = None):
    """Ragged ids as padded ones: (ids [batch, slot_num, width], weights of
    that shape or None, dropped [batch]: per sample the ids of bags longer
    than `width` that did not fit). `width` defaults to the longest bag the
    capacity allows (the capacity itself)."""
    bags = to_bags(ids, weights)
    b, s = bags.batch_shape
    width = int(bags.ids.shape[0] if width is None else width)
    offsets = bags.offsets
    length = jnp.maximum(offsets[1:] - offsets[:-1], 0)
    j = jnp.arange(width, dtype=jnp.int32)
    inside = j[None, :] < length[:, None]
    pos = jnp.clip(offsets[:-1, None] + j[None, :], 0, max(bags.ids.shape[0] - 1, 0))
    pad = checks.padding_value(bags.ids.dtype)
    padded = jnp.where(inside, bags.ids[pos], jnp.asarray(pad, bags.ids.dtype))
    w = None
    if bags.weights.shape[0]:
        w = jnp.where(inside, bags.weights[pos], 0.0).reshape(b, s, width)
    dropped = jnp.maximum(length - width, 0).reshape(b, s).sum(axis=1).astype(jnp.int32)
    return padded.reshape(b, s, width), w, dropped
