"""Tests of the hash find-or-insert target and its pure-JAX reference.

Insertion is deterministic on every platform (xla_ffi/hash_math.h has the
rule): the CPU and CUDA targets and the pure-JAX reference equal
`tests/oracles.HashShardOracle`, the rule written from its definition on
Python ints, bit for bit. Every batch is also checked against the
order-free contract of a hash table (`_check_contract`), and a whole stream
against a dict key -> row (`DictOracle`).
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import HashShardOracle, py_bucket_slots, py_home, py_num_buckets

from sok_jax.ops import hash_ops, reference

KEY_DTYPES = [np.int32, np.uint32, np.int64]
SEEDS = [0, 1, 2]


def _x64(dtype):
    """Enables 64-bit types for int64 keys, for the duration of a test."""
    if np.dtype(dtype) == np.int64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _empty(dtype):
    return hash_ops.EMPTY(dtype)


def _random_keys(rng, dtype, size):
    """Distinct random keys over the dtype's full range, EMPTY excluded."""
    info = np.iinfo(dtype)
    out = set()
    while len(out) < size:
        draw = rng.integers(info.min, info.max, size=2 * size, dtype=dtype, endpoint=True)
        out.update(int(k) for k in draw if k != _empty(dtype))
    return np.array(sorted(out)[:size], dtype=dtype)[rng.permutation(size)]


# --- pure-Python oracles -----------------------------------------------------


def _py_hash_word(key: int, dtype) -> int:
    """The hash word from its definition, on Python ints."""
    m32, m64 = (1 << 32) - 1, (1 << 64) - 1
    if np.dtype(dtype) == np.int64:
        z = key & m64
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & m64
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & m64
        z ^= z >> 31
        return z >> 32
    h = key & m32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m32
    h ^= h >> 16
    return h


def _oracle_of(slots, **kw) -> HashShardOracle:
    """The oracle holding the keys of the table `slots` (scores zero)."""
    slots = np.asarray(slots)
    o = HashShardOracle(slots.shape[0], np.dtype(slots.dtype) == np.int64, **kw)
    e = _empty(slots.dtype)
    o.slots = [None if k == e else int(k) for k in slots.tolist()]
    return o


def _table(o: HashShardOracle, dtype):
    e = int(_empty(dtype))
    return np.array([e if k is None else k for k in o.slots], dtype)


def _simulate(slots, keys, insert, step=1):
    """The rule on numpy arrays: (slots, rows, is_new, num_failed)."""
    o = _oracle_of(slots)
    keys = np.asarray(keys)
    rows, is_new, _, status = o.call(
        [int(k) for k in keys], insert, step, padding=int(_empty(keys.dtype))
    )
    failed = sum(st == hash_ops.FULL for st in status)
    return _table(o, slots.dtype), np.array(rows, np.int32), np.array(is_new, np.int32), failed


def _reachable(after, s):
    """Whether the search of xla_ffi/hash_math.h FindRow (no eviction)
    reaches slot s: every bucket from the key's home up to s's is full, and
    no EMPTY slot precedes s in its own bucket."""
    cap = after.shape[0]
    empty = _empty(after.dtype)
    nb = py_num_buckets(cap)
    b = py_home(int(after[s]), cap, np.dtype(after.dtype) == np.int64)
    for _ in range(nb):
        slots = py_bucket_slots(b, cap)
        if s in slots:
            return all(after[t] != empty for t in slots if t < s)
        if any(after[t] == empty for t in slots):
            return False
        b = (b + 1) % nb
    return False


