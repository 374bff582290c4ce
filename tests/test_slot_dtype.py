"""16-bit optimizer slots (`slot_dtype=` on every sparse optimizer) on CPU.

1. Round to nearest, every rule with slots, both 16-bit slot dtypes, fused
   (update_bags) and unfused (update), a bfloat16 table: each step from one
   state, the CPU target against the pure-JAX reference and against the
   numpy optimizer oracles (tests/oracles.py, float64 from the same 16-bit
   values) rounded to the storage dtypes, within one 16-bit ulp (a float32
   and a float64 result near a tie may round to either side of it).
2. Stochastic rounding: each stored slot is exactly its float32 update (the
   same step on float32 copies, which the flag leaves alone) rounded with
   the words of (seed, count, row, column, slot), so one of its two 16-bit
   neighbours (numpy oracle); the slots' words are not the weight's; a rerun
   with the seed gives the same bits; the reference writes the same bits
   wherever its float32 update is the target's.
3. Wrong slot dtypes raise naming what is wrong, in Python and in C++.
4. A layer's export carries a bfloat16 accumulator as it is and
   `import_pairs` restores it bit for bit.
5. The planner counts 16-bit slots at their size.
(The host storage tiers with 16-bit slots: tests/test_host_storage.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import require_devices
from oracles import bits, random_table
from test_fused_update import CASES
from test_host_storage import assert_same_export, batch, layer, sparse_step
from test_stochastic_rounding import BAGS, DIM, ROWS, SEED, _apply, neighbours, step_inputs

from sok_jax import optim
from sok_jax.ops import embed_ops, optim_ops
from sok_jax.ops.rounding import rounding_words, stochastic_round

SLOT = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
# One ulp relative to the value (at most), per storage dtype.
ULP = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-22}
LR = 0.05
SLOT_RULES = sorted(k for k in CASES if k != "sgd")


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _close(got, want, dtype_name, what):
    """Within one ulp of `dtype_name` (plus 2e-5 absolute: FTRL's cancelling
    sums and float16 subnormals)."""
    np.testing.assert_allclose(_f64(got), _f64(want), rtol=ULP[dtype_name], atol=2e-5,
                               err_msg=what)


def _step_inputs(rng, nnz=3):
    """One step's bags, `nnz` positions each (-1: no key, so bags of 0 to
    nnz keys; one shape every step, so eager ops compile once), no weights,
    and a float32 cotangent: test_stochastic_rounding's `_apply` inputs."""
    ids = rng.integers(-1, ROWS, BAGS * nnz).astype(np.int32)
    offsets = np.arange(BAGS + 1, dtype=np.int32) * nnz
    return step_inputs(ids, offsets, rng.normal(size=(BAGS, DIM)).astype(np.float32))


def _start(name, rng, slot_dtype, table_dtype="bfloat16", **opt_kw):
    """(table, state, ffi optimizer, reference optimizer) with the rule's
    random slots (test_fused_update CASES) stored as `slot_dtype`."""
    kw, _, make_slots = CASES[name]
    table, _ = random_table(rng, ROWS, DIM, table_dtype)
    ffi, ref = (
        optim.by_name(name, LR, slot_dtype=slot_dtype, implementation=impl, **kw, **opt_kw)
        for impl in ("ffi", "reference")
    )
    state = ffi.init(table)
    assert all(s.dtype == jnp.dtype(slot_dtype) for s in state.slots)
    slots = tuple(jnp.asarray(s).astype(slot_dtype) for s in make_slots(rng, ROWS, DIM))
    return table, state._replace(slots=slots), ffi, ref


