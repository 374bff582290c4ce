"""Fused sparse optimizer updates: raw FFI wrappers and pure-JAX references.

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
table may be float32, bfloat16 or float16 (math in float32); slots are
float32. Learning rate and Adam's step are traced values (schedules work
inside ``jit``); the other hyperparameters are compile-time constants.

Each ``reference_*`` function computes the same update in plain JAX
(``.at[rows].set``); it is the test oracle and a selectable fallback.

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

import sok_jax._native  # noqa: F401  (registers the FFI targets)

__all__ = [
    "bwd_update",
    "sgd_update",
    "adagrad_update",
    "rowwise_adagrad_update",
    "adam_update",
    "ftrl_update",
    "reference_sgd_update",
    "reference_adagrad_update",
    "reference_rowwise_adagrad_update",
    "reference_adam_update",
    "reference_ftrl_update",
    "adagrad_slots",
    "rowwise_adagrad_slots",
    "adam_slots",
    "ftrl_slots",
]

_TABLE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# ---------------------------------------------------------------------------
# Trace-time checks
# ---------------------------------------------------------------------------


def _check_rows(table, unique_rows, row_grads, num_unique):
    """Checks the table and the unique-row gradient; returns num_unique as [1]."""
    if table.ndim != 2:
        raise ValueError(f"table must be rank 2 [rows, D], got shape {table.shape}")
    if jnp.dtype(table.dtype) not in _TABLE_DTYPES:
        raise ValueError(f"table must be float32, bfloat16 or float16, got {table.dtype}")
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


def _check_slot(slot, name, shape):
    if slot.dtype != jnp.float32 or tuple(slot.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be float32 {list(shape)} like the table, got {slot.dtype} {slot.shape}"
        )


def _check_rowwise_slot(slot, name, rows):
    if slot.dtype != jnp.float32 or tuple(slot.shape) not in ((rows,), (rows, 1)):
        raise ValueError(
            f"{name} must be float32 [{rows}] or [{rows}, 1] (one per table row), "
            f"got {slot.dtype} {slot.shape}"
        )


def _scalar(x, name):
    """A traced float32 scalar from a Python number or a size-1 array."""
    x = jnp.asarray(x)
    if x.size != 1 or x.ndim > 1:
        raise ValueError(f"{name} must be a scalar, got shape {x.shape}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real number, got {x.dtype}")
    return x.reshape(()).astype(jnp.float32)


def _hparams(*named):
    return jnp.stack([_scalar(v, n) for n, v in named])


def _ffi(name, outs, args, **attrs):
    """Calls target `name`; the first len(outs) args alias the outputs."""
    call = jax.ffi.ffi_call(
        name,
        tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs),
        vmap_method="sequential",
        input_output_aliases={i: i for i in range(len(outs))},
    )
    return call(*args, **{k: np.float32(v) for k, v in attrs.items()})


# ---------------------------------------------------------------------------
# FFI wrappers
# ---------------------------------------------------------------------------


def sgd_update(table, unique_rows, row_grads, num_unique, learning_rate):
    """SGD on the touched rows: ``w -= learning_rate * g`` (optax.sgd).

    Args:
      table: [R, D] float32, bfloat16 or float16.
      unique_rows: int32 [U] rows to update; entries at or beyond
        ``num_unique`` and rows outside [0, R) are ignored.
      row_grads: float32 [U, D] gradient of each of those rows.
      num_unique: int32 [1] (or scalar) count of valid ``unique_rows``.
      learning_rate: scalar, may be traced.

    Returns:
      The updated table (aliases ``table``; donate it to update in place).

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    hp = _hparams(("learning_rate", learning_rate))
    (out,) = _ffi("sok_sgd_update", (table,), (table, unique_rows, row_grads, num_unique, hp))
    return out


def adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7
):
    """Adagrad on the touched rows, as optax.adagrad (scale_by_rss).

    ``acc += g**2; w -= learning_rate * g * rsqrt(acc + eps)`` (zero step
    where ``acc <= 0``). The accumulator starts at optax's
    ``initial_accumulator_value`` (0.1): see :func:`adagrad_slots`.

    Args:
      table: [R, D] float32, bfloat16 or float16.
      accumulator: float32 [R, D] sum of squared gradients.
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      eps: added under the square root (optax default 1e-7).

    Returns:
      ``(table, accumulator)``, aliasing the inputs.

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_slot(accumulator, "accumulator", table.shape)
    hp = _hparams(("learning_rate", learning_rate))
    return tuple(
        _ffi(
            "sok_adagrad_update",
            (table, accumulator),
            (table, accumulator, unique_rows, row_grads, num_unique, hp),
            eps=eps,
        )
    )


def rowwise_adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7
):
    """Row-wise Adagrad on the touched rows (one accumulator per row).

    ``acc[r] += mean_d(g_d**2); w -= learning_rate * g * rsqrt(acc[r] + eps)``
    (FBGEMM's accumulator, optax Adagrad's step; equals Adagrad for D == 1).

    Args:
      table: [R, D] float32, bfloat16 or float16.
      accumulator: float32 [R] or [R, 1].
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      eps: added under the square root (default 1e-7, as optax Adagrad).

    Returns:
      ``(table, accumulator)``, aliasing the inputs (accumulator keeps its
      shape).

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_rowwise_slot(accumulator, "accumulator", table.shape[0])
    hp = _hparams(("learning_rate", learning_rate))
    return tuple(
        _ffi(
            "sok_rowwise_adagrad_update",
            (table, accumulator),
            (table, accumulator, unique_rows, row_grads, num_unique, hp),
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
):
    """Lazy Adam on the touched rows (optax.adam's formulas, TF LazyAdam).

    ``m = (1-b1) g + b1 m; v = (1-b2) g**2 + b2 v;
    w -= learning_rate * m_hat / (sqrt(v_hat + eps_root) + eps)`` with
    ``m_hat = m / (1 - b1**step)``, ``v_hat = v / (1 - b2**step)``. Rows not
    touched keep their moments (no decay).

    Args:
      table: [R, D] float32, bfloat16 or float16.
      m, v: float32 [R, D] first and second moments (start at zero).
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      step: the 1-based count of this update (optax's ``count`` after its
        increment), a scalar that may be traced; int or float.
      b1, b2, eps, eps_root: optax.adam's hyperparameters.

    Returns:
      ``(table, m, v)``, aliasing the inputs.

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_slot(m, "m", table.shape)
    _check_slot(v, "v", table.shape)
    hp = _hparams(("learning_rate", learning_rate), ("step", step))
    return tuple(
        _ffi(
            "sok_adam_update",
            (table, m, v),
            (table, m, v, unique_rows, row_grads, num_unique, hp),
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
      accumulator, linear: float32 [R, D].
      unique_rows, row_grads, num_unique: as in :func:`sgd_update`.
      learning_rate: scalar, may be traced.
      learning_rate_power, l1_regularization_strength,
      l2_regularization_strength, l2_shrinkage_regularization_strength, beta:
        Keras Ftrl's hyperparameters (defaults -0.5, 0, 0, 0, 0).

    Returns:
      ``(table, accumulator, linear)``, aliasing the inputs.

    Raises:
      ValueError: a shape or dtype is wrong (the message names the argument).
    """
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_slot(accumulator, "accumulator", table.shape)
    _check_slot(linear, "linear", table.shape)
    hp = _hparams(("learning_rate", learning_rate))
    return tuple(
        _ffi(
            "sok_ftrl_update",
            (table, accumulator, linear),
            (table, accumulator, linear, unique_rows, row_grads, num_unique, hp),
            learning_rate_power=learning_rate_power,
            l1_regularization_strength=l1_regularization_strength,
            l2_regularization_strength=l2_regularization_strength,
            l2_shrinkage_regularization_strength=l2_shrinkage_regularization_strength,
            beta=beta,
        )
    )


# ---------------------------------------------------------------------------
# The backward fused with the update
# ---------------------------------------------------------------------------

# Element-wise rules of the fused target, with their constant
# hyperparameters in the order xla_ffi/optim_math.h VisitRule reads them.
RULES = {
    "sgd": (0, ()),
    "adagrad": (1, ("eps",)),
    "adam": (2, ("b1", "b2", "eps", "eps_root")),
    "ftrl": (
        3,
        (
            "learning_rate_power",
            "l1_regularization_strength",
            "l2_regularization_strength",
            "l2_shrinkage_regularization_strength",
            "beta",
        ),
    ),
}
_RULE_SLOTS = {"sgd": 0, "adagrad": 1, "adam": 2, "ftrl": 2}


def bwd_update(rule, table, slots, grad_out, ids, offsets, weights, combiner, hparams, **consts):
    """The sparse backward of a lookup and an optimizer step in one target.

    Per distinct row of `table` that the bags (`ids`, `offsets`, `weights`,
    `combiner`: the layout of ``embed_ops.lookup_combine``) looked up, the
    summed gradient (as ``embed_ops.lookup_combine_bwd``) is applied to the
    row and its `slots` in place by `rule` (as ``<rule>_update``). On the GPU
    no [N, D] row gradient is written or read back: each run of sorted
    positions updates its row where it is summed.

    Args:
      rule: "sgd", "adagrad", "adam" or "ftrl" (element-wise rules).
      table: [R, D] float32, bfloat16 or float16.
      slots: the rule's float32 [R, D] slots (0, 1 or 2, in the order of the
        matching ``*_update``).
      grad_out: [M, D] cotangent of the lookup's output, the table's dtype or
        float32.
      ids, offsets, weights, combiner: the lookup's bags.
      hparams: the traced hyperparameters: (learning_rate,) or, for adam,
        (learning_rate, step).
      **consts: the rule's constant hyperparameters (RULES), by name.

    Returns:
      ``(table, *slots)``, aliasing the inputs.

    Raises:
      ValueError: an unknown rule, a missing constant, or a wrong shape or
        dtype (the message names the argument).
    """
    from sok_jax.ops import embed_ops

    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    code, names = RULES[rule]
    missing = [k for k in names if k not in consts]
    extra = sorted(set(consts) - set(names))
    if missing or extra:
        raise ValueError(
            f"{rule}: constants {list(names)} expected, missing {missing}, unexpected {extra}"
        )
    embed_ops.check_table(table)
    embed_ops._check_grad_out(grad_out, ids, offsets, weights)
    if grad_out.shape[1] != table.shape[1]:
        raise ValueError(
            f"grad_out must be [M, {table.shape[1]}] like the table, got {tuple(grad_out.shape)}"
        )
    if grad_out.dtype != table.dtype:
        grad_out = grad_out.astype(jnp.float32)
    slots = tuple(slots)
    if len(slots) != _RULE_SLOTS[rule]:
        raise ValueError(f"{rule} takes {_RULE_SLOTS[rule]} slots, got {len(slots)}")
    for k, slot in enumerate(slots):
        _check_slot(slot, f"slot {k}", table.shape)
    hp = _hparams(*((f"hparams[{i}]", v) for i, v in enumerate(hparams)))
    dummies = (jnp.zeros((0,), jnp.float32),) * (2 - len(slots))
    outs = (table, *slots, *dummies)
    n, d = ids.shape[0], table.shape[1]
    call = jax.ffi.ffi_call(
        "sok_embed_bwd_update",
        tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs)
        + (jax.ShapeDtypeStruct((embed_ops.bwd_workspace_bytes(n, d),), jnp.uint8),),
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
        combiner=np.int32(embed_ops.combiner_code(combiner)),
        rule=np.int32(code),
        consts=np.asarray([consts[k] for k in names] or [0.0], np.float32),
    )
    return tuple(res[: 1 + len(slots)])


