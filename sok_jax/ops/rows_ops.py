"""Row movers: the `sok_rows_*` FFI targets.

They copy whole rows between two row-major tables of one dtype (a table's
vectors [R, D] of any float dtype, or an optimizer slot [R, D] / [R]) and are
how the host storage tiers (`sok_jax.distributed.storage`) move rows between
a table in pinned host memory and its cache in HBM: XLA hands the custom call
the host pointer and the kernel reads or writes the rows over the host link
(XLA's own gather and scatter do not take a host operand).

* `gather_rows(src, rows)`: out[i] = src[rows[i]], zeros where rows[i] lies
  outside [0, R).
* `scatter_rows(dst, rows, values)`: dst[rows[i]] = values[i] where rows[i]
  lies in [0, R), in place (the output aliases `dst`; donate it under jit).
  The rows in range must be distinct: which of two values for one row lands
  is not defined on the GPU.

* `copy_rows(dst, dst_rows, src, src_rows, count=None)`: dst[dst_rows[i]] =
  src[src_rows[i]] where both name a row, in place (one pass, no
  intermediate: what moves rows between a host store and its cache). The
  dst rows in range must be distinct. With `count` (a traced int32), only
  the pairs i < count are read: a list whose live pairs lead costs a pass
  over those alone, however long its padding.

* `scatter_rows_async(dst, rows, values)` then `join_rows(dst, *keep)`:
  `scatter_rows`, which on a GPU runs on a side stream beside the ops that
  follow it (a load from the same host store: the host link then carries
  both directions at once) until `join_rows`, which returns `dst` once the
  scatter has finished. Between the two, nothing may read the scattered
  rows, and `keep` must hold `rows` and `values` (they stay alive until
  the join) and the outputs of the ops meant to run beside the scatter
  (the join comes after them). On the CPU the scatter is complete at once.
* `copy_rows_async(dst, dst_rows, src, src_rows, count=None)`: `copy_rows`,
  which on a GPU runs on that side stream until a later `join_rows`. It
  reads its own copies of the row lists and count, so nothing need be kept
  alive; but until the join nothing may read the rows it writes, nor write
  the rows it reads. (What brings a prefetched batch's rows into a cache
  while the step goes on.)

`sok_jax.ops.reference` has them all under the same names in plain JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sok_jax import _native  # noqa: F401  (registers the targets)

__all__ = [
    "gather_rows",
    "scatter_rows",
    "scatter_rows_async",
    "join_rows",
    "copy_rows",
    "copy_rows_async",
]


def _check_table(table, what):
    if table.ndim not in (1, 2):
        raise ValueError(f"{what} must be [R] or [R, W], got shape {table.shape}")


def _check_rows(rows):
    if rows.ndim != 1 or rows.dtype != jnp.int32:
        raise ValueError(f"rows must be int32 [K], got {rows.dtype} {rows.shape}")


def _in_place(target: str, dst, *args):
    """The custom call `target(dst, *args)` whose output is `dst`, updated in
    place (aliased)."""
    out = jax.ShapeDtypeStruct(dst.shape, dst.dtype)
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential", input_output_aliases={0: 0})
    return call(dst, *args)


def gather_rows(src: jax.Array, rows: jax.Array) -> jax.Array:
    """The rows `rows` of `src` ([K] + src.shape[1:], src's dtype); zeros
    where a row index lies outside [0, R)."""
    _check_table(src, "src")
    _check_rows(rows)
    out = jax.ShapeDtypeStruct((rows.shape[0], *src.shape[1:]), src.dtype)
    return jax.ffi.ffi_call("sok_rows_gather", out, vmap_method="sequential")(src, rows)


def scatter_rows(dst: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """`dst` with dst[rows[i]] = values[i] for every rows[i] in [0, R) (the
    rows in range distinct), in place."""
    _check_scatter(dst, rows, values)
    return _in_place("sok_rows_scatter", dst, rows, values)


def scatter_rows_async(dst: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """`scatter_rows`, finished only at a later `join_rows(dst, rows,
    values, ...)` (see the module docstring)."""
    _check_scatter(dst, rows, values)
    return _in_place("sok_rows_scatter_async", dst, rows, values)


def join_rows(x: jax.Array, *keep) -> jax.Array:
    """`x` once every `scatter_rows_async` before it has finished; `keep`
    (any arrays) stay alive until then."""
    return _in_place("sok_rows_join", x, *keep)


def _check_scatter(dst, rows, values):
    _check_table(dst, "dst")
    _check_rows(rows)
    want = (rows.shape[0], *dst.shape[1:])
    if values.shape != want or values.dtype != dst.dtype:
        raise ValueError(
            f"values must be {dst.dtype} {list(want)} (one row of dst per listed row), "
            f"got {values.dtype} {values.shape}"
        )


def copy_rows(dst: jax.Array, dst_rows: jax.Array, src: jax.Array, src_rows: jax.Array, count=None):
    """`dst` with dst[dst_rows[i]] = src[src_rows[i]] for i < `count` (all
    pairs when None) wherever both indices name a row (the dst rows in
    range distinct), in place."""
    return _copy("sok_rows_copy", dst, dst_rows, src, src_rows, count)


def copy_rows_async(
    dst: jax.Array, dst_rows: jax.Array, src: jax.Array, src_rows: jax.Array, count=None
):
    """`copy_rows`, finished only at a later `join_rows` (see the module
    docstring)."""
    return _copy("sok_rows_copy_async", dst, dst_rows, src, src_rows, count)


def _copy(target, dst, dst_rows, src, src_rows, count):
    _check_table(dst, "dst")
    _check_table(src, "src")
    _check_rows(dst_rows)
    _check_rows(src_rows)
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"src must have dst's dtype and row shape, got {src.dtype} {src.shape} for "
            f"{dst.dtype} {dst.shape}"
        )
    if src_rows.shape != dst_rows.shape:
        raise ValueError(
            f"src_rows and dst_rows must have one length, got {src_rows.shape} and "
            f"{dst_rows.shape}"
        )
    return _in_place(target, dst, dst_rows, src, src_rows, _count(count, dst_rows))


def _count(count, rows) -> jax.Array:
    """`count` as the int32 [1] operand; the list's length when None."""
    if count is None:
        return jnp.full((1,), rows.shape[0], jnp.int32)
    count = jnp.asarray(count)
    if count.size != 1 or not jnp.issubdtype(count.dtype, jnp.integer):
        raise ValueError(f"count must be one integer, got {count.dtype} {count.shape}")
    return count.reshape(1).astype(jnp.int32)
