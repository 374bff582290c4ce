"""`DistributedEmbedding(use_hashtable=True)` on 1, 2, 4 and 8 (forced host
CPU) devices.

In hash mode a key is any integer (padding -1 excepted), owned by device
k % n and mapped to a row of that device's shard by the hash table in
`state.slot_keys`; a key's initial vector depends only on the seed and the
key (`initializers.init_rows`). So the *logical* table key -> vector must not
depend on the device count, nor on the row a key lands in. The tests check:

  * training (sparse sgd / adagrad, and the dense path through `jax.grad`)
    gives the same outputs and exported pairs on 1, 2 and 8 devices, and the
    dense path equals the sparse sgd path;
  * outputs against a python dict key -> vector (numpy brute force);
  * a full shard: `stats.hash_full` exactly, stored keys untouched, failed
    keys contributing nothing, `check=True` and `check_stats` raising;
  * export on 8 devices, import on 1, 2 and 4.

Insertion is deterministic on every platform (xla_ffi/hash_math.h): the
full shard test knows exactly which keys get the last free rows from
`oracles.HashShardOracle`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from oracles import FULL, HashShardOracle

import sok_jax
from sok_jax import initializers, optim
from sok_jax.distributed import DistributedEmbedding

DIM = 4
SLOTS, NNZ = 2, 4
BATCH = 16  # divisible by every device count
TOTAL_ROWS = 1024  # rows_per_gpu = TOTAL_ROWS // n: never full in tests 1, 2, 4
TOL = dict(rtol=1e-6, atol=1e-6)
PAD = -1


def make_emb(n, combiner, rows_per_gpu=None, key_dtype=jnp.int32, **kw):
    return DistributedEmbedding(
        combiner,
        rows_per_gpu or TOTAL_ROWS // n,
        DIM,
        slot_num=SLOTS,
        max_nnz=kw.pop("max_nnz", NNZ),
        use_hashtable=True,
        key_dtype=key_dtype,
        mesh=mesh_of(n),
        axis_name=AXIS,
        **kw,
    )


# --------------------------------------------------------------------------
# Random keys and batches (int64 numpy; -1 is padding).


def extreme_keys(key_dtype) -> list[int]:
    if np.dtype(key_dtype) == np.int64:
        big = 2**63
        # 2**32 + 1 and 1 (and -(2**32) - 1 and -1) share their low 32 bits.
        return [-big, big - 1, -big + 1, big - 2, -2, 0, 1, 2**32 + 1, -(2**32) - 1, 2**40 + 8]
    big = 2**31
    return [-big, big - 1, -big + 1, big - 2, -2, 0, 1, 8, 16]


def random_keys(rng, key_dtype, size) -> np.ndarray:
    info = np.iinfo(np.dtype(key_dtype))
    k = rng.integers(info.min, info.max, size=size, dtype=np.int64, endpoint=True)
    return np.where(k == PAD, 7, k)


def key_pool(rng, key_dtype, size) -> np.ndarray:
    """Distinct keys: the extremes, small ones, and random over the range."""
    small = rng.integers(-50, 50, size=size // 4)
    keys = np.concatenate(
        [np.asarray(extreme_keys(key_dtype), np.int64), small, random_keys(rng, key_dtype, size)]
    )
    keys = np.unique(keys[keys != PAD])
    return rng.permutation(keys)[:size]


def make_batch(rng, pool, key_dtype, batch=BATCH, p_pad=0.3, p_fresh=0.25) -> np.ndarray:
    """Keys from `pool` (so they repeat within and across batches), some fresh
    random ones, padding interleaved, an empty bag and a repeated key."""
    ids = rng.choice(pool, size=(batch, SLOTS, NNZ))
    fresh = rng.random(ids.shape) < p_fresh
    ids = np.where(fresh, random_keys(rng, key_dtype, ids.shape), ids)
    ids = np.where(rng.random(ids.shape) < p_pad, PAD, ids)
    ids[0, 0] = PAD  # an empty bag
    ids[1, 1, :] = ids[1, 1, 0] if ids[1, 1, 0] != PAD else pool[0]  # one key, four times
    return ids


def to_keys(ids, key_dtype):
    return jnp.asarray(np.asarray(ids, np.int64).astype(np.dtype(key_dtype)))


@jax.jit
def _init_rows(seed_data, keys):
    return initializers.init_rows(initializers.resolve("random_uniform"), seed_data, keys, DIM)


def init_vectors(seed_data, keys, key_dtype) -> dict:
    """The oracle's initial vectors: `init_rows` of the keys (padded to a
    multiple of 256 so that one compilation serves every call)."""
    keys = [int(k) for k in keys]
    if not keys:
        return {}
    padded = np.zeros(-(-len(keys) // 256) * 256, np.int64)
    padded[: len(keys)] = keys
    vecs = _init_rows(seed_data, jnp.asarray(padded.astype(np.dtype(key_dtype))))
    return dict(zip(keys, np.asarray(vecs, np.float64)[: len(keys)]))


@functools.lru_cache(maxsize=None)
def initial_state(n, rows_per_gpu, key_dtype, seed):
    """emb.init compiles on every call: share the (never donated) states."""
    emb = make_emb(n, "sum", rows_per_gpu, key_dtype=jnp.dtype(key_dtype))
    return emb.init(seed)


def bag_terms(ids, weights, combiner):
    """Per bag (b, s): its keys with their coefficient w * f(bag) in the
    combined output. A key with no vector (unseen in evaluation, or no row in
    a full shard) still counts in mean/sqrtn's denominator, as the layer does."""
    B, S, _ = ids.shape
    for b in range(B):
        for s in range(S):
            terms = [
                (int(k), 1.0 if weights is None else float(weights[b, s, j]))
                for j, k in enumerate(ids[b, s])
                if k != PAD
            ]
            ws = [w for _, w in terms]
            if combiner == "sum":
                f = 1.0
            elif combiner == "mean":
                f = 1.0 / sum(ws) if terms and sum(ws) != 0 else 0.0
            else:
                t = sum(w * w for w in ws)
                f = 1.0 / np.sqrt(t) if t > 0 else 0.0
            yield b, s, [(k, w * f) for k, w in terms]


