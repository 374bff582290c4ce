"""The lookup's backward fused with the optimizer (`embed_ops.bwd_update`,
`SparseOptimizer.update_bags`) on CPU.

Each step is checked against an independent oracle, over several steps so
slot state carries: the numpy gradient of the lookup (conftest
`np_embed_grads`, summed per row in float64) fed to the optimizer oracles of
test_optim_ops (optax for SGD and Adagrad, numpy from the published formulas
for lazy Adam, FTRL and row-wise Adagrad). Rows no valid id names keep their
bits, in the table and every slot. The fused step must also equal the
two-step form (`lookup_combine_bwd` then the optimizer's `update`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import oracles as oo
import pytest
from oracles import COMBINERS, build_form, np_embed_grads, np_sparse_rows, random_bags, random_table

from sok_jax import optim
from sok_jax.ops import embed_ops

# name -> (optimizer kwargs, oracle, slot maker); hyperparameters away from
# their defaults where the default would hide a term.
CASES = {
    "sgd": ({}, oo.sgd_oracle, lambda rng, r, d: []),
    "adagrad": ({"eps": 1e-3}, oo.adagrad_oracle, lambda rng, r, d: [oo.acc_slot(rng, (r, d))]),
    "adam": (
        {"b1": 0.8, "b2": 0.95, "eps": 1e-6, "eps_root": 1e-8},
        oo.adam_oracle,
        lambda rng, r, d: [
            rng.normal(0, 0.1, (r, d)).astype(np.float32),
            rng.uniform(0.0, 0.2, (r, d)).astype(np.float32),
        ],
    ),
    "ftrl": (
        {
            "learning_rate_power": -0.6,
            "l1_regularization_strength": 0.05,
            "l2_regularization_strength": 0.02,
            "l2_shrinkage_regularization_strength": 0.01,
            "beta": 0.5,
        },
        oo.ftrl_oracle,
        lambda rng, r, d: [
            rng.uniform(0.1, 1.0, (r, d)).astype(np.float32),
            rng.normal(0, 0.5, (r, d)).astype(np.float32),
        ],
    ),
    "rowwise_adagrad": (
        {"eps": 1e-3},
        oo.rowwise_adagrad_oracle,
        lambda rng, r, d: [oo.acc_slot(rng, (r,))],
    ),
}
ROWS = 37

# The fused step against the two-step form. The element-wise rules compute
# the same float operations in the same order on both paths; row-wise
# Adagrad's sum of g^2 over the row may be taken in another order (on the
# GPU), so its new table rows may round to a neighbouring 16-bit value.
_TWO_STEP_TOL = {"float32": (1e-6, 1e-7), "bfloat16": (1e-6, 1e-7), "float16": (1e-6, 1e-7)}
_ROWWISE_TWO_STEP_TOL = {"float32": (2e-6, 1e-7), "bfloat16": (8e-3, 1e-6), "float16": (1e-3, 1e-6)}


def _two_step_tol(name, table_dtype):
    return (_ROWWISE_TWO_STEP_TOL if name == "rowwise_adagrad" else _TWO_STEP_TOL)[table_dtype]


def _flat_bags(rng, batch, slots, nnz, combiner):
    """Random padded bags (duplicates, padding, out-of-range ids, weights) as
    the flat (ids, offsets, weights) layout, with the conftest BagSet."""
    bags = random_bags(
        rng,
        batch=batch,
        slots=slots,
        nnz=nnz,
        rows=ROWS,
        key_dtype="int32",
        weighted=bool(rng.integers(2)),
        with_oob=True,
    )
    built = build_form(bags, "padded", rng)
    ids = jnp.asarray(built.ids).reshape(-1)
    offsets = jnp.arange(batch * slots + 1, dtype=jnp.int32) * nnz
    w = (
        jnp.asarray(built.weights, jnp.float32).reshape(-1)
        if built.weights is not None
        else jnp.zeros((0,), jnp.float32)
    )
    return bags, ids, offsets, w


def _bits(x):
    return oo.bits(x)


def _check_rest(ctx, name, table_dtype, table, state, touched, old_bits, want_t, want_s):
    """After a fused step: the rows not in `touched` keep their bits
    (`old_bits`: the table's, then each slot's) in the table and every slot,
    and the whole step equals the two-step form (`want_t`, `want_s`)."""
    untouched = np.setdiff1d(np.arange(ROWS), touched)
    for k, (got, before) in enumerate(zip([table, *state.slots], old_bits)):
        np.testing.assert_array_equal(
            _bits(got)[untouched], before[untouched], err_msg=f"{ctx} leaf {k}"
        )
    np.testing.assert_allclose(
        np.asarray(table.astype(jnp.float32)),
        np.asarray(want_t.astype(jnp.float32)),
        *_two_step_tol(name, table_dtype),
        err_msg=ctx,
    )
    for got, want in zip(state.slots, want_s.slots):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), *_two_step_tol(name, "float32"), err_msg=ctx
        )


@pytest.mark.parametrize("grad_f32", [False, True])
@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dim", [5, 12])
@pytest.mark.parametrize("name", list(CASES))
def test_update_bags_matches_oracle(name, dim, table_dtype, grad_f32):
    kw, oracle, make_slots = CASES[name]
    rng = np.random.default_rng()
    combiner = str(rng.choice(COMBINERS))
    table, _ = random_table(rng, ROWS, dim, table_dtype)
    opt = optim.by_name(name, 0.05, **kw)
    state = opt.init(table)
    state = state._replace(slots=tuple(jnp.asarray(s) for s in make_slots(rng, ROWS, dim)))
    fused = jax.jit(opt.update_bags, static_argnums=(6,), donate_argnums=(0, 1))
    two_step = jax.jit(
        lambda t, s, g, i, o, w, c: opt.update(
            t, s, embed_ops.lookup_combine_bwd(g, i, o, w, c, ROWS)
        ),
        static_argnums=(6,),
    )
    tol = {"float32": (2e-5, 2e-6), "bfloat16": (1e-2, 1e-2)}[table_dtype]
    for step in range(1, 4):
        bags, ids, offsets, w = _flat_bags(rng, 6, 4, 3, combiner)
        g64 = rng.normal(size=(6, 4, dim))
        g = jnp.asarray(g64, jnp.float32 if grad_f32 else table.dtype).reshape(-1, dim)
        g64 = np.asarray(g.astype(jnp.float32), np.float64).reshape(6, 4, dim)
        old_t = np.asarray(table.astype(jnp.float32))
        old_s = [np.asarray(s) for s in state.slots]
        old_bits = [_bits(table)] + [_bits(s) for s in state.slots]
        want_t, want_s = two_step(table, state, g, ids, offsets, w, combiner)
        table, state = fused(table, state, g, ids, offsets, w, combiner)
        ctx = f"{name} D={dim} {table_dtype} grad_f32={grad_f32} {combiner} step {step}"
        assert table.dtype == jnp.dtype(table_dtype) and int(state.count) == step, ctx

        d_table, _ = np_embed_grads(np.zeros((ROWS, dim)), bags, combiner, g64)
        touched = np_sparse_rows(bags)
        o_t, o_s = oracle(
            old_t, old_s, touched, d_table[touched].astype(np.float32), 0.05, step, kw
        )
        np.testing.assert_allclose(
            np.asarray(table.astype(jnp.float32))[touched],
            np.asarray(o_t)[touched],
            *tol,
            err_msg=ctx,
        )
        for k, (got, want) in enumerate(zip(state.slots, o_s)):
            np.testing.assert_allclose(
                np.asarray(got)[touched],
                np.asarray(want)[touched],
                rtol=2e-5,
                atol=2e-5,
                err_msg=f"{ctx} slot {k}",
            )
        _check_rest(ctx, name, table_dtype, table, state, touched, old_bits, want_t, want_s)


@pytest.mark.parametrize("name", ["sgd", "adam", "rowwise_adagrad"])
def test_hot_row_long_runs(name):
    """A row looked up by hundreds of positions (the GPU splits such runs in
    chunks summed apart, then applies the rule once) and many rows once."""
    kw, oracle, make_slots = CASES[name]
    rng = np.random.default_rng()
    dim, m = 8, 1500
    ids = rng.integers(0, ROWS, size=m).astype(np.int32)
    hot = int(rng.integers(ROWS))
    ids[rng.random(m) < 0.6] = hot
    ids[rng.random(m) < 0.05] = -1  # skipped
    g = rng.normal(size=(m, dim)).astype(np.float32)
    table, _ = random_table(rng, ROWS, dim, "float32")
    opt = optim.by_name(name, 0.1, **kw)
    state = opt.init(table)._replace(
        slots=tuple(jnp.asarray(s) for s in make_slots(rng, ROWS, dim))
    )
    old_t, old_s = np.asarray(table), [np.asarray(s) for s in state.slots]
    offsets = jnp.arange(m + 1, dtype=jnp.int32)
    table, state = jax.jit(opt.update_bags, static_argnums=(6,))(
        table, state, jnp.asarray(g), jnp.asarray(ids), offsets, jnp.zeros((0,), jnp.float32), "sum"
    )
    valid = ids >= 0
    touched = np.unique(ids[valid])
    d = np.zeros((ROWS, dim))
    np.add.at(d, ids[valid], g[valid].astype(np.float64))
    assert np.sum(ids == hot) > 3 * 128
    o_t, o_s = oracle(old_t, old_s, touched, d[touched].astype(np.float32), 0.1, 1, kw)
    np.testing.assert_allclose(
        np.asarray(table)[touched], np.asarray(o_t)[touched], rtol=1e-4, atol=1e-5
    )
    for got, want in zip(state.slots, o_s):
        np.testing.assert_allclose(
            np.asarray(got)[touched], np.asarray(want)[touched], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("grad_f32", [False, True])
@pytest.mark.parametrize("table_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dim", [67, 264])
def test_rowwise_adagrad_wide_rows_long_runs(dim, table_dtype, grad_f32):
    """Row-wise Adagrad fused over rows wider than one pass of a lane group
    (D = 67: the scalar path past 64 columns; D = 264: the 4-wide path past
    256) with hot rows of hundreds of positions (the chunked runs), many
    rows seen once, skipped ids and weights, over three steps: each touched
    row's accumulator grows once per step by the mean of its summed g^2, as
    the numpy oracle and the two-step form say; the rest keep their bits."""
    kw, oracle, make_slots = CASES["rowwise_adagrad"]
    rng = np.random.default_rng()
    m = 700
    table, _ = random_table(rng, ROWS, dim, table_dtype)
    opt = optim.rowwise_adagrad(0.1, **kw)
    state = opt.init(table)._replace(slots=(jnp.asarray(oo.acc_slot(rng, (ROWS,))),))
    fused = jax.jit(opt.update_bags, static_argnums=(6,))
    two_step = jax.jit(
        lambda t, s, g, i, o, w, c: opt.update(
            t, s, embed_ops.lookup_combine_bwd(g, i, o, w, c, ROWS)
        ),
        static_argnums=(6,),
    )
    tol = {"float32": (2e-5, 2e-6), "float16": (2e-3, 2e-3), "bfloat16": (1e-2, 1e-2)}
    for step in range(1, 4):
        ids = rng.integers(0, ROWS, size=m).astype(np.int32)
        hot = rng.choice(ROWS, size=2, replace=False)
        ids[rng.random(m) < 0.35] = hot[0]
        ids[rng.random(m) < 0.25] = hot[1]
        ids[rng.random(m) < 0.05] = -1
        ids[rng.random(m) < 0.02] = ROWS + 4  # out of range: skipped
        w = rng.uniform(0.5, 1.5, m).astype(np.float32)
        g = jnp.asarray(rng.normal(size=(m, dim)), jnp.float32 if grad_f32 else table.dtype)
        offsets = jnp.arange(m + 1, dtype=jnp.int32)
        old_t = np.asarray(table.astype(jnp.float32))
        old_s = [np.asarray(s) for s in state.slots]
        old_bits = [_bits(table), _bits(state.slots[0])]
        args = (g, jnp.asarray(ids), offsets, jnp.asarray(w), "sum")
        want_t, want_s = two_step(table, state, *args)
        table, state = fused(table, state, *args)
        ctx = f"D={dim} {table_dtype} grad_f32={grad_f32} step {step}"
        valid = (ids >= 0) & (ids < ROWS)
        assert np.sum(ids == hot[0]) > 128, ctx  # at least one chunked run
        touched = np.unique(ids[valid])
        d = np.zeros((ROWS, dim))
        g64 = np.asarray(g.astype(jnp.float32), np.float64)
        np.add.at(d, ids[valid], w[valid, None] * g64[valid])
        o_t, o_s = oracle(old_t, old_s, touched, d[touched].astype(np.float32), 0.1, step, kw)
        np.testing.assert_allclose(
            np.asarray(table.astype(jnp.float32))[touched],
            np.asarray(o_t)[touched],
            *tol[table_dtype],
            err_msg=ctx,
        )
        np.testing.assert_allclose(
            np.asarray(state.slots[0])[touched],
            np.asarray(o_s[0])[touched],
            rtol=2e-5,
            atol=2e-5,
            err_msg=ctx,
        )
        _check_rest(
            ctx, "rowwise_adagrad", table_dtype, table, state, touched, old_bits, want_t, want_s
        )


def test_rowwise_adagrad_update_bags_is_fused():
    """update_bags of row-wise Adagrad is the one fused target (no [N, D]
    row gradient: neither sok_embed_bwd nor sok_rowwise_adagrad_update in
    the program), and accepts the [R, 1] accumulator as `update` does."""
    rng = np.random.default_rng()
    table, _ = random_table(rng, ROWS, 6, "float32")
    opt = optim.rowwise_adagrad(0.1)
    bags, ids, offsets, w = _flat_bags(rng, 5, 3, 2, "mean")
    g = jnp.asarray(rng.normal(size=(15, 6)), jnp.float32)
    state = opt.init(table)
    hlo = jax.jit(opt.update_bags, static_argnums=(6,)).lower(
        table, state, g, ids, offsets, w, "mean"
    ).as_text()
    targets = set(re.findall(r"custom_call @(\w+)", hlo))
    assert targets == {"sok_embed_bwd_update"}, targets
    col = state._replace(slots=(state.slots[0][:, None],))
    got_t, got_s = opt.update_bags(table, col, g, ids, offsets, w, "mean")
    want_t, want_s = opt.update(
        table, state, embed_ops.lookup_combine_bwd(g, ids, offsets, w, "mean", ROWS)
    )
    assert got_s.slots[0].shape == (ROWS, 1)
    np.testing.assert_allclose(np.asarray(got_t), np.asarray(want_t), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(got_s.slots[0])[:, 0], np.asarray(want_s.slots[0]), rtol=2e-6, atol=1e-7
    )
    assert not np.array_equal(np.asarray(got_t), np.asarray(table))


@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(embed_ops.RULES))
def test_reference_bwd_update_matches_target(name, table_dtype):
    """The pure-JAX `reference.bwd_update` (what implementation="reference"
    runs) and the FFI target compute the same step for every rule, under
    jit, with duplicates, padding, out-of-range ids and weights."""
    from sok_jax.ops import reference

    kw, _, make_slots = CASES[name]
    rng = np.random.default_rng()
    dim = 7
    table, _ = random_table(rng, ROWS, dim, table_dtype)
    slots = tuple(jnp.asarray(s) for s in make_slots(rng, ROWS, dim))
    _, ids, offsets, w = _flat_bags(rng, 6, 4, 3, "sqrtn")
    g = jnp.asarray(rng.normal(size=(24, dim)), table.dtype)
    hparams = (0.05, 3.0) if name == "adam" else (0.05,)

    def run(ops):
        return jax.jit(
            lambda t, s, g: ops.bwd_update(
                name, t, s, g, ids, offsets, w, "sqrtn", hparams, **kw
            )
        )(table, slots, g)

    got, want = run(embed_ops), run(reference)
    tol = {"float32": (2e-5, 2e-6), "bfloat16": (1e-2, 1e-2)}[table_dtype]
    np.testing.assert_allclose(
        np.asarray(got[0].astype(jnp.float32)), np.asarray(want[0].astype(jnp.float32)), *tol
    )
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    assert not np.array_equal(np.asarray(got[0]), np.asarray(table))


def test_bwd_update_errors():
    rng = np.random.default_rng()
    table, _ = random_table(rng, ROWS, 4, "float32")
    ids = jnp.asarray(rng.integers(0, ROWS, size=6), jnp.int32)
    offsets = jnp.arange(7, dtype=jnp.int32)
    w = jnp.zeros((0,), jnp.float32)
    g = jnp.ones((6, 4), jnp.float32)
    acc = jnp.ones((ROWS, 4), jnp.float32)
    call = embed_ops.bwd_update
    with pytest.raises(ValueError, match="rule must be one of"):
        call("lamb", table, (), g, ids, offsets, w, "sum", (0.1,))
    with pytest.raises(ValueError, match="missing \\['eps'\\]"):
        call("adagrad", table, (acc,), g, ids, offsets, w, "sum", (0.1,))
    with pytest.raises(ValueError, match="unexpected \\['eps'\\]"):
        call("sgd", table, (), g, ids, offsets, w, "sum", (0.1,), eps=1.0)
    with pytest.raises(ValueError, match="adagrad takes 1 slots"):
        call("adagrad", table, (), g, ids, offsets, w, "sum", (0.1,), eps=1e-7)
    with pytest.raises(ValueError, match="slot 0 must be float32"):
        call("adagrad", table, (acc[:, :2],), g, ids, offsets, w, "sum", (0.1,), eps=1e-7)
    with pytest.raises(ValueError, match="rowwise_adagrad takes 1 slots"):
        call("rowwise_adagrad", table, (), g, ids, offsets, w, "sum", (0.1,), eps=1e-7)
    with pytest.raises(ValueError, match="missing \\['eps'\\]"):
        call("rowwise_adagrad", table, (acc[:, 0],), g, ids, offsets, w, "sum", (0.1,))
    with pytest.raises(ValueError, match="slot 0 must be float32"):  # [R, D]: adagrad's
        call("rowwise_adagrad", table, (acc,), g, ids, offsets, w, "sum", (0.1,), eps=1e-7)
    with pytest.raises(ValueError, match="grad_out must be"):
        call("sgd", table, (), g[:, :3], ids, offsets, w, "sum", (0.1,))
    with pytest.raises(ValueError, match="learning_rate|hparams"):
        call("sgd", table, (), g, ids, offsets, w, "sum", (jnp.ones(2),))


@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad", "adam"])
def test_single_table_sparse_update(name):
    """sok_jax.sparse_update equals sparse_grad + update on a single table,
    through the public lookup (ragged ids with weights), over two steps."""
    import sok_jax

    rng = np.random.default_rng()
    table, _ = random_table(rng, ROWS, 8, "float32")
    opt = optim.by_name(name, 0.05)
    s_a = s_b = opt.init(table)
    t_a = t_b = table
    for _ in range(2):
        lengths = rng.integers(0, 4, size=(5, 2))
        values = jnp.asarray(rng.integers(-2, ROWS + 3, size=int(lengths.sum())), jnp.int32)
        ids = sok_jax.RaggedIds.from_lengths(values, lengths)
        w = jnp.asarray(rng.uniform(0.5, 2.0, values.shape), jnp.float32)
        out, ctx = sok_jax.lookup(t_a, ids, weights=w, combiner="sqrtn")
        d_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
        t_a, s_a = opt.update(t_a, s_a, sok_jax.sparse_grad(ctx, d_out))
        t_b, s_b = jax.jit(sok_jax.sparse_update, static_argnums=(1,))(t_b, opt, s_b, ctx, d_out)
        np.testing.assert_allclose(np.asarray(t_b), np.asarray(t_a), rtol=1e-6, atol=1e-7)
        for a, b in zip(s_a.slots, s_b.slots):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(np.asarray(t_b), np.asarray(table))


@pytest.mark.parametrize("path", ["update_bags", "update"])
@pytest.mark.parametrize("implementation", ["ffi", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_skip_nonfinite(name, implementation, path):
    """skip_nonfinite=True: every row whose summed gradient (numpy, float64)
    holds a NaN or Inf keeps its bits in the table and every slot; the other
    touched rows follow the optimizer's oracle; `count_nonfinite` counts the
    poisoned cotangents. Without the flag the same step poisons those rows."""
    import sok_jax

    kw, oracle, make_slots = CASES[name]
    rng = np.random.default_rng()
    dim, batch, slots = 6, 8, 3
    table, _ = random_table(rng, ROWS, dim, "float32")
    opt = optim.by_name(name, 0.05, implementation=implementation, skip_nonfinite=True, **kw)
    plain = optim.by_name(name, 0.05, implementation=implementation, **kw)
    state = opt.init(table)._replace(
        slots=tuple(jnp.asarray(s) for s in make_slots(rng, ROWS, dim))
    )
    bags, ids, offsets, w = _flat_bags(rng, batch, slots, 4, "sum")
    g = rng.normal(size=(batch * slots, dim)).astype(np.float32)
    reaching = [  # bags holding a row, in the flat order of g
        b * slots + s
        for b in range(batch)
        for s in range(slots)
        if any(0 <= k < ROWS for k in bags.keys[b][s])
    ]
    poisoned = rng.choice(reaching, size=3, replace=False)
    g[poisoned[0], rng.integers(dim)] = np.nan
    g[poisoned[1], rng.integers(dim)] = np.inf
    g[poisoned[2], :] = -np.inf
    assert int(sok_jax.count_nonfinite(jnp.asarray(g))) == 3

    with np.errstate(invalid="ignore"):  # the poisoned bags' NaN/Inf reach their rows
        d_table, _ = np_embed_grads(
            np.zeros((ROWS, dim)), bags, "sum", g.reshape(batch, slots, dim)
        )
    touched = np_sparse_rows(bags)
    finite = np.all(np.isfinite(d_table), axis=1)
    bad, good = touched[~finite[touched]], touched[finite[touched]]
    assert bad.size >= 1 and good.size >= 1

    def step(o, t, s):
        if path == "update_bags":
            return o.update_bags(t, s, jnp.asarray(g), ids, offsets, w, "sum")
        return o.update(
            t, s, embed_ops.lookup_combine_bwd(jnp.asarray(g), ids, offsets, w, "sum", ROWS)
        )

    old_t, old_s = np.asarray(table), [np.asarray(s) for s in state.slots]
    old_bits = [_bits(table)] + [_bits(s) for s in state.slots]
    poisoned_t, _ = step(plain, table, state)
    assert not np.all(np.isfinite(np.asarray(poisoned_t)[bad]))
    new_t, new_s = jax.jit(lambda t, s: step(opt, t, s))(table, state)
    keep = np.setdiff1d(np.arange(ROWS), good)
    for k, (got, before) in enumerate(zip([new_t, *new_s.slots], old_bits)):
        np.testing.assert_array_equal(_bits(got)[keep], before[keep], err_msg=f"leaf {k}")
    o_t, o_s = oracle(old_t, old_s, good, d_table[good].astype(np.float32), 0.05, 1, kw)
    np.testing.assert_allclose(np.asarray(new_t)[good], np.asarray(o_t)[good], 2e-5, 2e-6)
    for got, want in zip(new_s.slots, o_s):
        np.testing.assert_allclose(np.asarray(got)[good], np.asarray(want)[good], 2e-5, 2e-5)
