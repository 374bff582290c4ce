"""Wrong inputs a new user hits, each a clear error or a counted condition:
keys that do not fit `key_dtype` (int64 past 2^31 with x64 off, floats,
the padding key) and non-finite vectors in the host helpers, and
`sok_jax.check_ids` for batches before a jitted step; ragged ids whose
lengths do not match their values (refused where concrete, counted in
`stats.invalid` / `count_invalid_ids` under jit, against a numpy oracle
of the bag rule); sparse optimizers given an optax optimizer or bad
hyperparameters."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from devices import AXIS, mesh_of, require_devices

import sok_jax
from sok_jax import optim
from sok_jax.ops import checks

N = 2
DIM = 4


def _layer(hashed=True, key_dtype=jnp.int32):
    require_devices(N)
    return sok_jax.DistributedEmbedding(
        "sum", 16, DIM, mesh=mesh_of(N), axis_name=AXIS, use_hashtable=hashed, key_dtype=key_dtype
    )


def _collection():
    require_devices(N)
    tables = [
        sok_jax.TableSpec("d", 32, DIM),
        sok_jax.TableSpec("h", 32, DIM, use_hashtable=True),
    ]
    features = [sok_jax.FeatureSpec("fd", "d", 3), sok_jax.FeatureSpec("fh", "h", 3)]
    return sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(N), axis_name=AXIS)


# ------------------------------------------------------------ keys (item 4)
BAD_KEYS = [
    (np.array([1, 2**33 + 1], np.int64), "8589934593 does not fit key_dtype int32"),
    (np.array([1.7, 2.0]), "must be integers"),
    (np.array([3, -1]), "padding value"),
]


@pytest.mark.parametrize("keys,match", BAD_KEYS)
def test_import_pairs_refuses_keys_that_do_not_fit(keys, match):
    emb = _layer()
    vectors = np.random.default_rng().normal(size=(len(keys), DIM)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        emb.import_pairs(keys, vectors)
    coll = _collection()
    with pytest.raises(ValueError, match=match):
        coll.import_pairs({"h": (keys, vectors)})


def test_import_pairs_refuses_nonfinite_vectors_and_keeps_good_keys():
    emb = _layer()
    rng = np.random.default_rng()
    keys = rng.choice(2**31 - 2, size=5, replace=False).astype(np.int64)  # int64, all fit
    vectors = rng.normal(size=(5, DIM)).astype(np.float32)
    bad = vectors.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"vectors: 1 value\(s\) are NaN or Inf, the first at"):
        emb.import_pairs(keys, bad)
    k, v = emb.export_pairs(emb.import_pairs(keys, vectors))
    order = np.argsort(keys)
    np.testing.assert_array_equal(k, keys[order].astype(np.int32))
    np.testing.assert_array_equal(v, vectors[order])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, jnp.bfloat16])
def test_host_vectors_finds_every_nonfinite_entry(dtype):
    """Random entries made NaN, +Inf or -Inf (also +Inf beside -Inf in one
    row) are refused with numpy's count and first index; finite rows whose
    sums overflow the dtype pass."""
    rng = np.random.default_rng()
    big = float(jnp.finfo(dtype).max) / 2  # numpy 2.x has no finfo of bfloat16
    for _ in range(8):
        vectors = rng.normal(size=(int(rng.integers(1, 300)), int(rng.integers(1, 20))))
        vectors[rng.random(vectors.shape) < 0.05] = big  # rows whose sums overflow
        vectors = vectors.astype(dtype)
        np.testing.assert_array_equal(checks.host_vectors(vectors, "v"), vectors)
        spots = rng.random(vectors.shape) < rng.choice([0.0005, 0.01])
        spots.reshape(-1)[rng.integers(vectors.size)] = True
        bad = vectors.copy()
        bad[spots] = rng.choice([np.nan, np.inf, -np.inf], size=int(spots.sum()))
        first = re.escape(str(tuple(int(i) for i in np.argwhere(spots)[0])))
        with pytest.raises(ValueError, match=rf"{int(spots.sum())} value\(s\) .* at {first}"):
            checks.host_vectors(bad, "v")
    row = np.ones((3, 4), dtype)
    row[1, 0], row[1, 2] = np.inf, -np.inf
    with pytest.raises(ValueError, match=r"2 value\(s\) are NaN or Inf, the first at \(1, 0\)"):
        checks.host_vectors(row, "v")


def test_uint32_keys_refuse_their_padding_and_negatives():
    emb = _layer(key_dtype=jnp.uint32)
    v = np.zeros((1, DIM), np.float32)
    with pytest.raises(ValueError, match="4294967295 is the padding value of uint32"):
        emb.import_pairs(np.array([0xFFFFFFFF], np.uint32), v)
    with pytest.raises(ValueError, match="-1 does not fit key_dtype uint32"):
        emb.import_pairs(np.array([-1]), v)


def test_direct_mode_host_helpers_refuse_float_keys():
    emb = _layer(hashed=False)
    state = emb.init(0)
    with pytest.raises(ValueError, match="must be integers"):
        emb.logical_rows(state, np.array([1.7]))
    with pytest.raises(ValueError, match="must be integers"):
        emb.import_pairs(np.array([1.7]), np.zeros((1, DIM), np.float32))


def test_check_ids_refuses_what_jit_would_truncate():
    emb = _layer()
    ids = np.array([[[1, -1]], [[2**33 + 1, 5]]], np.int64)
    # What jit does without x64: the id becomes 1, silently.
    assert int(jnp.asarray(ids)[1, 0, 0]) == 1
    with pytest.raises(ValueError, match="8589934593 does not fit key_dtype int32"):
        sok_jax.check_ids(ids, emb)
    with pytest.raises(ValueError, match="must be integers"):
        sok_jax.check_ids(ids.astype(np.float64), jnp.int32)
    good = np.random.default_rng().integers(-1, 2**31 - 1, size=(4, 1, 2))
    out = sok_jax.check_ids(good, emb)  # int64 that fits, padding allowed
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, good)
    coll = _collection()
    batch = {"fd": np.zeros((2, 3), np.int64), "fh": np.full((2, 3), 2**40, np.int64)}
    with pytest.raises(ValueError, match="feature 'fh': ids: 1099511627776 does not fit"):
        sok_jax.check_ids(batch, coll)
    ragged = sok_jax.RaggedIds.from_lengths(np.array([1, 2**32], np.int64), np.ones((2, 1), int))
    with pytest.raises(ValueError, match=r"ids.values: 4294967296 does not fit"):
        sok_jax.check_ids(ragged, emb)


# ---------------------------------------------------------- ragged (item 5)
def test_from_lengths_refuses_lengths_that_do_not_match_concrete_values():
    values = np.arange(8, dtype=np.int32)
    with pytest.raises(ValueError, match=r"lengths must be >= 0; lengths\[1, 0\] is -1"):
        sok_jax.RaggedIds.from_lengths(values, np.array([[2], [-1], [2], [1]], np.int32))
    with pytest.raises(ValueError, match=r"end at 9 \(offsets\[-1\], the sum of the lengths\) but"):
        sok_jax.RaggedIds.from_lengths(values, np.array([[2], [2], [2], [3]], np.int32))
    with pytest.raises(ValueError, match="lengths must be integers"):
        sok_jax.RaggedIds.from_lengths(values, np.full((4, 1), 2.0))
    # Offsets given directly are checked where they are used.
    table = jnp.zeros((16, DIM))
    bad = sok_jax.RaggedIds(values, np.array([0, 2, 1, 3, 4], np.int32), 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        sok_jax.embed(table, bad)


def _lost_oracle(offsets, capacity, width):
    """Per bag: (first position read, ids read, ids named but not read)."""
    out = []
    for b in range(len(offsets) - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        if e < s:
            out.append((s, 0, 1))
        elif s < max(offsets[: b + 1]) or s < 0:
            out.append((s, 0, e - s))
        else:
            kept = min(max(min(e, capacity) - s, 0), width)
            out.append((s, kept, e - s - kept))
    return out


@pytest.mark.parametrize("case", ["past_capacity", "negative", "random"])
def test_ragged_lengths_that_do_not_match_are_counted_under_jit(case):
    coll = _collection()
    batch, cap, width = 8, 12, 3
    rng = np.random.default_rng()
    if case == "past_capacity":
        lengths = np.full((batch, 1), 2)
        lengths[-1] = 3  # sums to 17 > 12
    elif case == "negative":
        lengths = rng.integers(0, 2, (batch, 1))
        lengths[2] = -1
    else:
        lengths = rng.integers(-1, 5, (batch, 1))
        lengths[rng.integers(batch)] = -1  # at least one bag that does not match
    lengths = lengths.astype(np.int32)
    values = rng.integers(0, 32, cap).astype(np.int32)
    state = coll.init(1)

    @jax.jit
    def run(state, values, lengths):
        ids = sok_jax.RaggedIds.from_lengths(values, lengths)  # traced: not checkable here
        pad = jnp.zeros((batch, 3), jnp.int32) - 1
        outs, state = coll.apply(state, {"fd": ids, "fh": pad}, training=False)
        return outs["fd"], state.stats["d"].invalid, sok_jax.count_invalid_ids(ids, 32)

    out, invalid, counted = run(state, values, lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths[:, 0])])
    bags = _lost_oracle(offsets, cap, width)
    lost = np.array([b[2] for b in bags])
    per_device = lost.reshape(N, -1).sum(axis=1)
    assert per_device.sum() > 0
    np.testing.assert_array_equal(np.asarray(invalid), per_device)
    # count_invalid_ids knows no width: only the capacity and the bag rule.
    no_width = _lost_oracle(offsets, cap, 10**9)
    assert int(counted) == sum(b[2] for b in no_width)
    keys, vecs = coll.export_pairs(state, "d")
    want = np.zeros((batch, DIM), np.float32)
    for i, (s, kept, _) in enumerate(bags):
        for k in values[s : s + kept]:
            want[i] += vecs[np.searchsorted(keys, k)]
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------- optimizers (item 8)
def test_an_optax_optimizer_on_the_sparse_path_is_a_clear_type_error():
    emb = _layer(hashed=False)
    state = emb.init(0)
    with pytest.raises(TypeError, match="optax optimizers are for the dense path"):
        emb.init_optimizer(optax.adam(0.1), state)
    with pytest.raises(TypeError, match=r"TableSpec 't': optimizer is an optax-style"):
        sok_jax.TableSpec("t", 8, DIM, optimizer=optax.sgd(0.1))
    table = jnp.zeros((8, DIM))
    _, ctx = sok_jax.lookup(table, jnp.zeros((2, 1, 1), jnp.int32))
    with pytest.raises(TypeError, match="sok_jax.optim"):
        sok_jax.sparse_update(table, optax.sgd(0.1), (), ctx, jnp.ones((2, 1, DIM)))
    with pytest.raises(TypeError, match="must be a sok_jax.optim.SparseOptimizer"):
        emb.init_optimizer("adagrad", state)


BAD_HYPER = [
    (lambda: optim.adagrad("0.1"), TypeError, "learning_rate must be a real number"),
    (lambda: optim.sgd(-1), ValueError, "learning_rate must be >= 0, got -1"),
    (lambda: optim.adam(float("nan")), ValueError, "learning_rate must be finite"),
    (lambda: optim.adam(0.1, b1=1.0), ValueError, r"b1 must lie in \[0, 1\)"),
    (lambda: optim.adam(0.1, b2=-0.1), ValueError, r"b2 must lie in \[0, 1\)"),
    (lambda: optim.adam(0.1, eps=-1e-8), ValueError, "eps must be >= 0"),
    (lambda: optim.adagrad(0.1, initial_accumulator_value=-1), ValueError, "initial_acc"),
    (lambda: optim.rowwise_adagrad(0.1, eps=float("inf")), ValueError, "eps must be finite"),
    (lambda: optim.ftrl(0.1, learning_rate_power=0.5), ValueError, "learning_rate_power"),
    (lambda: optim.ftrl(0.1, l1_regularization_strength=-1), ValueError, "l1_regularization"),
    (lambda: optim.by_name("sgd", True), TypeError, "learning_rate must be a real number"),
]


@pytest.mark.parametrize("make,error,match", BAD_HYPER)
def test_bad_hyperparameters_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_learning_rate_schedules_still_work():
    rng = np.random.default_rng()
    table0 = rng.normal(size=(8, DIM)).astype(np.float32)
    sched = optax.linear_schedule(0.5, 0.1, 4)
    opt = optim.sgd(sched)
    table, s = jnp.asarray(table0), opt.init(jnp.asarray(table0))
    ids = jnp.asarray([[[3]], [[5]]], jnp.int32)
    g = rng.normal(size=(2, 1, DIM)).astype(np.float32)
    want = table0.copy()
    for step in range(2):
        _, ctx = sok_jax.lookup(table, ids)
        table, s = sok_jax.sparse_update(table, opt, s, ctx, jnp.asarray(g))
        lr = 0.5 + (0.1 - 0.5) * step / 4
        want[3] -= lr * g[0, 0]
        want[5] -= lr * g[1, 0]
    np.testing.assert_allclose(np.asarray(table), want, rtol=1e-6, atol=1e-6)
    optim.adam(jnp.float32(0.01))  # a concrete array learning rate is a number
