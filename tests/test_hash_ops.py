"""Tests of the hash find-or-insert target and its pure-JAX reference.

The CPU target is sequential: keys are processed in position order, so its
results equal the sequential simulation exactly. The CUDA target inserts
concurrently (atomicCAS per slot): which slot a colliding new key takes, which
position of a repeated new key gets is_new, and which new keys fail when the
table fills up all depend on the race. On such platforms the tests check the
contract instead (`_check_contract`); find mode stays exact everywhere.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _sequential(x=None) -> bool:
    """Whether find_or_insert ran (on `x`'s device) on the sequential CPU
    target; otherwise insertion order is a race (the CUDA target)."""
    if x is not None and hasattr(x, "devices"):
        return all(d.platform == "cpu" for d in x.devices())
    return jax.default_backend() == "cpu"


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


def _simulate(slots, keys, insert):
    """Sequential find-or-insert on numpy arrays: the CPU target's contract."""
    slots = np.array(slots, copy=True)
    keys = np.asarray(keys)
    cap = slots.shape[0]
    empty = _empty(slots.dtype)
    starts = hash_ops.hash_slot(keys, cap)
    rows = np.full(keys.shape, -1, np.int32)
    is_new = np.zeros(keys.shape, np.int32)
    failed = 0
    for i, k in enumerate(keys):
        if k == empty:
            continue
        s = int(starts[i])
        for _ in range(cap):
            if slots[s] == k:
                rows[i] = s
                break
            if slots[s] == empty:
                if insert:
                    slots[s] = k
                    rows[i] = s
                    is_new[i] = 1
                break
            s = 0 if s + 1 == cap else s + 1
        else:
            failed += int(insert)
    return slots, rows, is_new, failed


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
    every stored key is reachable from its hash slot by linear probing.
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
    # Linear probing finds every stored key: no EMPTY slot on its probe path.
    starts = hash_ops.hash_slot(after[occ], cap)
    for st, s in zip(starts.tolist(), occ.tolist()):
        path = (st + np.arange((s - st) % cap)) % cap
        assert (after[path] != empty).all(), "a stored key is unreachable"


class DictOracle:
    """key -> row across batches; checks the semantic contract of a batch."""

    def __init__(self, dtype, sequential=True):
        self.rows: dict[int, int] = {}
        self.empty = int(_empty(dtype))
        # Concurrent insertion may set is_new at any one position of a new
        # key, not necessarily its first.
        self.sequential = sequential

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
                if k in seen_new and not self.sequential:
                    new_flags[k] += nw
                    continue
                assert nw == 0, "is_new set twice for one key"
                continue
            if not insert:
                assert r == -1 and nw == 0
                continue
            if r == -1:
                assert nw == 0
                failed += 1
                continue
            if self.sequential:
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
@pytest.mark.parametrize("capacity", [1, 7, 1000, 2**31 - 1])
def test_hash_slot_matches_definition(dtype, capacity):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    keys = np.concatenate(
        [
            np.array([info.min, info.max, 0, 1, info.max - 1], dtype),
            rng.integers(info.min, info.max, 200, dtype=dtype, endpoint=True),
        ]
    )
    want = np.array([_py_hash_word(int(k), dtype) % capacity for k in keys])
    got_np = hash_ops.hash_slot(keys, capacity)
    np.testing.assert_array_equal(got_np, want)
    with _x64(dtype):
        got_jnp = jax.jit(hash_ops.hash_slot, static_argnums=1)(jnp.asarray(keys), capacity)
        np.testing.assert_array_equal(np.asarray(got_jnp), want)


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
        seq = _sequential(slots)
        oracle = DictOracle(dtype, sequential=seq)
        for step in range(12):
            insert = step % 4 != 3  # every fourth batch is evaluation
            keys = pool[rng.integers(0, min(len(pool), 60 * (step + 1)), 128)]
            keys[rng.random(128) < 0.1] = _empty(dtype)  # padding anywhere
            before = np.array(slots)
            slots, rows, is_new, failed = hash_ops.find_or_insert(
                slots, jnp.asarray(keys), insert=insert
            )
            _check_contract(before, keys, slots, rows, is_new, failed, insert)
            if seq:
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


def _colliding_keys(rng, dtype, cap, start, count):
    """`count` distinct keys whose first probe is slot `start`."""
    out = []
    while len(out) < count:
        cand = _random_keys(rng, dtype, 4096)
        out += cand[hash_ops.hash_slot(cand, cap) == start].tolist()
    return np.array(out[:count], dtype)


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("start", [3, 63])  # 63: the probe wraps around
def test_colliding_keys_probe_linearly(dtype, start):
    rng = np.random.default_rng(start)
    cap = 64
    keys = _colliding_keys(rng, dtype, cap, start, 5)
    batch = np.concatenate([keys, keys[::-1], [_empty(dtype)], keys[:2]])
    with _x64(dtype):
        slots, rows, is_new, failed = hash_ops.find_or_insert(
            hash_ops.empty_slot_keys(cap, dtype), jnp.asarray(batch), insert=True
        )
        want = [(start + i) % cap for i in range(5)]
        rows = np.asarray(rows)
        if _sequential(slots):
            np.testing.assert_array_equal(rows[:5], want)
            np.testing.assert_array_equal(np.asarray(is_new), [1] * 5 + [0] * 8)
        else:
            # Concurrent: the 5 keys fill the same 5 consecutive slots, in
            # any order, with is_new at any one position of each key.
            assert sorted(rows[:5].tolist()) == sorted(want)
            _check_contract(
                np.full(cap, _empty(dtype), dtype), batch, slots, rows, is_new, failed, True
            )
        want = rows[:5].tolist()
        np.testing.assert_array_equal(rows[5:10], want[::-1])
        np.testing.assert_array_equal(rows[10:], [-1] + want[:2])
        assert int(np.asarray(is_new).sum()) == 5
        assert int(failed) == 0
        # Found again, in another order, in find mode.
        _, r2, _, _ = hash_ops.find_or_insert(slots, jnp.asarray(keys[::-1]), insert=False)
        np.testing.assert_array_equal(np.asarray(r2), want[::-1])


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
        if _sequential(slots):
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
        if _sequential(slots):
            sim = _simulate(np.asarray(slots0), batch, True)
            _assert_same((slots, rows, is_new, failed), sim)
            # The table is full and holds the first 16 distinct keys of the
            # stream.
            stored = list(dict.fromkeys(keys[:4].tolist() + [k for k in batch.tolist() if k != e]))[
                :cap
            ]
            assert sorted(slots_np.tolist()) == sorted(stored)
        else:
            # Concurrent: the table is full, holds the 4 earlier keys and
            # 12 distinct keys of the batch; which 12 is a race.
            assert e not in slots_np.tolist()
            assert len(set(slots_np.tolist())) == cap
            assert set(slots_np.tolist()) <= set(keys.tolist())
            stored = keys[:4].tolist() + [
                k for k in slots_np.tolist() if k not in keys[:4].tolist()
            ]
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
        # (Sequentially the unstored keys are keys[16:], so these are keys[30:].)
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
            if insert and not _sequential(got[0]):
                # Concurrent insertion: the contract, and the same outcome
                # in what is order-free: failures happen iff the batch's new
                # keys overflow the table, hence the same number of stored
                # keys, and the same key set when nothing failed.
                _check_contract(slots, keys, *got, insert)
                gs, ws = np.asarray(got[0]), np.asarray(want[0])
                assert (int(got[3]) == 0) == (int(want[3]) == 0)
                assert (gs != e).sum() == (ws != e).sum()
                if int(want[3]) == 0:
                    assert sorted(gs.tolist()) == sorted(ws.tolist())
            else:
                _assert_same(got, want)
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
        seq = _sequential(slots)
        oracle = DictOracle(dtype, sequential=seq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "donated buffers not usable"
            for keys in batches:
                before = np.array(slots)  # a copy: slots is donated
                slots, rows, is_new, failed = step(slots, jnp.asarray(keys))
                _check_contract(before, keys, slots, rows, is_new, failed, True)
                if seq:
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
        if _sequential(got[0]):
            want = _simulate(np.asarray(slots[b]), keys[b], True)
            _assert_same([g[b] for g in got], want)


def test_empty_batch():
    slots = hash_ops.empty_slot_keys(8, np.int32)
    s, r, n, f = hash_ops.find_or_insert(slots, jnp.zeros((0,), jnp.int32), insert=True)
    assert r.shape == (0,) and n.shape == (0,) and int(f) == 0
    np.testing.assert_array_equal(np.asarray(s), np.asarray(slots))


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
