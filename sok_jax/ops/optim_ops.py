"""Fused sparse optimizer updates: raw FFI wrappers and their checks.

The backward of an embedding lookup gives, per shard, the rows it touched and
their summed gradients (IndexedSlices-style):

* ``unique_rows`` int32 [U]: row indices into the table, -1 beyond
  ``num_unique`` (rows outside [0, R) are skipped anyway);
* ``row_grads`` float32 [U, D]: the gradient of each of those rows;
* ``num_unique`` int32 [1]: how many leading entries are valid.

Each ``*_update`` applies one optimizer step to exactly those rows of the
table and its slots, in place: the outputs alias the inputs
(``input_output_aliases``), so under ``jax.jit`` with donated state no copy is
made and no [R, D] gradient is built. Every other row keeps its bits. The
table may be float32, bfloat16 or float16, and so may the slots (all of an
update's slots share one dtype, ``SLOT_DTYPES``): every element is loaded to
float32, updated in float32 and stored back. Learning rate and Adam's step
are traced values (schedules work inside ``jit``); the other
hyperparameters are compile-time constants.
A 16-bit table's or slot's new values are rounded to nearest even, or, given
``rounding=StochasticRounding(seed, step)``
(:mod:`sok_jax.ops.rounding`), stochastically (each slot with random bits of
its own); float32 arrays ignore it.

``sok_jax.ops.reference`` computes each update under the same name in plain
JAX (``.at[rows].set``): the test oracle and a selectable fallback.

Formulas and hyperparameter names follow optax (``sgd``, ``adagrad``,
``adam``; Adam here is *lazy*: moments of untouched rows do not decay, as TF
LazyAdam and SOK) and tf.keras ``Ftrl``. Row-wise Adagrad keeps one
accumulator per row, ``acc += mean_d(g_d**2)`` (FBGEMM), and steps as optax
Adagrad does; for D == 1 it equals Adagrad.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax import _native  # noqa: F401  (registers the targets)
from sok_jax.ops.checks import check_table
from sok_jax.ops.rounding import rounding_call

__all__ = [
    "sgd_update",
    "adagrad_update",
    "rowwise_adagrad_update",
    "adam_update",
    "ftrl_update",
    "adagrad_slots",
    "rowwise_adagrad_slots",
    "adam_slots",
    "ftrl_slots",
    "SLOT_DTYPES",
    "check_slot_dtype",
]

# The storage dtypes of optimizer slots (the kernels compute in float32).
SLOT_DTYPES = ("float32", "bfloat16", "float16")

# ---------------------------------------------------------------------------
# Trace-time checks
# ---------------------------------------------------------------------------


def check_row_grads(table, unique_rows, row_grads, num_unique):
    """Checks the table and the unique-row gradient; returns num_unique as [1]."""
    check_table(table)
    if unique_rows.ndim != 1 or unique_rows.dtype != jnp.int32:
        raise ValueError(
            f"unique_rows must be int32 [U], got {unique_rows.dtype} {unique_rows.shape}"
        )
    u, d = unique_rows.shape[0], table.shape[1]
    if row_grads.shape != (u, d) or row_grads.dtype != jnp.float32:
        raise ValueError(
            f"row_grads must be float32 [U, D] = [{u}, {d}] (U from unique_rows, "
            f"D from table), got {row_grads.dtype} {row_grads.shape}"
        )
    num_unique = jnp.asarray(num_unique)
    if num_unique.dtype != jnp.int32 or num_unique.size != 1 or num_unique.ndim > 1:
        raise ValueError(
            f"num_unique must be int32 [1] (or a scalar), got {num_unique.dtype} {num_unique.shape}"
        )
    return num_unique.reshape(1)


def check_slot_dtype(slot_dtype, name="slot_dtype"):
    """`slot_dtype` (a name or a dtype) as a jnp.dtype; ValueError naming
    `name` unless it is one of ``SLOT_DTYPES``."""
    try:
        dtype = jnp.dtype(slot_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in SLOT_DTYPES:
        raise ValueError(f"{name} must be one of {list(SLOT_DTYPES)}, got {slot_dtype!r}")
    return dtype


def check_slot(slot, name, shape):
    if jnp.dtype(slot.dtype).name not in SLOT_DTYPES or tuple(slot.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be {' or '.join(SLOT_DTYPES)} {list(shape)} like the table, "
            f"got {slot.dtype} {slot.shape}"
        )


def check_rowwise_slot(slot, name, rows):
    if jnp.dtype(slot.dtype).name not in SLOT_DTYPES or tuple(slot.shape) not in (
        (rows,),
        (rows, 1),
    ):
        raise ValueError(
            f"{name} must be {' or '.join(SLOT_DTYPES)} [{rows}] or [{rows}, 1] "
            f"(one per table row), got {slot.dtype} {slot.shape}"
        )


def check_same_slot_dtype(named_slots):
    """ValueError unless every (name, slot) pair has the first one's dtype
    (an update's slots share one slot_dtype)."""
    (first, a), *rest = named_slots
    for name, b in rest:
        if b.dtype != a.dtype:
            raise ValueError(
                f"{name} must have the dtype of {first} (an optimizer's slots share one "
                f"slot_dtype), got {b.dtype} and {a.dtype}"
            )


def as_scalar(x, name):
    """A traced float32 scalar from a Python number or a size-1 array."""
    x = jnp.asarray(x)
    if x.size != 1 or x.ndim > 1:
        raise ValueError(f"{name} must be a scalar, got shape {x.shape}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real number, got {x.dtype}")
    return x.reshape(()).astype(jnp.float32)


def hparams_vector(*named, rounding_words=()):
    """The float32 hparams of an update target: the named traced values, then
    the rounding policy's words (`rounding.rounding_call`)."""
    return jnp.stack([as_scalar(v, n) for n, v in named] + list(rounding_words))


def _ffi(name, outs, args, hparams, rounding, **attrs):
    """Calls update target `name` with the traced `hparams` (named pairs) and
    `rounding` (None or a StochasticRounding); the first len(outs) args alias
    the outputs, and `hparams` follows `args`."""
    sr, words = rounding_call(rounding, *outs)
    hp = hparams_vector(*hparams, rounding_words=words)
    call = jax.ffi.ffi_call(
        name,
        tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs),
        vmap_method="sequential",
        input_output_aliases={i: i for i in range(len(outs))},
    )
    return call(
        *args,
        hp,
        **{k: np.float32(v) for k, v in attrs.items()},
        stochastic_rounding=sr,
    )