def np_combine(vec_of, ids, weights, combiner) -> np.ndarray:
    """[B, S, D] float64 brute force. `vec_of(k)` is a key's vector."""
    out = np.zeros((ids.shape[0], ids.shape[1], DIM))
    for b, s, terms in bag_terms(ids, weights, combiner):
        for k, c in terms:
            out[b, s] += c * vec_of(k)
    return out


# --------------------------------------------------------------------------
# Compiled programs, cached per configuration.


@functools.lru_cache(maxsize=None)
def apply_fn(n, combiner, training, weighted=False, key_dtype="int32", **kw):
    emb = make_emb(n, combiner, key_dtype=jnp.dtype(key_dtype), **kw)

    @jax.jit
    def run(state, ids, w):
        return emb.apply(state, ids, w if weighted else None, training=training)

    return emb, run


LR = 0.5
OPTIMIZERS = {
    "sgd": lambda: optim.sgd(LR),
    "adagrad": lambda: optim.adagrad(LR),
    "sgd_fused": lambda: optim.sgd(LR),
}


@functools.lru_cache(maxsize=None)
def train_step(n, mode, combiner):
    """jit (state, opt_state, ids, g) -> (out, state, opt_state): one step on
    the loss sum(g * out). mode "dense": jax.grad w.r.t. state.table and
    table -= LR * grad on the state apply returned; else the sparse path."""
    emb = make_emb(n, combiner)

    if mode == "dense":

        @jax.jit
        def step(state, opt_state, ids, g):
            def loss(table):
                out, new_state = emb.apply(dataclasses.replace(state, table=table), ids)
                return jnp.sum(out * g), (out, new_state)

            grad, (out, new_state) = jax.grad(loss, has_aux=True)(state.table)
            new_state = dataclasses.replace(new_state, table=new_state.table - LR * grad)
            return out, new_state, opt_state

        return emb, None, step

    opt = OPTIMIZERS[mode]()

    @jax.jit
    def step(state, opt_state, ids, g):
        out, ctx, new_state = emb.lookup(state, ids)
        if mode.endswith("_fused"):  # the backward fused with the optimizer
            new_state, opt_state = emb.sparse_update(new_state, opt, opt_state, ctx, g)
            return out, new_state, opt_state
        grad = emb.sparse_grad(ctx, g)
        new_state, opt_state = emb.apply_gradients(new_state, opt, opt_state, grad)
        return out, new_state, opt_state

    return emb, opt, step


