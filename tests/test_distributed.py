"""`sok_jax.DistributedEmbedding` on 1, 2, 4 and 8 (forced host CPU) devices,
against the single-device `sok_jax.embed` on the logical table.

Key k lives on device k % n at local row k // n, i.e. at global row
(k % n) * rows_per_gpu + k // n of `state.table`; the *logical* table is the
physical one re-ordered by key. Every comparison maps the sharded table and
its gradients to logical order with `physical_rows` below (not with the code
under test).

Multi-device cases skip when fewer devices exist; with
SOK_REQUIRE_MULTIDEVICE=1 such a skip is a failure instead.
"""

from __future__ import annotations

# conftest.py forces 8 host devices before jax starts (the flag only works then).
import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sok_jax
from sok_jax import initializers
from sok_jax.distributed import (
    DistributedEmbedding,
    EmbeddingState,
    check_stats,
)

COMBINERS = ("sum", "mean", "sqrtn")
DEVICE_COUNTS = (1, 2, 4, 8)
TOTAL_ROWS = 256  # logical keys [0, 256); rows_per_gpu = TOTAL_ROWS // n
DIM = 8
BATCH, SLOTS, NNZ = 16, 2, 64  # one id shape for every pattern: one compile per config
SEED = 7

FWD_TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_RTOL = 1e-5  # and atol 1e-5 times the reference's largest magnitude


def physical_rows(keys, n: int, rows_per_gpu: int):
    keys = np.asarray(keys)
    return (keys % n) * rows_per_gpu + keys // n


def to_logical(table, n: int) -> np.ndarray:
    """[n * rows_per_gpu, D] physical (sharded) layout -> logical, by key."""
    table = np.asarray(jax.device_get(table))
    return table[physical_rows(np.arange(table.shape[0]), n, table.shape[0] // n)]


def assert_grad_close(got, want, what=""):
    want = np.asarray(want)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=GRAD_RTOL, atol=1e-5 * scale, err_msg=what)


def make_emb(n, combiner, **kw) -> DistributedEmbedding:
    kw.setdefault("slot_num", SLOTS)
    kw.setdefault("max_nnz", NNZ)
    kw.setdefault("use_hashtable", False)
    return DistributedEmbedding(
        combiner, TOTAL_ROWS // n, DIM, mesh=mesh_of(n), axis_name=AXIS, **kw
    )


@functools.lru_cache(maxsize=None)
def initial_state(n: int, seed: int = SEED) -> EmbeddingState:
    # The state does not depend on the combiner or the id shape: share it.
    return make_emb(n, "sum").init(seed)


# --------------------------------------------------------------------------
# Id patterns (global batch, int64 numpy; -1 is padding).

PATTERNS = ("mixed", "one_owner", "last_owner", "same_key", "empty", "full")


def make_ids(
    pattern: str,
    rng: np.random.Generator,
    n: int,
    *,
    batch=BATCH,
    slots=SLOTS,
    nnz=NNZ,
    total_rows=TOTAL_ROWS,
) -> np.ndarray:
    rpg = total_rows // n
    ids = np.full((batch, slots, nnz), -1, np.int64)
    if pattern == "empty":
        return ids
    if pattern == "full":
        lengths = np.full((batch, slots), nnz)
    else:
        lengths = rng.integers(0, nnz + 1, size=(batch, slots))
        lengths[0, 0] = 0  # an empty bag
        lengths[-1, :] = nnz  # full bags
    k0 = int(rng.integers(0, total_rows))
    for b in range(batch):
        for s in range(slots):
            m = int(lengths[b, s])
            if pattern in ("mixed", "full"):
                keys = rng.integers(0, total_rows, size=m)
            elif pattern == "one_owner":  # every key on device 0
                keys = n * rng.integers(0, rpg, size=m)
            elif pattern == "last_owner":
                keys = n * rng.integers(0, rpg, size=m) + (n - 1)
            elif pattern == "same_key":
                keys = np.full(m, k0)
            else:
                raise AssertionError(pattern)
            # Keys at scattered positions, padding interleaved.
            cols = np.sort(rng.choice(nnz, size=m, replace=False))
            ids[b, s, cols] = keys
    return ids


def make_weights(rng, shape):
    return rng.uniform(0.25, 1.5, size=shape).astype(np.float32)


# --------------------------------------------------------------------------
# Compiled programs, cached per configuration so that every pattern and seed
# of one configuration reuses one compilation.


@functools.lru_cache(maxsize=None)
def oracle(combiner: str, weighted: bool):
    """jit: embed's output and the grads of sum(g * out) w.r.t. the logical
    table and the weights."""

    @jax.jit
    def run(table, ids, w, g):
        def loss(t, w):
            out = sok_jax.embed(t, ids, combiner=combiner, weights=w if weighted else None)
            return jnp.sum(out * g), out

        (_, out), (d_t, d_w) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(table, w)
        return out, d_t, d_w

    return run


@functools.lru_cache(maxsize=None)
def distributed(n: int, combiner: str, weighted: bool, **kw):
    """jit: the dense-compatible path (apply + jax.grad w.r.t. state.table and
    the weights) and the sparse path (lookup + sparse_grad) on one batch."""
    emb = make_emb(n, combiner, **kw)

    @jax.jit
    def run(state, ids, w, g):
        def loss(table, w):
            st = dataclasses.replace(state, table=table)
            out, new_state = emb.apply(st, ids, w if weighted else None)
            return jnp.sum(out * g), (out, new_state)

        (_, (out, new_state)), (d_t, d_w) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            state.table, w
        )
        s_out, ctx, s_state = emb.lookup(state, ids, w if weighted else None)
        sg = emb.sparse_grad(ctx, g)
        return dict(
            out=out,
            d_table=d_t,
            d_w=d_w,
            state=new_state,
            s_out=s_out,
            sparse=sg,
            s_stats=s_state.stats,
        )

    return emb, run


