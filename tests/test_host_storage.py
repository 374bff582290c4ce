"""Storage tiers (sok_jax.distributed.storage): a table in host memory
(`storage="host"`) or behind an HBM cache (`storage="host_cached"`) computes
exactly what the same table in HBM computes, bit for bit, with a cache far
smaller than the table (rows leave it every step); the cache's counts follow
a numpy simulation of its policy; bad arguments raise naming what is wrong.
On the CPU the host store and the cache are separate arrays, so all of the
cache logic runs here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices

import sok_jax
from sok_jax import optim
from sok_jax.distributed import storage
from sok_jax.ops import ffi, reference

D, SLOTS, NNZ, ROWS = 8, 3, 2, 64

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.1),
    "adagrad": lambda: optim.adagrad(0.1),
    "rowwise_adagrad": lambda: optim.rowwise_adagrad(0.1),
    "adam": lambda: optim.adam(0.01),
    "ftrl": lambda: optim.ftrl(0.1),
}


def layer(n, hashed, implementation="ffi", combiner="sum", rows=ROWS, **kw):
    return sok_jax.DistributedEmbedding(
        combiner=combiner,
        max_vocabulary_size_per_gpu=rows,
        embedding_vec_size=D,
        slot_num=SLOTS,
        max_nnz=NNZ,
        use_hashtable=hashed,
        key_dtype=jnp.int32,
        mesh=mesh_of(n),
        axis_name=AXIS,
        implementation=implementation,
        **kw,
    )


def per_device(n):
    """Samples per device: 2 on one device, 1 on 8 (so that one lookup
    brings fewer rows to a device than it holds, and a cache fits them)."""
    return 2 if n == 1 else 1


def batch(rng, n, hashed, size=None, rows=ROWS):
    """ids [B, SLOTS, NNZ] (`per_device` samples each) with padding, and a
    cotangent; keys of a table of `rows` rows per device."""
    b = per_device(n) * n if size is None else size
    high = 3 * rows * n if hashed else rows * n
    ids = rng.integers(0, high, (b, SLOTS, NNZ)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.2] = -1
    return ids, rng.normal(size=(b, SLOTS, D)).astype(np.float32)


def sparse_step(emb, opt):
    def step(state, opt_state, ids, g, training=True):
        out, ctx, state = emb.lookup(state, ids, training=training)
        state, opt_state = emb.sparse_update(state, opt, opt_state, ctx, g)
        return out, state, opt_state

    return jax.jit(step, static_argnames="training")


def assert_same_export(ref, emb_ref, got, emb_got, opt_ref=None, opt_got=None):
    a = emb_ref.export_pairs(ref, opt_ref) if opt_ref is not None else emb_ref.export_pairs(ref)
    b = emb_got.export_pairs(got, opt_got) if opt_got is not None else emb_got.export_pairs(got)
    if opt_ref is None:
        a, b = sok_jax.TableExport(*a), sok_jax.TableExport(*b)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    for x, y in zip(a.slots or (), b.slots or ()):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ row movers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int32"])
@pytest.mark.parametrize("shape", [(40, 7), (40,), (40, 16)])
def test_row_movers_match_reference(dtype, shape):
    rng = np.random.default_rng()
    table = jnp.asarray(rng.normal(size=shape) * 100, dtype)
    rows = jnp.asarray(rng.permutation(50)[:24] - 5, jnp.int32)  # some out of range
    want = reference.gather_rows(table, rows)
    got = jax.jit(ffi.gather_rows)(table, rows)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    host = np.asarray(table)
    for i, r in enumerate(np.asarray(rows)):
        expect = host[r] if 0 <= r < shape[0] else np.zeros(shape[1:], host.dtype)
        np.testing.assert_array_equal(np.asarray(got)[i], expect)

    values = jnp.asarray(rng.normal(size=(24, *shape[1:])) * 100, dtype)
    got = jax.jit(ffi.scatter_rows)(table, rows, values)
    expect = host.copy()
    for i, r in enumerate(np.asarray(rows)):
        if 0 <= r < shape[0]:
            expect[r] = np.asarray(values)[i]
    np.testing.assert_array_equal(np.asarray(got), expect)
    np.testing.assert_array_equal(np.asarray(reference.scatter_rows(table, rows, values)), expect)


def _copy_then_join(impl):
    def run(dst, dst_rows, src, src_rows, count):
        return impl.join_rows(impl.copy_rows_async(dst, dst_rows, src, src_rows, count))

    return run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_rows_matches_numpy(dtype):
    """All pairs, and with a traced `count` only the leading pairs (none,
    some, more than the list: clamped); `copy_rows_async` then `join_rows`
    the same."""
    rng = np.random.default_rng()
    dst = jnp.asarray(rng.normal(size=(30, 5)), dtype)
    src = jnp.asarray(rng.normal(size=(20, 5)), dtype)
    dst_rows = jnp.asarray(rng.permutation(36)[:16] - 3, jnp.int32)  # distinct, some out
    src_rows = jnp.asarray(rng.integers(-2, 22, 16), jnp.int32)
    for count in (None, 0, int(rng.integers(1, 16)), 40):
        expect = np.asarray(dst).copy()
        live = 16 if count is None else count
        for d, r in list(zip(np.asarray(dst_rows), np.asarray(src_rows)))[:live]:
            if 0 <= d < 30 and 0 <= r < 20:
                expect[d] = np.asarray(src)[r]
        for impl in (ffi, reference):
            for copy in (impl.copy_rows, _copy_then_join(impl)):
                got = jax.jit(copy)(dst, dst_rows, src, src_rows, count)
                np.testing.assert_array_equal(np.asarray(got), expect, err_msg=f"count {count}")


def test_by_host_row_orders_the_pairs_by_row_and_keeps_them():
    """storage.by_host_row gives the same (slot, row) pairs, rows ascending,
    the pairs naming no row (-1) last, against numpy."""
    rng = np.random.default_rng()
    for k in (1, 7, 300):
        slots = rng.permutation(2 * k)[:k].astype(np.int32)
        rows = np.where(rng.random(k) < 0.7, rng.permutation(5 * k)[:k], -1).astype(np.int32)
        got_slots, got_rows = map(np.asarray, jax.jit(storage.by_host_row)(slots, rows))
        live = int((rows >= 0).sum())
        assert (got_rows[:live] >= 0).all() and (got_rows[live:] == -1).all()
        assert (np.diff(got_rows[:live]) > 0).all()
        assert sorted(zip(got_slots.tolist(), got_rows.tolist())) == sorted(
            zip(slots.tolist(), rows.tolist())
        )


@pytest.mark.parametrize("shape", [(6,), (6, 5)])
def test_swap_rows_writes_back_and_loads(shape):
    """storage.swap_rows (a staged async write-back beside the load), the
    write-backs listed in another order than the loads, equals every
    write-back followed by every load, in numpy."""
    rng = np.random.default_rng()
    r, c, k = 60, 12, 10
    host = rng.normal(size=(r, *shape[1:])).astype(np.float32)
    cache = rng.normal(size=(c, *shape[1:])).astype(np.float32)
    slots = rng.permutation(c + 4)[:k].astype(np.int32) - 2  # distinct, some out of range
    rows = rng.permutation(r)  # leaving and incoming rows disjoint
    leaving = np.where(rng.random(k) < 0.8, rows[:k], -1).astype(np.int32)
    incoming = np.where(rng.random(k) < 0.8, rows[k : 2 * k], -1).astype(np.int32)
    want_host, want_cache = host.copy(), cache.copy()
    for slot, row in zip(slots, leaving):
        if 0 <= slot < c and row >= 0:
            want_host[row] = want_cache[slot]
    for slot, row in zip(slots, incoming):
        if 0 <= slot < c and row >= 0:
            want_cache[slot] = want_host[row]
    shuffle = rng.permutation(k)
    for impl in (ffi, reference):
        swap = jax.jit(
            lambda h, ca, so, lv, s, inc, impl=impl: storage.swap_rows(h, ca, so, lv, s, inc, impl),
            donate_argnums=(0, 1),
        )
        args = (jnp.asarray(host), jnp.asarray(cache)) + tuple(
            jnp.asarray(x) for x in (slots[shuffle], leaving[shuffle], slots, incoming)
        )
        got_host, got_cache = swap(*args)
        np.testing.assert_array_equal(np.asarray(got_host), want_host)
        np.testing.assert_array_equal(np.asarray(got_cache), want_cache)


def test_row_movers_check_shapes():
    t = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="rows must be int32"):
        ffi.gather_rows(t, jnp.zeros((2,), jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32))
    with pytest.raises(ValueError, match="values must be"):
        ffi.scatter_rows(t, jnp.zeros((2,), jnp.int32), jnp.zeros((2, 4)))


# ------------------------------------------------------------ against HBM


# (devices, hash mode, optimizer, policy, implementation, overlapped
# moves): every optimizer, both policies, both modes, 1 and 8 devices, both
# implementations, both ways of moving rows.
CASES = [
    (1, False, "sgd", "lru", "ffi", False, "sum"),
    (1, False, "adagrad", "lfu", "ffi", True, "sum"),
    (1, True, "adam", "lru", "ffi", True, "sum"),
    (1, False, "rowwise_adagrad", "lfu", "reference", False, "sum"),
    (8, False, "ftrl", "lru", "ffi", False, "sum"),
    (8, False, "sgd", "lru", "reference", True, "sum"),
    (8, True, "adagrad", "lfu", "ffi", False, "sum"),
    (8, True, "rowwise_adagrad", "lru", "ffi", True, "sum"),
    (1, True, "adagrad", "lfu", "ffi", False, "mean"),  # a hash table read locally
]


@pytest.mark.parametrize("n,hashed,opt_name,policy,impl,overlap,combiner", CASES)
def test_cached_table_trains_as_the_hbm_table(n, hashed, opt_name, policy, impl, overlap, combiner):
    """Steps with a cache of fewer rows than the table, so rows leave it
    every step; an evaluation lookup between steps moves rows too. Outputs,
    vectors and optimizer slots equal the HBM table's bit for bit."""
    require_devices(n)
    rng = np.random.default_rng()
    positions = per_device(n) * SLOTS * NNZ * n  # the most rows one lookup brings to a device
    cache_rows = min(positions, ROWS - 1)
    if impl == "reference" and jax.default_backend() == "gpu":
        with pytest.raises(ValueError, match='needs implementation="ffi"'):
            layer(n, hashed, impl, combiner, storage="host_cached", cache_rows=cache_rows)
        return
    hbm = layer(n, hashed, impl, combiner)
    cached = layer(n, hashed, impl, combiner, storage="host_cached", cache_rows=cache_rows,
                   cache_policy=policy, cache_overlap_moves=overlap)
    opt = OPTIMIZERS[opt_name]()
    s_ref, s = hbm.init(3), cached.init(3)
    o_ref, o = hbm.init_optimizer(opt, s_ref), cached.init_optimizer(opt, s)
    step_ref, step = sparse_step(hbm, opt), sparse_step(cached, opt)
    evictions = 0
    for i in range(5):
        ids, g = batch(rng, n, hashed)
        want, s_ref, o_ref = step_ref(s_ref, o_ref, ids, g)
        got, s, o = step(s, o, ids, g)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"step {i}")
        evictions = int(np.sum(s.stats.cache_evictions))
        if i == 2:  # an evaluation lookup: moves rows, updates nothing
            ids, _ = batch(rng, n, hashed)
            want, s_ref = jax.jit(hbm.apply, static_argnames="training")(s_ref, ids, training=False)
            got, s = jax.jit(cached.apply, static_argnames="training")(s, ids, training=False)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if n == 1:
        assert evictions > 0, "the cache never evicted: the test does not exercise it"
    sok_jax.check_stats(s)
    assert_same_export(s_ref, hbm, s, cached, o_ref, o)
    if not hashed:
        keys = rng.integers(0, hbm.num_rows, 20)
        np.testing.assert_array_equal(cached.logical_rows(s, keys), hbm.logical_rows(s_ref, keys))