def _check_contract(before, keys, slots, rows, is_new, num_failed, insert):
    """Checks one batch against the order-free contract of find_or_insert,
    given the table `before` it: any valid concurrent outcome passes.

    Find mode is deterministic and must equal the sequential result. In
    insert mode: stored keys keep their slots (no overwrite, no move); every
    position of a key gets the same row; a key stored before gets its row and
    is_new 0; a newly inserted key gets a slot that was EMPTY and now holds it,
    with is_new 1 at exactly one of its positions; a key that got -1 is not
    stored, and num_failed counts exactly its positions; failing is only
    possible once the table is full; only batch keys are added, each once;
    every stored key is reachable from its home bucket.
    """
    before, after = np.asarray(before), np.asarray(slots)
    keys, rows, is_new = np.asarray(keys), np.asarray(rows), np.asarray(is_new)
    cap = before.shape[0]
    empty = _empty(before.dtype)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert rows.shape == is_new.shape == keys.shape
    assert np.isin(is_new, [0, 1]).all()
    if not insert:
        _assert_same((after, rows, is_new, num_failed), _simulate(before, keys, False))
        return
    used = before != empty
    np.testing.assert_array_equal(after[used], before[used], err_msg="a stored key was overwritten")
    occ = np.nonzero(after != empty)[0]
    where = dict(zip(after[occ].tolist(), occ.tolist()))
    assert len(where) == len(occ), "a key is stored in two slots"
    old = set(before[used].tolist())
    pad = keys == empty
    assert (rows[pad] == -1).all() and not is_new[pad].any()
    failed = 0
    inserted = set()
    for k in np.unique(keys[~pad]).tolist():
        pos = keys == k
        r, nw = rows[pos], is_new[pos]
        assert (r == r[0]).all(), f"key {k} got several rows {set(r.tolist())}"
        r0 = int(r[0])
        if k in old:
            assert r0 == where[k], "a stored key moved"
            assert not nw.any(), "is_new set for a stored key"
        elif r0 == -1:
            assert k not in where, "a stored key reported as failed"
            assert not nw.any()
            failed += int(pos.sum())
        else:
            assert 0 <= r0 < cap and where.get(k) == r0, "row does not hold key"
            assert before[r0] == empty, "a new key took a used row"
            assert int(nw.sum()) == 1, "is_new not set exactly once"
            inserted.add(k)
    assert set(where) == old | inserted, "a slot holds a key never inserted"
    assert int(num_failed) == failed
    if failed:
        assert len(occ) == cap, "a key failed while a slot was free"
    for s in occ.tolist():
        assert _reachable(after, s), "a stored key is unreachable"


class DictOracle:
    """key -> row across batches; checks the semantic contract of a batch."""

    def __init__(self, dtype):
        self.rows: dict[int, int] = {}
        self.empty = int(_empty(dtype))

    def check(self, slots, keys, rows, is_new, num_failed, insert, capacity):
        slots, keys = np.asarray(slots), np.asarray(keys)
        rows, is_new = np.asarray(rows), np.asarray(is_new)
        seen_new: set[int] = set()
        new_flags: dict[int, int] = {}
        failed = 0
        for k, r, nw in zip(keys.tolist(), rows.tolist(), is_new.tolist()):
            if k == self.empty:
                assert r == -1 and nw == 0
                continue
            if k in self.rows:
                assert r == self.rows[k], "a stored key moved"
                assert nw == 0, "is_new set twice for one key"
                continue
            if not insert:
                assert r == -1 and nw == 0
                continue
            if r == -1:
                assert nw == 0
                failed += 1
                continue
            assert nw == 1, "first position of a new key must be is_new"
            assert 0 <= r < capacity and slots[r] == k
            assert r not in self.rows.values(), "a new key took a used row"
            self.rows[k] = r
            seen_new.add(k)
            new_flags[k] = nw
        assert all(v == 1 for v in new_flags.values()), "is_new not set exactly once for a new key"
        assert int(num_failed) == failed
        # The table holds exactly the stored keys at their rows.
        occupied = np.nonzero(slots != self.empty)[0]
        assert len(occupied) == len(self.rows)
        for k, r in self.rows.items():
            assert int(slots[r]) == k


