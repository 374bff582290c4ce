"""Fused sparse optimizer updates (sok_jax.ops.optim_ops) on CPU.

Each FFI update is checked, over several steps so slot state carries, against
an independent oracle: optax on the dense gradient (SGD, Adagrad), numpy
written from the published formulas (lazy Adam, TF FTRL, FBGEMM row-wise
Adagrad). Untouched rows of the table and of every slot must keep their bits.
The FFI path must also match the pure-JAX reference under jit with donation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import (
    acc_slot,
    adagrad_oracle,
    adam_oracle,
    bits,
    ftrl_oracle,
    rowwise_adagrad_oracle,
    sgd_oracle,
)

from sok_jax.ops import optim_ops as ops
from sok_jax.ops import reference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# (rtol, atol) on the table, against a float32/float64 oracle.
TABLE_TOL = {"float32": (2e-5, 2e-6), "bfloat16": (1e-2, 1e-2), "float16": (2e-3, 2e-3)}
SLOT_TOL = (2e-5, 2e-6)  # FTRL's linear, a sum of terms of size ~|linear|
# (tens here), takes slot_atol=2e-5 instead.
DIMS = (1, 3, 4, 129)
NUM_ROWS = 40
CAPACITY = 24
STEPS = 3
LRS = (0.05, 0.02, 0.1)  # a per-step "schedule"


# ---------------------------------------------------------------------------
# Optimizer table: FFI fn, reference fn, slot maker, oracle, attrs
# ---------------------------------------------------------------------------


SPECS = {
    "sgd": dict(
        ffi=ops.sgd_update,
        ref=reference.sgd_update,
        slots=lambda rng, r, d: [],
        oracle=sgd_oracle,
        kw={},
    ),
    "adagrad": dict(
        ffi=ops.adagrad_update,
        ref=reference.adagrad_update,
        slots=lambda rng, r, d: [acc_slot(rng, (r, d))],
        oracle=adagrad_oracle,
        kw={},
    ),
    "adagrad_eps": dict(
        ffi=ops.adagrad_update,
        ref=reference.adagrad_update,
        slots=lambda rng, r, d: [acc_slot(rng, (r, d))],
        oracle=adagrad_oracle,
        kw={"eps": 1e-3},
    ),
    "rowwise_adagrad": dict(
        ffi=ops.rowwise_adagrad_update,
        ref=reference.rowwise_adagrad_update,
        slots=lambda rng, r, d: [acc_slot(rng, (r,))],
        oracle=rowwise_adagrad_oracle,
        kw={},
    ),
    "rowwise_adagrad_2d": dict(
        ffi=ops.rowwise_adagrad_update,
        ref=reference.rowwise_adagrad_update,
        slots=lambda rng, r, d: [acc_slot(rng, (r, 1))],
        oracle=rowwise_adagrad_oracle,
        kw={"eps": 1e-4},
    ),
    "adam": dict(
        ffi=ops.adam_update,
        ref=reference.adam_update,
        slots=lambda rng, r, d: [
            rng.normal(0, 0.1, (r, d)).astype(np.float32),
            rng.uniform(0, 0.05, (r, d)).astype(np.float32),
        ],
        oracle=adam_oracle,
        kw={},
        step0=4,
    ),
    "adam_custom": dict(
        ffi=ops.adam_update,
        ref=reference.adam_update,
        slots=lambda rng, r, d: [np.zeros((r, d), np.float32), np.zeros((r, d), np.float32)],
        oracle=adam_oracle,
        kw={"b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-8},
        step0=0,
    ),
    "ftrl": dict(
        ffi=ops.ftrl_update,
        ref=reference.ftrl_update,
        slots=lambda rng, r, d: [
            rng.uniform(0.1, 1.0, (r, d)).astype(np.float32),
            rng.normal(0, 0.5, (r, d)).astype(np.float32),
        ],
        oracle=ftrl_oracle,
        kw={},
        slot_atol=2e-5,
    ),
    "ftrl_reg": dict(
        ffi=ops.ftrl_update,
        ref=reference.ftrl_update,
        slots=lambda rng, r, d: [
            rng.uniform(0.1, 1.0, (r, d)).astype(np.float32),
            rng.normal(0, 0.5, (r, d)).astype(np.float32),
        ],
        oracle=ftrl_oracle,
        kw={
            "learning_rate_power": -0.6,
            "l1_regularization_strength": 0.05,
            "l2_regularization_strength": 0.02,
            "l2_shrinkage_regularization_strength": 0.01,
            "beta": 0.5,
        },
        slot_atol=2e-5,
    ),
}


def _hp(name, lr, step):
    """Positional hyperparameters after num_unique."""
    return (lr, step) if SPECS[name]["ffi"] is ops.adam_update else (lr,)


def _case(rng, d, dtype, n_valid=None):
    """A table, unique rows (padded), row grads (garbage in the padding)."""
    n = int(rng.integers(1, CAPACITY + 1)) if n_valid is None else n_valid
    perm = rng.permutation(NUM_ROWS)
    touched = perm[:n].astype(np.int32)
    # The padding names real, untouched rows as well as -1, and its gradients
    # are huge or NaN: all of it must be ignored because of num_unique.
    pad = np.where(
        rng.random(CAPACITY - n) < 0.5,
        -1,
        perm[n : n + CAPACITY - n] if NUM_ROWS - n >= CAPACITY - n else -1,
    ).astype(np.int32)
    unique_rows = np.concatenate([touched, pad])
    grads = rng.normal(0, 1, (CAPACITY, d)).astype(np.float32)
    grads[:n][rng.random((n, d)) < 0.1] = 0.0
    grads[n:] = 1e30
    if CAPACITY > n:
        grads[n, 0] = np.nan
    return unique_rows, grads, np.array([n], np.int32), touched


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SPECS))
def test_update_matches_oracle(name, dtype, d, seed):
    spec = SPECS[name]
    rng = np.random.default_rng([seed, d, list(DTYPES).index(dtype), list(SPECS).index(name)])
    table = jnp.asarray(rng.normal(0, 1, (NUM_ROWS, d)).astype(np.float32), DTYPES[dtype])
    slots = [jnp.asarray(s) for s in spec["slots"](rng, NUM_ROWS, d)]
    o_w = _f32(table)
    o_slots = [np.asarray(s) for s in slots]
    rtol, atol = TABLE_TOL[dtype]
    for k in range(STEPS):
        lr = LRS[k]
        step = spec.get("step0", 0) + k + 1
        ur, g, nu, touched = _case(rng, d, dtype)
        out = _as_tuple(
            spec["ffi"](
                table,
                *slots,
                jnp.asarray(ur),
                jnp.asarray(g),
                jnp.asarray(nu),
                *_hp(name, lr, step),
                **spec["kw"],
            )
        )
        new_table, new_slots = out[0], list(out[1:])
        assert new_table.dtype == table.dtype and new_table.shape == table.shape
        for s, ns in zip(slots, new_slots):
            assert ns.shape == s.shape and ns.dtype == jnp.float32
        # Half tables: the oracle restarts from the kernel's rounded state.
        if dtype != "float32":
            o_w, o_slots = _f32(table), [np.asarray(s) for s in slots]
        o_w, o_slots = spec["oracle"](o_w, o_slots, touched, g[: nu[0]], lr, step, spec["kw"])
        ctx = f"{name} {dtype} D={d} seed={seed} step={k}"
        np.testing.assert_allclose(
            _f32(new_table)[touched], o_w[touched], rtol=rtol, atol=atol, err_msg=ctx
        )
        for i, (ns, os_) in enumerate(zip(new_slots, o_slots)):
            np.testing.assert_allclose(
                np.asarray(ns)[touched],
                np.asarray(os_)[touched],
                rtol=SLOT_TOL[0],
                atol=spec.get("slot_atol", SLOT_TOL[1]),
                err_msg=f"{ctx} slot {i}",
            )
        untouched = np.setdiff1d(np.arange(NUM_ROWS), touched)
        np.testing.assert_array_equal(
            bits(new_table)[untouched], bits(table)[untouched], err_msg=ctx
        )
        for ns, s in zip(new_slots, slots):
            np.testing.assert_array_equal(bits(ns)[untouched], bits(s)[untouched], err_msg=ctx)
        assert np.all(np.isfinite(_f32(new_table))), ctx
        table, slots = new_table, new_slots


def _ffi_vs_ref_tol(dtype):
    return {"float32": (1e-6, 1e-7), "bfloat16": (8e-3, 1e-6), "float16": (1e-3, 1e-6)}[dtype]


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SPECS))
def test_ffi_matches_reference_under_jit_with_donation(name, dtype, d):
    spec = SPECS[name]
    rng = np.random.default_rng([7, d, list(SPECS).index(name)])
    nslots = len(spec["slots"](rng, 1, 1))
    donate = tuple(range(1 + nslots))

    def step_fn(fn, state, ur, g, nu, lr, step):
        hp = (lr, step) if fn in (ops.adam_update, reference.adam_update) else (lr,)
        return _as_tuple(fn(*state, ur, g, nu, *hp, **spec["kw"]))

    def run(fn):
        r = np.random.default_rng([11, d])
        table = jnp.asarray(r.normal(0, 1, (NUM_ROWS, d)).astype(np.float32), DTYPES[dtype])
        state = [table] + [
            jnp.asarray(s) for s in spec["slots"](np.random.default_rng(3), NUM_ROWS, d)
        ]
        jitted = jax.jit(
            lambda *a: step_fn(fn, a[: len(state)], *a[len(state) :]), donate_argnums=donate
        )
        for k in range(STEPS):
            ur, g, nu, _ = _case(r, d, dtype)
            # lr and step are traced: a schedule inside jit.
            state = list(jitted(*state, ur, g, nu, jnp.float32(LRS[k]), jnp.int32(k + 1)))
        return state

    got, want = run(spec["ffi"]), run(spec["ref"])
    rtol, atol = _ffi_vs_ref_tol(dtype)
    # XLA may contract a*b+c into an FMA where the C++ kernel rounds twice;
    # FTRL's linear slot, a cancelling sum of terms of size ~|linear|, shows
    # it most. The kernel matches a float32 numpy emulation exactly.
    slot_tol = (1e-5, 5e-5) if name.startswith("ftrl") else (1e-6, 1e-7)
    if name.startswith("ftrl") and dtype == "float32":
        rtol, atol = slot_tol
    # On GPU nvcc contracts FMAs too, differently, so a half-precision weight
    # can round one ulp apart; the linear slot takes it in through sigma * w
    # (sigma <= quad and |w| <= |linear| / quad, so |sigma * dw| is at most
    # one ulp of the |linear| w came from) and carries it over the steps.
    # Allow that (rtol of the largest |linear|) there; CPU stays strict.
    half_ftrl_gpu = (
        jax.default_backend() != "cpu" and name.startswith("ftrl") and dtype != "float32"
    )
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = (rtol, atol) if i == 0 else slot_tol
        if half_ftrl_gpu and i == 2:
            tol = (rtol, rtol * float(np.max(np.abs(_f32(b)))))
        np.testing.assert_allclose(
            _f32(a), _f32(b), rtol=tol[0], atol=tol[1], err_msg=f"{name} {dtype} D={d} output {i}"
        )


def test_donated_update_is_in_place():
    rng = np.random.default_rng(5)
    table = jnp.asarray(rng.normal(size=(NUM_ROWS, 8)), jnp.float32)
    m, v = ops.adam_slots(table)
    ptrs = [x.unsafe_buffer_pointer() for x in (table, m, v)]
    ur, g, nu, touched = _case(rng, 8, "float32")
    f = jax.jit(ops.adam_update, donate_argnums=(0, 1, 2))
    out = f(table, m, v, ur, g, nu, 0.1, 1)
    assert table.is_deleted() and m.is_deleted() and v.is_deleted()
    assert [x.unsafe_buffer_pointer() for x in out] == ptrs


def test_num_unique_zero_changes_nothing():
    rng = np.random.default_rng(6)
    table = jnp.asarray(rng.normal(size=(NUM_ROWS, 4)), jnp.float32)
    acc = jnp.asarray(rng.uniform(size=(NUM_ROWS, 4)), jnp.float32)
    ur, g, _, _ = _case(rng, 4, "float32", n_valid=5)
    t2, a2 = ops.adagrad_update(table, acc, ur, g, jnp.array([0], jnp.int32), 0.1)
    np.testing.assert_array_equal(bits(t2), bits(table))
    np.testing.assert_array_equal(bits(a2), bits(acc))


def test_invalid_rows_in_prefix_are_skipped():
    """-1 and out-of-range rows inside unique_rows[:num_unique] are skipped."""
    rng = np.random.default_rng(8)
    table = jnp.asarray(rng.normal(size=(NUM_ROWS, 5)), jnp.float32)
    ur = np.array([3, -1, NUM_ROWS, 7, NUM_ROWS + 100, -5], np.int32)
    g = rng.normal(size=(6, 5)).astype(np.float32)
    nu = np.array([6], np.int32)
    for fn in (ops.sgd_update, reference.sgd_update):
        out = _f32(fn(table, ur, g, nu, 0.5))
        want = _f32(table).copy()
        want[[3, 7]] -= 0.5 * g[[0, 3]]
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)
        untouched = np.setdiff1d(np.arange(NUM_ROWS), [3, 7])
        np.testing.assert_array_equal(bits(out)[untouched], bits(table)[untouched])


def test_num_unique_beyond_capacity_is_clamped():
    rng = np.random.default_rng(9)
    table = jnp.asarray(rng.normal(size=(NUM_ROWS, 4)), jnp.float32)
    ur = np.array([1, 2, 3], np.int32)
    g = rng.normal(size=(3, 4)).astype(np.float32)
    a = ops.sgd_update(table, ur, g, np.array([1000], np.int32), 0.1)
    b = reference.sgd_update(table, ur, g, np.array([1000], np.int32), 0.1)
    np.testing.assert_allclose(_f32(a), _f32(b), rtol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rowwise_adagrad_with_d1_is_adagrad(dtype):
    rng = np.random.default_rng(10)
    table = jnp.asarray(rng.normal(size=(NUM_ROWS, 1)), DTYPES[dtype])
    acc = jnp.asarray(acc_slot(rng, (NUM_ROWS, 1)))
    ur, g, nu, _ = _case(rng, 1, dtype)
    t1, a1 = ops.adagrad_update(table, acc, ur, g, nu, 0.3)
    t2, a2 = ops.rowwise_adagrad_update(table, acc, ur, g, nu, 0.3)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(bits(t1), bits(t2))
        np.testing.assert_array_equal(bits(a1), bits(a2))
    else:
        # nvcc contracts acc + g * g (adagrad) into an FMA but not
        # acc + mean(g * g) (rowwise): an ulp or two apart in float32, which
        # may flip the rounding of a half-precision table by one ulp.
        rtol, atol = _ffi_vs_ref_tol(dtype)
        np.testing.assert_allclose(_f32(t1), _f32(t2), rtol=rtol, atol=atol)
        np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), rtol=1e-6, atol=1e-7)


def test_vmap_sequential():
    rng = np.random.default_rng(12)
    tables = jnp.asarray(rng.normal(size=(2, NUM_ROWS, 4)), jnp.float32)
    ur = np.stack([_case(rng, 4, "float32")[0] for _ in range(2)])
    g = rng.normal(size=(2, CAPACITY, 4)).astype(np.float32)
    nu = np.array([[5], [9]], np.int32)
    got = jax.vmap(ops.sgd_update, in_axes=(0, 0, 0, 0, None))(tables, ur, g, nu, 0.1)
    for i in range(2):
        want = reference.sgd_update(tables[i], ur[i], g[i], nu[i], 0.1)
        np.testing.assert_allclose(got[i], want, rtol=1e-6)


# ---------------------------------------------------------------------------
# Trace-time checks
# ---------------------------------------------------------------------------


def _good():
    t = jnp.zeros((NUM_ROWS, 4), jnp.float32)
    return dict(
        table=t,
        ur=jnp.zeros((6,), jnp.int32),
        g=jnp.zeros((6, 4), jnp.float32),
        nu=jnp.ones((1,), jnp.int32),
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(table=jnp.zeros((NUM_ROWS,), jnp.float32)), "table"),
        (dict(table=jnp.zeros((NUM_ROWS, 4), jnp.int32)), "table"),
        (dict(ur=jnp.zeros((6,), jnp.float32)), "unique_rows"),
        (dict(ur=jnp.zeros((6, 1), jnp.int32)), "unique_rows"),
        (dict(g=jnp.zeros((6, 5), jnp.float32)), "row_grads"),
        (dict(g=jnp.zeros((7, 4), jnp.float32)), "row_grads"),
        (dict(g=jnp.zeros((6, 4), jnp.bfloat16)), "row_grads"),
        (dict(nu=jnp.ones((2,), jnp.int32)), "num_unique"),
        (dict(nu=jnp.ones((1,), jnp.float32)), "num_unique"),
    ],
)
@pytest.mark.parametrize("use_ref", [False, True])
def test_bad_common_arguments(bad, match, use_ref):
    a = {**_good(), **bad}
    fn = reference.sgd_update if use_ref else ops.sgd_update
    with pytest.raises(ValueError, match=match):
        fn(a["table"], a["ur"], a["g"], a["nu"], 0.1)


def test_bad_slots_and_hparams():
    a = _good()
    t, ur, g, nu = a["table"], a["ur"], a["g"], a["nu"]
    with pytest.raises(ValueError, match="accumulator"):
        ops.adagrad_update(t, jnp.zeros((NUM_ROWS, 3)), ur, g, nu, 0.1)
    with pytest.raises(ValueError, match="accumulator"):  # 16-bit slots are fine, ints not
        ops.adagrad_update(t, jnp.zeros((NUM_ROWS, 4), jnp.int32), ur, g, nu, 0.1)
    with pytest.raises(ValueError, match="accumulator"):
        ops.rowwise_adagrad_update(t, jnp.zeros((NUM_ROWS, 4)), ur, g, nu, 0.1)
    with pytest.raises(ValueError, match=r"\bv\b"):
        ops.adam_update(t, jnp.zeros((NUM_ROWS, 4)), jnp.zeros((NUM_ROWS, 2)), ur, g, nu, 0.1, 1)
    with pytest.raises(ValueError, match="linear"):
        ops.ftrl_update(t, jnp.zeros((NUM_ROWS, 4)), jnp.zeros((3, 4)), ur, g, nu, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        ops.sgd_update(t, ur, g, nu, jnp.ones((2,)))
    with pytest.raises(ValueError, match="step"):
        ops.adam_update(t, *ops.adam_slots(t), ur, g, nu, 0.1, jnp.ones((3,)))


def test_slot_initialisers():
    t = jnp.zeros((NUM_ROWS, 3), jnp.bfloat16)
    assert ops.adagrad_slots(t).shape == (NUM_ROWS, 3)
    assert float(ops.adagrad_slots(t)[0, 0]) == pytest.approx(0.1)
    assert ops.rowwise_adagrad_slots(t).shape == (NUM_ROWS,)
    m, v = ops.adam_slots(t)
    assert m.dtype == v.dtype == jnp.float32 and not np.any(np.asarray(m))
    n, z = ops.ftrl_slots(t)
    assert n.shape == z.shape == (NUM_ROWS, 3)