def sparse_to_physical(sg, n: int, rpg: int):
    """Scatters a SparseRowGrad (device d's local row r -> global row
    d * rpg + r) into a dense [n * rpg, D]; checks its layout on the way."""
    rows = np.asarray(sg.rows).reshape(n, -1)
    cap = rows.shape[1]
    grads = np.asarray(sg.grads).reshape(n, cap, -1)
    count = np.asarray(sg.count)
    assert count.shape == (n,)
    dense = np.zeros((n * rpg, grads.shape[-1]), np.float32)
    for d in range(n):
        c = int(count[d])
        real = rows[d, :c]
        assert np.all((real >= 0) & (real < rpg)), (d, real)
        assert len(np.unique(real)) == c, f"device {d}: repeated rows {real}"
        assert np.all(rows[d, c:] == -1), f"device {d}: rows past count not -1"
        np.testing.assert_array_equal(grads[d, c:], 0.0)
        dense[d * rpg + real] += grads[d, :c]
    return dense, rows, count


# --------------------------------------------------------------------------
# Distributed == single device, every combiner, weighted or not.

CASES = [("mixed", 0), ("mixed", 1)] + [(p, 0) for p in PATTERNS if p != "mixed"]


@pytest.mark.parametrize("pattern,seed", CASES, ids=[f"{p}-{s}" for p, s in CASES])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_matches_single_device(n, combiner, weighted, pattern, seed):
    require_devices(n)
    rng = np.random.default_rng(
        [n, COMBINERS.index(combiner), weighted, PATTERNS.index(pattern), seed]
    )
    rpg = TOTAL_ROWS // n
    ids = make_ids(pattern, rng, n).astype(np.int32)
    w = make_weights(rng, ids.shape)
    g = rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32)
    state = initial_state(n)
    emb, run = distributed(n, combiner, weighted)
    r = run(state, ids, w, g)

    logical = to_logical(state.table, n)
    np.testing.assert_array_equal(emb.logical_rows(state, np.arange(TOTAL_ROWS)), logical)
    ref_out, ref_dt, ref_dw = oracle(combiner, weighted)(logical, ids, w, g)

    np.testing.assert_allclose(np.asarray(r["out"]), np.asarray(ref_out), **FWD_TOL)
    np.testing.assert_array_equal(np.asarray(r["s_out"]), np.asarray(r["out"]))
    d_table = np.asarray(r["d_table"])
    assert d_table.shape == (n * rpg, DIM)
    assert_grad_close(to_logical(d_table, n), ref_dt, "table gradient")
    if weighted:
        assert_grad_close(np.asarray(r["d_w"]), ref_dw, "weights gradient")

    # Sparse path: per-device distinct local rows; scattered == dense gradient.
    dense, rows, count = sparse_to_physical(r["sparse"], n, rpg)
    assert_grad_close(dense, d_table, "sparse vs dense gradient")
    assert_grad_close(to_logical(dense, n), ref_dt, "sparse vs single-device gradient")
    keys = np.unique(ids[ids >= 0])
    for d in range(n):
        want = np.sort(keys[keys % n == d] // n)
        np.testing.assert_array_equal(np.sort(rows[d, : count[d]]), want, err_msg=f"device {d}")

    for stats in (r["state"].stats, r["s_stats"]):
        for field in ("overflow", "invalid", "hash_full"):
            np.testing.assert_array_equal(np.asarray(getattr(stats, field)), np.zeros(n))
    check_stats(r["state"])  # a clean call does not raise
    # Direct mode never changes the table on lookup.
    np.testing.assert_array_equal(np.asarray(r["state"].table), np.asarray(state.table))


# --------------------------------------------------------------------------
# Initialization does not depend on the device count.


@pytest.mark.parametrize("seed", [0, 1234])
def test_init_same_logical_table_on_any_device_count(seed):
    require_devices(max(DEVICE_COUNTS))
    key = initializers.as_key(seed)
    want = np.asarray(
        initializers.init_rows(
            initializers.resolve("random_uniform"),
            key,
            jnp.arange(TOTAL_ROWS, dtype=jnp.uint32),
            DIM,
        )
    )
    assert np.all(np.abs(want) <= 0.05) and np.unique(want).size > TOTAL_ROWS
    for n in DEVICE_COUNTS:
        state = make_emb(n, "mean").init(seed)
        assert state.table.shape == (TOTAL_ROWS, DIM)
        assert state.table.sharding.is_equivalent_to(NamedSharding(mesh_of(n), P(AXIS, None)), 2)
        np.testing.assert_array_equal(to_logical(state.table, n), want, err_msg=f"n={n}")


def test_init_seed_and_initializer():
    require_devices(4)
    a = initial_state(4, SEED)
    b = make_emb(4, "sum").init(SEED + 1)
    assert not np.array_equal(np.asarray(a.table), np.asarray(b.table))
    z = make_emb(4, "sum", embedding_initializer="zeros").init(0)
    np.testing.assert_array_equal(np.asarray(z.table), 0.0)
    c = make_emb(4, "sum", embedding_initializer=jax.nn.initializers.normal(2.0)).init(3)
    c1 = make_emb(1, "sum", embedding_initializer=jax.nn.initializers.normal(2.0)).init(3)
    np.testing.assert_array_equal(to_logical(c.table, 4), to_logical(c1.table, 1))
    assert float(np.std(np.asarray(c.table))) > 1.0


# --------------------------------------------------------------------------
# Capacity overflow: counted exactly, contributes zeros, never corrupts.

OVF_BATCH, OVF_NNZ, OVF_FACTOR = 32, 8, 0.1


def buckets(ids: np.ndarray, n: int):
    """(source device, destination, its distinct valid keys ascending): what
    each device sends each destination."""
    lb = ids.shape[0] // n
    for d in range(n):
        local = ids[d * lb : (d + 1) * lb]
        valid = np.unique(local[(local >= 0) & (local < TOTAL_ROWS)])
        for dest in range(n):
            yield d, dest, valid[valid % n == dest]


def expected_overflow(ids: np.ndarray, n: int, capacity: int):
    """Per device: distinct valid keys per destination, ascending; those past
    `capacity` overflow. Returns (counts [n], ids with them set to -1)."""
    lb = ids.shape[0] // n
    counts = np.zeros(n, np.int64)
    kept = ids.copy()
    for d, _, mine in buckets(ids, n):
        dropped = mine[capacity:]
        counts[d] += dropped.size
        local = kept[d * lb : (d + 1) * lb]
        local[np.isin(local, dropped)] = -1
    return counts, kept


OVF_CASES = [(8, c) for c in COMBINERS] + [(2, "mean"), (4, "sum")]


@pytest.mark.parametrize("pattern", ["one_owner", "skewed"])
@pytest.mark.parametrize("n,combiner", OVF_CASES)
def test_capacity_overflow_counted_and_zeroed(n, combiner, pattern):
    require_devices(n)
    rng = np.random.default_rng([n, COMBINERS.index(combiner), len(pattern)])
    lb = OVF_BATCH // n
    capacity = math.ceil(OVF_FACTOR * SLOTS * OVF_NNZ * lb / n)
    ids = make_ids("one_owner", rng, n, batch=OVF_BATCH, nnz=OVF_NNZ)
    if pattern == "skewed":  # a quarter of the keys anywhere, the rest on device 0
        spread = rng.random(ids.shape) < 0.25
        ids = np.where(spread & (ids >= 0), rng.integers(0, TOTAL_ROWS, ids.shape), ids)
    ids = ids.astype(np.int32)
    want_ovf, kept = expected_overflow(ids, n, capacity)
    assert want_ovf.sum() > 0  # the test means something
    g = rng.normal(size=(OVF_BATCH, SLOTS, DIM)).astype(np.float32)
    w = np.ones(ids.shape, np.float32)

    state = initial_state(n)
    emb, run = distributed(n, combiner, False, max_nnz=OVF_NNZ, capacity_factor=OVF_FACTOR)
    assert emb._capacity(lb) == capacity
    r = run(state, ids, w, g)
    new_state = r["state"]
    np.testing.assert_array_equal(np.asarray(new_state.stats.overflow), want_ovf)
    np.testing.assert_array_equal(np.asarray(r["s_stats"].overflow), want_ovf)
    np.testing.assert_array_equal(np.asarray(new_state.stats.invalid), 0)

    # The keys that did not fit contribute zeros (and mean divides by the
    # count of those that made it), and get no gradient.
    logical = to_logical(state.table, n)
    ref_out, ref_dt, _ = oracle(combiner, False)(logical, kept, w, g)
    np.testing.assert_allclose(np.asarray(r["out"]), np.asarray(ref_out), **FWD_TOL)
    assert_grad_close(to_logical(r["d_table"], n), ref_dt, "table gradient under overflow")
    dense, _, _ = sparse_to_physical(r["sparse"], n, TOTAL_ROWS // n)
    assert_grad_close(to_logical(dense, n), ref_dt, "sparse gradient under overflow")
    np.testing.assert_array_equal(np.asarray(new_state.table), np.asarray(state.table))

    with pytest.raises(ValueError, match="overflow"):
        check_stats(new_state)


@pytest.mark.parametrize(
    "n,pattern", [(2, "random"), (4, "skewed"), (8, "one_owner"), (8, "random")]
)
def test_required_capacity_factor(n, pattern):
    """The factor equals the numpy count (largest distinct keys any source
    sends one destination, x n over the local positions), the layer built
    with it overflows nowhere, and one bucket slot less overflows."""
    require_devices(n)
    rng = np.random.default_rng([n, len(pattern), 5])
    lb = OVF_BATCH // n
    ids = make_ids(
        "mixed" if pattern == "random" else "one_owner", rng, n, batch=OVF_BATCH, nnz=OVF_NNZ
    )
    if pattern == "skewed":
        spread = rng.random(ids.shape) < 0.25
        ids = np.where(spread & (ids >= 0), rng.integers(0, TOTAL_ROWS, ids.shape), ids)
    ids = ids.astype(np.int32)
    largest = max(mine.size for _, _, mine in buckets(ids, n))
    full = SLOTS * OVF_NNZ * lb
    emb = make_emb(n, "sum", max_nnz=OVF_NNZ)
    got = float(jax.jit(emb.required_capacity_factor)(ids))
    assert got == pytest.approx(largest * n / full, rel=1e-6)
    assert largest > 0
    state = initial_state(n)
    tight = make_emb(n, "sum", max_nnz=OVF_NNZ, capacity_factor=got)
    assert tight._capacity(lb) == largest
    _, st = jax.jit(tight.apply)(state, ids)
    np.testing.assert_array_equal(np.asarray(st.stats.overflow), 0)
    if largest > 1:
        short = make_emb(n, "sum", max_nnz=OVF_NNZ, capacity_factor=(largest - 1) * n / full)
        _, st = jax.jit(short.apply)(state, ids)
        assert int(np.asarray(st.stats.overflow).sum()) > 0


@pytest.mark.parametrize("n", [1, 8])
def test_check_never_loses_the_state(n):
    """check=True: an eager call raises EmbeddingError after the call, with
    the valid new state attached; inside a jitted, donating (and a
    differentiated) step nothing raises (the donated state would be lost):
    the step warns, returns a valid state, and check_stats raises on it."""
    require_devices(n)
    rng = np.random.default_rng(11)
    ids = make_ids("one_owner", rng, n, batch=OVF_BATCH, nnz=OVF_NNZ).astype(np.int32)
    emb = make_emb(n, "mean", max_nnz=OVF_NNZ, capacity_factor=OVF_FACTOR, check=True)
    state = initial_state(n)
    with pytest.raises(sok_jax.EmbeddingError, match="overflow") as err:
        emb.apply(state, ids)
    assert int(np.sum(np.asarray(err.value.state.stats.overflow))) > 0
    np.testing.assert_array_equal(np.asarray(err.value.state.table), np.asarray(state.table))

    copy = jax.tree.map(jnp.copy, state)
    step = jax.jit(lambda st, ids: emb.apply(st, ids)[1], donate_argnums=0)
    with pytest.warns(sok_jax.EmbeddingWarning, match="overflow"):
        new = jax.block_until_ready(step(copy, ids))
    with pytest.raises(sok_jax.EmbeddingError, match="overflow"):
        check_stats(new)
    np.testing.assert_array_equal(np.asarray(new.table), np.asarray(state.table))

    def loss(table, ids):
        out, st = emb.apply(dataclasses.replace(state, table=table), ids)
        return jnp.sum(out), st

    with pytest.warns(sok_jax.EmbeddingWarning, match="overflow"):
        g, st = jax.block_until_ready(jax.jit(jax.grad(loss, has_aux=True))(state.table, ids))
    with pytest.raises(sok_jax.EmbeddingError, match="overflow"):
        check_stats(st)
    bad = np.where(ids >= 0, TOTAL_ROWS + 1, -1).astype(np.int32)  # invalid, no overflow
    with pytest.warns(sok_jax.EmbeddingWarning, match="neither padding"):
        st = jax.block_until_ready(step(jax.tree.map(jnp.copy, state), bad))
    with pytest.raises(ValueError, match="neither padding"):
        check_stats(st)
    # A call that fits raises and warns nothing, and the process is still usable.
    ok = np.full_like(ids, -1)
    ok[:, 0, 0] = np.arange(OVF_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sok_jax.EmbeddingWarning)
        st = jax.block_until_ready(step(jax.tree.map(jnp.copy, state), ok))
    check_stats(st)
    out, _ = emb.apply(state, ok)
    g, _ = jax.jit(jax.grad(loss, has_aux=True))(state.table, ok)
    assert float(jnp.abs(g).sum()) > 0


def test_default_capacity_never_overflows():
    n = 8
    require_devices(n)
    # Every sample of a device sends max_feature_num distinct keys to one owner.
    ids = (n * np.arange(OVF_BATCH * SLOTS * OVF_NNZ)).reshape(OVF_BATCH, SLOTS, OVF_NNZ)
    ids = (ids % TOTAL_ROWS).astype(np.int32)
    emb = make_emb(n, "sum", max_nnz=OVF_NNZ, check=True)
    out, st = jax.jit(emb.apply)(initial_state(n), ids)
    np.testing.assert_array_equal(np.asarray(st.stats.overflow), 0)
    logical = to_logical(initial_state(n).table, n)
    want = sok_jax.embed(jnp.asarray(logical), ids, combiner="sum")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), **FWD_TOL)


