"""Online hash tables (`eviction`, `admit_after`, scores) on 1 to 8 forced
host CPU devices, against a numpy oracle of the whole layer.

`LayerOracle` keeps the logical table (key -> vector, Adagrad/Adam slots,
scores) and one `oracles.HashShardOracle` per shard, fed exactly what each
owner receives (each source's distinct keys it owns; a replicated table: the
whole gathered batch), and trains it from the published formulas. The tests
check, after every step: the stored key set, vectors, slots and scores
(`export_pairs` with the optimizer state), the counters, that no row but the
evicted ones changed key and no untouched row changed at all; and the
maintenance call, determinism (bits, twice; FFI vs the pure-JAX reference),
an 8 -> 2 device resume with Adam, deltas against the oracle (and applied
to a serving copy), the collection's three placements, and bad arguments.
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
from oracles import FULL, NOT_ADMITTED, HashShardOracle

import sok_jax
from sok_jax import initializers, optim
from sok_jax.distributed import DistributedEmbedding, HashOptions

DIM = 4
SLOTS, NNZ = 2, 3
BATCH = 16
PAD = -1
LR = 0.3
DEPTH, WIDTH = 2, 64
OPTS = HashOptions(sketch_depth=DEPTH, sketch_width=WIDTH)


def _x64(key_dtype):
    return jax.enable_x64(True) if key_dtype == "int64" else contextlib.nullcontext()


@jax.jit
def _init_rows(seed_data, keys):
    return initializers.init_rows(initializers.resolve("random_uniform"), seed_data, keys, DIM)


def init_vectors(seed_data, keys, key_dtype="int32") -> dict:
    keys = [int(k) for k in keys]
    if not keys:
        return {}
    padded = np.zeros(-(-len(keys) // 64) * 64, np.int64)
    padded[: len(keys)] = keys
    vecs = _init_rows(seed_data, jnp.asarray(padded.astype(np.dtype(key_dtype))))
    return dict(zip(keys, np.asarray(vecs, np.float64)[: len(keys)]))


def bag_terms(ids, combiner):
    """Per bag (b, s): its keys with their coefficient in the combined output
    (every key counts in mean/sqrtn's denominator, row or not)."""
    for b in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            ks = [int(k) for k in ids[b, s] if k != PAD]
            f = {"sum": 1.0, "mean": 1.0 / max(len(ks), 1), "sqrtn": 1.0 / np.sqrt(max(len(ks), 1))}
            yield b, s, [(k, f[combiner] if ks else 0.0) for k in ks]


class LayerOracle:
    """The online hash layer from its definition: shards under the rule,
    the logical table trained with Adagrad (lr LR, initial accumulator 0.1,
    eps 1e-7) or lazy Adam (b1 0.9, b2 0.999, eps 1e-8) on sum(g * out)."""

    def __init__(
        self, n_shards, rows, policy, admit, opt, seed_data, key_dtype="int32", placement="row"
    ):
        wide = key_dtype == "int64"
        width = WIDTH if admit else 0
        self.shards = [
            HashShardOracle(rows, wide, policy, admit or 0, DEPTH, width) for _ in range(n_shards)
        ]
        self.n, self.rows, self.placement = n_shards, rows, placement
        self.opt, self.seed, self.key_dtype = opt, seed_data, key_dtype
        self.vec, self.slots = {}, {}
        self.step, self.updates = 0, 0
        self.evictions = []  # (step, key)

    def shard_of(self, k):
        return k % self.n if self.placement == "row" else 0

    def received(self, ids, n_devices):
        """What each shard receives: per source, its distinct keys (row and
        table placement); all positions of the batch (replicated)."""
        out = [[] for _ in range(self.n)]
        if self.placement == "replicated":
            out[0] = [int(k) for k in ids.reshape(-1) if k != PAD]
            return out
        lb = ids.shape[0] // n_devices
        for src in range(n_devices):
            local = ids[src * lb : (src + 1) * lb]
            for k in sorted(set(int(k) for k in local[local != PAD])):
                out[self.shard_of(k)].append(k)
        return out

    def fresh_slots(self):
        if self.opt == "adagrad":
            return [np.full(DIM, 0.1)]
        return [np.zeros(DIM), np.zeros(DIM)]

    def lookup(self, ids, n_devices):
        """One training lookup; returns per shard (evicted, not_admitted,
        full) counts."""
        self.step += 1
        counts = []
        for shard, keys in zip(self.shards, self.received(ids, n_devices)):
            _, is_new, evicted, status = shard.call(keys, True, self.step)
            placed = [k for k, nw in zip(keys, is_new) if nw]
            gone = [e for e in evicted if e is not None]
            for e in gone:
                del self.vec[e], self.slots[e]
                self.evictions.append((self.step, e))
            self.vec.update(init_vectors(self.seed, placed, self.key_dtype))
            for k in placed:
                self.slots[k] = self.fresh_slots()
            counts.append(
                (len(gone), sum(s == NOT_ADMITTED for s in status), sum(s == FULL for s in status))
            )
        return counts

    def output(self, ids, combiner):
        out = np.zeros((ids.shape[0], ids.shape[1], DIM))
        for b, s, terms in bag_terms(ids, combiner):
            for k, c in terms:
                out[b, s] += c * self.vec.get(k, 0.0)
        return out

    def train(self, ids, g, combiner):
        grads = {}
        for b, s, terms in bag_terms(ids, combiner):
            for k, c in terms:
                if k in self.vec:
                    grads[k] = grads.get(k, 0.0) + c * g[b, s].astype(np.float64)
        self.updates += 1
        t = self.updates
        for k, gr in grads.items():
            w, sl = self.vec[k], self.slots[k]
            if self.opt == "adagrad":
                acc = sl[0] + gr * gr
                self.vec[k] = w - LR * np.where(acc > 0, gr / np.sqrt(acc + 1e-7), 0.0)
                self.slots[k] = [acc]
            else:
                m = 0.1 * gr + 0.9 * sl[0]
                v = 0.001 * gr * gr + 0.999 * sl[1]
                upd = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
                self.vec[k] = w - LR * upd
                self.slots[k] = [m, v]

    def evict_stale(self, max_age):
        freed = []
        for shard in self.shards:
            f = 0
            for s, k in enumerate(shard.slots):
                if k is not None and shard.last_seen[s] <= self.step - max_age:
                    shard.slots[s] = None
                    shard.last_seen[s] = shard.count[s] = 0
                    del self.vec[k], self.slots[k]
                    self.evictions.append((self.step, k))
                    f += 1
            freed.append(f)
        return freed

    def scores(self):
        out = {}
        for shard in self.shards:
            for s, k in enumerate(shard.slots):
                if k is not None:
                    out[k] = (shard.last_seen[s], shard.count[s])
        return out


def make_opt(name, impl="ffi"):
    make = optim.adagrad if name == "adagrad" else optim.adam
    return make(LR, implementation=impl)


def make_emb(n, rows, policy, admit, combiner="sum", key_dtype=jnp.int32, **kw):
    return DistributedEmbedding(
        combiner,
        rows,
        DIM,
        slot_num=SLOTS,
        max_nnz=NNZ,
        use_hashtable=True,
        key_dtype=key_dtype,
        mesh=mesh_of(n),
        axis_name=AXIS,
        eviction=policy,
        admit_after=admit,
        hash_options=kw.pop("hash_options", OPTS),
        **kw,
    )


def sparse_stepper(emb, opt):
    """A jitted sparse training step of `emb`: (state, opt_state, ids, d_out)
    -> (out, state, opt_state)."""

    @jax.jit
    def step(state, opt_state, ids, g):
        out, ctx, state = emb.lookup(state, ids)
        state, opt_state = emb.sparse_update(state, opt, opt_state, ctx, g)
        return out, state, opt_state

    return step


@functools.lru_cache(maxsize=None)
def step_fn(
    n, rows, policy, admit, combiner, opt_name, fused, key_dtype="int32", impl="ffi", log=None
):
    opts = HashOptions(sketch_depth=DEPTH, sketch_width=WIDTH, eviction_log=log)
    emb = make_emb(
        n,
        rows,
        policy,
        admit,
        combiner,
        jnp.dtype(key_dtype),
        hash_options=opts,
        implementation=impl,
    )
    opt = make_opt(opt_name, impl)
    if fused:
        return emb, opt, sparse_stepper(emb, opt)

    @jax.jit
    def step(state, opt_state, ids, g):  # the two-call form: gradient, then update
        out, ctx, state = emb.lookup(state, ids)
        state, opt_state = emb.apply_gradients(state, opt, opt_state, emb.sparse_grad(ctx, g))
        return out, state, opt_state

    return emb, opt, step


def stream(rng, n_batches, pool, hot, batch=BATCH):
    for _ in range(n_batches):
        ids = np.where(
            rng.random((batch, SLOTS, NNZ)) < 0.4,
            rng.choice(hot, (batch, SLOTS, NNZ)),
            rng.choice(pool, (batch, SLOTS, NNZ)),
        )
        ids = np.where(rng.random(ids.shape) < 0.2, PAD, ids)
        yield ids, rng.normal(size=(batch, SLOTS, DIM)).astype(np.float32)


def check_against(emb, state, opt_state, oracle, what=""):
    """The exported keys, vectors, slots and scores equal the oracle's."""
    exp = emb.export_pairs(state, opt_state)
    want = sorted(oracle.vec)
    np.testing.assert_array_equal(exp.keys.astype(np.int64), want, err_msg=f"{what} keys")
    if want:
        np.testing.assert_allclose(
            exp.vectors,
            np.stack([oracle.vec[k] for k in want]),
            rtol=2e-5,
            atol=2e-6,
            err_msg=f"{what} vectors",
        )
        for i, s in enumerate(exp.slots):
            np.testing.assert_allclose(
                s,
                np.stack([oracle.slots[k][i] for k in want]),
                rtol=2e-5,
                atol=1e-6,
                err_msg=f"{what} slot {i}",
            )
        sc = oracle.scores()
        np.testing.assert_array_equal(exp.last_seen, [sc[k][0] for k in want], err_msg=what)
        np.testing.assert_array_equal(exp.count, [sc[k][1] for k in want], err_msg=what)
    assert exp.step == oracle.step
    return exp


def physical(state, opt_state):
    return (
        np.asarray(state.slot_keys),
        np.asarray(state.table),
        [np.asarray(s) for s in opt_state.slots],
    )


ORACLE_CASES = [
    # n, rows/device, policy, admit_after, combiner, optimizer, fused
    (1, 40, "lru", None, "sum", "adagrad", True),
    (2, 16, "lfu", 2, "mean", "adagrad", False),
    (4, 20, "lru", 2, "sqrtn", "adam", True),
    (8, 16, "lfu", None, "sum", "adam", False),
]


@pytest.mark.parametrize(
    "n,rows,policy,admit,combiner,opt_name,fused",
    ORACLE_CASES,
    ids=[f"{c[0]}dev-{c[1]}rows-{c[2]}-admit{c[3]}-{c[5]}" for c in ORACLE_CASES],
)
def test_eviction_and_admission_equal_the_oracle(n, rows, policy, admit, combiner, opt_name, fused):
    """A stream with many more distinct keys than rows: after every step the
    outputs, stored keys, vectors, slots, scores and counters equal the
    oracle's; rows of unchanged keys not in the batch keep their bits; only
    evicted rows change key. Midway, the maintenance call frees stale rows."""
    require_devices(n)
    rng = np.random.default_rng([n, rows, admit or 0])
    emb, opt, step = step_fn(n, rows, policy, admit, combiner, opt_name, fused)
    state = emb.init(7)
    opt_state = emb.init_optimizer(opt, state)
    oracle = LayerOracle(n, rows, policy, admit, opt_name, state.seed)
    pool = np.unique(rng.integers(-(10**6), 10**6, 8 * n * rows))
    pool = pool[pool != PAD]
    hot = pool[:10]
    total_evicted = not_admitted = 0
    # The counters accumulate from init: per shard (evicted, not_admitted,
    # hash_full) so far.
    counted = np.zeros((n, 3), np.int64)
    for i, (ids, g) in enumerate(stream(rng, 10, pool, hot)):
        if i == 6:
            freed = oracle.evict_stale(1)
            state = emb.evict_stale(state, 1)
            counted[:, 0] += freed
            np.testing.assert_array_equal(np.asarray(state.stats.evicted), counted[:, 0])
            assert sum(freed) > 0
            check_against(emb, state, opt_state, oracle, "after evict_stale")
        before = physical(state, opt_state)
        counts = oracle.lookup(ids, n)
        want_out = oracle.output(ids, combiner)
        out, state, opt_state = step(state, opt_state, jnp.asarray(ids, jnp.int32), g)
        np.testing.assert_allclose(
            np.asarray(out), want_out, rtol=2e-5, atol=2e-6, err_msg=f"step {i}"
        )
        oracle.train(ids, g, combiner)
        st = state.stats
        counted += np.asarray(counts)
        np.testing.assert_array_equal(np.asarray(st.evicted), counted[:, 0])
        np.testing.assert_array_equal(np.asarray(st.not_admitted), counted[:, 1])
        np.testing.assert_array_equal(np.asarray(st.hash_full), counted[:, 2])
        np.testing.assert_array_equal(np.asarray(st.stale), 0)  # each update right after its lookup
        loads = [sum(k is not None for k in s.slots) / rows for s in oracle.shards]
        np.testing.assert_allclose(np.asarray(st.load), loads, rtol=1e-6)
        total_evicted += sum(c[0] for c in counts)
        not_admitted += sum(c[1] for c in counts)
        check_against(emb, state, opt_state, oracle, f"step {i}")
        # Nothing but the evicted rows changed key, and no row the batch did
        # not touch changed at all.
        keys0, table0, slots0 = before
        keys1, table1, slots1 = physical(state, opt_state)
        changed = (keys0 != PAD) & (keys1 != keys0)
        assert int(changed.sum()) == sum(c[0] for c in counts)
        batch_keys = set(int(k) for k in ids.reshape(-1) if k != PAD)
        untouched = (keys1 == keys0) & ~np.isin(keys1, list(batch_keys))
        np.testing.assert_array_equal(table1[untouched], table0[untouched])
        for a, b in zip(slots0, slots1):
            np.testing.assert_array_equal(b[untouched], a[untouched])
    assert total_evicted > 0
    if admit:
        assert not_admitted > 0


def run_stream(
    n,
    rows,
    policy,
    admit,
    combiner,
    opt_name,
    fused,
    seed,
    n_steps=6,
    key_dtype="int32",
    impl="ffi",
):
    rng = np.random.default_rng(seed)
    with _x64(key_dtype):
        emb, opt, step = step_fn(n, rows, policy, admit, combiner, opt_name, fused, key_dtype, impl)
        state = emb.init(3)
        opt_state = emb.init_optimizer(opt, state)
        info = np.iinfo(np.dtype(key_dtype))
        pool = np.unique(rng.integers(info.min, info.max, 6 * n * rows, dtype=np.int64))
        pool = pool[pool != PAD]
        outs = []
        for ids, g in stream(rng, n_steps, pool, pool[:8]):
            out, state, opt_state = step(
                state, opt_state, jnp.asarray(ids.astype(np.dtype(key_dtype))), g
            )
            outs.append(np.asarray(out))
        return emb, outs, jax.device_get((state, opt_state))


@pytest.mark.parametrize("n", [1, 4])  # 1: runs on one GPU too
@pytest.mark.parametrize("key_dtype", ["int32", "int64"])
def test_deterministic_twice_and_equal_to_the_reference(key_dtype, n):
    """The same stream twice gives bit-equal states (tables, keys, scores,
    sketch, log, slots); the pure-JAX reference gives the same keys, rows,
    scores and sketch, and vectors to float rounding."""
    require_devices(n)
    args = (n, 64 // n, "lru", 2, "mean", "adagrad", True, 11)
    _, outs_a, (sa, oa) = run_stream(*args, key_dtype=key_dtype)
    _, outs_b, (sb, ob) = run_stream(*args, key_dtype=key_dtype)
    for x, y in zip(jax.tree.leaves((sa, oa, outs_a)), jax.tree.leaves((sb, ob, outs_b))):
        np.testing.assert_array_equal(
            np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)
        )
    assert int(np.sum(sa.scores.log_total)) > 0  # the stream evicted
    _, outs_r, (sr, orr) = run_stream(*args, key_dtype=key_dtype, impl="reference")
    np.testing.assert_array_equal(sr.slot_keys, sa.slot_keys)
    for f in ("last_seen", "count", "step", "sketch", "log_keys", "log_steps", "log_total"):
        np.testing.assert_array_equal(getattr(sr.scores, f), getattr(sa.scores, f), err_msg=f)
    np.testing.assert_allclose(sr.table, sa.table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(orr.slots[0], oa.slots[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs_r, outs_a):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_8_to_2_devices_with_adam_equals_the_uninterrupted_run():
    """Train on 8 devices with LRU eviction, admission and Adam, free stale
    rows, export with the optimizer state; continue (a) on the same 8
    devices and (b) on 2 devices after import_pairs: every output, and the
    final keys, vectors, slots, scores, sketches and step, agree.
    After the resume no key is evicted in either run (their shards differ),
    and the sketch (the default width) is wide enough that no estimate of a
    new key differs between the two layouts (`scores.merge_sketches`), so
    both follow one logical table."""
    require_devices(8)
    rng = np.random.default_rng(21)
    opt = optim.adam(LR)
    emb8 = make_emb(8, 16, "lru", 2, "mean", hash_options=None)
    emb2 = make_emb(2, 256, "lru", 2, "mean", hash_options=None)

    step8, step2 = sparse_stepper(emb8, opt), sparse_stepper(emb2, opt)
    state = emb8.init(5)
    opt_state = emb8.init_optimizer(opt, state)
    pool = np.arange(1, 300) * 7919 % 1_000_003
    for ids, g in stream(rng, 10, pool, pool[:12]):
        _, state, opt_state = step8(state, opt_state, jnp.asarray(ids, jnp.int32), g)
    assert int(np.sum(state.scores.log_total)) > 0  # phase 1 evicted
    state = emb8.evict_stale(state, 2)
    exp = emb8.export_pairs(state, opt_state)
    resident = exp.keys.astype(np.int64)
    # Phase 2: resident keys and new ones, no more per 8-device shard than
    # it has free rows (so the 8-device run evicts nothing either).
    free = 16 - np.bincount(resident % 8, minlength=8)
    new = []
    for k in range(2_000_003, 2_100_000, 13):
        if free[k % 8] > 0:
            free[k % 8] -= 1
            new.append(k)
        if len(new) == 12:
            break
    new = np.array(new)
    s2, o2 = emb2.import_pairs(exp, optimizer=opt)  # the export's seed
    s8, o8 = dataclasses.replace(state, stats=emb8.zero_stats()), opt_state  # phase 2's counts
    for i in range(5):
        ids = np.where(
            rng.random((BATCH, SLOTS, NNZ)) < 0.3,
            rng.choice(new, (BATCH, SLOTS, NNZ)),
            rng.choice(resident, (BATCH, SLOTS, NNZ)),
        )
        ids = np.where(rng.random(ids.shape) < 0.2, PAD, ids)
        g = rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32)
        out8, s8, o8 = step8(s8, o8, jnp.asarray(ids, jnp.int32), g)
        out2, s2, o2 = step2(s2, o2, jnp.asarray(ids, jnp.int32), g)
        np.testing.assert_allclose(
            np.asarray(out2), np.asarray(out8), rtol=1e-5, atol=1e-6, err_msg=f"step {i}"
        )
        for st in (s8, s2):
            assert int(np.sum(st.stats.evicted)) == 0 and int(np.sum(st.stats.hash_full)) == 0
    e8, e2 = emb8.export_pairs(s8, o8), emb2.export_pairs(s2, o2)
    np.testing.assert_array_equal(e2.keys, e8.keys)
    assert set(new.tolist()) <= set(e8.keys.tolist())  # admitted after the resume
    np.testing.assert_allclose(e2.vectors, e8.vectors, rtol=1e-5, atol=1e-6)
    for a, b in zip(e2.slots, e8.slots):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(e2.last_seen, e8.last_seen)
    np.testing.assert_array_equal(e2.count, e8.count)
    assert e2.step == e8.step and e2.opt_count == e8.opt_count
    # 2 divides 8: the 2-device sketches are exactly the merged 8-device ones.
    np.testing.assert_array_equal(e2.sketch, np.stack([e8.sketch[d::2].sum(0) for d in range(2)]))


def test_deltas_equal_the_oracle_and_update_a_serving_copy():
    """export_pairs(since_step=t) holds exactly the rows the oracle inserted
    or updated after step t, and the keys it evicted since then that hold no
    row now; applied to the full export at t it gives the full export now."""
    require_devices(2)
    n, rows = 2, 16
    rng = np.random.default_rng(4)
    emb, opt, step = step_fn(n, rows, "lru", None, "sum", "adagrad", True, log=512)
    state = emb.init(1)
    opt_state = emb.init_optimizer(opt, state)
    oracle = LayerOracle(n, rows, "lru", None, "adagrad", state.seed)
    pool = np.arange(1, 400) * 31
    serving, t = None, None
    for i, (ids, g) in enumerate(stream(rng, 9, pool, pool[:6])):
        oracle.lookup(ids, n)
        _, state, opt_state = step(state, opt_state, jnp.asarray(ids, jnp.int32), g)
        oracle.train(ids, g, "sum")
        if i == 3:
            t = emb.step(state)
            assert t == 4
            k, v = emb.export_pairs(state)
            serving = dict(zip(k.tolist(), v))
        if i == 6:
            state = emb.evict_stale(state, 1)
            oracle.evict_stale(2)
    d = emb.export_pairs(state, since_step=t)
    sc = oracle.scores()
    changed = sorted(k for k, (ls, _) in sc.items() if ls > t)
    np.testing.assert_array_equal(d.keys.astype(np.int64), changed)
    gone = sorted({k for s, k in oracle.evictions if s > t} - set(oracle.vec))
    np.testing.assert_array_equal(d.evicted.astype(np.int64), gone)
    assert len(gone) > 0 and d.slots is None
    for k in d.evicted.tolist():
        serving.pop(k, None)
    serving.update(zip(d.keys.tolist(), d.vectors))
    k, v = emb.export_pairs(state)
    assert sorted(serving) == k.tolist()
    np.testing.assert_array_equal(np.stack([serving[x] for x in k.tolist()]), v)
    # A log too short for the evictions since t: refused, naming the fix.
    emb_s, opt_s, step_s = step_fn(n, rows, "lru", None, "sum", "adagrad", True, log=2)
    st = emb_s.init(1)
    os_ = emb_s.init_optimizer(opt_s, st)
    for ids, g in stream(np.random.default_rng(4), 8, pool, pool[:6]):
        _, st, os_ = step_s(st, os_, jnp.asarray(ids, jnp.int32), g)
    with pytest.raises(ValueError, match="eviction_log"):
        emb_s.export_pairs(st, since_step=1)
    emb_s.export_pairs(st, since_step=emb_s.step(st))  # recent enough: fine


@pytest.mark.parametrize("n", [1, 4])
def test_collection_hash_tables_in_every_placement(n):
    """An EmbeddingCollection with online hash tables placed row-wise,
    table-wise and replicated: each table's keys, vectors, slots, scores
    and counters equal its oracle after every step."""
    require_devices(n)
    specs = [
        sok_jax.TableSpec(
            "r",
            16 * n,
            DIM,
            use_hashtable=True,
            placement="row",
            eviction="lru",
            admit_after=2,
            hash_options=OPTS,
        ),
        sok_jax.TableSpec(
            "t",
            24,
            DIM,
            combiner="mean",
            use_hashtable=True,
            placement="table",
            eviction="lfu",
            hash_options=OPTS,
        ),
        sok_jax.TableSpec(
            "p",
            20,
            DIM,
            use_hashtable=True,
            placement="replicated",
            eviction="lru",
            admit_after=2,
            hash_options=OPTS,
        ),
    ]
    feats = [sok_jax.FeatureSpec(f"f{s.name}", s.name, NNZ) for s in specs]
    coll = sok_jax.EmbeddingCollection(specs, feats, mesh=mesh_of(n), axis_name=AXIS)
    assert {p.table: p.placement for p in coll.plan.tables} == {
        "r": "row",
        "t": "table",
        "p": "replicated",
    }
    opt = optim.adagrad(LR)
    state = coll.init(2)
    opt_state = coll.init_optimizer(opt, state)

    @jax.jit
    def step(state, opt_state, batch, cots):
        outs, ctx, state = coll.lookup(state, batch)
        state, opt_state = coll.sparse_update(state, opt, opt_state, ctx, cots)
        return outs, state, opt_state

    oracles = {}
    for s in specs:
        unit = coll._unit_of[s.name]
        r = coll._tables.unit(unit).rows.rows_per_device
        shards = n if s.placement == "row" else 1
        seed = initializers.table_seed(state.seed, initializers.table_id(s.name))
        oracles[s.name] = LayerOracle(
            shards, r, s.eviction, s.admit_after, "adagrad", seed, placement=s.placement
        )
    rng = np.random.default_rng(n)
    pools = {"r": np.arange(1, 120) * 3, "t": np.arange(1, 200) * 5, "p": np.arange(1, 150) * 7}
    combiners = {"r": "sum", "t": "mean", "p": "sum"}
    for i in range(7):
        batch, cots, ids3 = {}, {}, {}
        for s in specs:
            ids = rng.choice(pools[s.name], (BATCH, 1, NNZ))
            ids = np.where(rng.random(ids.shape) < 0.25, PAD, ids)
            ids3[s.name] = ids
            batch[f"f{s.name}"] = jnp.asarray(ids[:, 0], jnp.int32)
            cots[f"f{s.name}"] = rng.normal(size=(BATCH, DIM)).astype(np.float32)
        counts = {k: o.lookup(ids3[k], n) for k, o in oracles.items()}
        want = {k: o.output(ids3[k], combiners[k]) for k, o in oracles.items()}
        before = {
            k: (np.asarray(st.evicted), np.asarray(st.not_admitted))
            for k, st in state.stats.items()
        }
        outs, state, opt_state = step(state, opt_state, batch, cots)
        for k, o in oracles.items():
            np.testing.assert_allclose(
                np.asarray(outs[f"f{k}"]),
                want[k][:, 0],
                rtol=2e-5,
                atol=2e-6,
                err_msg=f"{k} step {i}",
            )
            o.train(ids3[k], cots[f"f{k}"][:, None], combiners[k])
            exp = coll.export_pairs(state, k, opt_state)
            keys = sorted(o.vec)
            np.testing.assert_array_equal(exp.keys.astype(np.int64), keys, err_msg=f"{k} {i}")
            if not keys:
                assert not len(exp.vectors)
            else:
                np.testing.assert_allclose(
                    exp.vectors, np.stack([o.vec[x] for x in keys]), rtol=2e-5, atol=2e-6
                )
                np.testing.assert_allclose(
                    exp.slots[0], np.stack([o.slots[x][0] for x in keys]), rtol=2e-5, atol=1e-6
                )
                sc = o.scores()
                np.testing.assert_array_equal(exp.last_seen, [sc[x][0] for x in keys])
                np.testing.assert_array_equal(exp.count, [sc[x][1] for x in keys])
            # This step's counts: the counters accumulate from init.
            evicted = np.asarray(state.stats[k].evicted) - before[k][0]
            not_admitted = np.asarray(state.stats[k].not_admitted) - before[k][1]
            np.testing.assert_array_equal(np.asarray(state.stats[k].stale), 0)
            ev = sum(c[0] for c in counts[k])
            if k == "p":  # every replica evicts the same rows; own positions' counts
                np.testing.assert_array_equal(evicted, [ev] * n)
                assert int(np.sum(not_admitted)) == counts[k][0][1]
            elif k == "t":
                d = coll._tables.unit(coll._unit_of[k]).rows.member_index(k)
                want_ev = np.zeros(n, int)
                want_ev[d] = ev
                np.testing.assert_array_equal(evicted, want_ev)
            else:
                np.testing.assert_array_equal(evicted, [c[0] for c in counts[k]])
                np.testing.assert_array_equal(not_admitted, [c[1] for c in counts[k]])
    assert all(o.evictions for o in oracles.values())
    # Round trip through the exports, on this collection's mesh.
    pairs = {s.name: coll.export_pairs(state, s.name, opt_state) for s in specs}
    s2, o2 = coll.import_pairs(pairs, seed=2, optimizer=opt)
    for s in specs:
        a, b = coll.export_pairs(s2, s.name, o2), pairs[s.name]
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.vectors, b.vectors)
        np.testing.assert_array_equal(a.slots[0], b.slots[0])
        np.testing.assert_array_equal(a.last_seen, b.last_seen)
        assert a.step == b.step
    before = {k: np.asarray(st.evicted) for k, st in state.stats.items()}
    state = coll.evict_stale(state, 1)
    for s in specs:
        freed = sum(oracles[s.name].evict_stale(1))
        ev = np.asarray(state.stats[s.name].evicted) - before[s.name]
        assert int(ev.max() if s.placement == "replicated" else ev.sum()) == freed, s.name
        keys = coll.export_pairs(state, s.name)[0].astype(np.int64)
        np.testing.assert_array_equal(keys, sorted(oracles[s.name].vec))


def test_plain_tables_keep_their_state():
    """Without eviction, admission or scores a hash table's state is today's:
    no scores, the four counters of every table; direct mode likewise."""
    require_devices(2)
    for hashed in (True, False):
        emb = DistributedEmbedding(
            "sum", 8, DIM, slot_num=1, use_hashtable=hashed, mesh=mesh_of(2), axis_name=AXIS
        )
        st = emb.init(0)
        assert st.scores is None
        assert st.stats.evicted is None and st.stats.load is None
        assert len(jax.tree.leaves(st)) == (7 if hashed else 6)
        sh = emb.state_shardings()
        assert jax.tree.structure(sh) == jax.tree.structure(st)


def test_direct_mode_export_with_optimizer_state_moves_across_device_counts():
    require_devices(8)
    opt = optim.adagrad(LR)
    rng = np.random.default_rng(0)
    embs = {
        n: DistributedEmbedding(
            "sum",
            64 // n,
            DIM,
            slot_num=SLOTS,
            max_nnz=NNZ,
            mesh=mesh_of(n),
            axis_name=AXIS,
            use_hashtable=False,
        )
        for n in (8, 2)
    }

    steps = {n: sparse_stepper(e, opt) for n, e in embs.items()}
    state = embs[8].init(0)
    opt_state = embs[8].init_optimizer(opt, state)
    batches = [
        (
            rng.integers(0, 64, (BATCH, SLOTS, NNZ)).astype(np.int32),
            rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32),
        )
        for _ in range(4)
    ]
    for ids, g in batches[:2]:
        _, state, opt_state = steps[8](state, opt_state, ids, g)
    exp = embs[8].export_pairs(state, opt_state)
    assert exp.last_seen is None and exp.slots[0].shape == (64, DIM)
    s2, o2 = embs[2].import_pairs(exp, optimizer=opt)
    for ids, g in batches[2:]:
        a, state, opt_state = steps[8](state, opt_state, ids, g)
        b, s2, o2 = steps[2](s2, o2, ids, g)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    e8, e2 = embs[8].export_pairs(state, opt_state), embs[2].export_pairs(s2, o2)
    np.testing.assert_allclose(e2.vectors, e8.vectors, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e2.slots[0], e8.slots[0], rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise_naming_them():
    require_devices(2)
    with pytest.raises(ValueError, match="admit_after"):
        make_emb(2, 16, None, 0)
    with pytest.raises(ValueError, match="admit_after"):
        make_emb(2, 16, None, -3)
    with pytest.raises(ValueError, match="eviction must be None, 'lru' or 'lfu', got 'fifo'"):
        make_emb(2, 16, "fifo", None)
    with pytest.raises(ValueError, match="eviction"):
        HashOptions(eviction="LRU")
    with pytest.raises(ValueError, match="sketch_width"):
        HashOptions(sketch_width=0)
    with pytest.raises(ValueError, match="eviction_log"):
        HashOptions(eviction_log=-1)
    with pytest.raises(ValueError, match="use_hashtable"):
        DistributedEmbedding(
            "sum", 8, DIM, mesh=mesh_of(2), axis_name=AXIS, eviction="lru", use_hashtable=False
        )
    with pytest.raises(ValueError, match="TableSpec 'x': admit_after"):
        sok_jax.TableSpec("x", 10, 4, use_hashtable=True, admit_after=0)
    with pytest.raises(ValueError, match="TableSpec 'x': eviction"):
        sok_jax.TableSpec("x", 10, 4, use_hashtable=True, eviction="random")
    plain = make_emb(2, 16, None, None, hash_options=None)
    st = plain.init(0)
    with pytest.raises(ValueError, match="evict_stale needs a hash table with eviction"):
        plain.evict_stale(st, 3)
    with pytest.raises(ValueError, match="since_step.*scores"):
        plain.export_pairs(st, since_step=0)
    emb = make_emb(2, 16, "lru", None)
    with pytest.raises(ValueError, match="max_age"):
        emb.evict_stale(emb.init(0), 0)
    exp = emb.export_pairs(emb.init(0), emb.init_optimizer(optim.adam(0.1), emb.init(0)))
    with pytest.raises(ValueError, match="optimizer="):
        emb.import_pairs(exp)


@pytest.mark.parametrize("two_call", [False, True])
def test_no_zero_size_array_crosses_shard_map(two_call):
    """As tests/test_distributed.py's guard (XLA's GPU compiler fails on a
    zero-size array between shard_map bodies), for the online programs: the
    sparse step (fused and two-call) and apply."""
    from test_distributed import _boundary_lines

    require_devices(2)
    emb = make_emb(2, 16, "lru", 2, "mean")
    opt = optim.adam(LR)
    state = emb.init(0)
    opt_state = emb.init_optimizer(opt, state)
    ids = jnp.asarray(np.arange(BATCH * SLOTS * NNZ).reshape(BATCH, SLOTS, NNZ), jnp.int32)

    def sparse(state, opt_state):
        out, ctx, state = emb.lookup(state, ids)
        if two_call:
            return emb.apply_gradients(state, opt, opt_state, emb.sparse_grad(ctx, out))
        return emb.sparse_update(state, opt, opt_state, ctx, out)

    programs = {
        "sparse step": jax.jit(sparse).lower(state, opt_state),
        "apply": jax.jit(lambda s: emb.apply(s, ids)).lower(state),
    }
    for name, lowered in programs.items():
        lines = _boundary_lines(lowered.as_text())
        assert lines, name
        bad = [line.strip()[:200] for line in lines if "tensor<0x" in line]
        assert not bad, f"{name}: zero-size arrays on a shard_map boundary: {bad}"
