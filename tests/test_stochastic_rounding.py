"""Stochastic rounding of the sparse updates' 16-bit table writes
(xla_ffi/rounding_math.h, sok_jax/ops/rounding.py, `stochastic_rounding=True`
on every sparse optimizer), on CPU.

1. The rounding function, against a numpy oracle (np.float16 and
   ml_dtypes.bfloat16 round-to-nearest, and the next value away from it):
   every result is one of the two neighbours of its float32 input, and over
   many independent words the rounded-up frequency is the distance ratio
   (unbiased), near float16's subnormals and overflow too; the CPU target and
   the pure-JAX twin give the same bits.
2. CPU target vs the pure-JAX reference over several steps, every optimizer,
   both 16-bit dtypes, fused (update_bags) and unfused (update): each step,
   each implementation's 16-bit table is exactly its own float32 update
   rounded with the words of (seed, count, row, column); the two tables are
   bit-identical wherever their float32 updates are (XLA and C++ may differ
   in the last float32 bit of a formula: contraction, pow, reduction order),
   and for SGD and Adagrad unfused, whose float32 steps agree everywhere,
   bit-identical after every step.
3. Determinism: same seed and step, same bits (eager and jit); another step
   or seed, other bits; a float32 table ignores the flag.
4. Training: a logistic model over one table on the synthetic planted data,
   from a wide initialisation with a learning rate whose steps lie below half
   a bfloat16 ulp for most weights: bfloat16 with round-to-nearest stalls,
   stochastic rounding (bfloat16 and float16) tracks float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import bits

from sok_jax import optim
from sok_jax.data import SparseFeature, roc_auc
from sok_jax.data.synthetic import SyntheticCriteo
from sok_jax.ops import embed_ops, optim_ops, reference
from sok_jax.ops.rounding import StochasticRounding, rounding_words, stochastic_round

HALF = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Where stochastic rounding puts the value past the largest finite one (inf).
INF_AT = {"bfloat16": 2.0**128, "float16": 2.0**16}


# ---------------------------------------------------------------------------
# The numpy oracle of the two neighbours
# ---------------------------------------------------------------------------


def neighbours(x, dtype):
    """uint16 bits (near, other) of the `dtype` values around float32 `x`:
    numpy's round-to-nearest result, and the next value on x's other side
    (equal to it when x is a `dtype` value)."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):
        y = x.astype(np.dtype(dtype))
    near = y.view(np.uint16)
    yf, xf = y.astype(np.float64), x.astype(np.float64)
    exact = yf == xf
    toward_zero = np.abs(yf) < np.abs(xf)  # the other one is a step away from zero
    other = np.where(exact, near, np.where(toward_zero, near + 1, near - 1)).astype(np.uint16)
    return near, other


def as_value(b, dtype):
    return np.asarray(b, np.uint16).view(np.dtype(dtype)).astype(np.float64)


def edge_values(name):
    if name == "float16":
        vals = [
            65504.0, 65505.0, 65519.0, 65520.0, 65535.0, 65536.0, 1e5,
            2.0**-14, 2.0**-14 * (1 - 2.0**-12), 2.0**-14 * (1 + 2.0**-12),
            2.0**-24, 1.5 * 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 2.0**-31,
            2.0**-33, 3.0 * 2.0**-40, 1e-40, 0.0, 1.0 / 3.0, 3.14159,
        ]
    else:
        vals = [
            3.3895314e38, 3.3896e38, 3.4028235e38, 1.1754944e-38, 1e-39, 1e-44,
            2.0**-126 * 1.0001, 0.0, 1.0 / 3.0, 3.14159, 65505.0, 2.0**-133 * 1.7,
        ]
    vals = np.asarray(vals, np.float32)
    return np.concatenate([vals, -vals])


def random_values(rng, name, n):
    lo, hi = (-30, 17) if name == "float16" else (-140, 128)
    mag = np.exp2(rng.uniform(lo, hi, n)) * rng.uniform(1.0, 2.0, n)
    mag = mag[mag < np.finfo(np.float32).max]
    return (rng.choice([-1.0, 1.0], mag.size) * mag).astype(np.float32)