def test_cached_table_with_16bit_slots_trains_as_the_hbm_table():
    """bfloat16 rows with a bfloat16 row-wise accumulator: the row movers
    carry the 16-bit slots with their rows, so outputs, vectors and slots
    equal the HBM table's bit for bit, slots in bfloat16."""
    rng = np.random.default_rng()
    cache_rows = per_device(1) * SLOTS * NNZ
    hbm = layer(1, False, dtype=jnp.bfloat16)
    cached = layer(1, False, dtype=jnp.bfloat16, storage="host_cached", cache_rows=cache_rows)
    opt = optim.rowwise_adagrad(0.1, slot_dtype="bfloat16")
    s_ref, s = hbm.init(3), cached.init(3)
    o_ref, o = hbm.init_optimizer(opt, s_ref), cached.init_optimizer(opt, s)
    assert o.cache.slots[0].dtype == o.host[0].dtype == jnp.bfloat16
    step_ref, step = sparse_step(hbm, opt), sparse_step(cached, opt)
    for _ in range(4):
        ids, g = batch(rng, 1, False)
        want, s_ref, o_ref = step_ref(s_ref, o_ref, ids, g)
        got, s, o = step(s, o, ids, g)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(np.sum(s.stats.cache_evictions)) > 0
    assert o.cache.slots[0].dtype == o.host[0].dtype == jnp.bfloat16
    assert_same_export(s_ref, hbm, s, cached, o_ref, o)


