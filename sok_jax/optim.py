"""Sparse (row-wise) optimizers: updates touch only the rows a batch looked up.

Each optimizer is a `SparseOptimizer(init, update)` pair, like an optax
`GradientTransformation`, but `update` takes the table itself and a
`SparseRowGrad` (distinct rows + summed gradients, from `sok_jax.sparse_grad`
or `DistributedEmbedding.sparse_grad`) and returns the new table: one fused
FFI kernel rewrites those rows and their slots in place (the table and slots
are aliased to the outputs; donate them in your jitted step). No [rows, D]
gradient is ever built, so a step costs O(batch), not O(table).

Hyperparameter names and defaults follow optax where optax has the
optimizer (sgd, adagrad, adam) and Keras for FTRL. `learning_rate` may be a
float or an optax schedule (a function of the step count).

`stochastic_rounding=True` (every optimizer; FBGEMM's name) writes a
bfloat16 or float16 table's new values by stochastic rounding instead of
round-to-nearest-even: each goes up or down to a neighbouring 16-bit value
with probability proportional to its distance, so updates smaller than half
an ulp still move the weights on average (`sok_jax.ops.rounding`). The
random bits of element (row, column) are a pure function of `seed`, the
state's `count` and the element, so a run is reproducible. Float32 tables
and float32 slots ignore it.

`slot_dtype="float32"` (default), `"bfloat16"` or `"float16"` (every
optimizer) is the storage dtype of the optimizer's slots (Adagrad's
accumulator, Adam's moments, FTRL's accumulator and linear term): half the
bytes of float32, so a 16-bit table and its 16-bit accumulator take a
quarter of what float32 needs (FBGEMM's optimizer-state dtype). The kernels
load each slot element to float32, compute the update exactly as in float32,
and store it back rounded to nearest even, or stochastically with
`stochastic_rounding=True`; a slot's random bits are drawn apart from its
weight's and from the other slot's (same seed, count, row and column, one
salt per slot). SGD has no slots: it checks `slot_dtype` and ignores it, so
`by_name(name, lr, slot_dtype=...)` works for every optimizer. Checkpoints,
`export_pairs` / `import_pairs` and the host storage tiers carry the slots in
their dtype.

`skip_nonfinite=True` (every optimizer) leaves each row whose summed
gradient holds a NaN or Inf, and that row's slots, exactly as they were;
the other rows of the step are updated as usual. It costs the unfused
backward (`update_bags` writes the row gradient to find those rows), so it
is off by default; `sok_jax.count_nonfinite` and the distributed layers'
`stats.nonfinite` count such cotangents either way.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax.ops import optim_ops, resolve
from sok_jax.ops.embed_ops import SparseRowGrad
from sok_jax.ops.optim_ops import check_slot_dtype
from sok_jax.ops.rounding import StochasticRounding, check_seed


class SparseOptState(NamedTuple):
    """slots: tuple of arrays of the optimizer's slot_dtype (float32 unless
    asked) shaped like the table (or [rows]); count: int32 scalar, the number
    of updates applied so far."""

    slots: tuple
    count: Any


class SparseOptimizer(NamedTuple):
    """init(table) -> SparseOptState;
    update(table, state, grad: SparseRowGrad) -> (table, state);
    update_bags(table, state, grad_out, ids, offsets, weights, combiner)
      -> (table, state): the lookup's backward and `update` in one step (the
      layout of `sok_jax.ops.embed_ops.lookup_combine`). For every
      optimizer here (sgd, adagrad, rowwise_adagrad, adam, ftrl) with the FFI
      implementation it is one fused target that never writes the [N, D] row
      gradient (`embed_ops.bwd_update`); with skip_nonfinite, or for an
      optimizer built without a rule, it is `lookup_combine_bwd` followed by
      `update`."""

    init: Callable
    update: Callable
    update_bags: Callable | None = None


def _lr(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def check_sparse_optimizer(optimizer, what: str = "optimizer") -> SparseOptimizer:
    """`optimizer` if it is a `SparseOptimizer`; TypeError naming `what`
    otherwise (an optax `GradientTransformation` above all: those train the
    dense path, `jax.grad` of `embed` or of `apply`)."""
    if isinstance(optimizer, SparseOptimizer):
        return optimizer
    if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
        raise TypeError(
            f"{what} is an optax-style GradientTransformation; the sparse path takes a "
            "sok_jax.optim optimizer (sok_jax.optim.sgd, adagrad, rowwise_adagrad, adam, ftrl). "
            "optax optimizers are for the dense path (jax.grad with respect to the table)"
        )
    raise TypeError(
        f"{what} must be a sok_jax.optim.SparseOptimizer (sok_jax.optim.sgd, adagrad, "
        f"rowwise_adagrad, adam, ftrl), got {type(optimizer).__name__}"
    )


def _real(name: str, value) -> float:
    """A concrete real scalar hyperparameter as a float: TypeError if it is
    not one (a string, an array of several values), ValueError if not finite."""
    arr = np.asarray(value) if not isinstance(value, bool) else np.asarray(value, object)
    if arr.ndim != 0 or arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(arr)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _rounding_seed(stochastic_rounding, seed):
    """The `rounding_seed` of `_make`: None when `stochastic_rounding` is
    False, else the checked seed. TypeError for a non-bool flag or a
    non-integer seed, ValueError for a seed outside [0, 2**32)."""
    if not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise TypeError(f"stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    seed = check_seed(seed)
    return seed if stochastic_rounding else None


def _check_hyper(learning_rate, **bounds) -> None:
    """Raises naming the first hyperparameter out of its range. `learning_rate`:
    a finite number >= 0, or a callable schedule (not checked). `bounds`:
    name -> (value, rule), rule one of ">=0", "[0,1)", "<=0" (all finite)."""
    if not callable(learning_rate) and not isinstance(learning_rate, jax.core.Tracer):
        if _real("learning_rate", learning_rate) < 0:
            raise ValueError(f"learning_rate must be >= 0, got {learning_rate!r}")
    tests = {
        ">=0": (lambda v: v >= 0, "must be >= 0"),
        "[0,1)": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        "<=0": (lambda v: v <= 0, "must be <= 0"),
    }
    for name, (value, rule) in bounds.items():
        ok, says = tests[rule]
        if not ok(_real(name, value)):
            raise ValueError(f"{name} {says}, got {value!r}")


def _make(
    update_name: str,
    make_slots: Callable,
    hyper: dict,
    learning_rate,
    implementation,
    step_arg=False,
    rule=None,
    skip_nonfinite=False,
    rounding_seed=None,
):
    """`rule`: the name of the rule of the fused backward+update target
    (`embed_ops.RULES`), None where there is none (`update_bags` is then the
    backward followed by `update`). With `skip_nonfinite` the backward is
    never fused: the rows are filtered on their summed gradient first.
    `rounding_seed`: None (round to nearest even) or the seed of stochastic
    rounding, whose step is the state's count."""
    ops = resolve(implementation)
    update_fn = getattr(ops, update_name)

    def rounding_of(state):
        if rounding_seed is None:
            return None
        return StochasticRounding(rounding_seed, state.count)

    def init(table):
        return SparseOptState(tuple(make_slots(table)), jnp.zeros((), jnp.int32))

    def hparams(state):
        """The traced hyperparameters of this step: lr (and Adam's 1-based step)."""
        return (_lr(learning_rate, state.count),) + ((state.count + 1,) if step_arg else ())

    def update(table, state: SparseOptState, grad: SparseRowGrad):
        if skip_nonfinite:
            grad = drop_nonfinite_rows(grad)
        out = update_fn(
            table,
            *state.slots,
            grad.rows,
            grad.grads,
            grad.count,
            *hparams(state),
            rounding=rounding_of(state),
            **hyper,
        )
        if not isinstance(out, tuple):
            out = (out,)
        return out[0], SparseOptState(tuple(out[1:]), state.count + 1)

    def update_bags(table, state: SparseOptState, grad_out, ids, offsets, weights, combiner):
        if rule is None or skip_nonfinite:
            grad = ops.lookup_combine_bwd(grad_out, ids, offsets, weights, combiner, table.shape[0])
            return update(table, state, grad)
        out = ops.bwd_update(
            rule,
            table,
            state.slots,
            grad_out,
            ids,
            offsets,
            weights,
            combiner,
            hparams(state),
            rounding=rounding_of(state),
            **hyper,
        )
        return out[0], SparseOptState(tuple(out[1:]), state.count + 1)

    return SparseOptimizer(init, update, update_bags)