def normal_or_zero(x):
    """`x` without float32 subnormals: XLA's CPU runtime flushes them to zero
    in arithmetic (the update's float32 math), so only the pure rounding
    function sees them."""
    return x[(x == 0) | (np.abs(x) >= np.finfo(np.float32).tiny)]


def sgd_write(values, rows, dtype, seed, step):
    """The CPU target writing float32 `values` [K] into `rows` rows of a zero
    `dtype` table (SGD with learning rate 1 and gradient -values: the new
    value is 0 + values exactly), stochastically rounded: [rows, K]."""
    k = values.shape[0]
    table = jnp.zeros((rows, k), dtype)
    grads = jnp.asarray(np.broadcast_to(-values, (rows, k)).copy())
    ur = jnp.arange(rows, dtype=jnp.int32)
    sr = StochasticRounding(seed, step)
    return optim_ops.sgd_update(table, ur, grads, jnp.int32(rows), 1.0, rounding=sr)


# ---------------------------------------------------------------------------
# 1. The rounding function
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HALF))
def test_rounds_to_a_neighbour(name):
    """Every result is one of the two neighbours, from the pure-JAX twin on
    random words and from the CPU target; the target and the twin agree
    bit for bit."""
    dt = HALF[name]
    rng = np.random.default_rng()
    x = np.concatenate([random_values(rng, name, 4000), edge_values(name)])
    words = jnp.asarray(rng.integers(0, 2**32, x.shape, dtype=np.uint64).astype(np.uint32))
    got = bits(stochastic_round(jnp.asarray(x), dt, words))
    near, other = neighbours(x, dt)
    bad = (got != near) & (got != other)
    assert not bad.any(), (x[bad][:5], got[bad][:5], near[bad][:5], other[bad][:5])

    seed, step = int(rng.integers(0, 2**32)), int(rng.integers(0, 2**31))
    vals = normal_or_zero(np.concatenate([x[:1000], edge_values(name)]))
    out = bits(sgd_write(vals, 8, dt, seed, step))  # 8 rows of the same values
    xe = np.float32(0.0) + vals  # what the update computes: -0 becomes +0
    near, other = neighbours(np.broadcast_to(xe, out.shape), dt)
    assert (((out == near) | (out == other))).all()
    words = rounding_words(seed, step, jnp.arange(8), jnp.arange(xe.size))
    twin = bits(stochastic_round(jnp.broadcast_to(jnp.asarray(xe), out.shape), dt, words))
    np.testing.assert_array_equal(out, twin)


@pytest.mark.parametrize("name", sorted(HALF))
def test_unbiased(name):
    """Over N rows (N independent words) the frequency of the upper
    neighbour is (x - lo) / (hi - lo) within 5 standard deviations (plus
    2/N), so the mean is x (inf counts as INF_AT for the overflow edge)."""
    dt = HALF[name]
    rng = np.random.default_rng()
    n = 4000
    x = normal_or_zero(np.concatenate([random_values(rng, name, 40), edge_values(name)]))
    x = np.float32(0.0) + x
    out = bits(sgd_write(x, n, dt, int(rng.integers(0, 2**32)), int(rng.integers(0, 2**31))))
    near, other = neighbours(x, dt)
    a, b = as_value(near, dt), as_value(other, dt)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    hi_eff = np.where(np.isinf(hi), INF_AT[name], hi)
    lo_eff = np.where(np.isinf(lo), -INF_AT[name], lo)
    xf = x.astype(np.float64)
    width = hi_eff - lo_eff
    p = np.where(width > 0, (xf - lo_eff) / np.where(width > 0, width, 1.0), 0.0)
    p = np.clip(p, 0.0, 1.0)  # x at or past INF_AT: always inf
    vals = as_value(out, dt)
    upper = np.where(np.isinf(hi)[None, :], np.isinf(vals), vals == hi[None, :])
    upper = upper & (width > 0)[None, :]
    freq = upper.mean(axis=0)
    bound = 5.0 * np.sqrt(p * (1 - p) / n) + 2.0 / n
    assert (np.abs(freq - p) <= bound).all(), (x[np.abs(freq - p) > bound], freq, p)
    finite = np.isfinite(hi) & np.isfinite(lo)
    mean = vals[:, finite].mean(axis=0)
    tol = width[finite] * bound[finite]
    np.testing.assert_array_less(np.abs(mean - xf[finite]), tol + 1e-300)