@pytest.mark.parametrize("n,hashed", [(1, False), (8, False), (8, True)])
def test_host_table_trains_as_the_hbm_table(n, hashed):
    require_devices(n)
    rng = np.random.default_rng()
    hbm, host = layer(n, hashed), layer(n, hashed, storage="host")
    opt = optim.adam(0.01)
    s_ref, s = hbm.init(5), host.init(5)
    o_ref, o = hbm.init_optimizer(opt, s_ref), host.init_optimizer(opt, s)
    step_ref, step = sparse_step(hbm, opt), sparse_step(host, opt)
    for _ in range(3):
        ids, g = batch(rng, n, hashed)
        want, s_ref, o_ref = step_ref(s_ref, o_ref, ids, g)
        got, s, o = step(s, o, ids, g)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_same_export(s_ref, hbm, s, host, o_ref, o)


def test_two_pass_update_and_import_on_a_cached_table():
    """sparse_grad + apply_gradients on a cached table equal the HBM
    table's; an import (with optimizer slots) into a cached layer continues
    training exactly as the HBM layer does."""
    require_devices(8)
    rng = np.random.default_rng()
    hbm = layer(8, False)
    cached = layer(8, False, storage="host_cached", cache_rows=48)
    opt = optim.adagrad(0.05)
    s_ref, s = hbm.init(0), cached.init(0)
    o_ref, o = hbm.init_optimizer(opt, s_ref), cached.init_optimizer(opt, s)

    def two_pass(emb):
        def step(state, opt_state, ids, g):
            out, ctx, state = emb.lookup(state, ids)
            grad = emb.sparse_grad(ctx, g)
            state, opt_state = emb.apply_gradients(state, opt, opt_state, grad)
            return out, state, opt_state

        return jax.jit(step)

    for _ in range(3):
        ids, g = batch(rng, 8, False)
        want, s_ref, o_ref = two_pass(hbm)(s_ref, o_ref, ids, g)
        got, s, o = two_pass(cached)(s, o, ids, g)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_same_export(s_ref, hbm, s, cached, o_ref, o)

    exported = hbm.export_pairs(s_ref, o_ref)
    s2, o2 = cached.import_pairs(exported, optimizer=opt)
    ids, g = batch(rng, 8, False)
    want, s_ref, o_ref = sparse_step(hbm, opt)(s_ref, o_ref, ids, g)
    got, s2, o2 = sparse_step(cached, opt)(s2, o2, ids, g)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_same_export(s_ref, hbm, s2, cached, o_ref, o2)