def drop_nonfinite_rows(grad: SparseRowGrad) -> SparseRowGrad:
    """`grad` with every row whose gradient holds a NaN or Inf marked absent
    (row -1, which every update target ignores; its gradient zeroed)."""
    finite = jnp.all(jnp.isfinite(grad.grads), axis=1)
    return SparseRowGrad(
        jnp.where(finite, grad.rows, -1),
        jnp.where(finite[:, None], grad.grads, 0.0),
        grad.count,
    )


def sgd(
    learning_rate,
    *,
    implementation: str = "ffi",
    skip_nonfinite: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    slot_dtype: str = "float32",
) -> SparseOptimizer:
    """Plain SGD on the touched rows (optax.sgd without momentum). It has no
    slots: `slot_dtype` is checked and ignored."""
    _check_hyper(learning_rate)
    check_slot_dtype(slot_dtype)
    return _make(
        "sgd_update",
        lambda t: (),
        {},
        learning_rate,
        implementation,
        rule="sgd",
        skip_nonfinite=skip_nonfinite,
        rounding_seed=_rounding_seed(stochastic_rounding, seed),
    )


def adagrad(
    learning_rate,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    implementation: str = "ffi",
    skip_nonfinite: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    slot_dtype: str = "float32",
) -> SparseOptimizer:
    """optax.adagrad on the touched rows (rows with no gradient are unchanged,
    exactly as optax leaves them)."""
    _check_hyper(
        learning_rate,
        initial_accumulator_value=(initial_accumulator_value, ">=0"),
        eps=(eps, ">=0"),
    )
    dtype = check_slot_dtype(slot_dtype)
    return _make(
        "adagrad_update",
        lambda t: (optim_ops.adagrad_slots(t, initial_accumulator_value, dtype),),
        {"eps": eps},
        learning_rate,
        implementation,
        rule="adagrad",
        skip_nonfinite=skip_nonfinite,
        rounding_seed=_rounding_seed(stochastic_rounding, seed),
    )


