"""Raw FFI wrappers of the embedding targets (no autodiff), with trace-time checks.

Every op works on the canonical bag layout that `sok_jax.ids` builds from any
input form: flat `ids` [N] (int32, uint32 or int64), `offsets` int32 [M + 1]
(bag b holds positions [offsets[b], offsets[b+1])), and `weights` float32 [N]
or an empty [0] array for "unweighted". An id that is not a row of the table
(`checks.valid_rows`) is skipped: padding and out-of-range ids contribute
nothing. `sok_jax.ops.reference` holds the pure-JAX twin of each op.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax import _native  # noqa: F401  (registers the targets)
from sok_jax.ops import optim_ops
from sok_jax.ops.checks import KEY_DTYPES, TABLE_DTYPES, check_table
from sok_jax.ops.rounding import rounding_call

COMBINERS = {"sum": 0, "mean": 1, "sqrtn": 2}


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
        or weights.shape[0] not in (0, ids.shape[0])
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


def check_grad_out(grad_out, ids, offsets, weights) -> None:
    """The bags, and a cotangent [num_bags, D] of a float dtype."""
    check_bags(ids, offsets, weights)
    if grad_out.ndim != 2 or grad_out.shape[0] != offsets.shape[0] - 1:
        raise ValueError(
            f"grad_out must be [num_bags={offsets.shape[0] - 1}, D], got {tuple(grad_out.shape)}"
        )
    if jnp.dtype(grad_out.dtype) not in TABLE_DTYPES:
        raise ValueError(f"grad_out must be a float type, got {grad_out.dtype}")


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


def lookup_combine_bwd(grad_out, ids, offsets, weights, combiner: str, num_rows: int):
    """Per distinct row, the summed gradient: a `SparseRowGrad` of capacity N.

    Sort + run-length on the device (cub), summed in position order, no float
    atomics: deterministic.
    """
    check_grad_out(grad_out, ids, offsets, weights)
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
    check_grad_out(grad_out, ids, offsets, weights)
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


# ---------------------------------------------------------------------------
# The backward fused with an optimizer step
# ---------------------------------------------------------------------------


class UpdateRule(NamedTuple):
    """A rule of the fused target: its id (xla_ffi/optim_math.h VisitRule),
    how many float32 slots it updates, the names of its constant
    hyperparameters in the order VisitRule reads them, and whether its slots
    hold one float per row ([R] or [R, 1], row-wise Adagrad) rather than one
    per element ([R, D])."""

    code: int
    num_slots: int
    consts: tuple[str, ...]
    per_row: bool = False


RULES = {
    "sgd": UpdateRule(0, 0, ()),
    "adagrad": UpdateRule(1, 1, ("eps",)),
    "adam": UpdateRule(2, 2, ("b1", "b2", "eps", "eps_root")),
    "ftrl": UpdateRule(
        3,
        2,
        (
            "learning_rate_power",
            "l1_regularization_strength",
            "l2_regularization_strength",
            "l2_shrinkage_regularization_strength",
            "beta",
        ),
    ),
    "rowwise_adagrad": UpdateRule(4, 1, ("eps",), per_row=True),
}


def check_bwd_update(rule, table, slots, grad_out, ids, offsets, weights, consts) -> UpdateRule:
    """The arguments of `bwd_update`; returns the rule's `UpdateRule`."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    spec = RULES[rule]
    missing = [k for k in spec.consts if k not in consts]
    extra = sorted(set(consts) - set(spec.consts))
    if missing or extra:
        raise ValueError(
            f"{rule}: constants {list(spec.consts)} expected, missing {missing}, unexpected {extra}"
        )
    check_table(table)
    check_grad_out(grad_out, ids, offsets, weights)
    if grad_out.shape[1] != table.shape[1]:
        raise ValueError(
            f"grad_out must be [M, {table.shape[1]}] like the table, got {tuple(grad_out.shape)}"
        )
    if len(slots) != spec.num_slots:
        raise ValueError(f"{rule} takes {spec.num_slots} slots, got {len(slots)}")
    for k, slot in enumerate(slots):
        if spec.per_row:
            optim_ops.check_rowwise_slot(slot, f"slot {k}", table.shape[0])
        else:
            optim_ops.check_slot(slot, f"slot {k}", table.shape)
    if slots:
        optim_ops.check_same_slot_dtype([(f"slot {k}", x) for k, x in enumerate(slots)])
    return spec


def bwd_update(
    rule, table, slots, grad_out, ids, offsets, weights, combiner, hparams, *, rounding=None,
    **consts
):
    """The sparse backward of a lookup and an optimizer step in one target.

    Per distinct row of `table` that the bags (`ids`, `offsets`, `weights`,
    `combiner`: the layout of `lookup_combine`) looked up, the summed
    gradient (as `lookup_combine_bwd`) is applied to the row and its `slots`
    in place by `rule` (as `optim_ops.<rule>_update`). On the GPU no [N, D]
    row gradient is written or read back: each run of sorted positions
    updates its row where it is summed (row-wise Adagrad: once the whole
    row's sum of squares is known).

    Args:
      rule: "sgd", "adagrad", "adam", "ftrl" (element-wise rules) or
        "rowwise_adagrad" (one accumulator per row).
      table: [R, D] float32, bfloat16 or float16.
      slots: the rule's slots (0, 1 or 2, in the order of the matching
        `optim_ops.*_update`): [R, D], or [R] / [R, 1] for rowwise_adagrad;
        float32, bfloat16 or float16, all of one dtype.
      grad_out: [M, D] cotangent of the lookup's output, the table's dtype or
        float32.
      ids, offsets, weights, combiner: the lookup's bags.
      hparams: the traced hyperparameters: (learning_rate,) or, for adam,
        (learning_rate, step).
      rounding: None (round to nearest even) or a
        `rounding.StochasticRounding` for a 16-bit table or 16-bit slots (as
        `optim_ops.sgd_update`).
      **consts: the rule's constant hyperparameters (`RULES`), by name.

    Returns:
      `(table, *slots)`, aliasing the inputs.

    Raises:
      ValueError: an unknown rule, a missing constant, or a wrong shape or
        dtype (the message names the argument).
    """
    slots = tuple(slots)
    spec = check_bwd_update(rule, table, slots, grad_out, ids, offsets, weights, consts)
    if grad_out.dtype != table.dtype:
        grad_out = grad_out.astype(jnp.float32)
    sr, words = rounding_call(rounding, table, *slots)
    hp = optim_ops.hparams_vector(
        *((f"hparams[{i}]", v) for i, v in enumerate(hparams)), rounding_words=words
    )
    # The target always takes two slots; a rule's unused ones are [0], of the
    # used ones' dtype.
    unused = (jnp.zeros((0,), slots[0].dtype if slots else jnp.float32),) * (2 - len(slots))
    outs = (table, *slots, *unused)
    n, d = ids.shape[0], table.shape[1]
    call = jax.ffi.ffi_call(
        "sok_embed_bwd_update",
        tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs)
        + (jax.ShapeDtypeStruct((bwd_workspace_bytes(n, d),), jnp.uint8),),
        vmap_method="sequential",
        input_output_aliases={i: i for i in range(1 + len(slots))},
    )
    res = call(
        *outs,
        grad_out,
        ids,
        offsets,
        weights,
        hp,
        combiner=np.int32(combiner_code(combiner)),
        rule=np.int32(spec.code),
        consts=np.asarray([consts[k] for k in spec.consts] or [0.0], np.float32),
        stochastic_rounding=sr,
    )
    return tuple(res[: 1 + len(slots)])
