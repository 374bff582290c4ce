"""Checkpointing a sharded training state with orbax: the layer's state and
its sparse optimizer state are plain pytrees of sharded jax.Arrays, so
orbax's StandardCheckpointer saves them and restores them onto the
layer's shardings (`state_shardings()`, `optimizer_shardings()`); training
resumed from the restored state is bit-identical to training that never
stopped. A checkpoint saved on another device count moves through the
logical pairs (`sok_jax.checkpoint.restore(..., layer=)`) or is refused in
one sentence, never restored permuted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import mesh_of, require_devices

import sok_jax
from sok_jax import optim

ocp = pytest.importorskip("orbax.checkpoint")

N = 4
SLOTS, NNZ, DIM, BATCH = 3, 2, 8, 32


def _layer(hash_mode: bool):
    if len(jax.devices()) < N:
        pytest.skip(f"needs {N} devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:N]), ("x",))
    kw = dict(use_hashtable=True, key_dtype=jnp.int32) if hash_mode else dict(use_hashtable=False)
    return sok_jax.DistributedEmbedding(
        "mean", 64, DIM, slot_num=SLOTS, max_nnz=NNZ, mesh=mesh, axis_name="x", **kw
    )


def _batches(rng, hash_mode, steps):
    hi = 10**6 if hash_mode else 64 * N
    out = []
    for _ in range(steps):
        ids = rng.integers(0, hi, size=(BATCH, SLOTS, NNZ))
        ids = np.where(rng.random(ids.shape) < 0.2, -1, ids).astype(np.int32)
        g = rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32)
        out.append((ids, g))
    return out


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


@pytest.mark.parametrize("hash_mode", [False, True])
def test_orbax_roundtrip_resumes_bit_identical(tmp_path, hash_mode):
    emb = _layer(hash_mode)
    opt = optim.adagrad(0.3)

    @jax.jit
    def step(state, opt_state, ids, g):
        _, ctx, state = emb.lookup(state, ids)
        return emb.apply_gradients(state, opt, opt_state, emb.sparse_grad(ctx, g))

    rng = np.random.default_rng(7 + hash_mode)
    data = _batches(rng, hash_mode, 4)
    state = emb.init(3)
    opt_state = emb.init_optimizer(opt, state)
    for ids, g in data[:2]:
        state, opt_state = step(state, opt_state, ids, g)

    ckpt = ocp.StandardCheckpointer()
    path = tmp_path / "ckpt"
    ckpt.save(path, {"state": state, "opt": opt_state})
    ckpt.wait_until_finished()
    target = {
        "state": _abstract(state, emb.state_shardings()),
        "opt": _abstract(opt_state, emb.optimizer_shardings(opt_state)),
    }
    restored = ckpt.restore(path, target)

    for a, b in zip(
        jax.tree.leaves((state, opt_state)), jax.tree.leaves((restored["state"], restored["opt"]))
    ):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Both continue identically (the restored arrays are usable, donation
    # included, and nothing in the state was lost: hash slots, counters).
    s1, o1 = state, opt_state
    s2, o2 = restored["state"], restored["opt"]
    for ids, g in data[2:]:
        s1, o1 = step(s1, o1, ids, g)
        s2, o2 = step(s2, o2, ids, g)
    for a, b in zip(jax.tree.leaves((s1, o1)), jax.tree.leaves((s2, o2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    k1, v1 = emb.export_pairs(s1)
    k2, v2 = emb.export_pairs(s2)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(v1, v2)
    # Training moved the table: the comparison is not between two inits.
    k0, v0 = emb.export_pairs(emb.init(3))
    if not hash_mode:
        assert np.abs(v1 - v0).max() > 1e-3
    else:
        assert k1.size > 0


def test_restore_names_the_array_that_does_not_match(tmp_path):
    """sok_jax.checkpoint.restore: bit-identical into a fresh state of the
    same layer; a layer of another D or another mode is refused in one
    sentence naming the array, and nothing is restored."""
    from sok_jax import checkpoint

    n = 2
    require_devices(n)
    mesh = mesh_of(n)
    emb = sok_jax.DistributedEmbedding(
        "sum", 16, 8, slot_num=2, max_nnz=2, mesh=mesh, use_hashtable=False
    )
    state = emb.init(3)
    ids = np.random.default_rng().integers(0, 32, (8, 2, 2)).astype(np.int32)
    _, state = emb.apply(state, ids)
    path = str(tmp_path / "ckpt")
    checkpoint.save(path, state)
    back = checkpoint.restore(path, emb.init(0))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.table.sharding.is_equivalent_to(emb.table_sharding, 2)
    wider = sok_jax.DistributedEmbedding(
        "sum", 16, 12, slot_num=2, max_nnz=2, mesh=mesh, use_hashtable=False
    )
    with pytest.raises(
        ValueError, match=r"'table' is float32\[32, 8\] but the target's is float32\[32, 12\]"
    ):
        checkpoint.restore(path, wider.init(0))
    hashed = sok_jax.DistributedEmbedding(
        "sum", 16, 8, slot_num=2, max_nnz=2, use_hashtable=True, mesh=mesh
    )
    with pytest.raises(ValueError, match="slot_keys"):
        checkpoint.restore(path, hashed.init(0))


@pytest.mark.parametrize("hash_mode", [False, True])
def test_restore_on_another_device_count_goes_through_the_pairs(tmp_path, hash_mode):
    """Saved on 8 devices, restored on 4 and 2 (same logical capacity): the
    logical table, the optimizer slots and the online scores equal those of
    the original (numpy on the exports); without layer= it is refused in one
    sentence naming export_pairs/import_pairs, never restored permuted."""
    from sok_jax import checkpoint

    require_devices(8)
    kw = dict(use_hashtable=True, eviction="lru") if hash_mode else dict(use_hashtable=False)

    def layer(n):
        return sok_jax.DistributedEmbedding(
            "sum", 128 // n, DIM, slot_num=1, max_nnz=2, mesh=mesh_of(n), **kw
        )

    opt = optim.adagrad(0.2)
    emb8 = layer(8)
    state = emb8.init(5)
    opt_state = emb8.init_optimizer(opt, state)
    rng = np.random.default_rng()
    ids = rng.integers(0, 10**6 if hash_mode else 128, (16, 1, 2)).astype(np.int32)
    out, ctx, state = emb8.lookup(state, ids)
    g = rng.normal(size=out.shape).astype(np.float32)
    state, opt_state = emb8.sparse_update(state, opt, opt_state, ctx, g)
    path = str(tmp_path / "ckpt")
    checkpoint.save(path, {"state": state, "opt": opt_state})
    want = emb8.export_pairs(state, opt_state)
    for n in (4, 2):
        emb = layer(n)
        fresh = emb.init(0)
        target = {"state": fresh, "opt": emb.init_optimizer(opt, fresh)}
        with pytest.raises(ValueError, match=r"saved on 8 devices .* export_pairs and import_"):
            checkpoint.restore(path, target)
        with pytest.raises(ValueError, match="pass optimizer="):
            checkpoint.restore(path, target, layer=emb)
        back = checkpoint.restore(path, target, layer=emb, optimizer=opt)
        assert back["state"].table.sharding.is_equivalent_to(emb.table_sharding, 2)
        got = emb.export_pairs(back["state"], back["opt"])
        np.testing.assert_array_equal(got.keys, want.keys)
        np.testing.assert_array_equal(got.vectors, want.vectors)
        for a, b in zip(got.slots, want.slots):
            np.testing.assert_array_equal(a, b)
        assert got.opt_count == want.opt_count == 1
        if hash_mode:
            np.testing.assert_array_equal(got.last_seen, want.last_seen)
            np.testing.assert_array_equal(got.count, want.count)
        # A table-only checkpoint moves too.
        checkpoint.save(str(tmp_path / f"table{n}"), state)
        alone = checkpoint.restore(str(tmp_path / f"table{n}"), fresh, layer=emb)
        k, v = emb.export_pairs(alone)
        np.testing.assert_array_equal(k, want.keys)
        np.testing.assert_array_equal(v, want.vectors)


def test_a_collection_moves_to_another_device_count(tmp_path):
    """A collection saved on 8 devices with its plan (save(layer=)) restores
    on 4 through the pairs of every table (row, table-wise and
    replicated, direct and hash), optimizer slots included; saved without
    its plan it is refused in one sentence."""
    from sok_jax import checkpoint

    require_devices(8)
    tables = [
        sok_jax.TableSpec("r", 64, DIM, placement="row"),
        sok_jax.TableSpec("h", 64, DIM, use_hashtable=True, placement="row"),
        sok_jax.TableSpec("t", 24, DIM, placement="table"),
        sok_jax.TableSpec("p", 16, DIM, use_hashtable=True, placement="replicated"),
    ]
    features = [sok_jax.FeatureSpec(f"f{t.name}", t.name, 2) for t in tables]

    def coll(n):
        return sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(n), batch_size=16)

    opt = optim.adagrad(0.2)
    c8 = coll(8)
    state = c8.init(2)
    opt_state = c8.init_optimizer(opt, state)
    rng = np.random.default_rng()
    batch = {
        f"f{t.name}": rng.integers(0, t.vocabulary_size, (16, 2)).astype(np.int32) for t in tables
    }
    outs, ctx, state = c8.lookup(state, batch)
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in outs.items()}
    state, opt_state = c8.sparse_update(state, opt, opt_state, ctx, grads)
    path = str(tmp_path / "ckpt")
    checkpoint.save(path, {"state": state, "opt": opt_state}, layer=c8)
    want = {t.name: c8.export_pairs(state, t.name, opt_state) for t in tables}
    for n in (4,):
        c = coll(n)
        fresh = c.init(0)
        target = {"state": fresh, "opt": c.init_optimizer(opt, fresh)}
        with pytest.raises(ValueError, match="pass layer="):
            checkpoint.restore(path, target)
        back = checkpoint.restore(path, target, layer=c, optimizer=opt)
        for t in tables:
            got = c.export_pairs(back["state"], t.name, back["opt"])
            np.testing.assert_array_equal(got.keys, want[t.name].keys)
            np.testing.assert_array_equal(got.vectors, want[t.name].vectors)
            for a, b in zip(got.slots, want[t.name].slots):
                np.testing.assert_array_equal(a, b)
    checkpoint.save(str(tmp_path / "noplan"), state)
    with pytest.raises(ValueError, match="no plan of the collection.*export_pairs and import"):
        checkpoint.restore(str(tmp_path / "noplan"), coll(4).init(0), layer=coll(4))