@pytest.mark.parametrize("hashed", [False, True], ids=["direct", "hash"])
@pytest.mark.parametrize("tier", ["host", "host_cached"])
def test_import_into_a_host_tier_stays_in_host_memory(tier, hashed):
    """An import (pairs and optimizer slots) into a host-stored layer writes
    its host stores where a fresh state keeps them (on a GPU: pinned host
    memory, so a table larger than HBM can be restored), and continues
    training exactly as the same import into an HBM layer."""
    require_devices(2)
    rng = np.random.default_rng()
    kw = {"cache_rows": 24} if tier == "host_cached" else {}
    hbm, tiered = layer(2, hashed), layer(2, hashed, storage=tier, **kw)
    opt = optim.adagrad(0.05)
    s_ref = hbm.init(0)
    o_ref = hbm.init_optimizer(opt, s_ref)
    for _ in range(2):
        ids, g = batch(rng, 2, hashed)
        _, s_ref, o_ref = sparse_step(hbm, opt)(s_ref, o_ref, ids, g)
    exported = hbm.export_pairs(s_ref, o_ref)
    s, o = tiered.import_pairs(exported, optimizer=opt)
    fresh = tiered.init(0)
    fresh_o = tiered.init_optimizer(opt, fresh)
    where = lambda tree: [x.sharding for x in jax.tree.leaves(tree)]  # noqa: E731
    assert where(s.table) == where(fresh.table)
    assert where(o) == where(fresh_o)
    ids, g = batch(rng, 2, hashed)
    want, s_ref, o_ref = sparse_step(hbm, opt)(s_ref, o_ref, ids, g)
    got, s, o = sparse_step(tiered, opt)(s, o, ids, g)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_same_export(s_ref, hbm, s, tiered, o_ref, o)


