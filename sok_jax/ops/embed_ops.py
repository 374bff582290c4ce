"""Raw FFI wrappers of the embedding targets (no autodiff), with trace-time checks.

Every op works on the canonical bag layout that `sok_jax.ids` builds from any
input form: flat `ids` [N] (int32, uint32 or int64), `offsets` int32 [M + 1]
(bag b holds positions [offsets[b], offsets[b+1])), and `weights` float32 [N]
or an empty [0] array for "unweighted". An id that is not in [0, num_rows) is
skipped (padding, out of range).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax import _native  # noqa: F401  (registers the targets)

COMBINERS = {"sum": 0, "mean": 1, "sqrtn": 2}
KEY_DTYPES = (jnp.dtype(jnp.int32), jnp.dtype(jnp.uint32), jnp.dtype(jnp.int64))
TABLE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class SparseRowGrad(NamedTuple):
    """The gradient of a table restricted to the rows a batch touched.

    Attributes:
      rows: int32 [capacity]; the distinct rows, ascending, -1 beyond `count`.
      grads: float32 [capacity, D]; the summed gradient of each row, zeros
        beyond `count`.
      count: int32 [1]; how many entries of `rows` are real.
    """

    rows: jax.Array
    grads: jax.Array
    count: jax.Array


def combiner_code(combiner: str) -> int:
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {sorted(COMBINERS)}, got {combiner!r}")
    return COMBINERS[combiner]


def check_table(table, name: str = "table") -> None:
    if table.ndim != 2:
        raise ValueError(f"{name} must be rank 2 [rows, D], got shape {tuple(table.shape)}")
    if jnp.dtype(table.dtype) not in TABLE_DTYPES:
        raise ValueError(
            f"{name} must be float32, bfloat16 or float16, got {jnp.dtype(table.dtype).name}"
        )


def check_bags(ids, offsets, weights) -> None:
    if ids.ndim != 1:
        raise ValueError(f"ids must be rank 1 (flattened), got shape {tuple(ids.shape)}")
    if jnp.dtype(ids.dtype) not in KEY_DTYPES:
        raise ValueError(f"ids must be int32, uint32 or int64, got {jnp.dtype(ids.dtype).name}")
    if offsets.ndim != 1 or offsets.shape[0] < 1 or offsets.dtype != jnp.int32:
        raise ValueError(
            f"offsets must be int32 [num_bags + 1], got {offsets.dtype} {tuple(offsets.shape)}"
        )
    if (
        weights.dtype != jnp.float32
        or weights.ndim != 1
        or weights.shape[0]
        not in (
            0,
            ids.shape[0],
        )
    ):
        raise ValueError(
            f"weights must be float32 [{ids.shape[0]}] (or [0] for none), got "
            f"{weights.dtype} {tuple(weights.shape)}"
        )


def check_fixed_nnz(ids, offsets, fixed_nnz: int) -> None:
    m = offsets.shape[0] - 1
    if fixed_nnz < 0 or (fixed_nnz > 0 and ids.shape[0] != m * fixed_nnz):
        raise ValueError(
            f"fixed_nnz={fixed_nnz} must be 0 or tile the ids exactly "
            f"(len(ids)={ids.shape[0]}, num_bags={m})"
        )


def lookup_combine(table, ids, offsets, weights, combiner: str, fixed_nnz: int = 0):
    """Looks up and combines each bag: [num_bags, D] in the table's dtype.

    `fixed_nnz` > 0 promises that bag b is positions [b * fixed_nnz,
    (b + 1) * fixed_nnz) (padded and BCOO ids, where `offsets` is exactly
    that): the kernel then reads no offsets (the one-key-per-bag case is a
    plain gather). 0: the bags are wherever `offsets` says.
    """
    check_table(table)
    check_bags(ids, offsets, weights)
    check_fixed_nnz(ids, offsets, fixed_nnz)
    m = offsets.shape[0] - 1
    out = jax.ShapeDtypeStruct((m, table.shape[1]), table.dtype)
    return jax.ffi.ffi_call("sok_embed_fwd", out, vmap_method="sequential")(
        table,
        ids,
        offsets,
        weights,
        combiner=np.int32(combiner_code(combiner)),
        fixed_nnz=np.int64(fixed_nnz),
    )


def bwd_workspace_bytes(n: int, dim: int) -> int:
    """Bytes of device workspace the CUDA backward needs for n ids of width
    dim (the kernel checks it): nine int arrays of n, cub's sort / run-length
    / scan temporaries (bounded by 16 n + 4 MiB), the chunk partials of long
    runs, and alignment slack. The CPU handler ignores it."""
    return 36 * n + (16 * n + (4 << 20)) + (n // 64 + 1) * dim * 4 + 8192


def _check_grad_out(grad_out, ids, offsets, weights) -> None:
    check_bags(ids, offsets, weights)
    if grad_out.ndim != 2 or grad_out.shape[0] != offsets.shape[0] - 1:
        raise ValueError(
            f"grad_out must be [num_bags={offsets.shape[0] - 1}, D], got {tuple(grad_out.shape)}"
        )
    if jnp.dtype(grad_out.dtype) not in TABLE_DTYPES:
        raise ValueError(f"grad_out must be a float type, got {grad_out.dtype}")


def lookup_combine_bwd(grad_out, ids, offsets, weights, combiner: str, num_rows: int):
    """Per distinct row, the summed gradient: a `SparseRowGrad` of capacity N.

    Sort + run-length on the device (cub), summed in position order, no float
    atomics: deterministic.
    """
    _check_grad_out(grad_out, ids, offsets, weights)
    n, d = ids.shape[0], grad_out.shape[1]
    outs = (
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((bwd_workspace_bytes(n, d),), jnp.uint8),
    )
    rows, grads, count, _ = jax.ffi.ffi_call("sok_embed_bwd", outs, vmap_method="sequential")(
        grad_out,
        ids,
        offsets,
        weights,
        combiner=np.int32(combiner_code(combiner)),
        num_rows=np.int64(num_rows),
    )
    return SparseRowGrad(rows, grads, count)


def lookup_combine_bwd_dense(
    grad_out, ids, offsets, weights, combiner: str, num_rows: int, dtype=jnp.float32
):
    """The dense [num_rows, D] table cotangent in `dtype`: the same sums as
    `rows_to_dense(lookup_combine_bwd(...))`, in one target (on the GPU each
    touched row is written once, straight from the sorted runs)."""
    _check_grad_out(grad_out, ids, offsets, weights)
    n, d = ids.shape[0], grad_out.shape[1]
    outs = (
        jax.ShapeDtypeStruct((num_rows, d), dtype),
        jax.ShapeDtypeStruct((bwd_workspace_bytes(n, d),), jnp.uint8),
    )
    dense, _ = jax.ffi.ffi_call("sok_embed_bwd_dense", outs, vmap_method="sequential")(
        grad_out.astype(dtype), ids, offsets, weights, combiner=np.int32(combiner_code(combiner))
    )
    return dense


def weight_grad(table, grad_out, ids, offsets, weights, combiner: str):
    """Cotangent of the per-id weights: float32 [N], zero for skipped ids."""
    check_table(table)
    check_bags(ids, offsets, weights)
    if weights.shape[0] != ids.shape[0]:
        raise ValueError("weight_grad needs weights of the same length as ids")
    out = jax.ShapeDtypeStruct((ids.shape[0],), jnp.float32)
    return jax.ffi.ffi_call("sok_embed_wgrad", out, vmap_method="sequential")(
        table,
        grad_out.astype(table.dtype),
        ids,
        offsets,
        weights,
        combiner=np.int32(combiner_code(combiner)),
    )


def rows_to_dense(sparse: SparseRowGrad, num_rows: int, dtype=jnp.float32):
    """The dense [num_rows, D] gradient of a `SparseRowGrad` (rows are unique,
    so this is a plain deterministic write, not a scatter-add)."""
    d = sparse.grads.shape[1]
    out = jax.ShapeDtypeStruct((num_rows, d), dtype)
    return jax.ffi.ffi_call("sok_rows_to_dense", out, vmap_method="sequential")(
        sparse.rows, sparse.grads, sparse.count
    )
