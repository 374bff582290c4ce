"""Eager calls of the sharded layers run one compiled program per layer and
input shapes (`sok_jax/distributed/eager.py`): as fast as a jitted call
after the first, bit-identical to it, never donating, never retracing for
new values, and checked on the host with `check=True`."""

from __future__ import annotations

import copy
import gc
import logging
import time
import warnings
import weakref

import jax
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices

import sok_jax
from sok_jax import optim
from sok_jax.distributed.eager import eager_cache

N = 8


def readme_layer(**kw):
    """The layer of README.md's "API in one screen"."""
    return sok_jax.DistributedEmbedding(
        combiner="mean",
        max_vocabulary_size_per_gpu=100_000,
        embedding_vec_size=16,
        slot_num=26,
        max_nnz=1,
        use_hashtable=False,
        mesh=mesh_of(N),
        axis_name=AXIS,
        **kw,
    )


def readme_ids(emb, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, emb.num_rows, (64, 26, 1), dtype=np.int32)


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class CompileLog(logging.Handler):
    """The names of the programs jax compiles while installed
    (`jax.log_compiles`)."""

    def __init__(self):
        super().__init__()
        self.compiled = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.compiled.append(msg.split()[1])

    def __enter__(self):
        self._ctx = jax.log_compiles()
        self._ctx.__enter__()
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        self._ctx.__exit__(*exc)


def test_eager_apply_is_fast_and_equals_jit():
    """The README's layer: after its first call an eager apply takes about
    what a jitted one does (the bound is generous for a loaded CI machine;
    op by op it took 5-10 s), and gives the jitted result bit for bit."""
    require_devices(N)
    emb = readme_layer()
    state = emb.init(seed=0)
    times = []
    for i in range(4):
        ids = readme_ids(emb, i)
        t0 = time.perf_counter()
        out, new = jax.block_until_ready(emb.apply(state, ids))
        times.append(time.perf_counter() - t0)
        want_out, want_state = jax.jit(emb.apply)(state, ids)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
        assert_trees_equal(new, want_state)
    assert float(np.median(times[1:])) < 2.0, times


def test_second_eager_call_does_not_retrace():
    """New values of the same shapes compile nothing; a new batch size
    compiles once more; the method's jit is cached on the instance."""
    require_devices(N)
    emb = sok_jax.DistributedEmbedding(
        "sum", 64, 8, slot_num=3, max_nnz=2, use_hashtable=True, mesh=mesh_of(N), axis_name=AXIS
    )
    state = emb.init(seed=1)
    rng = np.random.default_rng(0)
    with CompileLog() as log:
        state = emb.apply(state, rng.integers(0, 10**6, (16, 3, 2), dtype=np.int32))[1]
        assert "jit(apply)" in log.compiled
        log.compiled.clear()
        for _ in range(2):
            state = emb.apply(state, rng.integers(0, 10**6, (16, 3, 2), dtype=np.int32))[1]
        assert log.compiled == []
        emb.apply(state, rng.integers(0, 10**6, (32, 3, 2), dtype=np.int32))
        assert log.compiled == ["jit(apply)"]
    assert set(eager_cache(emb).jits) == {"apply"}
    assert eager_cache(emb).jits["apply"]._cache_size() == 2


def test_eager_sparse_step_equals_jit_and_donates_nothing():
    """lookup + sparse_update eagerly (a hash table with eviction) equal the
    jitted step, and the caller's state and optimizer state stay alive."""
    require_devices(N)
    emb = sok_jax.DistributedEmbedding(
        "mean",
        32,
        4,
        slot_num=2,
        max_nnz=3,
        use_hashtable=True,
        mesh=mesh_of(N),
        axis_name=AXIS,
        eviction="lru",
    )
    opt = optim.adagrad(0.1)
    state = emb.init(seed=2)
    opt_state = emb.init_optimizer(opt, state)

    def step(state, opt_state, ids):
        out, ctx, state = emb.lookup(state, ids)
        return emb.sparse_update(state, opt, opt_state, ctx, out * 2.0 + 1.0)

    jitted = jax.jit(step)
    rng = np.random.default_rng(3)
    for _ in range(3):
        ids = rng.integers(-1, 400, (16, 2, 3), dtype=np.int32)
        got = step(state, opt_state, ids)
        want = jitted(state, opt_state, ids)
        assert_trees_equal(got, want)
        assert not any(x.is_deleted() for x in jax.tree.leaves((state, opt_state)))
        state, opt_state = got
    assert {"lookup", "sparse_update"} <= set(eager_cache(emb).jits)


