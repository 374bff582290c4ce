"""The int8 inference lookup: the `sok_quant_fwd` FFI target.

An int8 table is a `QuantizedRows`: `q` uint8 [R, D] codes and `scale_bias`
float32 [R, 2], row r's element d being

    q[r, d] * scale_bias[r, 0] + scale_bias[r, 1]        (q in 0..255)

(xla_ffi/quant_math.h `Dequant`), as FBGEMM's int8 rows with a per-row scale
and bias. `lookup_combine_int8` dequantizes each looked-up row as it combines
it, with `embed_ops.lookup_combine`'s bags and rules (padding and ids outside
[0, R) skipped, sum / mean / sqrtn of the valid weights, empty bags zeros)
and its summation order; the output is float32. `sok_jax.ops.reference`
has the pure-JAX twin under the same name. Not differentiable: the table is
read-only (`sok_jax.distributed.quantized`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax import _native  # noqa: F401  (registers the targets)
from sok_jax.ops.embed_ops import check_bags, check_fixed_nnz, combiner_code

__all__ = ["lookup_combine_int8"]


class QuantizedRows(NamedTuple):
    """An int8 table (or shard): codes `q` uint8 [R, D] and per row
    `scale_bias` float32 [R, 2] (scale, bias)."""

    q: jax.Array
    scale_bias: jax.Array


def check_quantized(table: QuantizedRows) -> None:
    """Trace time: the two buffers of an int8 table agree."""
    q, sb = table.q, table.scale_bias
    if q.ndim != 2 or q.dtype != jnp.uint8:
        raise ValueError(f"q must be uint8 [R, D], got {q.dtype} {tuple(q.shape)}")
    if sb.dtype != jnp.float32 or sb.shape != (q.shape[0], 2):
        raise ValueError(
            f"scale_bias must be float32 [{q.shape[0]}, 2] (q's rows), got {sb.dtype} "
            f"{tuple(sb.shape)}"
        )


def lookup_combine_int8(table: QuantizedRows, ids, offsets, weights, combiner: str, fixed_nnz=0):
    """Looks up and combines each bag of an int8 table: float32 [num_bags, D].

    `fixed_nnz` as in `embed_ops.lookup_combine` (> 0: bag b is positions
    [b * fixed_nnz, (b + 1) * fixed_nnz), offsets unread)."""
    check_quantized(table)
    check_bags(ids, offsets, weights)
    check_fixed_nnz(ids, offsets, fixed_nnz)
    m = offsets.shape[0] - 1
    out = jax.ShapeDtypeStruct((m, table.q.shape[1]), jnp.float32)
    return jax.ffi.ffi_call("sok_quant_fwd", out, vmap_method="sequential")(
        table.q,
        table.scale_bias,
        ids,
        offsets,
        weights,
        combiner=np.int32(combiner_code(combiner)),
        fixed_nnz=np.int64(fixed_nnz),
    )