TR_STEPS = 4
TR_MODES = [("sgd", "mean"), ("adagrad", "sqrtn"), ("dense", "mean")]


@functools.lru_cache(maxsize=None)
def train_data(seed):
    rng = np.random.default_rng([seed, 17])
    pool = key_pool(rng, np.int32, 40)
    steps = [
        (make_batch(rng, pool, np.int32), rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32))
        for _ in range(TR_STEPS)
    ]
    eval_ids = make_batch(rng, pool, np.int32)  # seen and unseen keys
    return steps, eval_ids


@functools.lru_cache(maxsize=None)
def trajectory(n, mode, combiner, seed):
    """Outputs of every step and of the evaluation batch, the exported pairs
    and the final state."""
    emb, opt, step = train_step(n, mode, combiner)
    state = initial_state(n, None, "int32", 100 + seed)
    opt_state = emb.init_optimizer(opt, state) if opt is not None else None
    steps, eval_ids = train_data(seed)
    outs = []
    for ids, g in steps:
        out, state, opt_state = step(state, opt_state, to_keys(ids, np.int32), g)
        outs.append(np.asarray(out))
        for field in ("overflow", "invalid", "hash_full"):
            np.testing.assert_array_equal(np.asarray(getattr(state.stats, field)), 0)
    _, run_eval = apply_fn(n, combiner, False)
    out, _ = run_eval(state, to_keys(eval_ids, np.int32), None)
    outs.append(np.asarray(out))
    keys, vecs = emb.export_pairs(state)
    return outs, keys, vecs, state


# --------------------------------------------------------------------------
# 1. The same training on 1, 2 and 8 devices.


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode,combiner", TR_MODES, ids=[m for m, _ in TR_MODES])
def test_training_same_on_any_device_count(mode, combiner, seed):
    require_devices(8)
    ref_outs, ref_keys, ref_vecs, _ = trajectory(1, mode, combiner, seed)
    steps, eval_ids = train_data(seed)
    seen = np.unique(np.concatenate([ids[ids != PAD] for ids, _ in steps]))
    np.testing.assert_array_equal(ref_keys, seen)  # exactly the keys trained on
    assert np.abs(ref_outs[-1]).max() > 0  # evaluation found trained keys
    for n in (2, 8):
        outs, keys, vecs, state = trajectory(n, mode, combiner, seed)
        for i, (got, want) in enumerate(zip(outs, ref_outs)):
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"n={n} step {i}")
        np.testing.assert_array_equal(keys, ref_keys)
        np.testing.assert_allclose(vecs, ref_vecs, **TOL, err_msg=f"n={n} pairs")
        # Each key sits on its owner's shard.
        slot_keys = np.asarray(state.slot_keys).reshape(n, -1)
        for d in range(n):
            mine = slot_keys[d][slot_keys[d] != PAD]
            assert np.all(np.remainder(mine.astype(np.int64), n) == d), (n, d)


@pytest.mark.parametrize("sparse_mode", ["sgd", "sgd_fused"])
@pytest.mark.parametrize("n", [1, 8])
def test_dense_path_equals_sparse_sgd(n, sparse_mode):
    """jax.grad w.r.t. state.table + sgd == sparse_grad + optim.sgd (and the
    fused sparse_update), including the first gradient of a key inserted by
    the very call being differentiated."""
    require_devices(n)
    d_outs, d_keys, d_vecs, _ = trajectory(n, "dense", "mean", 0)
    s_outs, s_keys, s_vecs, _ = trajectory(n, sparse_mode, "mean", 0)
    for i, (a, b) in enumerate(zip(d_outs, s_outs)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=f"step {i}")
    np.testing.assert_array_equal(d_keys, s_keys)
    np.testing.assert_allclose(d_vecs, s_vecs, **TOL)
    # And training moved the vectors away from their initial values.
    init = init_vectors(trajectory(n, sparse_mode, "mean", 0)[3].seed, s_keys, np.int32)
    assert np.abs(s_vecs - np.stack([init[int(k)] for k in s_keys])).max() > 1e-3