def test_eager_check_raises_once_and_does_not_warn():
    """check=True: an eager call raises EmbeddingError with the valid new
    state (no in-program warning besides); a jitted call warns instead."""
    require_devices(N)
    emb = readme_layer(check=True)
    state = emb.init(seed=0)
    ids = readme_ids(emb, 0)
    ids[0, 0, 0] = emb.num_rows + 5  # not a row: skipped and counted
    with warnings.catch_warnings():
        warnings.simplefilter("error", sok_jax.EmbeddingWarning)
        with pytest.raises(sok_jax.EmbeddingError, match="neither padding") as err:
            emb.apply(state, ids)
    assert int(np.sum(np.asarray(err.value.state.stats.invalid))) == 1
    np.testing.assert_array_equal(np.asarray(err.value.state.table), np.asarray(state.table))
    with pytest.warns(sok_jax.EmbeddingWarning, match="neither padding"):
        jax.block_until_ready(jax.jit(emb.apply)(state, ids))


def test_eager_keeps_the_host_checks():
    """What jit would convert silently still reaches the method's checks:
    int64 ids without x64 are refused eagerly as before."""
    require_devices(N)
    emb = readme_layer()
    state = emb.init(seed=0)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        emb.apply(state, readme_ids(emb, 0).astype(np.int64))


def test_eager_cache_is_per_layer_and_freed():
    """Two layers of other sizes (and a copy of one) each run their own
    program, and a layer's compiled methods die with it."""
    require_devices(N)
    mesh = mesh_of(N)
    a = sok_jax.DistributedEmbedding("sum", 16, 4, slot_num=1, use_hashtable=False, mesh=mesh)
    b = sok_jax.DistributedEmbedding("sum", 16, 8, slot_num=1, use_hashtable=False, mesh=mesh)
    ids = np.arange(8, dtype=np.int32).reshape(8, 1, 1)
    assert a.apply(a.init(0), ids)[0].shape == (8, 1, 4)
    assert b.apply(b.init(0), ids)[0].shape == (8, 1, 8)
    assert eager_cache(a).jits["apply"] is not eager_cache(b).jits["apply"]
    c = copy.copy(b)  # shares b's attributes, not its compiled methods
    assert c.apply(c.init(0), ids)[0].shape == (8, 1, 8)
    assert eager_cache(c).jits["apply"] is not eager_cache(b).jits["apply"]
    gone = weakref.ref(a)
    del a
    gc.collect()
    assert gone() is None


def test_eager_collection_and_module():
    """An EmbeddingCollection and the NNX module over it: eager calls equal
    the jitted ones, through one cached program each."""
    require_devices(N)
    flax_mod = pytest.importorskip("sok_jax.flax")
    tables = [
        sok_jax.TableSpec("item", 2000, 8),
        sok_jax.TableSpec("tag", 500, 4, combiner="sum", use_hashtable=True),
        sok_jax.TableSpec("country", 30, 4, placement="replicated"),
    ]
    features = [
        sok_jax.FeatureSpec("item", "item", max_nnz=3),
        sok_jax.FeatureSpec("tag", "tag", max_nnz=2),
        sok_jax.FeatureSpec("country", "country"),
    ]
    coll = sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(N), axis_name=AXIS)
    rng = np.random.default_rng(5)

    def batch():
        return {
            "item": rng.integers(-1, 2000, (16, 3), dtype=np.int32),
            "tag": rng.integers(-1, 10**6, (16, 2), dtype=np.int32),
            "country": rng.integers(0, 30, (16, 1), dtype=np.int32),
        }

    state = coll.init(seed=0)
    for _ in range(2):
        b = batch()
        assert_trees_equal(coll.apply(state, b), jax.jit(coll.apply)(state, b))
    module = flax_mod.ShardedEmbedding(coll, seed=0)
    b = batch()
    want, want_state = jax.jit(coll.apply)(module.state, b)
    with CompileLog() as log:
        assert_trees_equal(module(b), want)  # training=True, as coll.apply's default
        assert log.compiled == []  # the collection's apply ran eagerly before
    assert_trees_equal(module.state, want_state)