# ---------------------------------------------------------------------------
# 2. CPU target vs the pure-JAX reference
# ---------------------------------------------------------------------------

ROWS, DIM, BAGS, SEED = 40, 6, 24, 0xC0FFEE
# SGD's and Adagrad's float32 update is the same sequence of rounded float32
# operations in the CPU target and in the reference that XLA compiles for
# the CPU. On the GPU they may differ in the last bit (nvcc and XLA each
# contract a * b + c into a fused multiply-add where they choose), so there
# the float32 values are compared to within an ulp and the rounding of each
# to the 16-bit one bit for bit.
SAME_FLOAT32_ARITHMETIC = jax.default_backend() == "cpu"
OPTIMIZERS = {
    "sgd": lambda impl: optim.sgd(0.05, implementation=impl, stochastic_rounding=True, seed=SEED),
    "adagrad": lambda impl: optim.adagrad(
        0.05, implementation=impl, stochastic_rounding=True, seed=SEED
    ),
    "rowwise_adagrad": lambda impl: optim.rowwise_adagrad(
        0.05, implementation=impl, stochastic_rounding=True, seed=SEED
    ),
    "adam": lambda impl: optim.adam(0.01, implementation=impl, stochastic_rounding=True, seed=SEED),
    "ftrl": lambda impl: optim.ftrl(
        0.05, l1_regularization_strength=0.001, implementation=impl, stochastic_rounding=True,
        seed=SEED,
    ),
}


def step_inputs(ids, offsets, g):
    """One step's `_apply` inputs: bags (ids, offsets, no weights), their
    float32 cotangent and the row gradient the unfused update takes. The row
    gradient is computed once per step: XLA's GPU segment_sum adds in no
    fixed order, so two evaluations may differ in the last bit."""
    ids, offsets, g = jnp.asarray(ids), jnp.asarray(offsets), jnp.asarray(g)
    w = jnp.zeros((0,), jnp.float32)
    return ids, offsets, w, g, reference.lookup_combine_bwd(g, ids, offsets, w, "sum", ROWS)


def _step_inputs(rng):
    """Random bags of 0 to 3 keys and a float32 cotangent: `step_inputs`."""
    lengths = rng.integers(0, 4, BAGS)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(0, ROWS, int(offsets[-1])).astype(np.int32)
    return step_inputs(ids, offsets, rng.normal(size=(BAGS, DIM)).astype(np.float32))


def _apply(opt, fused, table, state, inputs):
    ids, offsets, w, g, row_grad = inputs
    if fused:
        return opt.update_bags(table, state, g, ids, offsets, w, "sum")
    return opt.update(table, state, row_grad)


@pytest.mark.parametrize("fused", [False, True], ids=["update", "update_bags"])
@pytest.mark.parametrize("name", sorted(HALF))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_target_matches_reference(opt_name, name, fused):
    dt = HALF[name]
    rng = np.random.default_rng()
    ffi_opt, ref_opt = OPTIMIZERS[opt_name]("ffi"), OPTIMIZERS[opt_name]("reference")
    table = jnp.asarray(rng.normal(size=(ROWS, DIM)), jnp.float32).astype(dt)
    state = ffi_opt.init(table)
    all_f32_agree = True
    for _ in range(3):
        inputs = _step_inputs(rng)
        words = rounding_words(SEED, state.count, jnp.arange(ROWS), jnp.arange(DIM))
        t_ffi, s_ffi = _apply(ffi_opt, fused, table, state, inputs)
        t_ref, _ = _apply(ref_opt, fused, table, state, inputs)
        # The float32 updates each 16-bit write rounds: the same step on a
        # float32 copy of the table (which ignores the flag).
        w_ffi, s_ffi32 = _apply(ffi_opt, fused, table.astype(jnp.float32), state, inputs)
        w_ref, _ = _apply(ref_opt, fused, table.astype(jnp.float32), state, inputs)
        np.testing.assert_array_equal(bits(t_ffi), bits(stochastic_round(w_ffi, dt, words)))
        np.testing.assert_array_equal(bits(t_ref), bits(stochastic_round(w_ref, dt, words)))
        np.testing.assert_allclose(w_ffi, w_ref, rtol=1e-6, atol=1e-6)
        agree = bits(w_ffi) == bits(w_ref)
        all_f32_agree &= bool(agree.all())
        np.testing.assert_array_equal(bits(t_ffi)[agree], bits(t_ref)[agree])
        for a, b in zip(s_ffi.slots, s_ffi32.slots):  # float32 slots: no rounding
            np.testing.assert_array_equal(bits(a), bits(b))
        assert int(s_ffi.count) == int(state.count) + 1
        table, state = t_ffi, s_ffi
    if opt_name in ("sgd", "adagrad") and not fused and SAME_FLOAT32_ARITHMETIC:
        assert all_f32_agree  # so the whole trajectories were bit-identical