# --------------------------------------------------------------------------
# 2. Against a python dict key -> vector.

ORACLE_CASES = [
    (1, "mean", "int32", False),
    (1, "sqrtn", "int32", True),
    (8, "sum", "int32", True),
    (2, "sqrtn", "int64", False),
    (8, "mean", "int64", True),
]


def _x64(key_dtype):
    if key_dtype == "int64":
        return jax.enable_x64(True)
    return contextlib.nullcontext()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "n,combiner,key_dtype,weighted",
    ORACLE_CASES,
    ids=[f"{n}dev-{c}-{k}-{'w' if w else 'u'}" for n, c, k, w in ORACLE_CASES],
)
def test_against_dict_oracle(n, combiner, key_dtype, weighted, seed):
    require_devices(n)
    rng = np.random.default_rng([n, len(combiner), len(key_dtype), weighted, seed])
    with _x64(key_dtype):
        emb, train = apply_fn(n, combiner, True, weighted, key_dtype)
        _, evaluate = apply_fn(n, combiner, False, weighted, key_dtype)
        state = initial_state(n, None, key_dtype, seed)
        pool = key_pool(rng, np.dtype(key_dtype), 40)
        oracle: dict[int, np.ndarray] = {}
        for step in range(3):
            ids = make_batch(rng, pool, key_dtype)
            w = rng.uniform(0.25, 1.5, size=ids.shape).astype(np.float32)
            new = set(int(k) for k in np.unique(ids[ids != PAD])) - set(oracle)
            oracle.update(init_vectors(state.seed, sorted(new), key_dtype))
            before = np.asarray(state.slot_keys).copy()
            out, new_state = train(state, to_keys(ids, key_dtype), w)
            want = np_combine(oracle.__getitem__, ids, w if weighted else None, combiner)
            np.testing.assert_allclose(np.asarray(out), want, **TOL, err_msg=f"step {step}")
            for field in ("overflow", "invalid", "hash_full"):
                np.testing.assert_array_equal(np.asarray(getattr(new_state.stats, field)), 0)
            # The call is functional: the old state is untouched.
            np.testing.assert_array_equal(np.asarray(state.slot_keys), before)
            state = new_state

            keys, vecs = emb.export_pairs(state)
            assert keys.dtype == np.dtype(key_dtype)
            np.testing.assert_array_equal(keys, np.asarray(sorted(oracle), np.int64))
            np.testing.assert_allclose(vecs, np.stack([oracle[int(k)] for k in keys]), **TOL)

        # Evaluation: seen and unseen keys; nothing inserted, unseen give zeros.
        ids = make_batch(rng, pool, key_dtype, p_fresh=0.4)
        ids[2] = np.where(ids[2] != PAD, random_keys(rng, key_dtype, ids[2].shape), PAD)
        ids[2, :, 0] = random_keys(rng, key_dtype, SLOTS)  # sample 2: unseen keys only
        unseen = set(int(k) for k in ids[ids != PAD]) - set(oracle)
        assert unseen
        w = rng.uniform(0.25, 1.5, size=ids.shape).astype(np.float32)
        out, ev_state = evaluate(state, to_keys(ids, key_dtype), w)
        zero = np.zeros(DIM)
        want = np_combine(lambda k: oracle.get(k, zero), ids, w if weighted else None, combiner)
        np.testing.assert_allclose(np.asarray(out), want, **TOL)
        np.testing.assert_array_equal(np.asarray(out)[2], 0.0)
        np.testing.assert_array_equal(np.asarray(ev_state.slot_keys), np.asarray(state.slot_keys))
        np.testing.assert_array_equal(np.asarray(ev_state.table), np.asarray(state.table))
        for field in ("overflow", "invalid", "hash_full"):
            np.testing.assert_array_equal(np.asarray(getattr(ev_state.stats, field)), 0)
        keys, _ = emb.export_pairs(ev_state)
        np.testing.assert_array_equal(keys, np.asarray(sorted(oracle), np.int64))


# --------------------------------------------------------------------------
# 3. A full shard.