# ------------------------------------------------------------ the policy


def simulate_cache(batches, cache_rows, policy):
    """numpy: per lookup (hits, misses, evictions) of a one-device cache. A
    lookup of K key positions ranks the W = min(C, 2K) slots from the hand
    on (cyclically) by (score, offset), the slots its hits use last; its
    misses, ascending, take the first ones in order; the hand moves past the
    last slot taken. Scores: "lru" the last step that used the slot, "lfu"
    the uses since its row came in; -1 empty."""
    tags = np.full(cache_rows, -1)
    score = np.full(cache_rows, -1)
    hand = 0
    out = []
    for step, ids in enumerate(batches, start=1):
        k = ids.size
        rows = np.unique(ids[(ids >= 0) & (ids < ROWS)])
        where = {int(t): s for s, t in enumerate(tags) if t >= 0}
        hit_slots = {where[r] for r in rows if r in where}
        misses = [r for r in rows if r not in where]
        w = min(cache_rows, 2 * k)
        window = [(hand + i) % cache_rows for i in range(w)]
        ranked = sorted(
            range(w), key=lambda i: (window[i] in hit_slots, score[window[i]], i)
        )
        taken = ranked[: len(misses)]
        evictions = 0
        for r, i in zip(misses, taken):
            s = window[i]
            evictions += tags[s] >= 0
            tags[s] = r
            score[s] = step if policy == "lru" else 1
        if taken:
            hand = (hand + max(taken) + 1) % cache_rows
        for s in hit_slots:
            score[s] = step if policy == "lru" else score[s] + 1
        out.append((len(hit_slots), len(misses), evictions))
    return out


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cache_counts_follow_the_policy(policy):
    """Per lookup, the cache's hits, misses and evictions (the counters
    accumulate) equal the numpy simulation of its policy's, with a cache
    that fills and then evicts every lookup."""
    rng = np.random.default_rng()
    cache_rows = 2 * SLOTS * NNZ + 2
    emb = layer(1, False, storage="host_cached", cache_rows=cache_rows, cache_policy=policy)
    state = emb.init(0)
    apply = jax.jit(emb.apply)
    hot = rng.choice(ROWS, 6, replace=False)  # a few rows recur, so there are hits
    batches = []
    for _ in range(10):
        ids, _ = batch(rng, 1, False)
        ids[rng.random(ids.shape) < 0.4] = rng.choice(hot)
        batches.append(ids)
    want = simulate_cache(batches, cache_rows, policy)
    assert sum(e for _, _, e in want) > 0 and sum(h for h, _, _ in want) > 0
    before = np.zeros(3, np.int64)
    for ids, expect in zip(batches, want):
        _, state = apply(state, ids)
        st = state.stats
        total = np.array(
            [int(np.sum(x)) for x in (st.cache_hits, st.cache_misses, st.cache_evictions)]
        )
        assert tuple(total - before) == expect
        before = total


def exact_lru_hit_rate(batches, rows, cache_rows, warm):
    """numpy: the hit rate (distinct rows found over distinct rows looked
    up, after `warm` lookups) of a cache that always evicts the least
    recently used rows of all, never one the lookup uses."""
    slot_of = np.full(rows, -1)
    tags, last = np.full(cache_rows, -1), np.full(cache_rows, -1)
    hits = looked = 0
    for step, ids in enumerate(batches, start=1):
        distinct = np.unique(ids[ids >= 0])
        at = slot_of[distinct]
        if step > warm:
            hits, looked = hits + np.sum(at >= 0), looked + distinct.size
        last[at[at >= 0]] = step  # the hits are now the most recent
        missing = distinct[at < 0]
        victims = np.lexsort((np.arange(cache_rows), last))[: missing.size]
        slot_of[tags[victims][tags[victims] >= 0]] = -1
        tags[victims], slot_of[missing], last[victims] = missing, victims, step
    return hits / looked