# --------------------------------------------------------------------------
# Invalid ids: counted exactly per device, skipped like embed skips them.


@pytest.mark.parametrize("combiner", ["mean", "sqrtn"])
@pytest.mark.parametrize("n", [1, 4, 8])  # 1: the no-exchange local path
def test_invalid_ids_counted(n, combiner):
    require_devices(n)
    rng = np.random.default_rng([n, len(combiner), 5])
    ids = make_ids("mixed", rng, n).astype(np.int64)
    bad_values = np.array([TOTAL_ROWS, TOTAL_ROWS + 5, 2**31 - 1, -2, -(2**31)])
    bad = (rng.random(ids.shape) < 0.15) & (ids >= 0)
    ids = np.where(bad, rng.choice(bad_values, ids.shape), ids).astype(np.int32)
    lb = BATCH // n
    want_invalid = [int(bad[d * lb : (d + 1) * lb].sum()) for d in range(n)]
    assert sum(want_invalid) > 0
    w = make_weights(rng, ids.shape)
    g = rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32)
    state = initial_state(n)
    _, run = distributed(n, combiner, True)
    r = run(state, ids, w, g)
    np.testing.assert_array_equal(np.asarray(r["state"].stats.invalid), want_invalid)
    np.testing.assert_array_equal(np.asarray(r["s_stats"].invalid), want_invalid)
    np.testing.assert_array_equal(np.asarray(r["state"].stats.overflow), 0)

    cleaned = np.where(bad, -1, ids)
    ref_out, ref_dt, ref_dw = oracle(combiner, True)(to_logical(state.table, n), cleaned, w, g)
    np.testing.assert_allclose(np.asarray(r["out"]), np.asarray(ref_out), **FWD_TOL)
    assert_grad_close(to_logical(r["d_table"], n), ref_dt)
    np.testing.assert_array_equal(np.asarray(r["d_w"])[bad], 0.0)
    np.testing.assert_array_equal(np.asarray(r["state"].table), np.asarray(state.table))
    with pytest.raises(ValueError, match="neither padding"):
        check_stats(r["state"])