def simulate_full(prev_stored, ids, n, rows_per_gpu):
    """The insertion rule on the layer's exchange: device d receives, from
    every source, each of the source's distinct keys owned by d; a key is
    found, else the new keys take the free rows in claim order (the rule of
    xla_ffi/hash_math.h, `oracles.HashShardOracle`), else fail once per
    source that asked. Returns (hash_full per device, stored keys after)."""
    lb = ids.shape[0] // n
    failed = np.zeros(n, np.int64)
    stored = set()
    for d in range(n):
        shard = HashShardOracle(rows_per_gpu, wide=False)
        mine = sorted(k for k in prev_stored if k % n == d)
        shard.call(mine, True, 1)
        received = []
        for src in range(n):
            local = ids[src * lb : (src + 1) * lb]
            received += sorted(set(int(k) for k in local[local != PAD] if int(k) % n == d))
        _, _, _, status = shard.call(received, True, 2)
        failed[d] = sum(st == FULL for st in status)
        stored |= {k for k in shard.slots if k is not None}
    return failed, stored


@functools.lru_cache(maxsize=None)
def full_fn(n, combiner, rows_per_gpu):
    """jit: dense path (apply + jax.grad of sum(g * out)) and sparse path
    (lookup + sparse_grad) on one batch."""
    emb = make_emb(n, combiner, rows_per_gpu)

    @jax.jit
    def run(state, ids, g):
        def loss(table):
            out, new_state = emb.apply(dataclasses.replace(state, table=table), ids)
            return jnp.sum(out * g), (out, new_state)

        d_table, (out, new_state) = jax.grad(loss, has_aux=True)(state.table)
        s_out, ctx, s_state = emb.lookup(state, ids)
        return dict(
            out=out,
            state=new_state,
            d_table=d_table,
            s_out=s_out,
            s_state=s_state,
            sparse=emb.sparse_grad(ctx, g),
        )

    return emb, run


FULL_CASES = [(1, "sum", 6), (1, "mean", 6), (4, "sum", 3), (8, "mean", 2)]


