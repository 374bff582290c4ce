"""Pure-JAX reference of every embedding op: the test oracle, and a fallback
users can select with `implementation="reference"`.

Same canonical bag layout and the same rules as the kernels (`embed_ops`):
ids outside [0, num_rows) are skipped; `mean` divides by the sum of the valid
weights and `sqrtn` by the square root of the sum of their squares; an empty
or zero-weight bag gives zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sok_jax.ops.embed_ops import SparseRowGrad, combiner_code


def _positions(ids, offsets):
    """Bag index of each position, and whether the position is in some bag."""
    n = ids.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    # Offsets are non-decreasing: the bag of j is the number of bag ends <= j.
    bag = jnp.searchsorted(offsets[1:], pos, side="right").astype(jnp.int32)
    inside = (pos >= offsets[0]) & (pos < offsets[-1])
    return bag, inside


def valid_rows(ids, num_rows: int):
    """(valid mask, row index with invalid ids mapped to 0)."""
    if jnp.issubdtype(ids.dtype, jnp.unsignedinteger):
        valid = ids < jnp.asarray(num_rows, ids.dtype) if num_rows < 2**32 else ids >= 0
    else:
        valid = (ids >= 0) & (ids < num_rows)
    return valid, jnp.where(valid, ids, 0).astype(jnp.int32)


def _bag_scales(ids, offsets, weights, combiner: str, num_rows: int):
    m = offsets.shape[0] - 1
    bag, inside = _positions(ids, offsets)
    valid, rows = valid_rows(ids, num_rows)
    valid = valid & inside
    w = weights if weights.shape[0] else jnp.ones(ids.shape, jnp.float32)
    w = jnp.where(valid, w, 0.0)
    seg = jnp.where(valid, bag, m)  # invalid positions go to a dropped segment
    wsum = jax.ops.segment_sum(w, seg, m + 1)[:m]
    w2sum = jax.ops.segment_sum(w * w, seg, m + 1)[:m]
    code = combiner_code(combiner)
    if code == 1:
        f = jnp.where(wsum != 0, 1.0 / jnp.where(wsum != 0, wsum, 1.0), 0.0)
    elif code == 2:
        f = jnp.where(w2sum > 0, jax.lax.rsqrt(jnp.where(w2sum > 0, w2sum, 1.0)), 0.0)
    else:
        f = jnp.ones_like(wsum)
    return seg, valid, rows, w, f


def lookup_combine(table, ids, offsets, weights, combiner: str, fixed_nnz: int = 0):
    """`jnp.take` + masked segment sum; differentiable by plain JAX autodiff.

    `fixed_nnz` is accepted for the kernels' signature; the bags are read
    from `offsets` (which must then say the same)."""
    m = offsets.shape[0] - 1
    seg, valid, rows, w, f = _bag_scales(ids, offsets, weights, combiner, table.shape[0])
    vecs = jnp.take(table, rows, axis=0).astype(jnp.float32)
    summed = jax.ops.segment_sum(w[:, None] * vecs, seg, m + 1)[:m]
    return (summed * f[:, None]).astype(table.dtype)


def lookup_combine_bwd(grad_out, ids, offsets, weights, combiner: str, num_rows: int):
    """Reference of the sparse backward: distinct rows ascending, summed grads."""
    n = ids.shape[0]
    seg, valid, rows, w, f = _bag_scales(ids, offsets, weights, combiner, num_rows)
    m = offsets.shape[0] - 1
    scale = w * jnp.concatenate([f, jnp.zeros((1,), f.dtype)])[seg]
    # float32 explicitly: under x64 a bare jnp.zeros would promote grads to float64.
    g = jnp.concatenate(
        [grad_out.astype(jnp.float32), jnp.zeros((1, grad_out.shape[1]), jnp.float32)]
    )
    contrib = scale[:, None] * g[jnp.minimum(seg, m)]
    key = jnp.where(valid, rows, num_rows)
    uniq, inv = jnp.unique(key, size=n, fill_value=num_rows, return_inverse=True)
    inv = inv.reshape(-1)
    grads = jax.ops.segment_sum(jnp.where(valid[:, None], contrib, 0.0), inv, n)
    real = uniq < num_rows
    count = jnp.sum(real).astype(jnp.int32)
    return SparseRowGrad(
        jnp.where(real, uniq, -1).astype(jnp.int32),
        jnp.where(real[:, None], grads, 0.0),
        count.reshape(1),
    )


def rows_to_dense(sparse: SparseRowGrad, num_rows: int, dtype=jnp.float32):
    real = jnp.arange(sparse.rows.shape[0]) < sparse.count[0]
    idx = jnp.where(real & (sparse.rows >= 0), sparse.rows, num_rows)
    dense = jnp.zeros((num_rows, sparse.grads.shape[1]), jnp.float32)
    return dense.at[idx].set(sparse.grads, mode="drop").astype(dtype)


def lookup_combine_bwd_dense(
    grad_out, ids, offsets, weights, combiner: str, num_rows: int, dtype=jnp.float32
):
    sparse = lookup_combine_bwd(grad_out, ids, offsets, weights, combiner, num_rows)
    return rows_to_dense(sparse, num_rows, dtype)
