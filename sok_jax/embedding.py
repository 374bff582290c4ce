"""`sok_jax.embed`: single-shard lookup + combine with a `jax.custom_vjp`.

The forward is the `sok_embed_fwd` FFI target; the backward produces the
per-row gradient of the rows the batch touched (`sok_embed_bwd`: sort +
run-length, deterministic); `jax.grad` gets the dense table cotangent
straight from it (`sok_embed_bwd_dense`), plus the cotangent of the weights
(`sok_embed_wgrad`). The sparse form is reachable through `lookup` /
`sparse_grad` for the sparse optimizers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax import ids as ids_lib
from sok_jax.ops import checks, embed_ops, resolve
from sok_jax.ops.embed_ops import SparseRowGrad
from sok_jax.optim import check_sparse_optimizer


def _no_weights():
    return jnp.zeros((0,), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lookup(combiner, implementation, fixed_nnz, table, ids, offsets, weights):
    return resolve(implementation).lookup_combine(table, ids, offsets, weights, combiner, fixed_nnz)


def _lookup_fwd(combiner, implementation, fixed_nnz, table, ids, offsets, weights):
    out = _lookup(combiner, implementation, fixed_nnz, table, ids, offsets, weights)
    # No zero-size array crosses a shard_map boundary (residuals do, between
    # the forward and the backward manual computations): absent weights are
    # saved as None. Guarded by test_no_zero_size_array_crosses_shard_map.
    return out, (table, ids, offsets, weights if weights.shape[0] else None)


def _lookup_bwd(combiner, implementation, fixed_nnz, res, g):
    table, ids, offsets, weights = res
    ops = resolve(implementation)
    weights = _no_weights() if weights is None else weights
    d_table = ops.lookup_combine_bwd_dense(
        g, ids, offsets, weights, combiner, table.shape[0], table.dtype
    )
    if weights.shape[0]:
        d_weights = ops.weight_grad(table, g, ids, offsets, weights, combiner)
    else:
        d_weights = weights
    return d_table, None, None, d_weights


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def _check_ids_callback(bad_count, first_pos, first_id, shape_hint):
    if int(bad_count) > 0:
        where = f"flat position {int(first_pos)}"
        if shape_hint is not None:
            where += (
                f" (index {tuple(int(i) for i in np.unravel_index(int(first_pos), shape_hint))})"
            )
        raise ValueError(
            f"sok_jax: {int(bad_count)} id(s) are neither padding nor a row of the table; "
            f"the first is {int(first_id)} at {where}"
        )


def count_invalid_ids(ids, num_rows: int, *, slot_num: int | None = None):
    """How many ids (any accepted form) are neither padding nor in [0, num_rows),
    plus, for `RaggedIds`, the ids its offsets name but no lookup reads
    (lengths past the values' capacity, negative lengths and the bags they
    shift; `ids.count_lost_ragged`).

    Such ids are skipped by `embed` (they contribute nothing); this is the
    counter to read, and `embed(..., check_ids=True)` raises on invalid ids.
    """
    bags = ids_lib.to_bags(ids, None, slot_num)
    bad = jnp.sum(ids_lib.invalid_id_mask(bags, num_rows)).astype(jnp.int32)
    return bad + ids_lib.count_lost_ragged(ids)


def count_nonfinite(d_out):
    """How many output vectors of a cotangent `d_out` ([..., D], the
    gradient of a lookup's output) hold a NaN or Inf: int32 scalar. Each
    reaches every row its bag looked up; `skip_nonfinite=True` on a sparse
    optimizer leaves those rows and their slots as they were."""
    return jnp.sum(~jnp.all(jnp.isfinite(d_out), axis=-1)).astype(jnp.int32)


def _raise_on_invalid(bags, num_rows, shape_hint):
    bad = ids_lib.invalid_id_mask(bags, num_rows)
    first = jnp.argmax(bad)
    jax.debug.callback(
        functools.partial(_check_ids_callback, shape_hint=shape_hint),
        jnp.sum(bad),
        first,
        bags.ids[first],
    )


def _prepare(table, ids, weights, slot_num, combiner, check_ids, implementation):
    checks.check_table(table)
    embed_ops.combiner_code(combiner)
    resolve(implementation)
    bags = ids_lib.to_bags(ids, weights, slot_num)
    if check_ids:
        hint = (
            tuple(ids.shape)
            if hasattr(ids, "ndim") and not isinstance(ids, ids_lib.RaggedIds)
            else None
        )
        _raise_on_invalid(bags, table.shape[0], hint)
    return bags


def embed(
    table,
    ids,
    *,
    combiner: str = "mean",
    weights=None,
    slot_num: int | None = None,
    check_ids: bool = False,
    implementation: str = "ffi",
):
    """Looks up `ids` in `table` and combines each (sample, slot) bag.

    Args:
      table: [rows, D] float32, bfloat16 or float16 (accumulation in float32).
      ids: padded int array [batch, slot_num, max_nnz] with -1 for "no key"
        (0xFFFFFFFF for uint32); a `sok_jax.RaggedIds`; or a
        `jax.experimental.sparse.BCOO` of dense shape [batch*slot_num, max_nnz]
        (pass `slot_num`) or [batch, slot_num, max_nnz]. Key dtypes int32,
        uint32, int64 (int64 needs `jax_enable_x64`).
      combiner: "sum", "mean" or "sqrtn".
      weights: optional per-id float weights of the ids' shape (for BCOO, of
        its data; for ragged, of its values). "mean" divides by the sum of
        the weights, "sqrtn" by the root of the sum of their squares.
      slot_num: slots per sample, needed only for 2-D BCOO input.
      check_ids: raise (at run time, also under jit) if an id is neither
        padding nor in [0, rows), naming the first one and its position.
        Without it such ids are skipped (see `count_invalid_ids`).
      implementation: "ffi" (the custom calls) or "reference" (pure JAX).

    Returns:
      [batch, slot_num, D] in the table's dtype; an empty bag gives zeros.

    Raises:
      ValueError: at trace time for a bad shape, dtype or combiner.
    """
    bags = _prepare(table, ids, weights, slot_num, combiner, check_ids, implementation)
    out = _lookup(
        combiner, implementation, bags.fixed_nnz, table, bags.ids, bags.offsets, bags.weights
    )
    return out.reshape(*bags.batch_shape, table.shape[1])


@dataclasses.dataclass(frozen=True)
class LookupContext:
    """What a single-shard lookup saved for its sparse backward: its bags
    (ids [N], offsets [M + 1], weights [N] or None when unweighted) over a
    table of `num_rows` rows, the combiner and the implementation."""

    ids: Any
    offsets: Any
    weights: Any
    num_rows: int
    combiner: str
    implementation: str = "ffi"

    def bag_weights(self):
        """The weights in the ops' layout: [N], or [0] for unweighted."""
        return _no_weights() if self.weights is None else self.weights