# ---------------------------------------------------------------------------
# Slot initialisers (the initial values are not needed by the updates)
# ---------------------------------------------------------------------------


def _filled(table, shape, value):
    """float32 `shape` filled with `value`, as a fill XLA must compute (the
    value depends on the table through a term that is always exactly 0.0,
    so XLA cannot turn the fill into a constant of the executable).

    Kept because it is what was measured to run: on one H100 (2026-11-27)
    Adam's 20 GiB slots showed 40 GiB in use for 60 GiB of live arrays and
    the first step ran out of memory under XLA_PYTHON_CLIENT_PREALLOCATE=false,
    with or without this; with JAX's default preallocation and this, 20 GiB
    Adam trained (benchmarks/RESULTS.md). Whether it is needed there is not
    established."""
    if table.size == 0:
        return jnp.full(shape, value, jnp.float32)
    x = table.reshape(-1)[0].astype(jnp.float32)
    zero = jnp.where(jnp.isfinite(x), jnp.minimum(jnp.abs(x), 0.0), 0.0)
    return jnp.broadcast_to(jnp.float32(value) + zero, shape)


def adagrad_slots(table, initial_accumulator_value=0.1):
    """The Adagrad accumulator for `table`: float32 [R, D] filled (optax: 0.1)."""
    return _filled(table, table.shape, initial_accumulator_value)


def rowwise_adagrad_slots(table, initial_accumulator_value=0.1):
    """The row-wise Adagrad accumulator for `table`: float32 [R]."""
    return _filled(table, table.shape[:1], initial_accumulator_value)


def adam_slots(table):
    """Adam's ``(m, v)`` for `table`: float32 [R, D] zeros each."""
    return (_filled(table, table.shape, 0.0), _filled(table, table.shape, 0.0))


def ftrl_slots(table, initial_accumulator_value=0.1):
    """FTRL's ``(accumulator, linear)``: [R, D] filled (Keras: 0.1) and zeros."""
    return (
        _filled(table, table.shape, initial_accumulator_value),
        _filled(table, table.shape, 0.0),
    )