def test_window_clock_hits_as_often_as_exact_lru():
    """On power-law keys with a stable hot set, the cache's clock window
    (O(K) per lookup) finds about as many rows as exact LRU over the whole
    cache (O(C)) would."""
    rows, b, warm = 1 << 16, 64, 15
    rng = np.random.default_rng()
    hot = rng.permutation(rows)  # rank -> row, fixed over the steps
    ranks = [rng.zipf(1.05, (b, SLOTS, 1)) for _ in range(45)]
    batches = [hot[np.where(r <= rows, r, rows) - 1].astype(np.int32) for r in ranks]
    cache_rows = rows // 5
    emb = sok_jax.DistributedEmbedding(
        combiner="sum", max_vocabulary_size_per_gpu=rows, embedding_vec_size=2, slot_num=SLOTS,
        max_nnz=1, use_hashtable=False, key_dtype=jnp.int32, mesh=mesh_of(1), axis_name=AXIS,
        storage="host_cached", cache_rows=cache_rows,
    )
    state, apply = emb.init(0), jax.jit(emb.apply)
    for step, ids in enumerate(batches, start=1):
        _, state = apply(state, ids)
        if step == warm:
            before = [int(np.sum(x)) for x in (state.stats.cache_hits, state.stats.cache_misses)]
    hits, misses = (int(np.sum(x)) - y for x, y in zip(
        (state.stats.cache_hits, state.stats.cache_misses), before))
    want = exact_lru_hit_rate(batches, rows, cache_rows, warm)
    assert want > 0.3  # a real hot set
    assert abs(hits / (hits + misses) - want) < 0.03


def test_lookups_without_updates_then_an_update_train_as_in_hbm():
    """Several lookups without an update (say evaluations), then a training
    step: the update brings every moved row's optimizer slots along and
    trains the last lookup's rows exactly as the HBM table does; nothing is
    skipped or counted stale."""
    rng = np.random.default_rng()
    opt = optim.adagrad(0.1)
    tables = {}
    for tier, kw in (("hbm", {}), ("host_cached", dict(cache_rows=2 * SLOTS * NNZ))):
        emb = layer(1, False, storage=tier, **kw)
        state = emb.init(0)
        tables[tier] = [emb, state, emb.init_optimizer(opt, state)]
    for k, (ids, g) in enumerate(batch(rng, 1, False) for _ in range(12)):
        for entry in tables.values():
            emb, state, opt_state = entry
            out, ctx, state = jax.jit(emb.lookup)(state, ids)
            if k % 4 == 3:  # three lookups without an update, then one with
                state, opt_state = jax.jit(
                    lambda s, o, c, g, emb=emb: emb.sparse_update(s, opt, o, c, g)
                )(state, opt_state, ctx, g)
            entry[1:] = [state, opt_state]
    (emb_ref, ref, opt_ref), (emb_got, got, opt_got) = tables["hbm"], tables["host_cached"]
    assert int(np.sum(got.stats.stale)) == 0
    assert int(np.sum(got.stats.cache_evictions)) > 0
    assert_same_export(ref, emb_ref, got, emb_got, opt_ref, opt_got)


# ------------------------------------------------------------ prefetch