@pytest.mark.parametrize("evicting", [False, True], ids=["plain", "lru"])
def test_one_device_reads_rows_without_the_exchange(evicting):
    """One device: a hash table, evicting or not, reads each position's row
    directly (its context holds no owner rows; the oracle tests above and
    test_hash_online's eviction oracle check its values, unseen keys
    counted as zeros, stale rows skipped)."""
    options = sok_jax.HashOptions(eviction="lru") if evicting else None
    emb = make_emb(1, "mean", hash_options=options)
    rng = np.random.default_rng()
    ids = make_batch(rng, key_pool(rng, np.int32, 40), np.int32)
    _, ctx, _ = jax.jit(emb.lookup)(emb.init(0), to_keys(ids, np.int32))
    (unit_ctx,) = ctx.values()
    assert unit_ctx.owner_rows is None
    assert (unit_ctx.held is not None) == evicting


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n,combiner,rows_per_gpu", FULL_CASES)
def test_full_shard(n, combiner, rows_per_gpu, seed):
    require_devices(n)
    rng = np.random.default_rng([n, len(combiner), seed, 3])
    emb, run = full_fn(n, combiner, rows_per_gpu)
    state = initial_state(n, rows_per_gpu, "int32", seed)
    lb = BATCH // n
    # Batch 1 fits: one key per owner.
    first = np.full((BATCH, SLOTS, NNZ), PAD, np.int64)
    k1 = np.arange(n) + n * rng.integers(-(10**6), 10**6, size=n)
    k1 = np.where(k1 == PAD, 5 * n + np.arange(n), k1)
    first[:, 0, 0] = np.resize(k1, BATCH)  # every source asks for every key
    g = rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32)
    r = run(state, to_keys(first, np.int32), g)
    want_failed, stored = simulate_full(set(), first, n, rows_per_gpu)
    assert want_failed.sum() == 0
    np.testing.assert_array_equal(np.asarray(r["state"].stats.hash_full), 0)
    sok_jax.check_stats(r["state"])
    state = r["state"]
    keys0, vecs0 = emb.export_pairs(state)
    np.testing.assert_array_equal(keys0, sorted(stored))

    # Batch 2 overflows: old keys again plus many new ones, some new keys
    # asked for by several sources (each source's request is one failure).
    pool = np.concatenate([k1, key_pool(rng, np.int32, 4 * n * rows_per_gpu)])
    ids = make_batch(rng, pool, np.int32, p_pad=0.2, p_fresh=0.2)
    # rows_per_gpu + 2 new keys of one owner, asked for by every source: the
    # owner fills up, and a key that finds no row fails once per source.
    d0 = int(k1[0] % n)
    crowd = d0 + n * (10**6 + np.arange(rows_per_gpu + 2))
    assert crowd.size <= SLOTS * NNZ
    for src in range(n):
        ids[src * lb].reshape(-1)[: crowd.size] = rng.permutation(crowd)
    want_failed, stored_after = simulate_full(stored, ids, n, rows_per_gpu)
    assert want_failed[d0] >= n  # at least one crowd key fails on every source
    g = rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32)
    r = run(state, to_keys(ids, np.int32), g)
    vec0 = dict(zip(keys0.tolist(), vecs0.astype(np.float64)))
    requested = [
        set(int(k) for k in ids[s * lb : (s + 1) * lb][ids[s * lb : (s + 1) * lb] != PAD])
        for s in range(n)
    ]
    # The dense path (apply) and the sparse path (lookup) insert into the same
    # starting state independently, with the same deterministic winners of
    # the last free rows of a full shard; the invariants below hold for any
    # winner set, and the winners are the rule's.
    got = {}
    for name, out_key in (("state", "out"), ("s_state", "s_out")):
        st = r[name]
        keys, vecs = emb.export_pairs(st)
        have = set(keys.tolist())
        assert have == stored_after, name
        assert stored <= have <= stored | set().union(*requested), name
        for d in range(n):
            want_d = {k for k in stored | set().union(*requested) if k % n == d}
            assert sum(k % n == d for k in have) == min(rows_per_gpu, len(want_d)), (name, d)
        # One failure per (source, distinct requested key not stored).
        failed = np.zeros(n, np.int64)
        for src in range(n):
            for k in requested[src] - have:
                failed[k % n] += 1
        np.testing.assert_array_equal(np.asarray(st.stats.hash_full), failed, err_msg=name)
        np.testing.assert_array_equal(failed, want_failed, err_msg=name)
        assert failed[d0] >= 2 * n  # 2+ crowd keys cannot fit, each asked by every source
        np.testing.assert_array_equal(np.asarray(st.stats.overflow), 0)
        np.testing.assert_array_equal(np.asarray(st.stats.invalid), 0)
        with pytest.raises(ValueError, match="full"):
            sok_jax.check_stats(st)
        # Stored keys keep their vectors; the new ones that fit get init
        # vectors; failed keys contribute nothing (a zero vector).
        old = np.isin(keys, keys0)
        np.testing.assert_array_equal(vecs[old], vecs0)
        vec = dict(vec0)
        vec.update(init_vectors(state.seed, keys[~old], np.int32))
        np.testing.assert_allclose(vecs[~old], np.stack([vec[int(k)] for k in keys[~old]]), **TOL)
        want = np_combine(lambda k, vec=vec: vec.get(k, np.zeros(DIM)), ids, None, combiner)
        np.testing.assert_allclose(np.asarray(r[out_key]), want, **TOL, err_msg=name)
        got[name] = have

    # Gradients: only rows of stored keys the batch touched, on their owners,
    # each equal to the oracle's per-key sum; the sparse path's rows (on its
    # own state) and the dense path's cotangent (on its state) agree key by key.
    rpg = rows_per_gpu

    def key_grads(have):  # d(sum(g * out)) / d(vector of k), for stored k
        out = {}
        for b, s, terms in bag_terms(ids, None, combiner):
            for k, c in terms:
                if k in have:
                    out[k] = out.get(k, 0.0) + c * g[b, s].astype(np.float64)
        return out

    s_keys = np.asarray(r["s_state"].slot_keys).reshape(n, rpg)
    rows = np.asarray(r["sparse"].rows).reshape(n, -1)
    grads = np.asarray(r["sparse"].grads).reshape(n, rows.shape[1], DIM)
    count = np.asarray(r["sparse"].count)
    want = key_grads(got["s_state"])
    for d in range(n):
        c = int(count[d])
        ks = s_keys[d, rows[d, :c]].tolist()
        assert sorted(ks) == sorted(k for k in want if k % n == d), d
        np.testing.assert_allclose(
            grads[d, :c],
            np.stack([want[k] for k in ks]) if c else grads[d, :0],
            rtol=1e-5,
            atol=1e-5,
        )
    d_keys = np.asarray(r["state"].slot_keys).reshape(-1)
    d_table = np.asarray(r["d_table"])
    want = key_grads(got["state"])
    for i, k in enumerate(d_keys.tolist()):
        np.testing.assert_allclose(
            d_table[i],
            want.get(k, np.zeros(DIM)) if k != PAD else 0.0,
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"row {i} key {k}",
        )

    # check=True under jit: warns, the state stays valid, check_stats raises.
    checked = jax.jit(make_emb(n, combiner, rows_per_gpu, check=True).apply)
    with pytest.warns(sok_jax.EmbeddingWarning, match="full"):
        _, st = jax.block_until_ready(checked(state, to_keys(ids, np.int32)))
    with pytest.raises(sok_jax.EmbeddingError, match="full"):
        sok_jax.check_stats(st)
    # A call that fits does not (and leaves no failed effect behind).
    _, st = jax.block_until_ready(checked(state, to_keys(first, np.int32)))
    sok_jax.check_stats(st)