# ---------------------------------------------------------------------------
# Pure-JAX references (same formulas, term by term, as xla_ffi/optim_math.h)
# ---------------------------------------------------------------------------


def _gather_rows(table, unique_rows, num_unique):
    """Row of each unique_rows entry; invalid ones point past the end (dropped)."""
    rows = table.shape[0]
    u = unique_rows.shape[0]
    count = num_unique.reshape(())
    valid = (jnp.arange(u) < count) & (unique_rows >= 0) & (unique_rows < rows)
    idx = jnp.where(valid, unique_rows, rows)
    return idx


def _get(x, idx):
    return x.at[idx].get(mode="fill", fill_value=0).astype(jnp.float32)


def _set(x, idx, new):
    return x.at[idx].set(new.astype(x.dtype), mode="drop")


def reference_sgd_update(table, unique_rows, row_grads, num_unique, learning_rate):
    """Pure-JAX :func:`sgd_update`."""
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    lr = _scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    w = _get(table, idx)
    return _set(table, idx, w + (-lr * row_grads))


def _adagrad_scale(acc, eps):
    return jnp.where(acc > 0, 1.0 / jnp.sqrt(acc + np.float32(eps)), 0.0)


def reference_adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7
):
    """Pure-JAX :func:`adagrad_update`."""
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_slot(accumulator, "accumulator", table.shape)
    lr = _scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    acc = g * g + _get(accumulator, idx)
    w = _get(table, idx) + (-lr * (_adagrad_scale(acc, eps) * g))
    return _set(table, idx, w), _set(accumulator, idx, acc)


def reference_rowwise_adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7
):
    """Pure-JAX :func:`rowwise_adagrad_update`."""
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_rowwise_slot(accumulator, "accumulator", table.shape[0])
    lr = _scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    flat = accumulator.reshape(-1)
    acc = jnp.sum(g * g, axis=1) / np.float32(g.shape[1]) + _get(flat, idx)
    scale = _adagrad_scale(acc, eps)[:, None]
    w = _get(table, idx) + (-lr * (scale * g))
    return (_set(table, idx, w), _set(flat, idx, acc).reshape(accumulator.shape))


def reference_adam_update(
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
):
    """Pure-JAX :func:`adam_update` (lazy Adam)."""
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_slot(m, "m", table.shape)
    _check_slot(v, "v", table.shape)
    lr = _scalar(learning_rate, "learning_rate")
    t = _scalar(step, "step")
    b1, b2 = np.float32(b1), np.float32(b2)
    bc1 = 1.0 - jnp.power(b1, t)
    bc2 = 1.0 - jnp.power(b2, t)
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    m_new = (1 - b1) * g + b1 * _get(m, idx)
    v_new = (1 - b2) * (g * g) + b2 * _get(v, idx)
    upd = (m_new / bc1) / (jnp.sqrt(v_new / bc2 + np.float32(eps_root)) + np.float32(eps))
    w = _get(table, idx) + (-lr * upd)
    return _set(table, idx, w), _set(m, idx, m_new), _set(v, idx, v_new)


def _ftrl_pow(x, lr_power):
    if lr_power == -0.5:
        return jnp.sqrt(x)
    return jnp.power(x, np.float32(-lr_power))


def reference_ftrl_update(
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
):
    """Pure-JAX :func:`ftrl_update`."""
    num_unique = _check_rows(table, unique_rows, row_grads, num_unique)
    _check_slot(accumulator, "accumulator", table.shape)
    _check_slot(linear, "linear", table.shape)
    lr = _scalar(learning_rate, "learning_rate")
    lrp = float(np.float32(learning_rate_power))
    l1 = np.float32(l1_regularization_strength)
    l2 = np.float32(l2_regularization_strength)
    shrink = np.float32(l2_shrinkage_regularization_strength)
    l2_reg = l2 + np.float32(beta) / (2.0 * lr)
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    w = _get(table, idx)
    acc = _get(accumulator, idx)
    g_shrunk = g + 2.0 * shrink * w
    acc_new = acc + g * g
    p_new = _ftrl_pow(acc_new, lrp)
    z = _get(linear, idx) + (g_shrunk - (p_new - _ftrl_pow(acc, lrp)) / lr * w)
    quadratic = p_new / lr + 2.0 * l2_reg
    w_new = (jnp.clip(z, -l1, l1) - z) / quadratic
    return (_set(table, idx, w_new), _set(accumulator, idx, acc_new), _set(linear, idx, z))
