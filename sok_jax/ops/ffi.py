"""Every FFI op under its op's name: the implementation `"ffi"` selects
(`sok_jax.ops.resolve`). `sok_jax.ops.reference` has the same names."""

from sok_jax.ops.embed_ops import (
    bwd_update,
    lookup_combine,
    lookup_combine_bwd,
    lookup_combine_bwd_dense,
    rows_to_dense,
    weight_grad,
)
from sok_jax.ops.hash_ops import find_or_insert, hash_lookup
from sok_jax.ops.optim_ops import (
    adagrad_update,
    adam_update,
    ftrl_update,
    rowwise_adagrad_update,
    sgd_update,
)
from sok_jax.ops.quant_ops import lookup_combine_int8
from sok_jax.ops.rows_ops import (
    copy_rows,
    copy_rows_async,
    gather_rows,
    join_rows,
    scatter_rows,
    scatter_rows_async,
)

__all__ = [
    "lookup_combine",
    "lookup_combine_int8",
    "lookup_combine_bwd",
    "lookup_combine_bwd_dense",
    "rows_to_dense",
    "weight_grad",
    "bwd_update",
    "sgd_update",
    "adagrad_update",
    "rowwise_adagrad_update",
    "adam_update",
    "ftrl_update",
    "find_or_insert",
    "hash_lookup",
    "gather_rows",
    "scatter_rows",
    "scatter_rows_async",
    "join_rows",
    "copy_rows",
    "copy_rows_async",
]
# The op names every implementation has (`sok_jax.ops.reference` too).
OPS = tuple(__all__)