@pytest.mark.parametrize("n", [1, 4])
def test_uint32_keys(n):
    require_devices(n)
    rng = np.random.default_rng(3)
    ids = make_ids("mixed", rng, n)
    bad = (rng.random(ids.shape) < 0.1) & (ids >= 0)
    # 0x80000001 is negative if misread as int32; 0xFFFFFFFE is not padding.
    ids = np.where(bad, rng.choice([TOTAL_ROWS, 0x80000001, 0xFFFFFFFE], ids.shape), ids)
    ids = np.where(ids == -1, 0xFFFFFFFF, ids).astype(np.uint32)
    emb = make_emb(n, "mean", key_dtype=jnp.uint32)
    state = initial_state(n)
    out, st = jax.jit(emb.apply)(state, ids)
    lb = BATCH // n
    np.testing.assert_array_equal(
        np.asarray(st.stats.invalid), [bad[d * lb : (d + 1) * lb].sum() for d in range(n)]
    )
    want = sok_jax.embed(jnp.asarray(to_logical(state.table, n)), ids, combiner="mean")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), **FWD_TOL)


@pytest.mark.parametrize("n", [1, 4])
def test_int64_keys_with_x64(n):
    require_devices(n)
    rng = np.random.default_rng(4)
    ids = make_ids("mixed", rng, n)
    bad = (rng.random(ids.shape) < 0.1) & (ids >= 0)
    # 2**32 + 1 would alias key 1 if truncated to 32 bits.
    ids = np.where(bad, rng.choice([2**32 + 1, TOTAL_ROWS, -(2**40)], ids.shape), ids)
    state = initial_state(n)
    logical = jnp.asarray(to_logical(state.table, n))
    with jax.enable_x64(True):
        emb = make_emb(n, "sum", key_dtype=jnp.int64)
        out, st = jax.jit(emb.apply)(state, jnp.asarray(ids, jnp.int64))
        want = sok_jax.embed(logical, jnp.asarray(ids, jnp.int64), combiner="sum")
        out, want, invalid = np.asarray(out), np.asarray(want), np.asarray(st.stats.invalid)
    lb = BATCH // n
    np.testing.assert_array_equal(invalid, [bad[d * lb : (d + 1) * lb].sum() for d in range(n)])
    np.testing.assert_allclose(out, want, **FWD_TOL)