# ---------------------------------------------------------------------------
# FFI wrappers
# ---------------------------------------------------------------------------


def sgd_update(table, unique_rows, row_grads, num_unique, learning_rate, *, rounding=None):
    """SGD on the touched rows: ``w -= learning_rate * g`` (optax.sgd).

    Args:
      table: [R, D] float32, bfloat16 or float16.
      unique_rows: int32 [U] rows to update; entries at or beyond
        ``num_unique`` and rows outside [0, R) are ignored.
      row_grads: float32 [U, D] gradient of each of those rows.
      num_unique: int32 [1] (or scalar) count of valid ``unique_rows``.
      learning_rate: scalar, may be traced.
      rounding: None (round to nearest even) or a
        :class:`~sok_jax.ops.rounding.StochasticRounding` for a 16-bit table.

    Returns:
      The updated table (aliases ``table``; donate it to update in place).

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = check_row_grads(table, unique_rows, row_grads, num_unique)
    (out,) = _ffi(
        "sok_sgd_update",
        (table,),
        (table, unique_rows, row_grads, num_unique),
        (("learning_rate", learning_rate),),
        rounding,
    )
    return out


def adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7,
    rounding=None
):
    """Adagrad on the touched rows, as optax.adagrad (scale_by_rss).

    ``acc += g**2; w -= learning_rate * g * rsqrt(acc + eps)`` (zero step
    where ``acc <= 0``). The accumulator starts at optax's
    ``initial_accumulator_value`` (0.1): see :func:`adagrad_slots`.

    Args:
      table: [R, D] float32, bfloat16 or float16.
      accumulator: [R, D] sum of squared gradients (float32, bfloat16 or
        float16).
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      eps: added under the square root (optax default 1e-7).
      rounding: as in :func:`sgd_update`; also writes 16-bit slots.

    Returns:
      ``(table, accumulator)``, aliasing the inputs.

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = check_row_grads(table, unique_rows, row_grads, num_unique)
    check_slot(accumulator, "accumulator", table.shape)
    return tuple(
        _ffi(
            "sok_adagrad_update",
            (table, accumulator),
            (table, accumulator, unique_rows, row_grads, num_unique),
            (("learning_rate", learning_rate),),
            rounding,
            eps=eps,
        )
    )