@pytest.mark.skipif(
    not SAME_FLOAT32_ARITHMETIC, reason="the GPU kernel and XLA's GPU code round differently"
)
@pytest.mark.parametrize("name", sorted(HALF))
@pytest.mark.parametrize("opt_name", ["sgd", "adagrad"])
def test_trajectories_bit_identical(opt_name, name):
    """SGD and Adagrad unfused: the CPU target and the reference, each on its
    own state, end with the same bits after several steps."""
    dt = HALF[name]
    rng = np.random.default_rng()
    ffi_opt, ref_opt = OPTIMIZERS[opt_name]("ffi"), OPTIMIZERS[opt_name]("reference")
    t_a = t_b = jnp.asarray(rng.normal(size=(ROWS, DIM)), jnp.float32).astype(dt)
    s_a, s_b = ffi_opt.init(t_a), ref_opt.init(t_b)
    for _ in range(5):
        inputs = _step_inputs(rng)
        t_a, s_a = _apply(ffi_opt, False, t_a, s_a, inputs)
        t_b, s_b = _apply(ref_opt, False, t_b, s_b, inputs)
    np.testing.assert_array_equal(bits(t_a), bits(t_b))
    for a, b in zip(s_a.slots, s_b.slots):
        np.testing.assert_array_equal(bits(a), bits(b))


# ---------------------------------------------------------------------------
# 3. Determinism and the float32 table
# ---------------------------------------------------------------------------


def _sgd_call(table, ur, g, rounding, jit=False):
    def f(t):
        return optim_ops.sgd_update(t, ur, g, jnp.int32(ur.shape[0]), 1e-3, rounding=rounding)

    return jax.jit(f)(table) if jit else f(table)


@pytest.mark.parametrize("name", sorted(HALF))
def test_deterministic_in_seed_and_step(name):
    dt = HALF[name]
    rng = np.random.default_rng()
    table = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32).astype(dt)
    ur = jnp.asarray(rng.permutation(64)[:48], jnp.int32)
    g = jnp.asarray(rng.normal(size=(48, 16)), jnp.float32)
    a = bits(_sgd_call(table, ur, g, StochasticRounding(5, 7)))
    np.testing.assert_array_equal(a, bits(_sgd_call(table, ur, g, StochasticRounding(5, 7))))
    np.testing.assert_array_equal(
        a, bits(_sgd_call(table, ur, g, StochasticRounding(5, jnp.int32(7)), jit=True))
    )
    for other in (StochasticRounding(5, 8), StochasticRounding(6, 7)):
        assert (a != bits(_sgd_call(table, ur, g, other))).sum() > 10
    # A float32 table stores the float32 result whatever the flag.
    t32 = table.astype(jnp.float32)
    np.testing.assert_array_equal(
        bits(_sgd_call(t32, ur, g, StochasticRounding(5, 7))), bits(_sgd_call(t32, ur, g, None))
    )


def test_bad_arguments():
    with pytest.raises(TypeError, match="seed must be an integer"):
        optim.sgd(0.1, stochastic_rounding=True, seed=1.5)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*32\)"):
        optim.adam(0.1, stochastic_rounding=True, seed=-1)
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        optim.ftrl(0.1, stochastic_rounding="yes")
    table = jnp.zeros((4, 2), jnp.bfloat16)
    args = (jnp.arange(4, dtype=jnp.int32), jnp.zeros((4, 2), jnp.float32), jnp.int32(4), 0.1)
    with pytest.raises(TypeError, match="StochasticRounding"):
        optim_ops.sgd_update(table, *args, rounding=True)
    with pytest.raises(ValueError, match="integer scalar"):
        optim_ops.sgd_update(table, *args, rounding=StochasticRounding(0, 1.5))
    with pytest.raises(TypeError, match="seed must be an integer"):
        reference.sgd_update(table, *args, rounding=StochasticRounding("0", 1))