def _assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- helpers and hash --------------------------------------------------------


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_empty_slot_keys(dtype):
    with _x64(dtype):
        t = hash_ops.empty_slot_keys(5, dtype)
        assert t.shape == (5,) and t.dtype == np.dtype(dtype)
        assert (np.asarray(t) == _empty(dtype)).all()
    assert int(hash_ops.EMPTY(np.uint32)) == 0xFFFFFFFF
    assert int(hash_ops.EMPTY(np.int32)) == -1
    assert int(hash_ops.EMPTY(np.int64)) == -1


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("capacity", [1, 7, 16, 17, 1000, 2**31 - 1])
def test_hash_word_and_buckets_match_definition(dtype, capacity):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    keys = np.concatenate(
        [
            np.array([info.min, info.max, 0, 1, info.max - 1], dtype),
            rng.integers(info.min, info.max, 200, dtype=dtype, endpoint=True),
        ]
    )
    words = [_py_hash_word(int(k), dtype) for k in keys]
    nb = -(-capacity // 16)
    want = np.array([(w * nb) >> 32 for w in words])
    np.testing.assert_array_equal(hash_ops.hash_word(keys), words)
    np.testing.assert_array_equal(hash_ops.home_bucket(keys, capacity), want)
    assert hash_ops.num_buckets(capacity) == nb
    starts = hash_ops.bucket_starts(capacity)
    assert starts[0] == 0 and starts[-1] == capacity
    sizes = np.diff(starts)
    assert sizes.max() <= hash_ops.BUCKET_SLOTS and sizes.max() - sizes.min() <= 1
    with _x64(dtype):
        got = jax.jit(hash_ops.home_bucket, static_argnums=1)(jnp.asarray(keys), capacity)
        np.testing.assert_array_equal(np.asarray(got), want)
        # The claim order is a bijection of the key: distinct keys, distinct words.
        order = np.asarray(jax.jit(hash_ops.order_word)(jnp.asarray(keys)))
        np.testing.assert_array_equal(order, hash_ops.order_word(keys))
        u = np.unique(keys)
        assert np.unique(hash_ops.order_word(u)).size == u.size


# --- find-or-insert against the oracles -------------------------------------


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_batches(dtype, seed):
    """Many batches with repeats within and across batches, and padding."""
    rng = np.random.default_rng(seed)
    cap = 1024
    pool = _random_keys(rng, dtype, 600)  # load factor ends near 0.6
    with _x64(dtype):
        slots = hash_ops.empty_slot_keys(cap, dtype)
        sim = np.asarray(slots)
        oracle = DictOracle(dtype)
        for step in range(12):
            insert = step % 4 != 3  # every fourth batch is evaluation
            keys = pool[rng.integers(0, min(len(pool), 60 * (step + 1)), 128)]
            keys[rng.random(128) < 0.1] = _empty(dtype)  # padding anywhere
            before = np.array(slots)
            slots, rows, is_new, failed = hash_ops.find_or_insert(
                slots, jnp.asarray(keys), insert=insert
            )
            _check_contract(before, keys, slots, rows, is_new, failed, insert)
            sim, *want = _simulate(sim, keys, insert)
            _assert_same((slots, rows, is_new, failed), (sim, *want))
            oracle.check(slots, keys, rows, is_new, failed, insert, cap)
            if not insert:
                np.testing.assert_array_equal(np.asarray(slots), before)
            # Each new key is flagged exactly once.
            new_keys = keys[np.asarray(is_new) == 1]
            assert len(new_keys) == len(set(new_keys.tolist()))


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_evaluation_mode_inserts_nothing(dtype):
    rng = np.random.default_rng(5)
    keys = _random_keys(rng, dtype, 100)
    seen, unseen = keys[:50], keys[50:]
    with _x64(dtype):
        slots, rows, _, _ = hash_ops.find_or_insert(
            hash_ops.empty_slot_keys(128, dtype), jnp.asarray(seen), insert=True
        )
        stored = dict(zip(seen.tolist(), np.asarray(rows).tolist()))
        query = np.concatenate([unseen, seen, unseen])
        out_slots, qrows, is_new, failed = hash_ops.find_or_insert(
            slots, jnp.asarray(query), insert=False
        )
        np.testing.assert_array_equal(np.asarray(out_slots), np.asarray(slots))
        want = [stored.get(k, -1) for k in query.tolist()]
        np.testing.assert_array_equal(np.asarray(qrows), want)
        assert not np.asarray(is_new).any() and int(failed) == 0
        # Find only on an empty table finds nothing.
        _, r, _, f = hash_ops.find_or_insert(
            hash_ops.empty_slot_keys(16, dtype), jnp.asarray(seen), insert=False
        )
        assert (np.asarray(r) == -1).all() and int(f) == 0


def _colliding_keys(rng, dtype, cap, bucket, count):
    """`count` distinct keys whose home is bucket `bucket`."""
    out = []
    while len(out) < count:
        cand = _random_keys(rng, dtype, 4096)
        out += cand[hash_ops.home_bucket(cand, cap) == bucket].tolist()
    return np.array(out[:count], dtype)


def _claim_sorted(keys):
    return keys[np.argsort(hash_ops.order_word(keys), kind="stable")]


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("bucket", [1, 3])  # 3: the last bucket, overflow wraps to 0
def test_colliding_keys_fill_their_bucket_in_claim_order(dtype, bucket):
    """Keys of one home bucket take its slots in claim order (ascending
    order word), whatever their positions; without eviction the ones that
    do not fit go to the next bucket (wrapping around the table)."""
    rng = np.random.default_rng(bucket)
    cap = 64  # 4 buckets of 16
    keys = _colliding_keys(rng, dtype, cap, bucket, 5)
    batch = np.concatenate([keys, keys[::-1], [_empty(dtype)], keys[:2]])
    lo = 16 * bucket
    with _x64(dtype):
        slots, rows, is_new, failed = hash_ops.find_or_insert(
            hash_ops.empty_slot_keys(cap, dtype), jnp.asarray(batch), insert=True
        )
        rows = np.asarray(rows)
        # The i-th key in claim order takes the bucket's i-th slot.
        claim = _claim_sorted(keys).tolist()
        want = [lo + claim.index(k) for k in keys.tolist()]
        np.testing.assert_array_equal(rows[:5], want)
        np.testing.assert_array_equal(np.asarray(is_new), [1] * 5 + [0] * 8)
        _check_contract(
            np.full(cap, _empty(dtype), dtype), batch, slots, rows, is_new, failed, True
        )
        np.testing.assert_array_equal(rows[5:10], want[::-1])
        np.testing.assert_array_equal(rows[10:], [-1] + want[:2])
        assert int(failed) == 0
        # Found again, in another order, in find mode.
        _, r2, _, _ = hash_ops.find_or_insert(slots, jnp.asarray(keys[::-1]), insert=False)
        np.testing.assert_array_equal(np.asarray(r2), want[::-1])
        # 14 more keys of the bucket: 11 fill it, 3 overflow to the next
        # bucket's first slots, in claim order; all are found again.
        more = _colliding_keys(rng, dtype, cap, bucket, 19)[5:]
        more = np.array([k for k in more.tolist() if k not in keys.tolist()][:14], dtype)
        s2, r3, n3, f3 = hash_ops.find_or_insert(slots, jnp.asarray(more), insert=True)
        r3, s2 = np.asarray(r3), np.asarray(s2)
        assert int(f3) == 0 and int(np.asarray(n3).sum()) == 14
        claim = _claim_sorted(more).tolist()
        nxt = 16 * ((bucket + 1) % 4)
        want3 = [
            lo + 5 + claim.index(k) if claim.index(k) < 11 else nxt + claim.index(k) - 11
            for k in more.tolist()
        ]
        np.testing.assert_array_equal(r3, want3)
        _, r4, _, _ = hash_ops.find_or_insert(s2, jnp.asarray(more), insert=False)
        np.testing.assert_array_equal(np.asarray(r4), want3)
        sim = _simulate(np.asarray(slots), more, True)
        _assert_same((s2, r3, n3, f3), sim)


def _limit_keys(dtype):
    if np.dtype(dtype) == np.int64:
        return [
            2**63 - 1,
            -(2**63),
            -(2**63) + 1,
            -2,
            0,
            1,
            2**31 - 1,
            -(2**31),
            2**32 - 1,
            2**32,
            -3,
        ]
    if np.dtype(dtype) == np.int32:
        return [2**31 - 1, -(2**31), -(2**31) + 1, -2, 0, 1, -3, 2**31 - 2]
    return [0xFFFFFFFE, 0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFD]


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_keys_at_dtype_limits(dtype):
    keys = np.array(_limit_keys(dtype), dtype)
    e = _empty(dtype)
    batch = np.concatenate([keys[:3], [e], keys[3:], [e, e], keys])
    with _x64(dtype):
        slots, rows, is_new, failed = hash_ops.find_or_insert(
            hash_ops.empty_slot_keys(32, dtype), jnp.asarray(batch), insert=True
        )
        _check_contract(np.full(32, e, dtype), batch, slots, rows, is_new, failed, True)
        sim = _simulate(np.full(32, e, dtype), batch, True)
        _assert_same((slots, rows, is_new, failed), sim)
        rows = np.asarray(rows)
        n = len(keys)
        first = np.concatenate([rows[:3], rows[4 : n + 1]])
        assert (first >= 0).all() and len(set(first.tolist())) == n
        np.testing.assert_array_equal(rows[-n:], first)
        assert rows[3] == -1 and (rows[n + 1 : n + 3] == -1).all()
        assert int(np.asarray(is_new).sum()) == n
        np.testing.assert_array_equal(np.asarray(slots)[first], keys)


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_full_table(dtype):
    rng = np.random.default_rng(11)
    cap = 16
    keys = _random_keys(rng, dtype, 40)
    e = _empty(dtype)
    # 40 distinct keys, some repeated, padding in between.
    batch = np.concatenate([keys[:10], [e], keys[:3], keys[10:], [e], keys[20:25], keys[:2]])
    with _x64(dtype):
        slots0, rows0, _, _ = hash_ops.find_or_insert(
            hash_ops.empty_slot_keys(cap, dtype), jnp.asarray(keys[:4]), insert=True
        )
        slots, rows, is_new, failed = hash_ops.find_or_insert(
            slots0, jnp.asarray(batch), insert=True
        )
        _check_contract(slots0, batch, slots, rows, is_new, failed, True)
        rows, is_new, slots_np = np.asarray(rows), np.asarray(is_new), np.asarray(slots)
        sim = _simulate(np.asarray(slots0), batch, True)
        _assert_same((slots, rows, is_new, failed), sim)
        # The table is full and holds the 4 earlier keys and the first 12 new
        # distinct keys of the batch in claim order (one bucket of 16).
        new = [k for k in dict.fromkeys(batch.tolist()) if k != e and k not in keys[:4].tolist()]
        stored = keys[:4].tolist() + _claim_sorted(np.array(new, dtype)).tolist()[: cap - 4]
        assert sorted(slots_np.tolist()) == sorted(stored)
        # Earlier keys keep their rows.
        for k, r in zip(keys[:4].tolist(), np.asarray(rows0).tolist()):
            assert slots_np[r] == k
            assert (rows[batch == k] == r).all()
        # Exactly the non-padding positions of unstored keys failed.
        lost = np.array([k != e and k not in stored for k in batch.tolist()])
        assert int(failed) == int(lost.sum()) > 0
        assert (rows[lost] == -1).all() and not is_new[lost].any()
        assert int(is_new.sum()) == cap - 4
        # A second batch of only new keys: all fail, nothing overwritten.
        unstored = np.array([k for k in keys.tolist() if k not in stored], dtype)
        assert len(unstored) == 40 - cap
        batch2 = np.concatenate([unstored[-10:], [e], np.array(stored[:3], dtype)])
        s2, r2, n2, f2 = hash_ops.find_or_insert(slots, jnp.asarray(batch2), insert=True)
        np.testing.assert_array_equal(np.asarray(s2), slots_np)
        assert int(f2) == 10
        r2 = np.asarray(r2)
        assert (r2[:11] == -1).all() and not np.asarray(n2).any()
        np.testing.assert_array_equal(
            r2[11:], [int(np.nonzero(slots_np == k)[0][0]) for k in stored[:3]]
        )
        # Find mode on a full table: unseen keys are -1, nothing failed.
        _, r3, _, f3 = hash_ops.find_or_insert(slots, jnp.asarray(unstored), insert=False)
        assert (np.asarray(r3) == -1).all() and int(f3) == 0


# --- FFI vs pure-JAX reference ----------------------------------------------


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("insert", [True, False])
@pytest.mark.parametrize("cap", [13, 256])
def test_ffi_matches_reference(dtype, insert, cap):
    rng = np.random.default_rng(cap)
    pool = _random_keys(rng, dtype, 300)
    e = _empty(dtype)
    with _x64(dtype):
        ref = jax.jit(reference.find_or_insert, static_argnames="insert")
        ffi = jax.jit(hash_ops.find_or_insert, static_argnames="insert")
        # Start from a partly filled table so find mode has hits.
        slots, *_ = hash_ops.find_or_insert(
            hash_ops.empty_slot_keys(cap, dtype), jnp.asarray(pool[: cap // 2]), insert=True
        )
        for _ in range(3):
            keys = pool[rng.integers(0, 300, 200)]
            keys[rng.random(200) < 0.1] = e
            keys = jnp.asarray(keys)
            want = ref(slots, keys, insert=insert)
            got = ffi(slots, keys, insert=insert)
            _assert_same(got, want)
            _check_contract(slots, keys, *got, insert)
            slots = got[0]


# --- under jit, with donation, and vmap -------------------------------------


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_jit_with_donation(dtype):
    rng = np.random.default_rng(3)
    pool = _random_keys(rng, dtype, 300)
    batches = [pool[rng.integers(0, 300, 64)] for _ in range(6)]
    with _x64(dtype):

        @jax.jit
        def lookup_eval(slots, keys):
            return hash_ops.find_or_insert(slots, keys, insert=False)

        step = jax.jit(lambda s, k: hash_ops.find_or_insert(s, k, insert=True), donate_argnums=0)
        slots = hash_ops.empty_slot_keys(512, dtype)
        sim = np.asarray(slots)
        oracle = DictOracle(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "donated buffers not usable"
            for keys in batches:
                before = np.array(slots)  # a copy: slots is donated
                slots, rows, is_new, failed = step(slots, jnp.asarray(keys))
                _check_contract(before, keys, slots, rows, is_new, failed, True)
                sim, *want = _simulate(sim, keys, True)
                _assert_same((slots, rows, is_new, failed), (sim, *want))
                oracle.check(slots, keys, rows, is_new, failed, True, 512)
        _, rows, is_new, _ = lookup_eval(slots, jnp.asarray(pool))
        want = [oracle.rows.get(k, -1) for k in pool.tolist()]
        np.testing.assert_array_equal(np.asarray(rows), want)
        assert not np.asarray(is_new).any()


def test_vmap_sequential():
    rng = np.random.default_rng(4)
    keys = np.stack([_random_keys(rng, np.int32, 20) for _ in range(3)])
    slots = jnp.stack([hash_ops.empty_slot_keys(32, np.int32)] * 3)
    got = jax.vmap(lambda s, k: hash_ops.find_or_insert(s, k, insert=True))(
        slots, jnp.asarray(keys)
    )
    for b in range(3):
        _check_contract(slots[b], keys[b], *[g[b] for g in got], True)
        want = _simulate(np.asarray(slots[b]), keys[b], True)
        _assert_same([g[b] for g in got], want)


def test_empty_batch():
    slots = hash_ops.empty_slot_keys(8, np.int32)
    s, r, n, f = hash_ops.find_or_insert(slots, jnp.zeros((0,), jnp.int32), insert=True)
    assert r.shape == (0,) and n.shape == (0,) and int(f) == 0
    np.testing.assert_array_equal(np.asarray(s), np.asarray(slots))


# --- scores, eviction, admission (hash_lookup) -------------------------------

POLICY_CASES = [
    (None, 0),  # scores only
    ("lru", 0),
    ("lfu", 0),
    (None, 2),  # admission after 2 batches, no eviction
    ("lru", 3),
    ("lfu", 2),
]
LOOKUPS = {"ffi": hash_ops.hash_lookup, "reference": reference.hash_lookup}


def _lookup_fn(impl, policy, admit, depth):
    fn = LOOKUPS[impl]

    @jax.jit
    def run(slots, ls, ct, sk, keys, step, insert):
        return jax.lax.cond(
            insert,
            lambda: fn(
                slots,
                keys,
                insert=True,
                last_seen=ls,
                count=ct,
                sketch=sk,
                step=step,
                policy=policy,
                admit_after=admit,
                sketch_depth=depth,
            ),
            lambda: fn(
                slots,
                keys,
                insert=False,
                last_seen=ls,
                count=ct,
                sketch=sk,
                step=step,
                policy=policy,
                admit_after=admit,
                sketch_depth=depth,
            ),
        )

    return run


@pytest.mark.parametrize("impl", ["ffi", "reference"])
@pytest.mark.parametrize("cap", [16, 40, 96])
@pytest.mark.parametrize("policy,admit", POLICY_CASES, ids=[f"{p}-{a}" for p, a in POLICY_CASES])
@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_scores_eviction_admission_equal_the_oracle(dtype, policy, admit, cap, impl):
    """A stream with many more distinct keys than rows, hot keys, repeats
    and padding: after every call the table, its scores, the sketch and
    every per-position result equal the oracle's; rows whose key did not
    change keep their key; exactly the rows reported evicted changed key."""
    rng = np.random.default_rng([cap, len(str(policy)), admit])
    depth, width = 2, 24
    wide = np.dtype(dtype) == np.int64
    o = HashShardOracle(cap, wide, policy=policy, admit_after=admit, depth=depth, width=width)
    e = _empty(dtype)
    pool = _random_keys(rng, dtype, 5 * cap)
    hot = pool[:6]
    with _x64(dtype):
        run = _lookup_fn(impl, policy, admit, depth)
        slots = hash_ops.empty_slot_keys(cap, dtype)
        ls = jnp.zeros((cap,), jnp.int32)
        ct = jnp.zeros((cap,), jnp.int32)
        sk = jnp.zeros((depth * width,), jnp.int32) if admit else None
        if not admit:
            o.depth = o.width = 0
        evictions = 0
        for step in range(1, 25):
            insert = step % 5 != 0
            keys = np.where(rng.random(48) < 0.3, rng.choice(hot, 48), rng.choice(pool, 48))
            keys = keys.astype(dtype)
            keys[rng.random(48) < 0.1] = e
            before = np.asarray(slots).copy()
            got = run(slots, ls, ct, sk, jnp.asarray(keys), jnp.int32(step), insert)
            rows, is_new, evicted, status = o.call(
                [int(k) for k in keys], insert, step, padding=int(e)
            )
            np.testing.assert_array_equal(np.asarray(got.slot_keys), _table(o, dtype))
            np.testing.assert_array_equal(np.asarray(got.last_seen), o.last_seen)
            np.testing.assert_array_equal(np.asarray(got.count), o.count)
            if admit:
                np.testing.assert_array_equal(np.asarray(got.sketch), o.sketch)
            np.testing.assert_array_equal(np.asarray(got.rows), rows)
            np.testing.assert_array_equal(np.asarray(got.is_new), is_new)
            np.testing.assert_array_equal(np.asarray(got.status), status)
            np.testing.assert_array_equal(
                np.asarray(got.evicted), [e if v is None else v for v in evicted]
            )
            # Nothing but the evicted rows changed key; every new key sits at
            # its row.
            after = np.asarray(got.slot_keys)
            changed = np.nonzero((before != e) & (after != before))[0]
            ev_rows = np.asarray(got.rows)[np.asarray(got.evicted) != e]
            assert sorted(changed.tolist()) == sorted(ev_rows.tolist())
            if policy is None:
                assert changed.size == 0
            evictions += changed.size
            if not insert:
                np.testing.assert_array_equal(after, before)
            slots, ls, ct = got.slot_keys, got.last_seen, got.count
            sk = got.sketch
        if policy is not None:
            assert evictions > 0  # the stream did evict
        if admit:
            assert o.sketch and max(o.sketch) >= admit


@pytest.mark.parametrize("policy", [None, "lru"])
@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_result_does_not_depend_on_positions(dtype, policy):
    """The same keys in any order of positions (and with more repeats) give
    the same table and scores, every key the same row and status, and
    is_new / evicted at each new key's first position."""
    rng = np.random.default_rng(9)
    cap = 48
    pool = _random_keys(rng, dtype, 3 * cap)
    with _x64(dtype):
        slots = hash_ops.empty_slot_keys(cap, dtype)
        ls, ct = jnp.zeros((cap,), jnp.int32), jnp.zeros((cap,), jnp.int32)
        first = hash_ops.hash_lookup(
            slots,
            jnp.asarray(pool[: cap // 2]),
            insert=True,
            last_seen=ls,
            count=ct,
            step=1,
            policy=policy,
        )
        keys = rng.choice(pool, 80)
        outs = []
        for perm in (np.arange(80), rng.permutation(80), rng.permutation(80)):
            k = np.concatenate([keys[perm], keys[perm][:7]])
            r = hash_ops.hash_lookup(
                first.slot_keys,
                jnp.asarray(k),
                insert=True,
                last_seen=first.last_seen,
                count=first.count,
                step=2,
                policy=policy,
            )
            by_key = {}
            for i, key in enumerate(k.tolist()):
                row, st = int(r.rows[i]), int(r.status[i])
                assert by_key.setdefault(key, (row, st)) == (row, st)
            new_at = {int(k[i]): i for i in np.nonzero(np.asarray(r.is_new))[0]}
            for key, i in new_at.items():
                assert i == k.tolist().index(key)  # the first position
            ev = {int(k[i]): int(r.evicted[i]) for i in new_at.values()}
            outs.append(
                (np.asarray(r.slot_keys), np.asarray(r.last_seen), np.asarray(r.count), by_key, ev)
            )
        for o in outs[1:]:
            for a, b in zip(o[:3], outs[0][:3]):
                np.testing.assert_array_equal(a, b)
            assert o[3] == outs[0][3] and o[4] == outs[0][4]


def test_eviction_picks_lowest_score_then_key():
    """LRU evicts the least recently seen rows of the bucket, LFU the least
    often seen; ties go to the smaller key; rows seen in the call are never
    evicted."""
    cap = 16  # one bucket
    keys = np.arange(100, 116, dtype=np.int32)
    for policy in ("lru", "lfu"):
        slots = hash_ops.empty_slot_keys(cap, np.int32)
        ls, ct = jnp.zeros((cap,), jnp.int32), jnp.zeros((cap,), jnp.int32)
        r = hash_ops.hash_lookup(
            slots, jnp.asarray(keys), insert=True, last_seen=ls, count=ct, step=1, policy=policy
        )
        # Step 2 sees 100..107 again (LRU: seen at 2; LFU: count 2).
        r = hash_ops.hash_lookup(
            r.slot_keys,
            jnp.asarray(keys[:8]),
            insert=True,
            last_seen=r.last_seen,
            count=r.count,
            step=2,
            policy=policy,
        )
        # Step 3: 108 (seen now, so never evicted) and three new keys.
        batch = np.array([108, 900, 901, 902], np.int32)
        r3 = hash_ops.hash_lookup(
            r.slot_keys,
            jnp.asarray(batch),
            insert=True,
            last_seen=r.last_seen,
            count=r.count,
            step=3,
            policy=policy,
        )
        ev = np.asarray(r3.evicted)[1:]
        # Either policy: the victims are 109, 110, 111 (score 1/step 1, then by key).
        assert sorted(ev.tolist()) == [109, 110, 111], (policy, ev)
        # The claim order decides which new key takes which victim.
        claim = _claim_sorted(batch[1:]).tolist()
        for key, victim in zip(claim, [109, 110, 111]):
            assert int(np.asarray(r3.evicted)[batch.tolist().index(key)]) == victim
        assert int(np.asarray(r3.status)[0]) == hash_ops.FOUND
        sl = np.asarray(r3.slot_keys)
        assert 108 in sl and not ({109, 110, 111} & set(sl.tolist()))
        ls3, ct3 = np.asarray(r3.last_seen), np.asarray(r3.count)
        for key in batch.tolist():
            row = int(np.nonzero(sl == key)[0][0])
            assert ls3[row] == 3 and ct3[row] == (2 if key == 108 else 1)
        # A full bucket whose every row was seen in the call: new keys fail.
        seen = np.concatenate([np.asarray(r3.slot_keys), np.array([777], np.int32)])
        r4 = hash_ops.hash_lookup(
            r3.slot_keys,
            jnp.asarray(seen),
            insert=True,
            last_seen=r3.last_seen,
            count=r3.count,
            step=4,
            policy=policy,
        )
        assert int(np.asarray(r4.status)[-1]) == hash_ops.FULL
        np.testing.assert_array_equal(np.asarray(r4.slot_keys), np.asarray(r3.slot_keys))


def test_admission_counts_batches_not_positions():
    """A key is admitted in the admit_after-th call that sees it, however
    often it repeats within one call; until then it has no row."""
    cap, depth, width = 32, 3, 64
    slots = hash_ops.empty_slot_keys(cap, np.int32)
    ls, ct = jnp.zeros((cap,), jnp.int32), jnp.zeros((cap,), jnp.int32)
    sk = jnp.zeros((depth * width,), jnp.int32)
    k = jnp.asarray([5, 5, 5, 6, -1], jnp.int32)
    for step in (1, 2, 3):
        r = hash_ops.hash_lookup(
            slots,
            k,
            insert=True,
            last_seen=ls,
            count=ct,
            sketch=sk,
            step=step,
            admit_after=3,
            sketch_depth=depth,
        )
        slots, ls, ct, sk = r.slot_keys, r.last_seen, r.count, r.sketch
        st = np.asarray(r.status)
        if step < 3:
            np.testing.assert_array_equal(st, [hash_ops.NOT_ADMITTED] * 4 + [hash_ops.PADDING])
            assert (np.asarray(slots) == -1).all()
        else:
            np.testing.assert_array_equal(st, [hash_ops.INSERTED] * 4 + [hash_ops.PADDING])
            np.testing.assert_array_equal(np.asarray(r.is_new), [1, 0, 0, 1, 0])
            # The initial count of an admitted key is its sketch estimate.
            assert int(np.asarray(ct)[int(r.rows[0])]) == 3
    # Evaluation neither counts nor admits.
    r = hash_ops.hash_lookup(
        slots,
        jnp.asarray([9], jnp.int32),
        insert=False,
        last_seen=ls,
        count=ct,
        sketch=sk,
        step=4,
        admit_after=3,
        sketch_depth=depth,
    )
    np.testing.assert_array_equal(np.asarray(r.sketch), np.asarray(sk))
    assert int(r.status[0]) == hash_ops.MISSING


def test_hash_lookup_errors():
    slots = hash_ops.empty_slot_keys(8, np.int32)
    k = jnp.zeros(3, jnp.int32)
    z = jnp.zeros((8,), jnp.int32)
    with pytest.raises(ValueError, match="policy"):
        hash_ops.hash_lookup(slots, k, insert=True, last_seen=z, count=z, policy="fifo")
    with pytest.raises(ValueError, match="policy 'lru' needs"):
        hash_ops.hash_lookup(slots, k, insert=True, policy="lru")
    with pytest.raises(ValueError, match="last_seen and count"):
        hash_ops.hash_lookup(slots, k, insert=True, last_seen=z)
    with pytest.raises(ValueError, match="last_seen must be int32"):
        hash_ops.hash_lookup(slots, k, insert=True, last_seen=z[:4], count=z[:4])
    with pytest.raises(ValueError, match="admit_after"):
        hash_ops.hash_lookup(slots, k, insert=True, admit_after=-1)
    with pytest.raises(ValueError, match="admit_after > 0 needs a sketch"):
        hash_ops.hash_lookup(slots, k, insert=True, admit_after=2)
    with pytest.raises(ValueError, match="sketch_depth"):
        hash_ops.hash_lookup(
            slots, k, insert=True, sketch=jnp.zeros(8, jnp.int32), admit_after=2, sketch_depth=9
        )
    with pytest.raises(ValueError, match="sketch must be"):
        hash_ops.hash_lookup(
            slots, k, insert=True, sketch=jnp.zeros(7, jnp.int32), admit_after=2, sketch_depth=2
        )


# --- trace-time errors -------------------------------------------------------


def test_errors():
    slots = hash_ops.empty_slot_keys(8, np.int32)
    with pytest.raises(ValueError, match="keys dtype"):
        hash_ops.find_or_insert(slots, jnp.zeros(3, jnp.uint32), insert=True)
    with pytest.raises(ValueError, match="keys must be rank 1"):
        hash_ops.find_or_insert(slots, jnp.zeros((2, 2), jnp.int32), insert=True)
    with pytest.raises(ValueError, match="slot_keys must be rank 1"):
        hash_ops.find_or_insert(slots.reshape(2, 4), jnp.zeros(3, jnp.int32), insert=True)
    with pytest.raises(ValueError, match="slot_keys: unsupported"):
        hash_ops.find_or_insert(jnp.zeros(8, jnp.float32), jnp.zeros(3, jnp.float32), insert=True)
    with pytest.raises(ValueError, match="capacity"):
        hash_ops.empty_slot_keys(0, np.int32)
    with pytest.raises(ValueError, match="capacity"):
        hash_ops.find_or_insert(jnp.zeros(0, jnp.int32), jnp.zeros(3, jnp.int32), insert=True)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        with jax.enable_x64(False):
            hash_ops.empty_slot_keys(8, np.int64)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        with jax.enable_x64(False):  # numpy int64 must not be truncated
            hash_ops.find_or_insert(np.full(8, -1, np.int64), np.zeros(3, np.int64), insert=True)