def rowwise_adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7,
    rounding=None
):
    """Row-wise Adagrad on the touched rows (one accumulator per row).

    ``acc[r] += mean_d(g_d**2); w -= learning_rate * g * rsqrt(acc[r] + eps)``
    (FBGEMM's accumulator, optax Adagrad's step; equals Adagrad for D == 1).

    Args:
      table: [R, D] float32, bfloat16 or float16.
      accumulator: [R] or [R, 1] (float32, bfloat16 or float16).
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      eps: added under the square root (default 1e-7, as optax Adagrad).
      rounding: as in :func:`sgd_update`; also writes 16-bit slots.

    Returns:
      ``(table, accumulator)``, aliasing the inputs (accumulator keeps its
      shape).

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = check_row_grads(table, unique_rows, row_grads, num_unique)
    check_rowwise_slot(accumulator, "accumulator", table.shape[0])
    return tuple(
        _ffi(
            "sok_rowwise_adagrad_update",
            (table, accumulator),
            (table, accumulator, unique_rows, row_grads, num_unique),
            (("learning_rate", learning_rate),),
            rounding,
            eps=eps,
        )
    )


def adam_update(
    table,
    m,
    v,
    unique_rows,
    row_grads,
    num_unique,
    learning_rate,
    step,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    rounding=None,
):
    """Lazy Adam on the touched rows (optax.adam's formulas, TF LazyAdam).

    ``m = (1-b1) g + b1 m; v = (1-b2) g**2 + b2 v;
    w -= learning_rate * m_hat / (sqrt(v_hat + eps_root) + eps)`` with
    ``m_hat = m / (1 - b1**step)``, ``v_hat = v / (1 - b2**step)``. Rows not
    touched keep their moments (no decay).

    Args:
      table: [R, D] float32, bfloat16 or float16.
      m, v: [R, D] first and second moments (start at zero), of one dtype:
        float32, bfloat16 or float16.
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      step: the 1-based count of this update (optax's ``count`` after its
        increment), a scalar that may be traced; int or float.
      b1, b2, eps, eps_root: optax.adam's hyperparameters.
      rounding: as in :func:`sgd_update`; also writes 16-bit slots.

    Returns:
      ``(table, m, v)``, aliasing the inputs.

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = check_row_grads(table, unique_rows, row_grads, num_unique)
    check_slot(m, "m", table.shape)
    check_slot(v, "v", table.shape)
    check_same_slot_dtype((("m", m), ("v", v)))
    return tuple(
        _ffi(
            "sok_adam_update",
            (table, m, v),
            (table, m, v, unique_rows, row_grads, num_unique),
            (("learning_rate", learning_rate), ("step", step)),
            rounding,
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
        )
    )


def ftrl_update(
    table,
    accumulator,
    linear,
    unique_rows,
    row_grads,
    num_unique,
    learning_rate,
    *,
    learning_rate_power=-0.5,
    l1_regularization_strength=0.0,
    l2_regularization_strength=0.0,
    l2_shrinkage_regularization_strength=0.0,
    beta=0.0,
    rounding=None,
):
    """FTRL-Proximal on the touched rows, as tf.keras.optimizers.Ftrl.

    With ``lrp = learning_rate_power``, ``lr = learning_rate``::

      g' = g + 2 * l2_shrinkage * w;  n = acc + g**2
      linear += g' - (n**-lrp - acc**-lrp) / lr * w
      q = n**-lrp / lr + 2 * (l2 + beta / (2 lr))
      w = (clip(linear, -l1, l1) - linear) / q;  acc = n

    The accumulator starts at Keras' ``initial_accumulator_value`` (0.1) and
    ``linear`` at zero: see :func:`ftrl_slots`.

    Args:
      table: [R, D] float32, bfloat16 or float16.
      accumulator, linear: [R, D], of one dtype: float32, bfloat16 or
        float16.
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      learning_rate_power, l1_regularization_strength,
      l2_regularization_strength, l2_shrinkage_regularization_strength, beta:
        Keras Ftrl's hyperparameters (defaults -0.5, 0, 0, 0, 0).
      rounding: as in :func:`sgd_update`; also writes 16-bit slots.

    Returns:
      ``(table, accumulator, linear)``, aliasing the inputs.

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = check_row_grads(table, unique_rows, row_grads, num_unique)
    check_slot(accumulator, "accumulator", table.shape)
    check_slot(linear, "linear", table.shape)
    check_same_slot_dtype((("accumulator", accumulator), ("linear", linear)))
    return tuple(
        _ffi(
            "sok_ftrl_update",
            (table, accumulator, linear),
            (table, accumulator, linear, unique_rows, row_grads, num_unique),
            (("learning_rate", learning_rate),),
            rounding,
            learning_rate_power=learning_rate_power,
            l1_regularization_strength=l1_regularization_strength,
            l2_regularization_strength=l2_regularization_strength,
            l2_shrinkage_regularization_strength=l2_shrinkage_regularization_strength,
            beta=beta,
        )
    )


# ---------------------------------------------------------------------------
# Slot initialisers: arrays of `dtype` (one of SLOT_DTYPES, float32 by
# default) shaped like the table (only its shape is read), each a fresh
# buffer (`DistributedEmbedding.init_optimizer` makes each slot in a program
# of its own, so that no two come back in one buffer).
# ---------------------------------------------------------------------------


def adagrad_slots(table, initial_accumulator_value=0.1, dtype=jnp.float32):
    """The Adagrad accumulator for `table`: [R, D] filled (optax: 0.1)."""
    return jnp.full(table.shape, initial_accumulator_value, check_slot_dtype(dtype))


def rowwise_adagrad_slots(table, initial_accumulator_value=0.1, dtype=jnp.float32):
    """The row-wise Adagrad accumulator for `table`: [R]."""
    return jnp.full(table.shape[:1], initial_accumulator_value, check_slot_dtype(dtype))


def adam_slots(table, dtype=jnp.float32):
    """Adam's ``(m, v)`` for `table`: [R, D] zeros each."""
    dtype = check_slot_dtype(dtype)
    return (jnp.zeros(table.shape, dtype), jnp.zeros(table.shape, dtype))


def ftrl_slots(table, initial_accumulator_value=0.1, dtype=jnp.float32):
    """FTRL's ``(accumulator, linear)``: [R, D] filled (Keras: 0.1) and zeros."""
    dtype = check_slot_dtype(dtype)
    return (
        jnp.full(table.shape, initial_accumulator_value, dtype),
        jnp.zeros(table.shape, dtype),
    )