@pytest.mark.parametrize("fused", [False, True], ids=["update", "update_bags"])
@pytest.mark.parametrize("slot_dtype", sorted(SLOT))
@pytest.mark.parametrize("name", SLOT_RULES)
def test_matches_reference_and_oracle(name, slot_dtype, fused):
    kw, oracle, _ = CASES[name]
    rng = np.random.default_rng()
    table, state, ffi, ref = _start(name, rng, slot_dtype)
    for step in range(1, 4):
        inputs = _step_inputs(rng)
        t_ffi, s_ffi = _apply(ffi, fused, table, state, inputs)
        t_ref, s_ref = _apply(ref, fused, table, state, inputs)
        *_, grad = inputs
        n = int(grad.count[0])
        o_t, o_s = oracle(
            _f64(table), [_f64(s) for s in state.slots], np.asarray(grad.rows[:n]),
            np.asarray(grad.grads[:n]), LR, step, kw,
        )
        ctx = f"{name} {slot_dtype} fused={fused} step {step}"
        want_t = jnp.asarray(np.asarray(o_t, np.float32)).astype(table.dtype)
        _close(t_ffi, t_ref, "bfloat16", ctx + " table vs reference")
        _close(t_ffi, want_t, "bfloat16", ctx + " table vs oracle")
        for k, (a, b, o) in enumerate(zip(s_ffi.slots, s_ref.slots, o_s)):
            assert a.dtype == b.dtype == jnp.dtype(slot_dtype), ctx
            want = jnp.asarray(np.asarray(o, np.float32)).astype(slot_dtype)
            _close(a, b, slot_dtype, f"{ctx} slot {k} vs reference")
            _close(a, want, slot_dtype, f"{ctx} slot {k} vs oracle")
        table, state = t_ffi, s_ffi


# (rule, table dtype, slot dtype): each rule with slots, both 16-bit slot
# dtypes, a float32 table (whose 16-bit slots alone turn the rounding on).
SR_CASES = [
    ("adagrad", "bfloat16", "bfloat16"),
    ("rowwise_adagrad", "bfloat16", "float16"),
    ("adam", "float16", "bfloat16"),
    ("ftrl", "float32", "float16"),
]


@pytest.mark.parametrize("fused", [False, True], ids=["update", "update_bags"])
@pytest.mark.parametrize("name,table_dtype,slot_dtype", SR_CASES)
def test_stochastic_rounding_of_slots(name, table_dtype, slot_dtype, fused):
    rng = np.random.default_rng()
    table, state, ffi, ref = _start(
        name, rng, slot_dtype, table_dtype, stochastic_rounding=True, seed=SEED
    )
    for _ in range(2):
        inputs = _step_inputs(rng)
        t, s = _apply(ffi, fused, table, state, inputs)
        rerun_t, rerun_s = _apply(ffi, fused, table, state, inputs)
        for a, b in zip((t, *s.slots), (rerun_t, *rerun_s.slots)):
            np.testing.assert_array_equal(bits(a), bits(b))
        # The float32 updates every write rounds: float32 copies ignore the flag.
        as32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        state32 = state._replace(slots=tuple(as32(x) for x in state.slots))
        w32, s32 = _apply(ffi, fused, as32(table), state32, inputs)
        _, r32 = _apply(ref, fused, as32(table), state32, inputs)
        _, s_ref = _apply(ref, fused, table, state, inputs)
        rows = jnp.arange(ROWS)
        table_words = rounding_words(SEED, state.count, rows, jnp.arange(DIM))
        want_t = stochastic_round(w32, table.dtype, table_words)
        np.testing.assert_array_equal(bits(t), bits(want_t))
        for k, (got, want32) in enumerate(zip(s.slots, s32.slots)):
            want32 = want32.reshape(ROWS, -1)
            words = rounding_words(SEED, state.count, rows, jnp.arange(want32.shape[1]), slot=k)
            assert (np.asarray(words) != np.asarray(table_words[:, : want32.shape[1]])).all()
            got16 = bits(got).reshape(ROWS, -1)
            np.testing.assert_array_equal(got16, bits(stochastic_round(want32, slot_dtype, words)))
            near, other = neighbours(np.asarray(want32), SLOT[slot_dtype])
            assert ((got16 == near) | (got16 == other)).all(), f"slot {k}"
            agree = bits(want32) == bits(r32.slots[k].reshape(ROWS, -1))
            ref16 = bits(s_ref.slots[k]).reshape(ROWS, -1)
            np.testing.assert_array_equal(got16[agree], ref16[agree])
        table, state = t, s


