"""What a layer does with the state it is given (issue 21), on 1 and 8
forced host CPU devices:

* a stale context (its lookup's rows since given to other keys by a later,
  evicting lookup) updates only the rows that still hold its keys, against
  a numpy Adagrad oracle of the update without the evicted keys' positions;
  the skipped rows keep their vectors and slots bit for bit and are counted
  in `stats.stale`, which `check_stats` reports (layer and collection, FFI
  and reference, `sparse_update` and `sparse_grad` + `apply_gradients`);
* a state or optimizer state of another configuration raises at trace time
  naming the field, the expected and the given shape and dtype;
* the counters accumulate from `init` (`load` stays the last call's),
  `zero_stats` resets them, and `check=True` checks each call's own counts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices

import sok_jax
from sok_jax import optim
from sok_jax.distributed import DistributedEmbedding

DIM = 4
LR = 0.3
ROWS = 16  # per device: one bucket of 16 rows, so an evicting lookup may take any row
PAD = -1


def _adagrad_oracle(before, ids, g, combiner):
    """{key: (vector, accumulator)} after one Adagrad step (lr LR, eps 1e-7)
    of the bags `ids` [B, S, w] with cotangent `g` [B, S, D] from the export
    `before`, the positions of keys `before` does not hold dropped (a key
    that is not there has no row to update). Every key counts in a mean's
    denominator."""
    rows = {int(k): i for i, k in enumerate(before.keys)}
    grads = {}
    for b in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            ks = [int(k) for k in ids[b, s] if k != PAD]
            scale = 1.0 / len(ks) if combiner == "mean" and ks else 1.0
            for k in ks:
                if k in rows:
                    grads[k] = grads.get(k, 0.0) + scale * g[b, s].astype(np.float64)
    out = {}
    for k, gr in grads.items():
        w, acc = before.vectors[rows[k]], before.slots[0][rows[k]] + gr * gr
        out[k] = (w - LR * gr / np.sqrt(acc + 1e-7), acc)
    return out


def _check_update(before, after, ids, g, combiner, what):
    """`after` (an export) is `before` with the oracle's step on the keys it
    names, every other key's vector and slot bit for bit as before."""
    np.testing.assert_array_equal(after.keys, before.keys, err_msg=what)
    want = _adagrad_oracle(before, ids, g, combiner)
    assert want, what
    for i, k in enumerate(before.keys.tolist()):
        if k in want:
            np.testing.assert_allclose(after.vectors[i], want[k][0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(after.slots[0][i], want[k][1], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(after.vectors[i], before.vectors[i], err_msg=f"{k}")
            np.testing.assert_array_equal(after.slots[0][i], before.slots[0][i], err_msg=f"{k}")


def _batch(rng, keys, n, nnz):
    """The keys, shuffled, as ids [len / nnz, 1, nnz] (a batch divisible by n)."""
    ids = rng.permutation(np.asarray(keys)).reshape(-1, 1, nnz)
    assert ids.shape[0] % n == 0
    return ids.astype(np.int32)


CASES = [  # n, implementation, two_call
    (1, "ffi", False),
    (1, "reference", True),
    (8, "ffi", False),
    (8, "ffi", True),
    (8, "reference", False),
]


@pytest.mark.parametrize("n,impl,two_call", CASES)
def test_a_stale_context_skips_the_rows_given_to_other_keys(n, impl, two_call):
    """Lookup A fills every shard; lookup B evicts half of A's keys and is
    trained; an update with A's context then trains only A's keys still
    resident, and leaves B's rows (and their trained slots) as they were."""
    require_devices(n)
    rng = np.random.default_rng([n, two_call])
    emb = DistributedEmbedding(
        "sum",
        ROWS,
        DIM,
        slot_num=1,
        max_nnz=2,
        use_hashtable=True,
        mesh=mesh_of(n),
        axis_name=AXIS,
        implementation=impl,
        eviction="lru",
    )
    opt = optim.adagrad(LR, implementation=impl)
    lookup = jax.jit(emb.lookup)

    @jax.jit
    def update(state, opt_state, ctx, g):
        if two_call:
            return emb.apply_gradients(state, opt, opt_state, emb.sparse_grad(ctx, g))
        return emb.sparse_update(state, opt, opt_state, ctx, g)

    state = emb.init(3)
    opt_state = emb.init_optimizer(opt, state)
    ids_a = _batch(rng, np.arange(ROWS * n), n, 2)  # every shard full
    ids_b = _batch(rng, 1000 + np.arange(ROWS // 2 * n), n, 2)  # evicts half of A's keys
    _, ctx_a, state = lookup(state, ids_a)
    _, ctx_b, state = lookup(state, ids_b)
    g_b = rng.normal(size=(ids_b.shape[0], 1, DIM)).astype(np.float32)
    state, opt_state = update(state, opt_state, ctx_b, g_b)
    assert int(np.sum(state.stats.evicted)) == ROWS // 2 * n
    before = emb.export_pairs(state, opt_state)

    g_a = rng.normal(size=(ids_a.shape[0], 1, DIM)).astype(np.float32)
    state, opt_state = update(state, opt_state, ctx_a, g_a)
    _check_update(before, emb.export_pairs(state, opt_state), ids_a, g_a, "sum", "layer")
    # Each shard skipped the rows of its ROWS / 2 evicted keys (B's update none).
    np.testing.assert_array_equal(np.asarray(state.stats.stale), [ROWS // 2] * n)
    with pytest.raises(sok_jax.EmbeddingError, match="context from before a lookup"):
        sok_jax.check_stats(state)


@pytest.mark.parametrize("n", [1, 8])
def test_a_collection_skips_stale_rows_in_every_placement(n):
    """The same for a collection of a row-wise, a table-wise and a
    replicated evicting table (the latter with mean bags of 2: dropping a
    stale key leaves its bag-mates' gradients as they were) and a direct
    table, which cannot go stale and trains as ever."""
    require_devices(n)
    rng = np.random.default_rng(n)
    hashed = dict(use_hashtable=True, eviction="lru")
    tables = [
        sok_jax.TableSpec("row", ROWS * n, DIM, combiner="sum", placement="row", **hashed),
        sok_jax.TableSpec("rep", ROWS, DIM, combiner="mean", placement="replicated", **hashed),
        sok_jax.TableSpec("tab", ROWS, DIM, combiner="sum", placement="table", **hashed),
        sok_jax.TableSpec("dir", 64, DIM, combiner="sum", placement="row"),
    ]
    features = [
        sok_jax.FeatureSpec("frow", "row", 2),
        sok_jax.FeatureSpec("frep", "rep", 2),
        sok_jax.FeatureSpec("ftab", "tab", 2),
        sok_jax.FeatureSpec("fdir", "dir", 2),
    ]
    coll = sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(n), axis_name=AXIS)
    features_ = [f.name for f in features]
    opt = optim.adagrad(LR)
    lookup = jax.jit(coll.lookup)
    update = jax.jit(lambda s, o, c, g: coll.sparse_update(s, opt, o, c, g))
    state = coll.init(1)
    opt_state = coll.init_optimizer(opt, state)
    batch_size = ROWS * n // 2

    def padded(keys):
        ids = np.full((batch_size, 2), PAD, np.int32)
        ids.reshape(-1)[: len(keys)] = keys
        return rng.permutation(ids)

    def batch(row_keys, few_keys):
        return {
            "frow": padded(row_keys),
            "frep": padded(few_keys),
            "ftab": padded(few_keys),
            "fdir": rng.integers(-1, 64, (batch_size, 2)).astype(np.int32),
        }

    def cots():
        return {f: rng.normal(size=(batch_size, DIM)).astype(np.float32) for f in features_}

    batch_a = batch(np.arange(ROWS * n), np.arange(ROWS))
    batch_b = batch(1000 + np.arange(ROWS // 2 * n), 1000 + np.arange(ROWS // 2))
    _, ctx_a, state = lookup(state, batch_a)
    _, ctx_b, state = lookup(state, batch_b)
    state, opt_state = update(state, opt_state, ctx_b, cots())
    before = {t: coll.export_pairs(state, t, opt_state) for t in ("row", "rep", "tab", "dir")}
    g_a = cots()
    state, opt_state = update(state, opt_state, ctx_a, g_a)
    for t, combiner in (("row", "sum"), ("rep", "mean"), ("tab", "sum"), ("dir", "sum")):
        f = f"f{t}"
        after = coll.export_pairs(state, t, opt_state)
        _check_update(before[t], after, batch_a[f][:, None], g_a[f][:, None], combiner, t)
    # Half of A's keys lost their rows: per shard ("rep": the same on every replica).
    np.testing.assert_array_equal(np.asarray(state.stats["row"].stale), [ROWS // 2] * n)
    np.testing.assert_array_equal(np.asarray(state.stats["rep"].stale), [ROWS // 2] * n)
    on = coll._tables.unit(coll._unit_of["tab"]).rows.member_index("tab")  # its one device
    np.testing.assert_array_equal(np.asarray(state.stats["tab"].stale), np.eye(n)[on] * ROWS // 2)
    assert state.stats["dir"].stale is None
    with pytest.raises(sok_jax.EmbeddingError, match="table 'rep'.*context from before"):
        sok_jax.check_stats(state)


def _small_and_big(n, **kw):
    mesh = mesh_of(n)
    small = DistributedEmbedding("sum", 16, 4, slot_num=1, mesh=mesh, axis_name=AXIS, **kw)
    big = DistributedEmbedding("sum", 32, 8, slot_num=1, mesh=mesh, axis_name=AXIS, **kw)
    return small, big


def test_a_layer_rejects_the_state_of_another_configuration():
    """`big.apply(small.init(0), ids)` and every other method given a state
    or an optimizer state of another layer raise at trace time, naming the
    field with the expected and the given shape and dtype."""
    n = 8
    require_devices(n)
    mesh = mesh_of(n)
    small, big = _small_and_big(n)
    ids = np.arange(16, dtype=np.int32).reshape(16, 1, 1)
    bad, good = small.init(0), big.init(0)
    table = r"state\.table: this layer expects \(256, 8\) float32, got \(128, 4\) float32"
    with pytest.raises(ValueError, match=table):
        big.apply(bad, ids)
    with pytest.raises(ValueError, match=table):
        jax.jit(big.lookup)(bad, ids)
    opt = optim.adagrad(LR)
    with pytest.raises(ValueError, match=table):
        big.init_optimizer(opt, bad)
    for call in (big.export_pairs, big.step):
        with pytest.raises(ValueError, match=table):
            call(bad)
    # The optimizer state: its slots against the table.
    small_opt, big_opt = small.init_optimizer(opt, bad), big.init_optimizer(opt, good)
    out, ctx, st = big.lookup(good, ids)
    with pytest.raises(ValueError, match=r"opt_state\.slots\[0\].*\(256, 8\).*\(128, 4\)"):
        big.sparse_update(st, opt, small_opt, ctx, out)
    with pytest.raises(ValueError, match=r"opt_state\.slots\[0\].*\(256, 8\).*\(128, 4\)"):
        big.apply_gradients(st, opt, small_opt, big.sparse_grad(ctx, out))
    with pytest.raises(ValueError, match=r"opt_state\.slots\[0\]: this layer's table has 256"):
        big.export_pairs(st, small_opt)
    big.sparse_update(st, opt, big_opt, ctx, out)  # its own state passes
    # slot_keys' dtype, scores present iff online, a direct layer's none.
    u32 = DistributedEmbedding("sum", 32, 8, 1, key_dtype=jnp.uint32, mesh=mesh, axis_name=AXIS)
    keys = r"state\.slot_keys: .*\(256,\) int32, got \(256,\) uint32"
    with pytest.raises(ValueError, match=keys):
        big.apply(u32.init(0), ids)
    lru = DistributedEmbedding("sum", 32, 8, 1, mesh=mesh, axis_name=AXIS, eviction="lru")
    lacks = r"this layer has .*state\.scores, the given state has not"
    with pytest.raises(ValueError, match=lacks):
        lru.apply(good, ids)
    with pytest.raises(ValueError, match=r"state has .*state\.scores, which this layer has not"):
        big.apply(lru.init(0), ids)
    direct = DistributedEmbedding("sum", 32, 8, 1, use_hashtable=False, mesh=mesh, axis_name=AXIS)
    with pytest.raises(ValueError, match=r"state has state\.slot_keys, which this layer has not"):
        direct.apply(good, ids)
    bf16 = DistributedEmbedding("sum", 32, 8, 1, mesh=mesh, axis_name=AXIS, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"state\.table: .*bfloat16, got \(256, 8\) float32"):
        bf16.apply(good, ids)


def test_a_collection_rejects_the_state_of_another_configuration():
    """As the layer's, for a collection's state and its {unit: opt_state}."""
    n = 8
    require_devices(n)

    def coll(vocab, dim):
        return sok_jax.EmbeddingCollection(
            [sok_jax.TableSpec("t", vocab, dim, use_hashtable=True)],
            [sok_jax.FeatureSpec("f", "t", 1)],
            mesh=mesh_of(n),
            axis_name=AXIS,
        )

    small, big = coll(128, 4), coll(256, 8)
    batch = {"f": np.arange(16, dtype=np.int32).reshape(16, 1)}
    with pytest.raises(ValueError, match=r"state\.shards\['t'\]\.table: .*\(256, 8\).*\(128, 4\)"):
        big.apply(small.init(0), batch)
    opt = optim.adagrad(LR)
    state = big.init(0)
    outs, ctx, state = big.lookup(state, batch)
    with pytest.raises(ValueError, match=r"opt_state\['t'\]\.slots\[0\]"):
        big.sparse_update(state, opt, small.init_optimizer(opt, small.init(0)), ctx, outs)
    with pytest.raises(ValueError, match=r"opt_state must be a dict over the units \['t'\]"):
        big.sparse_update(state, opt, {}, ctx, outs)


def test_counters_accumulate_from_init_until_zero_stats():
    """invalid, nonfinite and evicted add up over calls (per device, against
    the ids each device's share of the batch holds); load is the last call's;
    zero_stats resets; check=True raises on a call's own drops only."""
    n = 8
    require_devices(n)
    rng = np.random.default_rng(0)
    mesh = mesh_of(n)
    emb = DistributedEmbedding(
        "sum", 8, DIM, slot_num=2, max_nnz=2, use_hashtable=False, mesh=mesh, axis_name=AXIS
    )
    opt = optim.sgd(LR)
    state = emb.init(0)
    opt_state = emb.init_optimizer(opt, state)
    want_invalid, want_nonfinite = np.zeros(n, int), np.zeros(n, int)
    step = jax.jit(lambda s, o, ids, g: _sparse_step(emb, opt, s, o, ids, g))
    for _ in range(3):
        ids = rng.integers(-1, emb.num_rows + 20, (16, 2, 2)).astype(np.int32)
        g = rng.normal(size=(16, 2, DIM)).astype(np.float32)
        g[rng.random((16, 2)) < 0.2] = np.nan
        state, opt_state = step(state, opt_state, ids, g)
        want_invalid += (ids >= emb.num_rows).reshape(n, -1).sum(axis=1)
        want_nonfinite += (~np.isfinite(g).all(axis=-1)).reshape(n, -1).sum(axis=1)
        np.testing.assert_array_equal(np.asarray(state.stats.invalid), want_invalid)
        np.testing.assert_array_equal(np.asarray(state.stats.nonfinite), want_nonfinite)
    assert want_invalid.sum() > 0 and want_nonfinite.sum() > 0
    state = dataclasses.replace(state, stats=emb.zero_stats())
    sok_jax.check_stats(state)  # nothing since the reset

    # check=True: the call that drops raises, a clean one after it does not.
    checked = DistributedEmbedding(
        "sum", 8, DIM, 2, 2, use_hashtable=False, mesh=mesh, axis_name=AXIS, check=True
    )
    bad = np.full((8, 2, 2), emb.num_rows + 1, np.int32)
    with pytest.raises(sok_jax.EmbeddingError) as err:
        checked.apply(checked.init(0), bad)
    _, st = checked.apply(err.value.state, np.zeros((8, 2, 2), np.int32))
    assert int(np.sum(st.stats.invalid)) == 8 * 4  # still counted

    # An online table: evicted adds up, load is a gauge.
    lru = DistributedEmbedding("sum", 16, DIM, 1, mesh=mesh, axis_name=AXIS, eviction="lru")
    st = lru.init(0)
    for i in range(3):
        ids = (1000 * i + np.arange(16 * n, dtype=np.int32)).reshape(-1, 1, 1)
        _, st = jax.jit(lru.apply)(st, ids)
    np.testing.assert_array_equal(np.asarray(st.stats.evicted), [32] * n)
    np.testing.assert_allclose(np.asarray(st.stats.load), 1.0)


def _sparse_step(emb, opt, state, opt_state, ids, g):
    out, ctx, state = emb.lookup(state, ids)
    return emb.sparse_update(state, opt, opt_state, ctx, g)
