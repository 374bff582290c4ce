"""The conveniences a new user reaches for: a collection's export of every
table at once (round-tripping through `import_pairs` onto another device
count), `sok_jax.pad_batch` for the last, short batch, the printed plan
naming the batch it assumes, and one `training` default everywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from jax.experimental import sparse as jsparse

import sok_jax
from sok_jax import optim

TABLES = (
    ("item", 2000, 8, {}),
    ("tag", 400, 4, {"combiner": "sum", "use_hashtable": True}),
    ("country", 30, 4, {"placement": "replicated"}),
)


def collection(n):
    tables = [sok_jax.TableSpec(name, v, d, **kw) for name, v, d, kw in TABLES]
    features = [
        sok_jax.FeatureSpec("item", "item", max_nnz=3),
        sok_jax.FeatureSpec("tag", "tag", max_nnz=2),
        sok_jax.FeatureSpec("country", "country"),
    ]
    return sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(n), axis_name=AXIS)


def random_batch(rng, size=16):
    return {
        "item": rng.integers(-1, 2000, (size, 3), dtype=np.int32),
        "tag": rng.integers(-1, 10**6, (size, 2), dtype=np.int32),
        "country": rng.integers(0, 30, (size, 1), dtype=np.int32),
    }


def assert_exports_equal(got, want):
    assert set(got) == set(want)
    for t in want:
        g, w = got[t], want[t]
        if isinstance(w, sok_jax.TableExport):
            assert isinstance(g, sok_jax.TableExport)
            assert len(g.slots) == len(w.slots)
            for a, b in zip(g.slots, w.slots):
                np.testing.assert_array_equal(a, b)
            g, w = (g.keys, g.vectors), (w.keys, w.vectors)
        np.testing.assert_array_equal(g[0], w[0])
        np.testing.assert_array_equal(g[1], w[1])


def test_export_all_tables_round_trips_onto_another_device_count():
    require_devices(8)
    rng = np.random.default_rng()
    coll8, coll4 = collection(8), collection(4)
    opt = optim.adagrad(0.1)
    state = coll8.init(seed=3)
    opt_state = coll8.init_optimizer(opt, state)
    outs, ctx, state = coll8.lookup(state, random_batch(rng))  # trained, tags inserted
    state, opt_state = coll8.sparse_update(state, opt, opt_state, ctx, outs)

    everything = coll8.export_pairs(state)
    assert set(everything) == {name for name, *_ in TABLES}
    assert_exports_equal(everything, {t: coll8.export_pairs(state, t) for t in everything})
    assert len(everything["tag"][0]) > 0

    state4 = coll4.import_pairs(everything)
    assert_exports_equal(coll4.export_pairs(state4), everything)
    probe = random_batch(rng)
    want, _ = coll8.apply(state, probe, training=False)
    got, _ = coll4.apply(state4, probe, training=False)
    for f in want:
        np.testing.assert_allclose(np.asarray(got[f]), np.asarray(want[f]), rtol=1e-6, atol=1e-7)

    full = coll8.export_pairs(state, opt_state=opt_state)
    assert all(isinstance(x, sok_jax.TableExport) for x in full.values())
    state4, opt4 = coll4.import_pairs(full, optimizer=opt)
    assert_exports_equal(coll4.export_pairs(state4, opt_state=opt4), full)


def test_pad_batch_pads_with_no_key_and_masks_the_real_samples():
    require_devices(8)
    rng = np.random.default_rng()
    emb = sok_jax.DistributedEmbedding(
        "sum", 64, 4, slot_num=3, max_nnz=2, use_hashtable=False, mesh=mesh_of(8), axis_name=AXIS
    )
    ids = rng.integers(-1, emb.num_rows, (61, 3, 2), dtype=np.int32)
    w = rng.random((61, 3, 2), dtype=np.float32)
    u = rng.integers(0, 9, (61, 2)).astype(np.uint32)
    p = sok_jax.pad_batch({"ids": ids, "w": w, "u": u, "labels": np.ones(61, np.float32)}, 8)
    assert isinstance(p, sok_jax.PaddedBatch) and p.count == 61
    np.testing.assert_array_equal(p.mask, np.arange(64) < 61)
    b = p.batch
    assert all(isinstance(x, np.ndarray) and x.shape[0] == 64 for x in b.values())
    np.testing.assert_array_equal(b["ids"][:61], ids)
    np.testing.assert_array_equal(b["ids"][61:], -1)
    np.testing.assert_array_equal(b["w"][61:], 0)
    np.testing.assert_array_equal(b["u"][61:], np.uint32(0xFFFFFFFF))
    np.testing.assert_array_equal(b["labels"], p.mask)

    # The padded batch through the layer: the real samples as the one-shard
    # embed of the logical table computes them, the padding zeros, uncounted.
    state = emb.init(seed=1)
    out, st = emb.apply(state, b["ids"], b["w"])
    table = jnp.asarray(emb.logical_rows(state, np.arange(emb.num_rows)))
    want = sok_jax.embed(table, ids, combiner="sum", weights=w)
    np.testing.assert_allclose(np.asarray(out)[p.mask], np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out)[~p.mask], 0)
    assert int(np.sum(np.asarray(st.stats.invalid))) == int(np.sum(ids >= emb.num_rows))

    # Jax arrays stay jax arrays; a multiple already met adds nothing.
    same = sok_jax.pad_batch(jnp.asarray(ids[:56]), 8)
    assert isinstance(same.batch, jax.Array) and same.count == 56 and same.mask.all()

    # Ragged ids get empty bags.
    lengths = rng.integers(0, 3, (5, 2))
    values = rng.integers(0, emb.num_rows, int(lengths.sum()) + 3).astype(np.int32)
    rag = sok_jax.RaggedIds.from_lengths(values, lengths)
    pr = sok_jax.pad_batch(rag, 4)
    assert pr.count == 5 and pr.batch.offsets.shape == (8 * 2 + 1,)
    got = np.asarray(sok_jax.embed(table, pr.batch, combiner="sum"))
    np.testing.assert_allclose(got[:5], np.asarray(sok_jax.embed(table, rag, combiner="sum")))
    np.testing.assert_array_equal(got[5:], 0)


def test_pad_batch_refuses_what_it_cannot_pad():
    ids = np.zeros((6, 1, 1), np.int32)
    with pytest.raises(ValueError, match="same number of samples"):
        sok_jax.pad_batch({"a": ids, "b": np.zeros(5)}, 4)
    with pytest.raises(ValueError, match="same number of samples"):
        sok_jax.pad_batch({}, 4)
    with pytest.raises(ValueError, match="not BCOO"):
        sok_jax.pad_batch(jsparse.BCOO.fromdense(ids.reshape(6, 1)), 4)
    with pytest.raises(ValueError, match="multiple must be a positive integer"):
        sok_jax.pad_batch(ids, 0)
    with pytest.raises(ValueError, match="leading sample axis"):
        sok_jax.pad_batch({"a": ids, "step": 3}, 4)


def test_printed_plan_names_the_batch_it_assumes():
    require_devices(8)
    text = str(collection(8).plan)
    assert "at a global batch of 131,072\n" in text
    assert "the batch the costs assume: EmbeddingCollection(batch_size=...)" in text
    tables = [sok_jax.TableSpec("t", 100, 4)]
    coll = sok_jax.EmbeddingCollection(
        tables, [sok_jax.FeatureSpec("t", "t")], mesh=mesh_of(8), axis_name=AXIS, batch_size=4096
    )
    assert coll.plan.batch_size == 4096 and "global batch of 4,096" in str(coll.plan)


def test_training_default_is_the_same_for_the_layer_and_the_modules():
    """apply, lookup and ShardedEmbedding.__call__ train by default (a hash
    table inserts); training=False only looks up and leaves the table."""
    require_devices(8)
    nnx_mod = pytest.importorskip("sok_jax.flax")
    emb = sok_jax.DistributedEmbedding(
        "sum", 16, 4, slot_num=2, mesh=mesh_of(8), axis_name=AXIS, eviction="lru"
    )
    ids = np.random.default_rng().integers(0, 10**6, (8, 2, 1), dtype=np.int32)
    module = nnx_mod.ShardedEmbedding(emb, seed=2)
    before = emb.export_pairs(module.state)
    module(ids, training=False)
    np.testing.assert_array_equal(emb.export_pairs(module.state)[0], before[0])
    _, want = emb.apply(emb.init(2), ids)
    module(ids)
    keys = emb.export_pairs(module.state)[0]
    np.testing.assert_array_equal(keys, emb.export_pairs(want)[0])
    np.testing.assert_array_equal(keys, np.unique(ids))