def test_bad_slot_dtypes():
    for make in (optim.sgd, optim.adagrad, optim.rowwise_adagrad, optim.adam, optim.ftrl):
        with pytest.raises(ValueError, match=r"slot_dtype must be one of \['float32', 'bfloat16'"):
            make(0.1, slot_dtype="int8")
    with pytest.raises(ValueError, match="slot_dtype must be one of"):
        optim.adam(0.1, slot_dtype="float64")
    t = jnp.zeros((ROWS, DIM), jnp.bfloat16)
    ur, g, nu = jnp.arange(4, dtype=jnp.int32), jnp.ones((4, DIM), jnp.float32), jnp.int32(4)
    m, v = optim_ops.adam_slots(t, "bfloat16")
    with pytest.raises(ValueError, match=r"\bv\b must have the dtype of m .*slot_dtype"):
        optim_ops.adam_update(t, m, v.astype(jnp.float32), ur, g, nu, 0.1, 1)
    with pytest.raises(ValueError, match="accumulator must be float32 or bfloat16 or float16"):
        optim_ops.adagrad_update(t, jnp.zeros((ROWS, DIM), jnp.int8), ur, g, nu, 0.1)
    acc, lin = optim_ops.ftrl_slots(t, 0.1, "float16")
    bag = (jnp.zeros((1, DIM), jnp.float32), ur, jnp.asarray([0, 4], jnp.int32),
           jnp.zeros((0,), jnp.float32), "sum")
    with pytest.raises(ValueError, match="slot 1 must have the dtype of slot 0"):
        embed_ops.bwd_update("ftrl", t, (acc, lin.astype(jnp.bfloat16)), *bag, (0.1,),
                             **{k: 0.0 for k in embed_ops.RULES["ftrl"].consts})
    # The C++ check, past the Python one: the raw target refuses mixed slots.
    call = jax.ffi.ffi_call("sok_adam_update", (jax.ShapeDtypeStruct(t.shape, t.dtype),
                            jax.ShapeDtypeStruct(m.shape, m.dtype),
                            jax.ShapeDtypeStruct(v.shape, jnp.float32)), vmap_method="sequential")
    with pytest.raises(Exception, match="v must have the dtype of the first slot"):
        jax.block_until_ready(call(
            t, m, v.astype(jnp.float32), ur, g, jnp.reshape(nu, (1,)), jnp.ones((2,), jnp.float32),
            b1=np.float32(0.9), b2=np.float32(0.999), eps=np.float32(1e-8),
            eps_root=np.float32(0.0), stochastic_rounding=np.int32(0),
        ))


def test_export_import_keeps_a_bfloat16_accumulator():
    require_devices(2)
    rng = np.random.default_rng()
    emb, emb2 = layer(2, True), layer(2, True)
    opt = optim.adagrad(0.1, slot_dtype="bfloat16")
    s = emb.init(3)
    o = emb.init_optimizer(opt, s)
    step = sparse_step(emb, opt)
    for _ in range(2):
        ids, g = batch(rng, 2, True)
        _, s, o = step(s, o, ids, g)
    exported = emb.export_pairs(s, o)
    assert exported.slots[0].dtype == jnp.bfloat16 and len(exported.keys) > 0
    s2, o2 = emb2.import_pairs(exported, optimizer=opt)
    assert o2.slots[0].dtype == jnp.bfloat16
    assert_same_export(s, emb, s2, emb2, o, o2)


def test_planner_counts_16bit_slots_at_their_size():
    """The planner's memory of a table's slots per row: a 16-bit slot counts
    half a float32 one."""
    from sok_jax.distributed.collection import _slot_bytes

    assert _slot_bytes(optim.adagrad(0.1), 16) == 64
    assert _slot_bytes(optim.adagrad(0.1, slot_dtype="bfloat16"), 16) == 32
    assert _slot_bytes(optim.adam(0.1, slot_dtype="float16"), 16) == 64
    assert _slot_bytes(optim.rowwise_adagrad(0.1, slot_dtype="bfloat16"), 16) == 2
    assert _slot_bytes(optim.sgd(0.1, slot_dtype="bfloat16"), 16) == 0