def cached_rows_of(emb, state, keys) -> np.ndarray:
    """Direct mode: whether each key's row is in its owner's cache (key k:
    device k % n, local row k // n)."""
    n, c = emb.num_devices, emb.storage.cache_rows
    tags = np.asarray(state.table.tags).reshape(n, c)
    return np.array([k // n in set(tags[k % n].tolist()) for k in keys])


@pytest.mark.parametrize(
    "n,hashed,opt_name,policy",
    [(1, False, "sgd", "lru"), (1, True, "adagrad", "lfu"), (8, False, "adagrad", "lru"),
     (8, True, "rowwise_adagrad", "lfu")],
)
def test_prefetching_steps_train_as_the_hbm_table(n, hashed, opt_name, policy):
    """Every step's lookup prefetches the next batch into a cache of far
    fewer rows than the table (rows leave it every step); an evaluation
    lookup between two steps leaves a prefetch unused. Outputs, vectors and
    optimizer slots equal the HBM table's bit for bit, nothing is stale,
    and in direct mode each prefetched batch's rows are in the cache when
    its step begins."""
    require_devices(n)
    rng = np.random.default_rng()
    rows = 4 * ROWS
    cache_rows = 2 * per_device(n) * SLOTS * NNZ * n  # this batch's positions and the next's
    hbm = layer(n, hashed, rows=rows)
    cached = layer(n, hashed, rows=rows, storage="host_cached", cache_rows=cache_rows,
                   cache_policy=policy)
    opt = OPTIMIZERS[opt_name]()
    s_ref, s = hbm.init(3), cached.init(3)
    o_ref, o = hbm.init_optimizer(opt, s_ref), cached.init_optimizer(opt, s)
    step_ref = sparse_step(hbm, opt)

    @jax.jit
    def step(state, opt_state, ids, g, upcoming):
        out, ctx, state = cached.lookup(state, ids, prefetch=upcoming)
        state, opt_state = cached.sparse_update(state, opt, opt_state, ctx, g)
        return out, state, opt_state

    apply = jax.jit(hbm.apply, static_argnames="training")
    apply_cached = jax.jit(cached.apply, static_argnames="training")
    batches = []
    for _ in range(7):  # on 8 devices, keys of devices 0 and 1 only, so that their caches fill
        ids, g = batch(rng, n, hashed, rows=rows)
        batches.append((np.where(ids >= 0, ids - ids % n + ids % 2, ids) if n > 1 else ids, g))
    for i in range(6):
        ids, g = batches[i]
        if not hashed and i > 0 and i != 4:  # the prefetch of step i - 1 is all there
            keys = ids[ids >= 0]
            assert cached_rows_of(cached, s, keys).all(), f"step {i}"
        want, s_ref, o_ref = step_ref(s_ref, o_ref, ids, g)
        got, s, o = step(s, o, ids, g, batches[i + 1][0])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"step {i}")
        if i == 3:  # an evaluation lookup between a prefetch and its batch
            other, _ = batch(rng, n, hashed, rows=rows)
            want, s_ref = apply(s_ref, other, training=False)
            got, s = apply_cached(s, other, training=False)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(np.sum(s.stats.stale)) == 0
    assert int(np.sum(s.stats.cache_evictions)) > 0, "the cache never evicted"
    assert_same_export(s_ref, hbm, s, cached, o_ref, o)


def test_prefetch_is_refused_where_it_cannot_work():
    rng = np.random.default_rng()
    ids, _ = batch(rng, 1, False)
    hbm = layer(1, False)
    with pytest.raises(ValueError, match='prefetch is for storage="host_cached"'):
        hbm.lookup(hbm.init(0), ids, prefetch=ids)
    positions = per_device(1) * SLOTS * NNZ
    small = layer(1, False, storage="host_cached", cache_rows=positions)  # one batch only
    state = small.init(0)
    with pytest.raises(ValueError, match="smaller than the .* a prefetch must place"):
        small.lookup(state, ids, prefetch=ids)
    big = layer(1, False, storage="host_cached", cache_rows=2 * positions)
    with pytest.raises(ValueError, match="prefetch must be the next batch, shaped as this one"):
        big.lookup(big.init(0), ids, prefetch=np.concatenate([ids, ids]))


# ------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(storage="disk"), "storage must be one of"),
        (dict(storage="host_cached"), "needs cache_rows"),
        (dict(storage="host_cached", cache_rows=0), "positive"),
        (dict(storage="host_cached", cache_rows=True), "needs cache_rows"),
        (dict(storage="host_cached", cache_rows=ROWS), "smaller than the rows"),
        (dict(storage="hbm", cache_rows=8), "cache_rows is for"),
        (dict(storage="host", cache_overlap_moves=True), "cache_overlap_moves is for"),
        (dict(storage="host_cached", cache_rows=8, cache_overlap_moves=1), "must be a bool"),
        (dict(storage="host_cached", cache_rows=8, cache_policy="fifo"), "cache_policy"),
    ],
)
def test_bad_storage_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        layer(1, False, **kw)


def test_cache_smaller_than_one_lookup_and_dense_grad_are_refused():
    emb = layer(1, False, storage="host_cached", cache_rows=4)
    state = emb.init(0)
    ids, _ = batch(np.random.default_rng(), 1, False)
    with pytest.raises(ValueError, match="cache_rows .4. is smaller than"):
        emb.apply(state, ids)
    big = layer(1, False, storage="host_cached", cache_rows=40)
    state = big.init(0)
    with pytest.raises(ValueError, match="trains through lookup"):  # jitted: a host table
        jax.jit(jax.grad(lambda s: big.apply(s, ids)[0].sum(), allow_int=True))(state)


# ------------------------------------------------------------ collections


def collection(specs, n=8, **kw):
    features = [sok_jax.FeatureSpec(f"f_{t.name}", t.name, 2) for t in specs]
    return sok_jax.EmbeddingCollection(specs, features, mesh=mesh_of(n), axis_name=AXIS, **kw)


