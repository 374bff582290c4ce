"""Pure-JAX twins of every op, under the op's name: the test oracle, and what
`implementation="reference"` selects everywhere (`sok_jax.ops.resolve`).

Same arguments, outputs and rules as the FFI wrappers (`embed_ops`,
`optim_ops`, `hash_ops`, gathered in `sok_jax.ops.ffi`): ids that are not rows
(`checks.valid_rows`) are skipped; `mean` divides by the sum of the valid
weights and `sqrtn` by the square root of the sum of their squares; an empty
or zero-weight bag gives zeros; optimizer updates follow
xla_ffi/optim_math.h term by term; `find_or_insert` processes keys in
position order, exactly as the CPU target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sok_jax.ops import embed_ops, hash_ops, optim_ops
from sok_jax.ops.checks import bag_of_positions, valid_rows
from sok_jax.ops.embed_ops import SparseRowGrad, combiner_code

# ---------------------------------------------------------------------------
# Lookup, combine and their backward
# ---------------------------------------------------------------------------


def _bag_scales(ids, offsets, weights, combiner: str, num_rows: int):
    m = offsets.shape[0] - 1
    bag, inside = bag_of_positions(offsets, ids.shape[0])
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


def weight_grad(table, grad_out, ids, offsets, weights, combiner: str):
    """Cotangent of the per-id weights, by autodiff of `lookup_combine`."""
    _, vjp = jax.vjp(
        lambda w: lookup_combine(table.astype(jnp.float32), ids, offsets, w, combiner), weights
    )
    (d_weights,) = vjp(grad_out.astype(table.dtype).astype(jnp.float32))
    return d_weights


def bwd_update(rule, table, slots, grad_out, ids, offsets, weights, combiner, hparams, **consts):
    """`embed_ops.bwd_update` as its two steps: `lookup_combine_bwd`, then the
    rule's optimizer update on the touched rows."""
    slots = tuple(slots)
    embed_ops.check_bwd_update(rule, table, slots, grad_out, ids, offsets, weights, consts)
    grad = lookup_combine_bwd(grad_out, ids, offsets, weights, combiner, table.shape[0])
    out = _RULE_UPDATES[rule](table, *slots, grad.rows, grad.grads, grad.count, *hparams, **consts)
    return out if isinstance(out, tuple) else (out,)


# ---------------------------------------------------------------------------
# Sparse optimizer updates (same formulas, term by term, as xla_ffi/optim_math.h)
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


def sgd_update(table, unique_rows, row_grads, num_unique, learning_rate):
    """Pure-JAX `optim_ops.sgd_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    w = _get(table, idx)
    return _set(table, idx, w + (-lr * row_grads))


def _adagrad_scale(acc, eps):
    return jnp.where(acc > 0, 1.0 / jnp.sqrt(acc + np.float32(eps)), 0.0)


def adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7
):
    """Pure-JAX `optim_ops.adagrad_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_slot(accumulator, "accumulator", table.shape)
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    acc = g * g + _get(accumulator, idx)
    w = _get(table, idx) + (-lr * (_adagrad_scale(acc, eps) * g))
    return _set(table, idx, w), _set(accumulator, idx, acc)


def rowwise_adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7
):
    """Pure-JAX `optim_ops.rowwise_adagrad_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_rowwise_slot(accumulator, "accumulator", table.shape[0])
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    flat = accumulator.reshape(-1)
    acc = jnp.sum(g * g, axis=1) / np.float32(g.shape[1]) + _get(flat, idx)
    scale = _adagrad_scale(acc, eps)[:, None]
    w = _get(table, idx) + (-lr * (scale * g))
    return (_set(table, idx, w), _set(flat, idx, acc).reshape(accumulator.shape))


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
    """Pure-JAX `optim_ops.adam_update` (lazy Adam)."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_slot(m, "m", table.shape)
    optim_ops.check_slot(v, "v", table.shape)
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
    t = optim_ops.as_scalar(step, "step")
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
    """Pure-JAX `optim_ops.ftrl_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_slot(accumulator, "accumulator", table.shape)
    optim_ops.check_slot(linear, "linear", table.shape)
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
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


# The update of each rule of the fused target (embed_ops.RULES).
_RULE_UPDATES = {
    "sgd": sgd_update,
    "adagrad": adagrad_update,
    "adam": adam_update,
    "ftrl": ftrl_update,
}


# ---------------------------------------------------------------------------
# Hash table
# ---------------------------------------------------------------------------


def find_or_insert(slot_keys: jax.Array, keys: jax.Array, *, insert: bool):
    """Pure-JAX `hash_ops.find_or_insert`, keys processed in position order.

    Same arguments and outputs, and the same results as its CPU target. Slow
    (one probe per loop step); an oracle and a fallback.
    """
    slot_keys, keys, dt = hash_ops.check_find_or_insert(slot_keys, keys)
    cap = slot_keys.shape[0]
    n = keys.shape[0]
    empty = jnp.asarray(hash_ops.EMPTY(dt), dt)
    starts = hash_ops.hash_slot(keys, cap)
    insert = bool(insert)

    def one_key(i, state):
        slots, rows, is_new, failed = state
        k = keys[i]

        # Probe state: (slot, probes done, outcome), outcome 0 = probing,
        # 1 = found/inserted at slot, 2 = stopped without a row.
        def cond(c):
            return c[2] == 0

        def body(c):
            s, p, _ = c
            cur = slots[s]
            hit = cur == k
            free = cur == empty
            exhausted = p + 1 >= cap
            outcome = jnp.where(hit | (free & insert), 1, jnp.where(free | exhausted, 2, 0)).astype(
                jnp.int32
            )
            nxt = jnp.where(s + 1 == cap, 0, s + 1).astype(jnp.int32)
            return (jnp.where(outcome == 0, nxt, s), p + 1, outcome)

        s, _, outcome = lax.while_loop(
            cond, body, (starts[i], jnp.int32(0), jnp.where(k == empty, 2, 0).astype(jnp.int32))
        )
        got = outcome == 1
        fresh = got & (slots[s] == empty)
        slots = slots.at[s].set(jnp.where(fresh, k, slots[s]))
        rows = rows.at[i].set(jnp.where(got, s, -1))
        is_new = is_new.at[i].set(fresh.astype(jnp.int32))
        full = insert & (k != empty) & ~got
        return slots, rows, is_new, failed + full.astype(jnp.int32)

    init = (
        slot_keys,
        jnp.full((n,), -1, jnp.int32),
        jnp.zeros((n,), jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    return lax.fori_loop(0, n, one_key, init)
