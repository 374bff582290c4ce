"""`sok_jax.embed` inside Flax linen, Flax NNX and Haiku models, trained with
optax inside jax.jit on a task whose label depends on the ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import sok_jax

ROWS, DIM, BATCH, SLOTS, NNZ = 60, 8, 64, 2, 4
USED = 50  # ids are drawn from [0, USED): rows >= USED are never looked up
STEPS = 30


def _task(seed: int, weighted: bool = False):
    """Padded ids with padding, and y = sum over slots of the (weighted) mean
    of a fixed random score per id: learnable exactly by embed + linear."""
    rng = np.random.default_rng(seed)
    score = rng.normal(size=ROWS)
    ids = rng.integers(0, USED, size=(BATCH, SLOTS, NNZ))
    ids[rng.random(ids.shape) < 0.3] = -1
    ids[:, :, 0] = rng.integers(0, USED, size=(BATCH, SLOTS))  # no empty bag
    w = rng.uniform(0.5, 1.5, size=ids.shape).astype(np.float32)
    valid = ids >= 0
    ww = np.where(valid, w if weighted else 1.0, 0.0)
    y = np.sum(np.sum(ww * score[np.where(valid, ids, 0)], -1) / np.sum(ww, -1), -1)
    return (
        jnp.asarray(ids.astype(np.int32)),
        jnp.asarray(w) if weighted else None,
        jnp.asarray(y.astype(np.float32)),
    )


def _train(loss_fn, params, ids, w, y, lr=0.05):
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, w, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(STEPS):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    final = float(jax.jit(loss_fn)(params, ids, w, y))
    return params, losses[0], final


def _assert_learned(first, final):
    assert np.isfinite(final)
    assert final < 0.5 * first, (first, final)


def _table_leaf(params):
    (table,) = [x for x in jax.tree_util.tree_leaves(params) if x.shape == (ROWS, DIM)]
    return table


def _unused_rows_unchanged(before, after):
    np.testing.assert_array_equal(
        np.asarray(_table_leaf(before))[USED:], np.asarray(_table_leaf(after))[USED:]
    )
    assert not np.allclose(
        np.asarray(_table_leaf(before))[:USED], np.asarray(_table_leaf(after))[:USED]
    )


class LinenModel(nn.Module):
    combiner: str = "mean"

    @nn.compact
    def __call__(self, ids, weights=None):
        table = self.param("table", nn.initializers.normal(0.1), (ROWS, DIM), jnp.float32)
        x = sok_jax.embed(table, ids, combiner=self.combiner, weights=weights)
        return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]


@pytest.mark.parametrize("combiner", ["mean", "sqrtn"])
def test_flax_linen(combiner):
    ids, w, y = _task(0)
    model = LinenModel(combiner)
    params = model.init(jax.random.key(0), ids)
    assert params["params"]["table"].shape == (ROWS, DIM)

    def loss_fn(params, ids, w, y):
        return jnp.mean((model.apply(params, ids, w) - y) ** 2)

    trained, first, final = _train(loss_fn, params, ids, w, y)
    _assert_learned(first, final)
    _unused_rows_unchanged(params, trained)


def test_flax_nnx():
    nnx = pytest.importorskip("flax.nnx")
    ids, w, y = _task(1)

    class NnxModel(nnx.Module):
        def __init__(self, rngs):
            self.table = nnx.Param(jax.random.normal(rngs.params(), (ROWS, DIM)) * 0.1)
            self.dense = nnx.Linear(SLOTS * DIM, 1, rngs=rngs)

        def __call__(self, ids, weights=None):
            x = sok_jax.embed(self.table[...], ids, combiner="mean", weights=weights)
            return self.dense(x.reshape(x.shape[0], -1))[:, 0]

    model = NnxModel(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, ids, w, y):
        m = nnx.merge(graphdef, params)
        return jnp.mean((m(ids, w) - y) ** 2)

    trained, first, final = _train(loss_fn, params, ids, w, y)
    _assert_learned(first, final)
    _unused_rows_unchanged(params, trained)
    # The trained state goes back into a module and predicts well.
    nnx.update(model, trained)
    assert float(jnp.mean((model(ids) - y) ** 2)) == pytest.approx(final, rel=1e-5)


def test_haiku():
    # Haiku is a test extra; an image without it (the GPU machines) skips.
    hk = pytest.importorskip("haiku")
    ids, w, y = _task(2, weighted=True)

    def forward(ids, weights):
        table = hk.get_parameter(
            "table", (ROWS, DIM), jnp.float32, init=hk.initializers.RandomNormal(0.1)
        )
        x = sok_jax.embed(table, ids, combiner="mean", weights=weights)
        return hk.Linear(1)(x.reshape(x.shape[0], -1))[:, 0]

    model = hk.without_apply_rng(hk.transform(forward))
    params = model.init(jax.random.key(2), ids, w)

    def loss_fn(params, ids, w, y):
        return jnp.mean((model.apply(params, ids, w) - y) ** 2)

    trained, first, final = _train(loss_fn, params, ids, w, y)
    _assert_learned(first, final)
    _unused_rows_unchanged(params, trained)