def rowwise_adagrad(
    learning_rate,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    implementation: str = "ffi",
    skip_nonfinite: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    slot_dtype: str = "float32",
) -> SparseOptimizer:
    """Adagrad with one accumulator per row (mean of g^2 over D), as FBGEMM."""
    _check_hyper(
        learning_rate,
        initial_accumulator_value=(initial_accumulator_value, ">=0"),
        eps=(eps, ">=0"),
    )
    dtype = check_slot_dtype(slot_dtype)
    return _make(
        "rowwise_adagrad_update",
        lambda t: (optim_ops.rowwise_adagrad_slots(t, initial_accumulator_value, dtype),),
        {"eps": eps},
        learning_rate,
        implementation,
        rule="rowwise_adagrad",
        skip_nonfinite=skip_nonfinite,
        rounding_seed=_rounding_seed(stochastic_rounding, seed),
    )


def adam(
    learning_rate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    implementation: str = "ffi",
    skip_nonfinite: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    slot_dtype: str = "float32",
) -> SparseOptimizer:
    """Lazy Adam (TF LazyAdam, SOK's Adam): optax.adam's formulas applied to
    the touched rows only; untouched rows keep their moments."""
    _check_hyper(
        learning_rate,
        b1=(b1, "[0,1)"),
        b2=(b2, "[0,1)"),
        eps=(eps, ">=0"),
        eps_root=(eps_root, ">=0"),
    )
    dtype = check_slot_dtype(slot_dtype)
    return _make(
        "adam_update",
        lambda t: optim_ops.adam_slots(t, dtype),
        {"b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root},
        learning_rate,
        implementation,
        step_arg=True,
        rule="adam",
        skip_nonfinite=skip_nonfinite,
        rounding_seed=_rounding_seed(stochastic_rounding, seed),
    )


def ftrl(
    learning_rate,
    learning_rate_power: float = -0.5,
    initial_accumulator_value: float = 0.1,
    l1_regularization_strength: float = 0.0,
    l2_regularization_strength: float = 0.0,
    l2_shrinkage_regularization_strength: float = 0.0,
    beta: float = 0.0,
    *,
    implementation: str = "ffi",
    skip_nonfinite: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    slot_dtype: str = "float32",
) -> SparseOptimizer:
    """FTRL-Proximal on the touched rows, as tf.keras.optimizers.Ftrl."""
    _check_hyper(
        learning_rate,
        learning_rate_power=(learning_rate_power, "<=0"),
        initial_accumulator_value=(initial_accumulator_value, ">=0"),
        l1_regularization_strength=(l1_regularization_strength, ">=0"),
        l2_regularization_strength=(l2_regularization_strength, ">=0"),
        l2_shrinkage_regularization_strength=(l2_shrinkage_regularization_strength, ">=0"),
        beta=(beta, ">=0"),
    )
    dtype = check_slot_dtype(slot_dtype)
    return _make(
        "ftrl_update",
        lambda t: optim_ops.ftrl_slots(t, initial_accumulator_value, dtype),
        {
            "learning_rate_power": learning_rate_power,
            "l1_regularization_strength": l1_regularization_strength,
            "l2_regularization_strength": l2_regularization_strength,
            "l2_shrinkage_regularization_strength": l2_shrinkage_regularization_strength,
            "beta": beta,
        },
        learning_rate,
        implementation,
        rule="ftrl",
        skip_nonfinite=skip_nonfinite,
        rounding_seed=_rounding_seed(stochastic_rounding, seed),
    )


def by_name(name: str, learning_rate, **kwargs) -> SparseOptimizer:
    """`sgd`, `adagrad`, `rowwise_adagrad`, `adam` or `ftrl` by name."""
    table = {
        "sgd": sgd,
        "adagrad": adagrad,
        "rowwise_adagrad": rowwise_adagrad,
        "adam": adam,
        "ftrl": ftrl,
    }
    if name not in table:
        raise ValueError(f"optimizer must be one of {sorted(table)}, got {name!r}")
    return table[name](learning_rate, **kwargs)
