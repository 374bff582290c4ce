"""Pure-JAX twins of every op, under the op's name: the test oracle, and what
`implementation="reference"` selects everywhere (`sok_jax.ops.resolve`).

Same arguments, outputs and rules as the FFI wrappers (`embed_ops`,
`optim_ops`, `hash_ops`, gathered in `sok_jax.ops.ffi`): ids that are not rows
(`checks.valid_rows`) are skipped; `mean` divides by the sum of the valid
weights and `sqrtn` by the square root of the sum of their squares; an empty
or zero-weight bag gives zeros; optimizer updates follow
xla_ffi/optim_math.h term by term; `hash_lookup` and `find_or_insert` follow
the insertion rule of xla_ffi/hash_math.h step by step, with the same
results as the CPU and CUDA targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sok_jax.ops import embed_ops, hash_ops, optim_ops, quant_ops
from sok_jax.ops.checks import bag_of_positions, valid_rows
from sok_jax.ops.embed_ops import SparseRowGrad, combiner_code
from sok_jax.ops.rounding import rounding_call, rounding_words, stochastic_round

# ---------------------------------------------------------------------------
# Lookup, combine and their backward
# ---------------------------------------------------------------------------


def bag_factors(offsets, weights, counted, combiner: str):
    """The combiner rule over the positions `counted` (bool [N]): (each
    position's bag, M where not counted; its weight, 0 where not counted;
    each bag's factor [M]: 1 / sum w (mean), 1 / sqrt(sum w^2) (sqrtn), 1
    (sum), 0 for a bag whose sum is 0)."""
    m, n = offsets.shape[0] - 1, counted.shape[0]
    bag, inside = bag_of_positions(offsets, n)
    counted = counted & inside
    w = weights if weights.shape[0] else jnp.ones((n,), jnp.float32)
    w = jnp.where(counted, w, 0.0)
    seg = jnp.where(counted, bag, m)  # positions not counted go to a dropped segment
    code = combiner_code(combiner)
    if code == 1:
        wsum = jax.ops.segment_sum(w, seg, m + 1)[:m]
        f = jnp.where(wsum != 0, 1.0 / jnp.where(wsum != 0, wsum, 1.0), 0.0)
    elif code == 2:
        w2sum = jax.ops.segment_sum(w * w, seg, m + 1)[:m]
        f = jnp.where(w2sum > 0, jax.lax.rsqrt(jnp.where(w2sum > 0, w2sum, 1.0)), 0.0)
    else:
        f = jnp.ones((m,), jnp.float32)
    return seg, w, f


def _bag_scales(ids, offsets, weights, combiner: str, num_rows: int):
    valid, rows = valid_rows(ids, num_rows)
    seg, w, f = bag_factors(offsets, weights, valid, combiner)
    valid = valid & (seg < f.shape[0])
    return seg, valid, rows, w, f


def lookup_combine(table, ids, offsets, weights, combiner: str, fixed_nnz: int = 0):
    """`jnp.take` + masked segment sum; differentiable by plain JAX autodiff.

    `fixed_nnz` is accepted for the kernels' signature; the bags are read
    from `offsets` (which must then say the same)."""
    seg, _, rows, w, f = _bag_scales(ids, offsets, weights, combiner, table.shape[0])
    vecs = jnp.take(table, rows, axis=0).astype(jnp.float32)
    return _combine_rows(vecs, seg, w, f).astype(table.dtype)


def _combine_rows(vecs, seg, w, f):
    """float32 [M, D]: per bag, the weighted sum of its positions' vectors
    `vecs` [N, D] (`_bag_scales`' segments and weights) times its factor."""
    m = f.shape[0]
    summed = jax.ops.segment_sum(w[:, None] * vecs, seg, m + 1)[:m]
    return summed * f[:, None]


def lookup_combine_int8(table, ids, offsets, weights, combiner: str, fixed_nnz: int = 0):
    """Each looked-up row dequantized (q * scale + bias, float32), then
    combined as `lookup_combine`: float32 [num_bags, D]."""
    quant_ops.check_quantized(table)
    seg, _, rows, w, f = _bag_scales(ids, offsets, weights, combiner, table.q.shape[0])
    sb = jnp.take(table.scale_bias, rows, axis=0)
    vecs = jnp.take(table.q, rows, axis=0).astype(jnp.float32) * sb[:, :1] + sb[:, 1:]
    return _combine_rows(vecs, seg, w, f)


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


def bwd_update(
    rule, table, slots, grad_out, ids, offsets, weights, combiner, hparams, *, rounding=None,
    **consts
):
    """`embed_ops.bwd_update` as its two steps: `lookup_combine_bwd`, then the
    rule's optimizer update on the touched rows."""
    slots = tuple(slots)
    embed_ops.check_bwd_update(rule, table, slots, grad_out, ids, offsets, weights, consts)
    grad = lookup_combine_bwd(grad_out, ids, offsets, weights, combiner, table.shape[0])
    update = _RULE_UPDATES[rule]
    out = update(
        table, *slots, grad.rows, grad.grads, grad.count, *hparams, rounding=rounding, **consts
    )
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


def _store(x, idx, new, rounding, slot=None):
    """`x` [R, D] (the table, or with `slot` that optimizer slot of its
    rows) with rows `idx` set to the float32 `new`, written as the targets
    write it: round to nearest even, or stochastic rounding with the words of
    (seed, step, row, column[, slot]) (xla_ffi/rounding_math.h)."""
    on, _ = rounding_call(rounding, x)
    if not on:
        return _set(x, idx, new)
    words = rounding_words(rounding.seed, rounding.step, idx, jnp.arange(x.shape[1]), slot)
    return x.at[idx].set(stochastic_round(new, x.dtype, words), mode="drop")


def sgd_update(table, unique_rows, row_grads, num_unique, learning_rate, *, rounding=None):
    """Pure-JAX `optim_ops.sgd_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    w = _get(table, idx)
    return _store(table, idx, w + (-lr * row_grads), rounding)


def _adagrad_scale(acc, eps):
    return jnp.where(acc > 0, 1.0 / jnp.sqrt(acc + np.float32(eps)), 0.0)


def adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7,
    rounding=None
):
    """Pure-JAX `optim_ops.adagrad_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_slot(accumulator, "accumulator", table.shape)
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    acc = g * g + _get(accumulator, idx)
    w = _get(table, idx) + (-lr * (_adagrad_scale(acc, eps) * g))
    return _store(table, idx, w, rounding), _store(accumulator, idx, acc, rounding, 0)


def rowwise_adagrad_update(
    table, accumulator, unique_rows, row_grads, num_unique, learning_rate, *, eps=1e-7,
    rounding=None
):
    """Pure-JAX `optim_ops.rowwise_adagrad_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_rowwise_slot(accumulator, "accumulator", table.shape[0])
    lr = optim_ops.as_scalar(learning_rate, "learning_rate")
    idx = _gather_rows(table, unique_rows, num_unique)
    g = row_grads
    column = accumulator.reshape(-1, 1)  # column 0 of each row (rounding words)
    acc = jnp.sum(g * g, axis=1) / np.float32(g.shape[1]) + _get(column[:, 0], idx)
    scale = _adagrad_scale(acc, eps)[:, None]
    w = _get(table, idx) + (-lr * (scale * g))
    return (
        _store(table, idx, w, rounding),
        _store(column, idx, acc[:, None], rounding, 0).reshape(accumulator.shape),
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
    """Pure-JAX `optim_ops.adam_update` (lazy Adam)."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_slot(m, "m", table.shape)
    optim_ops.check_slot(v, "v", table.shape)
    optim_ops.check_same_slot_dtype((("m", m), ("v", v)))
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
    return (
        _store(table, idx, w, rounding),
        _store(m, idx, m_new, rounding, 0),
        _store(v, idx, v_new, rounding, 1),
    )


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
    rounding=None,
):
    """Pure-JAX `optim_ops.ftrl_update`."""
    num_unique = optim_ops.check_row_grads(table, unique_rows, row_grads, num_unique)
    optim_ops.check_slot(accumulator, "accumulator", table.shape)
    optim_ops.check_slot(linear, "linear", table.shape)
    optim_ops.check_same_slot_dtype((("accumulator", accumulator), ("linear", linear)))
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
    return (
        _store(table, idx, w_new, rounding),
        _store(accumulator, idx, acc_new, rounding, 0),
        _store(linear, idx, z, rounding, 1),
    )


# The update of each rule of the fused target (embed_ops.RULES).
_RULE_UPDATES = {
    "sgd": sgd_update,
    "adagrad": adagrad_update,
    "adam": adam_update,
    "ftrl": ftrl_update,
    "rowwise_adagrad": rowwise_adagrad_update,
}


# ---------------------------------------------------------------------------
# Hash table (the rule of xla_ffi/hash_math.h, vectorized per step)
# ---------------------------------------------------------------------------


def _first_true(mask, axis=1):
    """Index of the first True along `axis` (0 where none)."""
    return jnp.argmax(mask, axis=axis)


def hash_lookup(
    slot_keys,
    keys,
    *,
    insert: bool,
    last_seen=None,
    count=None,
    sketch=None,
    step=None,
    policy=None,
    admit_after=None,
    sketch_depth: int = 1,
):
    """Pure-JAX `hash_ops.hash_lookup`: the same rule, the same results bit
    for bit as its CPU and CUDA targets. Slow where it must be sequential
    (keys left over by full buckets without eviction go one per loop step);
    an oracle and a fallback."""
    a = hash_ops.check_hash_lookup(
        slot_keys, keys, last_seen, count, sketch, step, policy, admit_after, sketch_depth
    )
    slots, keys, dt = a.slot_keys, a.keys, a.dtype
    n, cap = keys.shape[0], slots.shape[0]
    i32 = jnp.int32
    fill = hash_ops.EMPTY(dt)  # a numpy scalar: gathers take it as fill_value
    empty = jnp.asarray(fill, dt)
    if n == 0:
        z = jnp.zeros((0,), i32)
        return hash_ops.HashLookup(
            slots, a.last_seen, a.count, a.sketch, z, z, jnp.zeros((0,), dt), z
        )
    ls, ct, sk = a.last_seen, a.count, a.sketch
    scores = ls is not None
    now = a.step[0]
    evicting = a.policy != 0
    nb = hash_ops.num_buckets(cap)
    starts = hash_ops.bucket_starts(cap)
    width = int((starts[1:] - starts[:-1]).max())
    grid = starts[:-1, None] + np.arange(width)[None, :]
    valid_np = grid < starts[1:, None]
    slot_of = jnp.asarray(np.where(valid_np, grid, cap).astype(np.int32))  # [nb, width]
    valid = jnp.asarray(valid_np)
    pad = keys == empty
    home = hash_ops.home_bucket(keys, cap)

    # 1. Lookup (FindRow).
    def view(table, b):
        return table.at[slot_of[b]].get(mode="fill", fill_value=fill), valid[b], slot_of[b]

    if evicting:
        cur, ok, idx = view(slots, home)
        hit = ok & (cur == keys[:, None]) & ~pad[:, None]
        row = jnp.where(
            hit.any(1), jnp.take_along_axis(idx, _first_true(hit)[:, None], 1)[:, 0], -1
        )
    else:

        def cond(c):
            return jnp.any(~c[2]) & (c[3] < nb)

        def body(c):
            b, row, done, t = c
            cur, ok, idx = view(slots, b)
            is_empty = ok & (cur == empty)
            before_empty = (jnp.cumsum(is_empty, axis=1) - is_empty) == 0
            hit = ok & (cur == keys[:, None]) & before_empty
            found = hit.any(1)
            at = jnp.take_along_axis(idx, _first_true(hit)[:, None], 1)[:, 0]
            row = jnp.where(~done & found, at, row)
            done = done | found | is_empty.any(1)
            return jnp.where(b + 1 == nb, 0, b + 1).astype(i32), row, done, t + 1

        init = (home, jnp.full((n,), -1, i32), pad, jnp.int32(0))
        _, row, _, _ = lax.while_loop(cond, body, init)
    row = row.astype(i32)
    found = row >= 0
    no_evict = jnp.full((n,), empty, dt)
    if not insert:
        status = jnp.where(
            pad, hash_ops.PADDING, jnp.where(found, hash_ops.FOUND, hash_ops.MISSING)
        )
        return hash_ops.HashLookup(
            slots, ls, ct, sk, row, jnp.zeros((n,), i32), no_evict, status.astype(i32)
        )
    if scores:  # StampSeen, once per row
        touched = jnp.zeros((cap,), bool).at[jnp.where(found, row, cap)].set(True, mode="drop")
        ct = ct + (touched & (ls != now)).astype(i32)
        ls = jnp.where(touched, now, ls)

    # 2. The misses in claim order, each key's positions ascending.
    miss = ~pad & ~found
    pos = jnp.arange(n, dtype=i32)
    not_miss, _, s_pos = lax.sort(
        (jnp.where(miss, 0, 1).astype(i32), hash_ops.order_word(keys), pos), num_keys=3
    )
    s_order = hash_ops.order_word(keys)[s_pos]
    s_miss = not_miss == 0
    s_keys = keys[s_pos]
    head = s_miss & jnp.concatenate([jnp.ones((1,), bool), s_order[1:] != s_order[:-1]])
    s_home = home[s_pos]

    # 3. Admission.
    if a.admit_after:
        w = sk.shape[0] // a.sketch_depth
        cells = hash_ops.sketch_cells(s_keys, a.sketch_depth, w)
        sk = sk.at[cells.reshape(-1)].add(jnp.repeat(head.astype(i32), a.sketch_depth))
        est = jnp.min(sk[cells], axis=1)
        admitted = est >= a.admit_after
        init_count = est
    else:
        admitted = jnp.ones((n,), bool)
        init_count = jnp.ones((n,), i32)

    # 4. Per home bucket: its free slots ascending, then (eviction) its rows
    # not seen in this call by (score, key).
    cand = head & admitted
    ci = cand.astype(i32)
    seg = jnp.where(s_miss, s_home, nb)
    per_bucket = jax.ops.segment_sum(ci, seg, nb + 1)[:nb]
    b = jnp.minimum(s_home, nb - 1)
    rank = jnp.cumsum(ci) - 1 - (jnp.cumsum(per_bucket) - per_bucket)[b]
    bview = slots.at[slot_of].get(mode="fill", fill_value=fill)
    jj = jnp.broadcast_to(jnp.arange(width, dtype=i32), (nb, width))
    free = valid & (bview == empty)
    nfree = jnp.sum(free, axis=1)
    _, free_j = lax.sort((jnp.where(free, 0, 1).astype(i32), jj), dimension=1, num_keys=2)
    free_slot = jnp.take_along_axis(slot_of, free_j, 1)
    clip = jnp.clip(rank, 0, width - 1)
    use_free = cand & (rank < nfree[b])
    row1 = jnp.where(use_free, free_slot[b, clip], -1)
    ev_key = no_evict
    use_ev = jnp.zeros((n,), bool)
    if evicting:
        ls_b = ls.at[slot_of].get(mode="fill", fill_value=0)
        score_b = ls_b if a.policy == 1 else ct.at[slot_of].get(mode="fill", fill_value=0)
        ok_ev = valid & (bview != empty) & (ls_b != now)
        *_, ev_j = lax.sort(
            (jnp.where(ok_ev, 0, 1).astype(i32), score_b, bview, jj), dimension=1, num_keys=4
        )
        ev_slot = jnp.take_along_axis(slot_of, ev_j, 1)
        er = rank - nfree[b]
        use_ev = cand & ~use_free & (er < jnp.sum(ok_ev, axis=1)[b])
        eslot = ev_slot[b, jnp.clip(er, 0, width - 1)]
        row1 = jnp.where(use_ev, eslot, row1)
        ev_key = jnp.where(use_ev, slots.at[eslot].get(mode="fill", fill_value=fill), empty)
    target = jnp.where(row1 >= 0, row1, cap)
    slots = slots.at[target].set(s_keys, mode="drop")
    if scores:
        ls = ls.at[target].set(now, mode="drop")
        ct = ct.at[target].set(init_count, mode="drop")

    # 5. No eviction: the leftovers, in claim order, to the first later
    # bucket with an EMPTY slot (its lowest).
    if not evicting:
        leftover = cand & (row1 < 0)
        dummy = jnp.zeros((1,), i32)

        def place(i, c):
            def do(c):
                slots, ls_, ct_, rows_ = c
                bv = slots.at[slot_of].get(mode="fill", fill_value=fill)
                fr = valid & (bv == empty)
                dist = jnp.remainder(jnp.arange(nb, dtype=i32) - s_home[i], nb)
                ok = fr.any(1) & (dist > 0)
                bb = jnp.argmin(jnp.where(ok, dist, nb))
                slot = jnp.where(ok.any(), slot_of[bb, _first_true(fr[bb], axis=0)], -1)
                t = jnp.where(slot >= 0, slot, cap)
                slots = slots.at[t].set(s_keys[i], mode="drop")
                if scores:
                    ls_ = ls_.at[t].set(now, mode="drop")
                    ct_ = ct_.at[t].set(init_count[i], mode="drop")
                return slots, ls_, ct_, rows_.at[i].set(slot)

            return lax.cond(leftover[i], do, lambda c: c, c)

        carry = (slots, ls if scores else dummy, ct if scores else dummy, row1)
        slots, ls2, ct2, row1 = lax.fori_loop(0, n, place, carry)
        if scores:
            ls, ct = ls2, ct2

    # Every position of a new key: its key's row, or why it has none.
    run = jnp.cumsum(head.astype(i32)) - 1
    run_row = jnp.full((n,), -1, i32).at[jnp.where(head, run, n)].set(row1, mode="drop")
    s_row = jnp.where(s_miss, run_row[jnp.maximum(run, 0)], -1)
    s_status = jnp.where(
        s_row >= 0, hash_ops.INSERTED, jnp.where(admitted, hash_ops.FULL, hash_ops.NOT_ADMITTED)
    )
    at_miss = jnp.where(s_miss, s_pos, n)
    rows = row.at[at_miss].set(s_row, mode="drop")
    status = jnp.where(pad, hash_ops.PADDING, hash_ops.FOUND).astype(i32)
    status = status.at[at_miss].set(s_status.astype(i32), mode="drop")
    placed_head = head & (row1 >= 0)
    is_new = jnp.zeros((n,), i32).at[jnp.where(placed_head, s_pos, n)].set(1, mode="drop")
    evicted = no_evict.at[jnp.where(placed_head & use_ev, s_pos, n)].set(ev_key, mode="drop")
    return hash_ops.HashLookup(
        slots,
        ls if scores else None,
        ct if scores else None,
        sk,
        rows,
        is_new,
        evicted,
        status,
    )


def find_or_insert(slot_keys: jax.Array, keys: jax.Array, *, insert: bool):
    """Pure-JAX `hash_ops.find_or_insert` (`hash_lookup` without scores):
    the same results as its CPU and CUDA targets."""
    r = hash_lookup(slot_keys, keys, insert=insert)
    return r.slot_keys, r.rows, r.is_new, hash_ops.failures(r.status)


# ------------------------------------------------------------------ rows


def gather_rows(src, rows):
    """`rows_ops.gather_rows` in plain JAX: src[rows], zeros out of range."""
    valid = (rows >= 0) & (rows < src.shape[0])
    got = jnp.take(src, jnp.where(valid, rows, 0), axis=0)
    mask = valid.reshape(valid.shape + (1,) * (src.ndim - 1))
    return jnp.where(mask, got, jnp.zeros((), src.dtype))


def scatter_rows(dst, rows, values):
    """`rows_ops.scatter_rows` in plain JAX: dst.at[rows].set(values), rows
    out of range dropped."""
    valid = (rows >= 0) & (rows < dst.shape[0])
    return dst.at[jnp.where(valid, rows, dst.shape[0])].set(values, mode="drop")


def scatter_rows_async(dst, rows, values):
    """`rows_ops.scatter_rows_async`: `scatter_rows` (plain JAX has no
    pending work)."""
    return scatter_rows(dst, rows, values)


def join_rows(x, *keep):
    """`rows_ops.join_rows`: `x`."""
    del keep
    return x


def copy_rows(dst, dst_rows, src, src_rows, count=None):
    """`rows_ops.copy_rows` in plain JAX: dst[dst_rows] = src[src_rows] where
    both name a row, for the pairs before `count`."""
    live = dst_rows.shape[0] if count is None else jnp.reshape(count, ())
    ok = (jnp.arange(dst_rows.shape[0]) < live) & (dst_rows >= 0) & (dst_rows < dst.shape[0])
    ok &= (src_rows >= 0) & (src_rows < src.shape[0])
    values = jnp.take(src, jnp.where(ok, src_rows, 0), axis=0)
    return dst.at[jnp.where(ok, dst_rows, dst.shape[0])].set(values, mode="drop")


def copy_rows_async(dst, dst_rows, src, src_rows, count=None):
    """`rows_ops.copy_rows_async`: `copy_rows` (plain JAX has no pending
    work)."""
    return copy_rows(dst, dst_rows, src, src_rows, count)