# ---------------------------------------------------------------------------
# 4. Training: stochastic rounding tracks float32 where nearest stalls
# ---------------------------------------------------------------------------

FEATURES, CARD, BATCH, STEPS, LR = 2, 64, 2048, 400, 3e-5


def _train(data, dtype, opt, steps):
    """A logistic model, logit = sum over features of the id's weight (one
    [FEATURES * CARD, 1] table, sum loss), from weights uniform in (-1, 1),
    trained with `opt.update_bags`; returns (eval loss, eval AUC)."""
    feats = data.features
    offs = jnp.arange(FEATURES, dtype=jnp.int32) * CARD
    offsets = jnp.arange(BATCH * FEATURES + 1, dtype=jnp.int32)
    no_w = jnp.zeros((0,), jnp.float32)

    def ids_of(batch):
        return (jnp.concatenate([batch.sparse[f.name] for f in feats], axis=1) + offs).reshape(-1)

    def logits(table, batch):
        out = embed_ops.lookup_combine(table, ids_of(batch), offsets, no_w, "sum")
        return out.astype(jnp.float32).reshape(BATCH, FEATURES).sum(1)

    @jax.jit
    def step(table, state, i):
        batch = data.batch(i)
        g = jax.nn.sigmoid(logits(table, batch)) - batch.labels  # d sum-loss / d logit
        g = jnp.repeat(g[:, None], FEATURES, axis=1).reshape(-1, 1)
        return opt.update_bags(table, state, g, ids_of(batch), offsets, no_w, "sum")

    init = np.random.default_rng(0).uniform(-1.0, 1.0, (FEATURES * CARD, 1))
    table = jnp.asarray(init, jnp.float32).astype(dtype)
    state = opt.init(table)
    for i in range(steps):
        table, state = step(table, state, jnp.int32(i))
    ev = [data.eval_batch(j) for j in range(8)]
    z = jnp.concatenate([jax.jit(logits)(table, b) for b in ev])
    y = jnp.concatenate([b.labels for b in ev])
    loss = float(jnp.mean(jnp.logaddexp(0.0, z) - y * z))
    return loss, roc_auc(np.asarray(y), np.asarray(z))


def test_training_tracks_float32_where_nearest_stalls():
    """With steps of about lr * 20 ~ 6e-4 per weight, below half a bfloat16
    ulp (>= 9.8e-4) for the three quarters of the weights with |w| >= 0.25:
    float32 improves the held-out loss and AUC; bfloat16 with
    round-to-nearest recovers under a quarter of float32's loss improvement;
    stochastic rounding (bfloat16, float16) ends within 0.003 of float32's
    loss and 0.005 of its AUC. (Measured: init 0.7648 / 0.524; float32
    0.7247 / 0.564; bfloat16 nearest 0.7621 / 0.528; bfloat16 SR 0.7242 /
    0.565; float16 SR 0.7247 / 0.564.)"""
    feats = [SparseFeature(f"f{k}", CARD, 1) for k in range(FEATURES)]
    data = SyntheticCriteo(
        feats, BATCH, seed=3, num_dense=1, key_weight_std=1.0, dense_weight_std=0.0, bias=0.0,
        alpha=0.3,
    )
    init = _train(data, jnp.float32, optim.sgd(LR), 0)
    f32 = _train(data, jnp.float32, optim.sgd(LR), STEPS)
    rne = _train(data, jnp.bfloat16, optim.sgd(LR), STEPS)
    sr = {
        name: _train(data, HALF[name], optim.sgd(LR, stochastic_rounding=True, seed=1), STEPS)
        for name in sorted(HALF)
    }
    gain = init[0] - f32[0]
    assert gain > 0.03 and f32[1] - init[1] > 0.03, (init, f32)
    assert init[0] - rne[0] < 0.25 * gain, (init, f32, rne)
    for name, (loss, auc) in sr.items():
        assert abs(loss - f32[0]) < 0.003 and abs(auc - f32[1]) < 0.005, (name, loss, auc, f32)