# --------------------------------------------------------------------------
# 4. Export on 8 devices, import on 1, 2 and 4.


@pytest.mark.parametrize("mode,combiner", [("adagrad", "sqrtn"), ("dense", "mean")])
def test_export_8_import_anywhere(mode, combiner):
    require_devices(8)
    outs8, keys, vecs, _ = trajectory(8, mode, combiner, 0)
    _, eval_ids = train_data(0)
    for n in (1, 2, 4):
        emb, evaluate = apply_fn(n, combiner, False)
        state = emb.import_pairs(keys, vecs, seed=100)
        out, _ = evaluate(state, to_keys(eval_ids, np.int32), None)
        np.testing.assert_allclose(np.asarray(out), outs8[-1], **TOL, err_msg=f"n={n}")
        k2, v2 = emb.export_pairs(state)
        np.testing.assert_array_equal(k2, keys)
        np.testing.assert_array_equal(v2, vecs)

    # Shards exactly as large as their keys: every row taken, all found.
    per_owner = np.bincount(np.remainder(keys.astype(np.int64), 2), minlength=2)
    tight = make_emb(2, combiner, int(per_owner.max()))
    state = tight.import_pairs(keys, vecs, seed=100)
    k2, v2 = tight.export_pairs(state)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(v2, vecs)
    # One row short: refused.
    for n in (1, 2):
        need = np.bincount(np.remainder(keys.astype(np.int64), n), minlength=n).max()
        with pytest.raises(ValueError, match="shard"):
            make_emb(n, combiner, int(need) - 1).import_pairs(keys, vecs, seed=100)


def test_import_int64_pairs_across_device_counts():
    require_devices(8)
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        keys = key_pool(rng, np.int64, 60).astype(np.int64)
        vecs = rng.normal(size=(keys.size, DIM)).astype(np.float32)
        ids = np.where(
            rng.random((BATCH, SLOTS, NNZ)) < 0.3, PAD, rng.choice(keys, size=(BATCH, SLOTS, NNZ))
        )
        vec = dict(zip(keys.tolist(), vecs.astype(np.float64)))
        want = np_combine(vec.__getitem__, ids, None, "sum")
        for n in (8, 2):
            emb, evaluate = apply_fn(n, "sum", False, False, "int64")
            state = emb.import_pairs(keys, vecs, seed=1)
            k2, v2 = emb.export_pairs(state)
            np.testing.assert_array_equal(k2, np.sort(keys))
            np.testing.assert_array_equal(v2, vecs[np.argsort(keys)])
            out, _ = evaluate(state, to_keys(ids, np.int64), None)
            np.testing.assert_allclose(np.asarray(out), want, **TOL, err_msg=f"n={n}")
        with pytest.raises(ValueError, match="shard"):
            make_emb(8, "sum", 2, key_dtype=jnp.int64).import_pairs(keys, vecs)
