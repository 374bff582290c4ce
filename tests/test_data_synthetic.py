"""sok_jax.data.SyntheticCriteo: batches made on the device from (seed, step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sok_jax import data

FEATURES = data.criteo_features(scale=1e-3)  # 40,000 rows for the large ones


def _np(batch):
    return jax.tree.map(np.asarray, batch)


def test_deterministic_for_a_seed_and_a_step():
    gen = data.SyntheticCriteo(FEATURES, 512, seed=3)
    make = jax.jit(gen.batch)
    a, b = _np(make(5)), _np(make(5))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # The same batch from a fresh generator, from eager code, and from a traced step.
    again = _np(data.SyntheticCriteo(FEATURES, 512, seed=3).batch(jnp.int32(5)))
    np.testing.assert_array_equal(again.sparse["cat_0"], a.sparse["cat_0"])
    np.testing.assert_array_equal(again.labels, a.labels)
    other_step, other_seed = _np(make(6)), _np(data.SyntheticCriteo(FEATURES, 512, seed=4).batch(5))
    assert not np.array_equal(other_step.sparse["cat_0"], a.sparse["cat_0"])
    assert not np.array_equal(other_seed.sparse["cat_0"], a.sparse["cat_0"])
    held = _np(jax.jit(gen.eval_batch)(5))
    assert not np.array_equal(held.sparse["cat_0"], a.sparse["cat_0"])


@pytest.mark.parametrize("multi_hot", [False, True], ids=["one-hot", "multi-hot"])
def test_shapes_dtypes_and_ranges(multi_hot):
    feats = data.criteo_features(scale=1e-3, multi_hot=multi_hot)
    gen = data.SyntheticCriteo(feats, 256)
    b = _np(jax.jit(gen.batch)(0))
    assert b.dense.shape == (256, 13) and b.dense.dtype == np.float32
    assert np.all(np.isfinite(b.dense)) and b.dense.min() >= np.log(3.0) - 1e-6
    assert b.labels.shape == (256,) and b.labels.dtype == np.float32
    assert set(np.unique(b.labels)) <= {0.0, 1.0}
    assert sorted(b.sparse) == sorted(f.name for f in feats)
    for f in feats:
        ids = b.sparse[f.name]
        assert ids.shape == (256, f.nnz) and ids.dtype == np.int32
        assert ids.min() >= 0 and ids.max() < f.cardinality, f


def test_keys_stay_within_full_size_cardinalities():
    """40M-row features: float32 ranks with their low bits filled in, and the
    uint32 bijection, stay in range and reach beyond float32's spacing."""
    big = [data.SparseFeature("big", 40_000_000, 4), data.SparseFeature("tiny", 3, 1)]
    gen = data.SyntheticCriteo(big, 1 << 15, alpha=1.01)
    b = _np(jax.jit(gen.batch)(0))
    ids = b.sparse["big"]
    assert ids.min() >= 0 and ids.max() < 40_000_000
    assert np.any(ids % 4 != ids[0, 0] % 4)  # not stuck on float32's grid of 4
    assert set(np.unique(b.sparse["tiny"])) <= {0, 1, 2}


def test_power_law_skew_is_visible():
    gen = data.SyntheticCriteo(FEATURES, 1 << 16)
    b = _np(jax.jit(gen.batch)(0))
    ids = b.sparse["cat_0"][:, 0]  # 40,000 rows
    _, counts = np.unique(ids, return_counts=True)
    assert counts.max() > 100 * np.median(counts), (counts.max(), np.median(counts))
    # ...and the hot ids are spread over the table, not packed at row 0.
    top = np.argsort(-np.bincount(ids, minlength=40_000))[:20]
    assert top.max() - top.min() > 1000
    # A steeper law is more skewed.
    steep = data.SyntheticCriteo(FEATURES, 1 << 16, alpha=1.5)
    s_ids = np.asarray(jax.jit(steep.batch)(0).sparse["cat_0"])
    assert np.unique(s_ids).size < np.unique(ids).size


def test_labels_follow_the_planted_model():
    gen = data.SyntheticCriteo(FEATURES, 1 << 14, seed=1)
    b = jax.jit(gen.batch)(0)
    logits = np.asarray(jax.jit(gen.planted_logits)(b))
    labels = np.asarray(b.labels)
    auc = data.roc_auc(labels, logits)
    assert auc > 0.75, auc
    assert data.roc_auc(labels, -logits) < 0.25
    # The click rate is what the planted logits predict.
    np.testing.assert_allclose(labels.mean(), (1 / (1 + np.exp(-logits))).mean(), atol=0.02)
    # An id's weight is a function of (seed, feature, id) alone.
    ids = jnp.arange(100_000)
    w1 = np.asarray(gen.key_weights(2, ids))
    w2 = np.asarray(data.SyntheticCriteo(FEATURES, 8, seed=1).key_weights(2, ids))
    np.testing.assert_array_equal(w1, w2)
    assert abs(w1.std() - 0.5) < 0.01 and abs(w1.mean()) < 0.01
    assert not np.array_equal(w1, np.asarray(gen.key_weights(3, ids)))  # per feature


def test_multi_hot_planted_logit_ignores_padding():
    feats = data.criteo_features(scale=1e-3, multi_hot=True)
    gen = data.SyntheticCriteo(feats, 64)
    b = jax.jit(gen.batch)(0)
    base = np.asarray(gen.planted_logits(b))
    ids = b.sparse["cat_20"]  # 100 ids per sample
    padded = b._replace(
        sparse=dict(b.sparse, cat_20=jnp.concatenate([ids, -jnp.ones_like(ids)], 1))
    )
    np.testing.assert_allclose(np.asarray(gen.planted_logits(padded)), base, rtol=1e-5, atol=1e-5)


def test_roc_auc():
    assert data.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert data.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert data.roc_auc([1, 1], [0.1, 0.2]) == 0.5