@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
def test_collection_with_host_tables_trains_as_in_hbm(prefetch):
    """A host_cached table, a host table and an HBM table in one collection
    compute what the all-HBM collection computes, with each lookup
    prefetching the next batch or not; export and import see the logical
    tables."""
    require_devices(8)
    rng = np.random.default_rng()
    cache_rows = 40 if prefetch else 20  # a prefetch holds two batches' 16 positions

    def specs(tiered):
        extra = [dict(storage="host_cached", cache_rows=cache_rows, cache_overlap_moves=True),
                 dict(storage="host"), {}]
        return [
            sok_jax.TableSpec(name, 400 + 40 * i, 4 + 4 * i, placement="row",
                              use_hashtable=(i == 1), **(extra[i] if tiered else {}))
            for i, name in enumerate(["a", "b", "c"])
        ]

    ref, got = collection(specs(False)), collection(specs(True))
    assert [t.storage for t in got.plan.tables] == ["host_cached", "host", "hbm"]
    opt = optim.adagrad(0.1)
    s_ref, s = ref.init(1), got.init(1)
    o_ref, o = ref.init_optimizer(opt, s_ref), got.init_optimizer(opt, s)

    @jax.jit
    def step(state, opt_state, batch, g, upcoming):
        outs, ctx, state = got.lookup(state, batch, prefetch=upcoming if prefetch else None)
        state, opt_state = got.sparse_update(state, opt, opt_state, ctx, g)
        return outs, state, opt_state

    batches = [
        {f"f_{t}": rng.integers(-1, v, (8, 2)).astype(np.int32)
         for t, v in (("a", 400), ("b", 1000), ("c", 480))}
        for _ in range(5)
    ]
    for batch, upcoming in zip(batches, batches[1:]):
        g = {f"f_{t}": rng.normal(size=(8, d)).astype(np.float32)
             for t, d in (("a", 4), ("b", 8), ("c", 12))}
        want, s_ref, o_ref = sparse_step(ref, opt)(s_ref, o_ref, batch, g)
        out, s, o = step(s, o, batch, g, upcoming)
        for k in want:
            np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(want[k]))
    for t in "abc":
        a, b = ref.export_pairs(s_ref, t, o_ref), got.export_pairs(s, t, o)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.vectors, b.vectors)
        for x, y in zip(a.slots, b.slots):
            np.testing.assert_array_equal(x, y)
    s2, o2 = got.import_pairs({t: ref.export_pairs(s_ref, t, o_ref) for t in "abc"}, optimizer=opt)
    for t in "abc":
        a, b = ref.export_pairs(s_ref, t, o_ref), got.export_pairs(s2, t, o2)
        np.testing.assert_array_equal(a.vectors, b.vectors)
        for x, y in zip(a.slots, b.slots):
            np.testing.assert_array_equal(x, y)


def test_planner_offloads_under_an_hbm_budget():
    """Tables that do not fit the budget move to host memory behind a cache,
    the one read least per byte first; the plan says so; pinned tables stay."""
    require_devices(8)
    specs = [
        sok_jax.TableSpec("hot", 4096, 16, placement="row"),     # read 8 times per sample
        sok_jax.TableSpec("cold", 65536, 16, placement="row"),   # read once per sample
        sok_jax.TableSpec("pinned", 65536, 16, placement="row", storage="hbm"),
    ]
    features = [sok_jax.FeatureSpec("h", "hot", 8), sok_jax.FeatureSpec("c", "cold", 1),
                sok_jax.FeatureSpec("p", "pinned", 1)]
    per_device = lambda rows: rows // 8 * 16 * 4 * 2  # noqa: E731 - table + Adagrad slot
    total = per_device(4096) + 2 * per_device(65536)
    coll = sok_jax.EmbeddingCollection(specs, features, mesh=mesh_of(8), axis_name=AXIS,
                                       batch_size=64, hbm_budget=int(total * 0.7))
    plan = {t.table: t for t in coll.plan.tables}
    assert plan["cold"].storage == "host_cached" and plan["cold"].cache_rows < 65536 // 8
    assert plan["hot"].storage == "hbm" and plan["pinned"].storage == "hbm"
    assert max(coll.plan.memory_per_device) <= int(total * 0.7)
    assert "offloaded 'cold'" in str(coll.plan)
    with pytest.raises(ValueError, match="do not fit"):
        sok_jax.EmbeddingCollection(specs, features, mesh=mesh_of(8), axis_name=AXIS,
                                    batch_size=64, hbm_budget=per_device(65536) // 2)
    with pytest.raises(ValueError, match="placements"):
        sok_jax.TableSpec("r", 10, 4, placement="replicated", storage="host")