jax.tree_util.register_dataclass(
    LookupContext,
    data_fields=["ids", "offsets", "weights"],
    meta_fields=["num_rows", "combiner", "implementation"],
)


def lookup(
    table,
    ids,
    *,
    combiner: str = "mean",
    weights=None,
    slot_num: int | None = None,
    check_ids: bool = False,
    implementation: str = "ffi",
):
    """Like `embed`, but also returns the `LookupContext` for `sparse_grad`.

    The sparse training pattern: differentiate the loss with respect to the
    lookup's output, then turn that cotangent into per-row gradients with
    `sparse_grad(ctx, d_out)` and hand them to a sparse optimizer. No
    [rows, D] gradient is ever built. The output is not differentiable with
    respect to `table` through this function (use `embed` for that).
    """
    bags = _prepare(table, ids, weights, slot_num, combiner, check_ids, implementation)
    out = resolve(implementation).lookup_combine(
        jax.lax.stop_gradient(table),
        bags.ids,
        bags.offsets,
        bags.weights,
        combiner,
        bags.fixed_nnz,
    )
    weights = bags.weights if bags.weights.shape[0] else None
    ctx = LookupContext(bags.ids, bags.offsets, weights, table.shape[0], combiner, implementation)
    return out.reshape(*bags.batch_shape, table.shape[1]), ctx


def sparse_grad(ctx: LookupContext, d_out) -> SparseRowGrad:
    """Per-row gradient of the table from the cotangent of `lookup`'s output."""
    g = d_out.reshape(-1, d_out.shape[-1])
    return resolve(ctx.implementation).lookup_combine_bwd(
        g, ctx.ids, ctx.offsets, ctx.bag_weights(), ctx.combiner, ctx.num_rows
    )


def sparse_update(table, optimizer, opt_state, ctx: LookupContext, d_out):
    """`optimizer.update(table, opt_state, sparse_grad(ctx, d_out))` in one
    pass: for every sok_jax.optim optimizer (FFI implementation, without
    skip_nonfinite) one kernel sums each touched row's gradient and applies
    the optimizer to the row and its slots in place, never writing the
    [touched rows, D] gradient.
    Donate `table` and `opt_state` in your step. Returns (table, opt_state).
    """
    check_sparse_optimizer(optimizer)
    if optimizer.update_bags is None:  # a SparseOptimizer built without it
        return optimizer.update(table, opt_state, sparse_grad(ctx, d_out))
    g = d_out.reshape(-1, d_out.shape[-1])
    return optimizer.update_bags(
        table, opt_state, g, ctx.ids, ctx.offsets, ctx.bag_weights(), ctx.combiner
    )
