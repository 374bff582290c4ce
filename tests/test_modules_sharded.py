"""The sharded layers as modules: `sok_jax.flax.ShardedEmbedding` (NNX),
`sok_jax.flax.ShardedEmbed` (linen) and `sok_jax.haiku.ShardedEmbed`, over
`DistributedEmbedding` and `EmbeddingCollection`, on 8 host devices (the
haiku test skips where haiku is not installed; the others need only flax).
Each computes what the layer computes on the same state (the layer is the
oracle here; the layer's own oracles are in test_distributed and
test_collection), and the NNX sparse step in one jitted function trains the
tables exactly as the layer's own step does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices

import sok_jax
import sok_jax.flax

optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

N, ROWS, DIM, SLOTS, NNZ, BATCH = 8, 32, 8, 3, 2, 16


def _layers():
    mesh = mesh_of(N)
    emb = sok_jax.DistributedEmbedding(
        "sum",
        ROWS,
        DIM,
        slot_num=SLOTS,
        max_nnz=NNZ,
        mesh=mesh,
        axis_name=AXIS,
        use_hashtable=False,
    )
    coll = sok_jax.EmbeddingCollection(
        [
            sok_jax.TableSpec("a", 300, DIM, combiner="mean"),
            sok_jax.TableSpec("h", 200, 4, use_hashtable=True),
        ],
        [sok_jax.FeatureSpec("a", "a", NNZ), sok_jax.FeatureSpec("h", "h", 1)],
        mesh=mesh,
        axis_name=AXIS,
    )
    return {"layer": emb, "collection": coll}


def _batch(kind, rng):
    if kind == "layer":
        return rng.integers(-1, ROWS * N, (BATCH, SLOTS, NNZ)).astype(np.int32)
    return {
        "a": rng.integers(-1, 300, (BATCH, NNZ)).astype(np.int32),
        "h": rng.integers(0, 10_000, (BATCH, 1)).astype(np.int32),
    }


def _flat(outs):
    leaves = jax.tree.leaves(outs)
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def _dense_loss(w, outs):
    return jnp.mean(jnp.tanh(_flat(outs) @ w) ** 2)


@pytest.mark.parametrize("kind", ["layer", "collection"])
def test_nnx_sparse_step_equals_the_layers_own(kind):
    require_devices(N)
    layer = _layers()[kind]
    rng = np.random.default_rng()
    batches = [_batch(kind, rng) for _ in range(3)]
    opt = sok_jax.optim.adagrad(0.2)
    width = jax.eval_shape(lambda: _flat(layer.apply(layer.init(0), batches[0])[0])).shape[1]

    class Model(nnx.Module):
        def __init__(self):
            self.embedding = sok_jax.flax.ShardedEmbedding(layer, seed=4, optimizer=opt)
            self.w = nnx.Param(jnp.asarray(rng.normal(size=(width, 2)), jnp.float32))

    model = Model()
    w0 = np.asarray(model.w[...])
    dense = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, dense, ids):
        outs, ctx = model.embedding.lookup(ids)
        loss, (g, d) = nnx.value_and_grad(lambda m, o: _dense_loss(m.w[...], o), argnums=(0, 1))(
            model, outs
        )
        dense.update(model, g)
        model.embedding.sparse_update(ctx, d)
        return loss

    # The same three steps with the layer and optax, by hand.
    state = layer.init(4)
    slots = layer.init_optimizer(opt, state)
    w = jnp.asarray(w0)

    @jax.jit
    def ref_step(state, slots, w, ids):
        outs, ctx, state = layer.lookup(state, ids)
        loss, (gw, d) = jax.value_and_grad(_dense_loss, argnums=(0, 1))(w, outs)
        state, slots = layer.sparse_update(state, opt, slots, ctx, d)
        return state, slots, w - 0.1 * gw, loss

    for ids in batches:
        loss = step(model, dense, ids)
        state, slots, w, ref_loss = ref_step(state, slots, w, ids)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.w[...]), np.asarray(w), rtol=1e-6, atol=1e-7)
    got, want = model.embedding.state, state
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # The tables are variables of their own collection, sharded as the layer says.
    tables = nnx.state(model, sok_jax.flax.EmbeddingTables)
    leaves = jax.tree.leaves(tables)
    shardings = jax.tree.leaves(layer.state_shardings())
    assert len(leaves) == len(shardings)
    for x, sh in zip(leaves, shardings):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
    assert jax.tree.leaves(nnx.state(model, sok_jax.flax.EmbeddingSlots))
    model.embedding.check()


@pytest.mark.parametrize("kind", ["layer", "collection"])
def test_nnx_module_state_split_off_and_donated(kind):
    """A module built from a given state (`state=`) holds it; its state split
    off by `nnx.split` runs a jitted step with `state_shardings()` as in/out
    shardings, donated, and trains as the layer's own step; `set_state`
    replaces the layer's state and keeps the slots."""
    require_devices(N)
    layer = _layers()[kind]
    ids = _batch(kind, np.random.default_rng())
    opt = sok_jax.optim.adagrad(0.2)
    start = layer.init(9)
    module = sok_jax.flax.ShardedEmbedding(layer, state=start, optimizer=opt)
    graphdef, state = nnx.split(module)
    shardings = module.state_shardings()
    assert jax.tree.structure(shardings) == jax.tree.structure(state)

    def step(state, ids):
        m = nnx.merge(graphdef, state)
        outs, ctx = m.lookup(ids)
        m.sparse_update(ctx, jax.tree.map(jnp.ones_like, outs))
        return nnx.state(m)

    jitted = jax.jit(
        step, in_shardings=(shardings, None), out_shardings=shardings, donate_argnums=(0,)
    )
    new = jitted(state, ids)
    assert all(x.is_deleted() for x in jax.tree.leaves(state) if x.ndim == 2)  # tables, slots
    for x, sh in zip(jax.tree.leaves(new), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
    want = layer.init(9)
    outs, ctx, want = layer.lookup(want, ids)
    want, want_slots = layer.sparse_update(
        want, opt, layer.init_optimizer(opt, want), ctx, jax.tree.map(jnp.ones_like, outs)
    )
    got = nnx.merge(graphdef, new)
    got_slots = nnx.state(got, sok_jax.flax.EmbeddingSlots)
    for a, b in zip(jax.tree.leaves((got.state, got_slots)), jax.tree.leaves((want, want_slots))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    other = layer.init(1)
    got.set_state(other)
    assert jax.tree.leaves(got.state)[0] is jax.tree.leaves(other)[0]
    assert jax.tree.leaves(nnx.state(got, sok_jax.flax.EmbeddingSlots))


@pytest.mark.parametrize("kind", ["layer", "collection"])
def test_linen_module_computes_the_layer(kind):
    require_devices(N)
    layer = _layers()[kind]
    ids = _batch(kind, np.random.default_rng())
    want, _ = layer.apply(layer.init(3), ids)

    linen = sok_jax.flax.ShardedEmbed(layer, seed=3)
    variables = linen.init(jax.random.key(0), ids)
    state0 = variables["embedding"]["state"]
    out, new = linen.apply({"embedding": {"state": state0}}, ids, mutable=["embedding"])
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    (out, ctx), new = linen.apply(
        {"embedding": {"state": state0}}, ids, sparse=True, mutable=["embedding"]
    )
    opt = sok_jax.optim.sgd(1.0)
    st = new["embedding"]["state"]
    st2, _ = layer.sparse_update(
        st, opt, layer.init_optimizer(opt, st), ctx, jax.tree.map(jnp.ones_like, out)
    )
    assert not all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(st2), jax.tree.leaves(st))
    )


@pytest.mark.parametrize("kind", ["layer", "collection"])
def test_haiku_module_computes_the_layer(kind):
    require_devices(N)
    hk = pytest.importorskip("haiku")
    import sok_jax.haiku

    layer = _layers()[kind]
    ids = _batch(kind, np.random.default_rng())
    want, want_state = layer.apply(layer.init(3), ids)

    f = hk.transform_with_state(lambda ids: sok_jax.haiku.ShardedEmbed(layer, 3, name="e")(ids))
    params, hk_state = f.init(jax.random.key(0), ids)
    out, hk_state = f.apply(params, hk_state, None, ids)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(hk_state["e"]["state"]), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