# --------------------------------------------------------------------------
# A jitted data-parallel + model-parallel training step.

TR_ROWS_PER_GPU, TR_BATCH, TR_NNZ, TR_STEPS = 8, 64, 4, 30


def _train(n: int, steps: int):
    import flax.linen as nn
    import optax

    mesh = mesh_of(n)
    vocab = TR_ROWS_PER_GPU * 8  # the same logical table for any n
    emb = DistributedEmbedding(
        "sum",
        vocab // n,
        DIM,
        slot_num=SLOTS,
        max_nnz=TR_NNZ,
        mesh=mesh,
        axis_name=AXIS,
        use_hashtable=False,
    )

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(16)(x))
            return nn.Dense(1)(x)[:, 0]

    model = MLP()
    repl = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P(AXIS))
    params = model.init(jax.random.key(0), jnp.zeros((1, SLOTS * DIM)))
    dense_opt, table_opt = optax.adam(1e-2), optax.adam(5e-2)
    state = emb.init(1)
    dense_os = dense_opt.init(params)
    table_os = table_opt.init(state.table)

    params_sh = jax.tree.map(lambda _: repl, params)
    dense_os_sh = jax.tree.map(lambda _: repl, dense_os)
    table_os_sh = jax.tree.map(lambda x: emb.table_sharding if x.ndim == 2 else repl, table_os)
    state_sh = EmbeddingState(
        table=emb.table_sharding,
        slot_keys=None,
        seed=repl,
        stats=emb.state_shardings().stats,
    )
    params, dense_os, table_os, state = jax.device_put(
        (params, dense_os, table_os, state), (params_sh, dense_os_sh, table_os_sh, state_sh)
    )

    def step(params, dense_os, state, table_os, ids, labels):
        def loss_fn(params, table):
            out, new_state = emb.apply(dataclasses.replace(state, table=table), ids)
            logits = model.apply(params, out.reshape(out.shape[0], -1))
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), new_state

        (loss, new_state), (gp, gt) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
            params, state.table
        )
        up, dense_os = dense_opt.update(gp, dense_os, params)
        params = optax.apply_updates(params, up)
        ut, table_os = table_opt.update(gt, table_os, state.table)
        new_state = dataclasses.replace(new_state, table=optax.apply_updates(state.table, ut))
        return params, dense_os, new_state, table_os, loss

    step = jax.jit(
        step,
        in_shardings=(params_sh, dense_os_sh, state_sh, table_os_sh, batch_sh, batch_sh),
        out_shardings=(params_sh, dense_os_sh, state_sh, table_os_sh, repl),
        donate_argnums=(0, 1, 2, 3),
    )

    # Synthetic task: each key has a hidden score; the label says whether the
    # sample's keys sum to a positive score.
    rng = np.random.default_rng(2024)
    score = rng.normal(size=vocab)
    losses = []
    for _ in range(steps):
        ids = rng.integers(0, vocab, size=(TR_BATCH, SLOTS, TR_NNZ))
        ids[rng.random(ids.shape) < 0.3] = -1
        s = np.where(ids >= 0, score[np.maximum(ids, 0)], 0.0).sum(axis=(1, 2))
        labels = (s > 0).astype(np.float32)
        ids = jax.device_put(ids.astype(np.int32), batch_sh)
        labels = jax.device_put(labels, batch_sh)
        params, dense_os, state, table_os, loss = step(
            params, dense_os, state, table_os, ids, labels
        )
        losses.append(float(loss))
    assert state.table.sharding.is_equivalent_to(emb.table_sharding, 2)
    np.testing.assert_array_equal(np.asarray(state.stats.overflow), 0)
    return np.asarray(losses), to_logical(state.table, n)


