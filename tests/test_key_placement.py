"""Key placement of row-sharded hash tables (`key_placement="mod" | "hashed"`,
`sok_jax.distributed.key_owner`).

* The owner rule: numpy (host) and jax (device, under jit) give the same
  owners for int32, uint32 and int64 keys, both equal to a plain-Python
  murmur3 / splitmix64 oracle (tests/oracles.py), and hashed owners spread
  keys of a common stride that "mod" puts on one device.
* 64 keys that are all multiples of 8 on 8 devices: "mod" loses half of
  them to a full shard (`stats.hash_full`), "hashed" none; the same for a
  collection's `TableSpec`.
* Training under "hashed" on 8 devices computes what 1 device computes and
  what a numpy dict key -> vector computes, with the ffi and the reference
  implementations.
* Pairs and `TableExport`s (scores, slots, admission sketches) move between
  a "mod" and a "hashed" layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from oracles import _fmix32, _mix64, x64_if

import sok_jax
from sok_jax import initializers, optim
from sok_jax.distributed import DistributedEmbedding, key_owner

N, DIM, SLOTS, NNZ, BATCH, LR = 8, 4, 2, 2, 16, 0.5
TOL = dict(rtol=1e-6, atol=1e-6)


def py_owner(key: int, n: int, key_placement: str, wide: bool) -> int:
    """The owner of a key: k % n, or the word of salt 0 (the key's order
    word mixed once more, its leading 32 bits for int64 keys) % n."""
    if key_placement == "mod":
        return key % n
    if wide:
        word = _mix64(_mix64(key)) >> 32
    else:
        word = _fmix32(_fmix32(key))
    return word % n


@pytest.mark.parametrize("key_dtype", ["int32", "uint32", "int64"])
def test_owner_host_and_device_agree_with_the_oracle(key_dtype):
    info = np.iinfo(np.dtype(key_dtype))
    rng = np.random.default_rng()
    keys = rng.integers(info.min, info.max, 500, dtype=np.int64, endpoint=True)
    keys = np.concatenate([keys, [info.min, info.max, 0, 1, 8]]).astype(key_dtype)
    for n in (1, 3, 8):
        for placement in ("mod", "hashed"):
            host = key_owner(keys, n, placement)
            assert host.dtype == np.int32
            want = [py_owner(int(k), n, placement, key_dtype == "int64") for k in keys]
            np.testing.assert_array_equal(host, want, err_msg=f"{placement} n={n}")
            with x64_if(key_dtype):
                dev = jax.jit(lambda k, n=n, p=placement: key_owner(k, n, p))(jnp.asarray(keys))
                np.testing.assert_array_equal(np.asarray(dev), host, err_msg=f"{placement} n={n}")
    # A common stride: "mod" puts every key on device 0, "hashed" spreads them.
    stride = np.arange(0, 8 * 4096, 8, dtype=key_dtype)
    assert np.bincount(key_owner(stride, N, "mod"), minlength=N)[0] == 4096
    counts = np.bincount(key_owner(stride, N, "hashed"), minlength=N)
    assert counts.min() > 0.8 * 512 and counts.max() < 1.2 * 512, counts


def test_bad_key_placement_is_refused():
    with pytest.raises(ValueError, match="key_placement must be one of"):
        DistributedEmbedding(key_placement="random", mesh=mesh_of(1))
    with pytest.raises(ValueError, match="needs use_hashtable=True"):
        DistributedEmbedding(use_hashtable=False, key_placement="hashed", mesh=mesh_of(1))
    with pytest.raises(ValueError, match="TableSpec 't'.*needs use_hashtable=True"):
        sok_jax.TableSpec("t", 64, 4, key_placement="hashed")
    with pytest.raises(ValueError, match="TableSpec 't'.*placement 'table'"):
        sok_jax.TableSpec("t", 64, 4, use_hashtable=True, placement="table", key_placement="hashed")
    with pytest.raises(ValueError, match="TableSpec 't'.*placement 'replicated'"):
        sok_jax.TableSpec(
            "t", 64, 4, use_hashtable=True, placement="replicated", key_placement="hashed"
        )


# 64 keys, every one a multiple of 8, into 8 shards of 32 rows (25% full).
STRIDED = np.arange(0, 64 * N, N, dtype=np.int32)


@pytest.mark.parametrize("placement,lost", [("mod", 32), ("hashed", 0)])
def test_strided_keys_fill_one_shard_only_under_mod(placement, lost):
    require_devices(N)
    emb = DistributedEmbedding(
        "sum", 32, DIM, use_hashtable=True, mesh=mesh_of(N), axis_name=AXIS, key_placement=placement
    )
    out, state = jax.jit(emb.apply)(emb.init(0), STRIDED.reshape(-1, 1, 1))
    assert int(np.sum(np.asarray(state.stats.hash_full))) == lost
    keys, _ = emb.export_pairs(state)
    assert len(keys) == len(STRIDED) - lost
    assert int(np.sum(np.all(np.asarray(out) == 0, axis=-1))) == lost  # no row: zeros


@pytest.mark.parametrize("placement,lost", [("mod", 32), ("hashed", 0)])
def test_collection_table_spec_takes_the_placement(placement, lost):
    require_devices(N)
    tables = [
        sok_jax.TableSpec("h", 32 * N, DIM, use_hashtable=True, key_placement=placement),
        sok_jax.TableSpec("d", 100, DIM),
    ]
    features = [sok_jax.FeatureSpec("h", "h"), sok_jax.FeatureSpec("d", "d")]
    batch = {"h": STRIDED.reshape(-1, 1), "d": (STRIDED % 100).reshape(-1, 1)}
    coll = sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(N), axis_name=AXIS)
    outs, state = jax.jit(coll.apply)(coll.init(0), batch)
    assert int(np.sum(np.asarray(state.stats["h"].hash_full))) == lost
    assert len(coll.export_pairs(state, "h")[0]) == len(STRIDED) - lost
    if lost:
        return
    one = sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(1), axis_name=AXIS)
    want, _ = jax.jit(one.apply)(one.init(0), batch)
    for name in ("h", "d"):
        np.testing.assert_allclose(np.asarray(outs[name]), np.asarray(want[name]), **TOL)


# --------------------------------------------------------------------------
# Training: 8 devices "hashed" == 1 device == a numpy dict key -> vector.


def _layer(n, placement="hashed", implementation="ffi", **kw):
    return DistributedEmbedding(
        "sum",
        kw.pop("rows", 256 // n),
        DIM,
        slot_num=SLOTS,
        max_nnz=NNZ,
        use_hashtable=True,
        mesh=mesh_of(n),
        axis_name=AXIS,
        implementation=implementation,
        key_placement=placement,
        **kw,
    )


@functools.lru_cache(maxsize=None)
def _sgd_step(emb):
    opt = optim.sgd(LR)

    @jax.jit
    def step(state, opt_state, ids, g):
        out, ctx, state = emb.lookup(state, ids)
        state, opt_state = emb.sparse_update(state, opt, opt_state, ctx, g)
        return out, state, opt_state

    return opt, step


def _batches(rng, steps=3):
    pool = np.concatenate([STRIDED[:24], rng.integers(-(2**31), 2**31 - 1, 24)])
    pool = np.unique(pool[pool != -1]).astype(np.int32)
    out = []
    for _ in range(steps):
        ids = rng.choice(pool, (BATCH, SLOTS, NNZ)).astype(np.int32)
        ids[rng.random(ids.shape) < 0.25] = -1
        out.append((ids, rng.normal(size=(BATCH, SLOTS, DIM)).astype(np.float32)))
    return out


def _train(emb, batches, seed=5):
    opt, step = _sgd_step(emb)
    state = emb.init(seed)
    opt_state = emb.init_optimizer(opt, state)
    outs = []
    for ids, g in batches:
        out, state, opt_state = step(state, opt_state, jnp.asarray(ids), jnp.asarray(g))
        outs.append(np.asarray(out))
        assert int(np.sum(np.asarray(state.stats.hash_full))) == 0
    return outs, state


def _dict_oracle(batches, seed=5):
    """Outputs and final pairs of sparse sgd on sum(g * out), a dict key ->
    vector whose new keys start at `init_rows` of the key."""
    key_data = jax.random.key_data(initializers.as_key(seed))
    init = initializers.resolve("random_uniform")
    table, outs = {}, []
    for ids, g in batches:
        new = sorted({int(k) for k in ids.ravel() if k != -1} - set(table))
        if new:
            vecs = initializers.init_rows(init, key_data, jnp.asarray(new, jnp.int32), DIM)
            table.update(zip(new, np.asarray(vecs, np.float64)))
        out = np.zeros((BATCH, SLOTS, DIM))
        for (b, s, _), k in np.ndenumerate(ids):
            if k != -1:
                out[b, s] += table[int(k)]
        for (b, s, _), k in np.ndenumerate(ids):
            if k != -1:
                table[int(k)] = table[int(k)] - LR * g[b, s]
        outs.append(out)
    return outs, table


@pytest.mark.parametrize("implementation", ["ffi", "reference"])
def test_hashed_training_equals_one_device_and_the_dict_oracle(implementation):
    require_devices(N)
    batches = _batches(np.random.default_rng())
    emb = _layer(N, implementation=implementation)
    outs, state = _train(emb, batches)
    one = _layer(1, placement="mod")
    want_outs, want_state = _train(one, batches)
    oracle_outs, oracle_table = _dict_oracle(batches)
    for got, want, oracle in zip(outs, want_outs, oracle_outs):
        np.testing.assert_allclose(got, want, **TOL)
        np.testing.assert_allclose(got, oracle, **TOL)
    keys, vecs = emb.export_pairs(state)
    want_keys, want_vecs = one.export_pairs(want_state)
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_allclose(vecs, want_vecs, **TOL)
    np.testing.assert_array_equal(keys, sorted(oracle_table))
    np.testing.assert_allclose(vecs, np.stack([oracle_table[int(k)] for k in keys]), **TOL)
    # The keys really are spread by the mixer: each shard holds its owners' keys.
    slot_keys = np.asarray(state.slot_keys).reshape(N, -1)
    for d in range(N):
        held = slot_keys[d][slot_keys[d] != -1]
        np.testing.assert_array_equal(key_owner(held, N, "hashed"), d)


def test_pairs_move_between_mod_and_hashed():
    require_devices(N)
    batches = _batches(np.random.default_rng())
    mod = _layer(N, placement="mod")
    _, state = _train(mod, batches)
    keys, vecs = mod.export_pairs(state)
    hashed = _layer(N)
    moved = hashed.import_pairs(keys, vecs, seed=5)
    k2, v2 = hashed.export_pairs(moved)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(v2, vecs)
    ids = jnp.asarray(batches[0][0])
    want, _ = mod.apply(state, ids, training=False)
    got, _ = hashed.apply(moved, ids, training=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    back = mod.import_pairs(k2, v2, seed=5)
    k3, v3 = mod.export_pairs(back)
    np.testing.assert_array_equal(k3, keys)
    np.testing.assert_array_equal(v3, vecs)


@pytest.mark.parametrize("source,target", [("mod", "hashed"), ("hashed", "mod")])
def test_admission_sketch_moves_between_placements(source, target):
    """A key seen once where admit_after=2 is admitted at its next sighting
    after the export moves to the other placement: the sketch that counted
    it reaches the shard that now owns it."""
    require_devices(N)
    kw = dict(rows=64, admit_after=2)
    src, dst = _layer(N, source, **kw), _layer(N, target, **kw)
    opt = optim.sgd(LR)
    keys = np.arange(1, 1 + BATCH * SLOTS * NNZ, dtype=np.int32)
    ids = jnp.asarray(keys.reshape(BATCH, SLOTS, NNZ))
    _, state = jax.jit(src.apply)(src.init(0), ids)
    assert len(src.export_pairs(state)[0]) == 0  # seen once: none admitted
    exp = src.export_pairs(state, src.init_optimizer(opt, state))
    assert exp.key_placement == source
    moved, _ = dst.import_pairs(exp, optimizer=opt)
    _, moved = jax.jit(dst.apply)(moved, ids)
    keys, _ = dst.export_pairs(moved)
    np.testing.assert_array_equal(keys, np.asarray(ids).ravel())
