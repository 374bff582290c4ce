"""NaN and Inf cotangents in the sharded layers: `stats.nonfinite` counts
them per device, `check_stats` names them, and `skip_nonfinite=True` leaves
every row they reach (and its optimizer slots) as it was while the other
touched rows train exactly as without the flag.

Oracles: the per-device counts from numpy over each device's share of the
batch; the rows a poisoned bag reaches from the ids in numpy; the clean rows
from the same step without the flag (rows are updated independently)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sok_jax
from sok_jax import optim

DIM, BATCH, SLOTS, NNZ = 4, 16, 2, 3


def _sharded(mesh, x):
    return jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(AXIS)))


def _poison(rng, shape, n_bad):
    """Random cotangents with `n_bad` distinct vectors holding a NaN, +Inf or
    -Inf; returns (cotangent, flat indices of the poisoned vectors)."""
    d = rng.normal(size=shape).astype(np.float32)
    flat = d.reshape(-1, shape[-1])
    bad = rng.choice(flat.shape[0], size=n_bad, replace=False)
    for j, b in enumerate(bad):
        flat[b, rng.integers(shape[-1])] = (np.nan, np.inf, -np.inf)[j % 3]
    return d, bad


def _per_device(d, n):
    bad = ~np.all(np.isfinite(d), axis=-1).reshape(n, -1)
    return bad.sum(axis=1)


@pytest.mark.parametrize("use_hashtable", [False, True])
@pytest.mark.parametrize("n", [1, 8])
def test_layer_counts_and_skips(n, use_hashtable):
    require_devices(n)
    rng = np.random.default_rng()
    mesh = mesh_of(n)
    emb = sok_jax.DistributedEmbedding(
        max_vocabulary_size_per_gpu=512 // n,
        embedding_vec_size=DIM,
        slot_num=SLOTS,
        max_nnz=NNZ,
        mesh=mesh,
        axis_name=AXIS,
        use_hashtable=use_hashtable,
    )
    guarded, plain = optim.adagrad(0.1, skip_nonfinite=True), optim.adagrad(0.1)
    ids_np = rng.integers(0, 200, size=(BATCH, SLOTS, NNZ)).astype(np.int32)
    ids = _sharded(mesh, ids_np)
    d_np, bad = _poison(rng, (BATCH, SLOTS, DIM), 3)

    def step(opt):
        state = emb.init(jax.random.key(3))
        opt_state = emb.init_optimizer(opt, state)

        @jax.jit
        def run(state, opt_state, ids, d):
            _, ctx, state = emb.lookup(state, ids)
            return emb.sparse_update(state, opt, opt_state, ctx, d)

        before = emb.export_pairs(
            run(state, opt_state, ids, _sharded(mesh, np.zeros_like(d_np)))[0]
        )
        state, opt_state = run(state, opt_state, ids, _sharded(mesh, d_np))
        return state, before

    state, before = step(guarded)
    poisoned_state, _ = step(plain)
    np.testing.assert_array_equal(np.asarray(state.stats.nonfinite), _per_device(d_np, n))
    with pytest.raises(sok_jax.EmbeddingError, match="3 cotangent vector"):
        sok_jax.check_stats(state)

    keys, vecs = emb.export_pairs(state)
    _, vecs_plain = emb.export_pairs(poisoned_state)
    b_keys, b_vecs = before
    reached = np.unique(ids_np.reshape(BATCH * SLOTS, NNZ)[bad])
    at = np.isin(keys, reached)
    assert at.any() and (~at).any()
    # Vectors after a zero-cotangent Adagrad step are the initial ones.
    np.testing.assert_array_equal(keys, b_keys)
    np.testing.assert_array_equal(vecs[at], b_vecs[at])
    assert not np.all(np.isfinite(vecs_plain[at]))
    np.testing.assert_array_equal(vecs[~at], vecs_plain[~at])


def test_collection_counts_per_table():
    require_devices(8)
    rng = np.random.default_rng()
    mesh = mesh_of(8)
    coll = sok_jax.EmbeddingCollection(
        [
            sok_jax.TableSpec("a", 300, DIM, combiner="sum"),
            sok_jax.TableSpec("b", 200, DIM, combiner="mean", placement="table"),
        ],
        [
            sok_jax.FeatureSpec("fa", "a", 2),
            sok_jax.FeatureSpec("fa2", "a", 1),
            sok_jax.FeatureSpec("fb", "b", 3),
        ],
        mesh=mesh,
        axis_name=AXIS,
        batch_size=BATCH,
    )
    opt = optim.sgd(0.1, skip_nonfinite=True)
    state = coll.init(jax.random.key(0))
    opt_state = coll.init_optimizer(opt, state)
    nnz = {"fa": 2, "fa2": 1, "fb": 3}
    vocab = {"fa": 300, "fa2": 300, "fb": 200}
    batch = {f: _sharded(mesh, rng.integers(0, vocab[f], (BATCH, k))) for f, k in nnz.items()}
    batch = {f: v.astype(jnp.int32) for f, v in batch.items()}
    d = {f: _poison(rng, (BATCH, DIM), k)[0] for f, k in (("fa", 2), ("fa2", 1), ("fb", 0))}

    @jax.jit
    def run(state, opt_state, batch, d):
        _, ctx, state = coll.lookup(state, batch)
        return coll.sparse_update(state, opt, opt_state, ctx, d)

    state, _ = run(state, opt_state, batch, {f: _sharded(mesh, v) for f, v in d.items()})
    want_a = _per_device(d["fa"], 8) + _per_device(d["fa2"], 8)
    np.testing.assert_array_equal(np.asarray(state.stats["a"].nonfinite), want_a)
    np.testing.assert_array_equal(np.asarray(state.stats["b"].nonfinite), np.zeros(8))
    with pytest.raises(sok_jax.EmbeddingError, match="table 'a': 3 cotangent"):
        sok_jax.check_stats(state)