@functools.lru_cache(maxsize=None)
def trained(n: int):
    return _train(n, TR_STEPS)


def test_training_step_loss_falls():
    require_devices(8)
    losses, _ = trained(8)
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.6 * losses[0], losses


def test_training_same_on_one_and_eight_devices():
    require_devices(8)
    losses8, table8 = trained(8)
    losses1, table1 = trained(1)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table8, table1, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------
# Trace-time errors.


def _trace(emb, state, ids, weights=None):
    """Traces apply without running it."""
    return jax.eval_shape(lambda s, i, w: emb.apply(s, i, w), state, ids, weights)


def test_trace_time_errors():
    n = 4
    require_devices(n)
    emb = make_emb(n, "mean", max_nnz=4)
    state = initial_state(n)
    good = np.zeros((8, SLOTS, 4), np.int32)
    out = _trace(emb, state, good)[0]
    assert out.shape == (8, SLOTS, DIM)

    with pytest.raises(ValueError, match="slot_num"):
        _trace(emb, state, np.zeros((8, SLOTS + 1, 4), np.int32))
    with pytest.raises(ValueError, match="max_nnz"):
        _trace(emb, state, np.zeros((8, SLOTS, 5), np.int32))
    with pytest.raises(ValueError, match="slot_num"):
        _trace(emb, state, np.zeros((8, SLOTS * 4), np.int32))
    with pytest.raises(ValueError, match="divisible"):
        _trace(emb, state, np.zeros((6, SLOTS, 4), np.int32))
    with pytest.raises(ValueError, match="key_dtype"):
        _trace(emb, state, np.zeros((8, SLOTS, 4), np.uint32))
    with pytest.raises(ValueError, match="int32, uint32 or int64"):
        _trace(emb, state, np.zeros((8, SLOTS, 4), np.float32))
    with pytest.raises(ValueError, match="int32, uint32 or int64"):
        _trace(emb, state, np.zeros((8, SLOTS, 4), np.int16))
    with pytest.raises(ValueError, match="weights"):
        _trace(emb, state, good, np.ones((8, SLOTS, 3), np.float32))
    with pytest.raises(ValueError, match="ragged"):
        emb.apply(
            state,
            sok_jax.RaggedIds.from_lengths(np.zeros(4, np.int32), np.ones((4, SLOTS), np.int32)),
        )
    # int64 without x64: never silently truncated.
    with pytest.raises(ValueError, match="jax_enable_x64"):
        emb.apply(state, np.zeros((8, SLOTS, 4), np.int64))
    with pytest.raises(ValueError, match="jax_enable_x64"):
        make_emb(n, "mean", key_dtype=jnp.int64)
    u = make_emb(n, "mean", max_nnz=4, key_dtype=jnp.uint32)
    with pytest.raises(ValueError, match="key_dtype"):
        _trace(u, state, good)


def test_sok_defaults():
    """SOK's defaults: hash mode, int64 keys under jax_enable_x64 and int32
    otherwise; a key past any direct-mode table is a row of its own, found
    again with the vector it was given."""
    require_devices(2)
    emb = DistributedEmbedding("sum", 8, DIM, mesh=mesh_of(2), axis_name=AXIS)
    assert emb.use_hashtable and emb.key_dtype == jnp.int32
    with jax.enable_x64(True):
        wide = DistributedEmbedding("sum", 8, DIM, mesh=mesh_of(2), axis_name=AXIS)
    assert wide.use_hashtable and wide.key_dtype == jnp.int64
    rng = np.random.default_rng()
    keys = rng.choice(np.arange(10**6, 2 * 10**6), size=(4, 1, 1), replace=False)
    sh = NamedSharding(mesh_of(2), P(AXIS))
    ids = jax.device_put(jnp.asarray(keys, jnp.int32), sh)
    out, state = jax.jit(emb.apply, static_argnames="training")(emb.init(0), ids, training=True)
    assert int(np.sum(state.stats.invalid)) == 0 and np.all(np.any(np.asarray(out) != 0, -1))
    got_keys, vecs = emb.export_pairs(state)
    np.testing.assert_array_equal(got_keys, np.sort(keys.ravel()))
    order = np.argsort(keys.ravel())
    np.testing.assert_array_equal(vecs, np.asarray(out).reshape(4, DIM)[order])


def test_constructor_errors():
    require_devices(2)
    with pytest.raises(ValueError, match="combiner"):
        make_emb(2, "max")
    with pytest.raises(ValueError, match="capacity_factor"):
        make_emb(2, "sum", capacity_factor=0.0)
    with pytest.raises(ValueError, match="axis_name"):
        DistributedEmbedding("sum", 8, DIM, mesh=mesh_of(2), axis_name="nope", use_hashtable=False)
    with pytest.raises(ValueError, match="max_nnz"):
        make_emb(2, "sum", max_nnz=0)
    with pytest.raises(ValueError, match="embedding_vec_size"):
        DistributedEmbedding("sum", 8, 0, mesh=mesh_of(2), axis_name=AXIS, use_hashtable=False)
    with pytest.raises(ValueError, match="embedding_vec_size must be a positive integer, got 2.5"):
        DistributedEmbedding(
            "sum", 8, 2.5, mesh=mesh_of(2), axis_name=AXIS, use_hashtable=False
        )  # not truncated to 2
    with pytest.raises(ValueError, match="weights must be floating"):
        emb = make_emb(2, "sum")
        emb.apply(
            emb.init(0), np.zeros((4, SLOTS, NNZ), np.int32), np.ones((4, SLOTS, NNZ), np.int32)
        )


def _boundary_lines(text):
    """Lines of lowered StableHLO where values enter or leave a shard_map
    body (Shardy's manual_computation / sdy.return, GSPMD's shmap_body)."""
    keys = ("manual_computation", "sdy.return", "shmap_body")
    return [line for line in text.splitlines() if any(k in line for k in keys)]


@pytest.mark.parametrize("hash_mode", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_no_zero_size_array_crosses_shard_map(hash_mode, weighted):
    """XLA's GPU compiler (jax 0.11.2, Shardy) segfaults on a zero-size array
    that travels between shard_map bodies: none of the layer's programs (dense
    grad, sparse step, apply) may have one on a shard_map boundary."""
    n = 2
    require_devices(n)
    kw = dict(use_hashtable=True, key_dtype=jnp.int32) if hash_mode else {}
    emb = make_emb(n, "mean", **kw)
    state = emb.init(0)
    ids = jnp.asarray(make_ids("mixed", np.random.default_rng(0), n), jnp.int32)
    w = jnp.ones(ids.shape, jnp.float32) if weighted else None
    opt = sok_jax.optim.adagrad(0.1)
    opt_state = emb.init_optimizer(opt, state)

    def dense(table):
        out, _ = emb.apply(dataclasses.replace(state, table=table), ids, w)
        return jnp.sum(out)

    def sparse(state, opt_state):
        out, ctx, state = emb.lookup(state, ids, w)
        return emb.apply_gradients(state, opt, opt_state, emb.sparse_grad(ctx, out))

    programs = {
        "grad": jax.jit(jax.grad(dense)).lower(state.table),
        "sparse step": jax.jit(sparse).lower(state, opt_state),
        "apply": jax.jit(lambda s: emb.apply(s, ids, w)).lower(state),
    }
    for name, lowered in programs.items():
        lines = _boundary_lines(lowered.as_text())
        assert lines, f"{name}: no shard_map boundary found in the lowered program"
        bad = [line.strip()[:200] for line in lines if "tensor<0x" in line]
        assert not bad, f"{name}: zero-size array on a shard_map boundary: {bad}"


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad", "adam", "ftrl"])
def test_init_optimizer_slots(n, name):
    """init_optimizer gives optimizer.init's values, slots sharded like the
    table's rows, and every leaf in a buffer of its own on every device, also
    across calls (a step donates them all; a shared buffer could not be
    donated twice). On the GPU this guards the plain fills of the slot
    initializers against constant buffers shared between calls."""
    require_devices(n)
    emb = make_emb(n, "sum")
    state = emb.init(0)
    # A table of random values: `init` may read it (it only needs the shape).
    state = dataclasses.replace(
        state,
        table=jax.device_put(
            np.random.default_rng().standard_normal(state.table.shape).astype(np.float32),
            state.table.sharding,
        ),
    )
    opt = sok_jax.optim.by_name(name, 0.1)
    got = emb.init_optimizer(opt, state)
    want = opt.init(np.asarray(state.table))
    assert len(got.slots) == len(want.slots) >= 1
    for g, w in zip(got.slots, want.slots):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        # Each device holds the slot rows of its own table rows.
        rows_of = {s.device: s.index[0] for s in state.table.addressable_shards}
        assert {s.device: s.index[0] for s in g.addressable_shards} == rows_of
    assert int(got.count) == int(want.count) == 0
    # A second call (another table's optimizer, say) gets buffers of its own too.
    again = emb.init_optimizer(opt, state)
    leaves = [state.table, *got.slots, *again.slots]
    for d in emb.mesh.devices.flat:
        ptrs = [
            s.data.unsafe_buffer_pointer()
            for x in leaves
            for s in x.addressable_shards
            if s.device == d
        ]
        assert len(set(ptrs)) == len(ptrs), f"{name}: leaves share a buffer on {d}"


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"])
def test_sparse_update_is_sparse_grad_then_apply(n, name):
    """`sparse_update` (the backward fused with the optimizer on each owner)
    gives the same table and slots as `apply_gradients(sparse_grad(...))`
    over several steps with duplicates across devices, and the step runs
    the fused target for every optimizer (the one-device path and the
    exchange path)."""
    require_devices(n)
    emb = make_emb(n, "sqrtn")
    opt = sok_jax.optim.by_name(name, 0.05)
    rng = np.random.default_rng()
    st_a = st_b = emb.init(int(rng.integers(1 << 30)))
    os_a, os_b = emb.init_optimizer(opt, st_a), emb.init_optimizer(opt, st_b)
    t0 = np.asarray(st_a.table)

    def two_step(state, opt_state, ids, w, cot):
        out, ctx, state = emb.lookup(state, ids, w)
        return emb.apply_gradients(state, opt, opt_state, emb.sparse_grad(ctx, cot))

    def fused(state, opt_state, ids, w, cot):
        out, ctx, state = emb.lookup(state, ids, w)
        return emb.sparse_update(state, opt, opt_state, ctx, cot)

    two_step_j, fused_j = jax.jit(two_step), jax.jit(fused)
    for step in range(3):
        ids = jnp.asarray(make_ids("mixed", rng, n), jnp.int32)
        w = jnp.asarray(rng.uniform(0.5, 1.5, ids.shape), jnp.float32)
        cot = jnp.asarray(rng.normal(size=(ids.shape[0], SLOTS, DIM)), jnp.float32)
        if step == 0:
            hlo = fused_j.lower(st_b, os_b, ids, w, cot).as_text()
            assert "sok_embed_bwd_update" in hlo, name
        st_a, os_a = two_step_j(st_a, os_a, ids, w, cot)
        st_b, os_b = fused_j(st_b, os_b, ids, w, cot)
        np.testing.assert_allclose(
            np.asarray(st_b.table),
            np.asarray(st_a.table),
            rtol=1e-6,
            atol=1e-7,
            err_msg=f"step {step}",
        )
        for a, b in zip(os_a.slots, os_b.slots):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
        assert int(os_b.count) == int(os_a.count) == step + 1
    assert not np.array_equal(np.asarray(st_b.table), t0)
