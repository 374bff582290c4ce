"""Live deltas (sok_jax.serving.apply_delta): a serving state made at step t,
given the rows training changed after t, holds what the trained state holds
at the end, bit for bit (float32, and every inference row format against
`quantize` of the final state), on 1 and 8 devices, for a layer (direct and
an evicting hash table) and a collection (per-table deltas); evicted keys
look up as unseen zeros; tables in host memory serve and follow through
their quantized state; and what does not fit is refused by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices

import sok_jax
from sok_jax.distributed import deltas
from sok_jax.distributed.quantized import dequantize, quantize_int8

D, SLOTS, NNZ, ROWS = 8, 2, 2, 32
FORMATS = ["float32", "int8", "bfloat16", "float16"]


# an evicting table whose log keeps every eviction of the tests' few steps
LOGGED = sok_jax.HashOptions(eviction="lru", eviction_log=256)


def _layer(n, hashed, rows=ROWS, dim=D, options=LOGGED):
    return sok_jax.DistributedEmbedding(
        combiner="sum", max_vocabulary_size_per_gpu=rows, embedding_vec_size=dim,
        slot_num=SLOTS, max_nnz=NNZ, use_hashtable=hashed, key_dtype=jnp.int32,
        mesh=mesh_of(n), axis_name=AXIS, hash_options=options if hashed else None,
    )


def _trainer(model, opt):
    @jax.jit
    def step(state, opt_state, ids):
        outs, ctx, state = model.lookup(state, ids)
        grads = jax.tree.map(jnp.ones_like, outs)
        return model.sparse_update(state, opt, opt_state, ctx, grads)

    return step


def _serving(model, state, fmt):
    return state if fmt == "float32" else sok_jax.serving.quantize(model, state, fmt)


def _rows_by_key(table, slot_keys):
    """{key: its row of every leaf of `table`} of a hash shard (host)."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(table)]
    keys = np.asarray(slot_keys)
    return {int(k): [x[i] for x in leaves] for i, k in enumerate(keys) if k >= 0}


def _assert_same_rows(got, want, what):
    assert sorted(got) == sorted(want), what
    for k in want:
        for a, b in zip(got[k], want[k]):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: key {k}")


@functools.lru_cache(maxsize=None)
def _trained_layer(n, hashed):
    """(layer, state at step t, the final state, the keys trained after t):
    five steps of random keys (a hash table evicts), t after the second."""
    rng = np.random.default_rng()
    emb = _layer(n, hashed)
    opt = sok_jax.optim.adagrad(0.3)
    step = _trainer(emb, opt)
    state = emb.init(int(rng.integers(1 << 30)))
    opt_state = emb.init_optimizer(opt, state)
    high = 6 * ROWS * n if hashed else ROWS * n  # a hash table evicts
    seen, early = [], None
    for i in range(5):
        ids = rng.integers(-1, high, (4 * n, SLOTS, NNZ)).astype(np.int32)
        state, opt_state = step(state, opt_state, ids)
        if i == 1:
            early = state
        elif i > 1:
            seen.append(ids)
    touched = np.unique(np.concatenate([s.ravel() for s in seen]))
    return emb, early, state, touched[touched >= 0]


@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["one-call", "calls-of-4-2-1-keys"])
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("hashed", [False, True], ids=["direct", "hash"])
def test_layer_delta_gives_the_trained_rows(n, hashed, chunk_rows, monkeypatch):
    """`chunk_rows` 4: the delta goes in calls of 4, then 2 and 1 keys per
    device (evictions in the first), as a large one does in calls of
    CHUNK_ROWS down to MIN_CALL_ROWS."""
    require_devices(n)
    if chunk_rows:
        monkeypatch.setattr(deltas, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(deltas, "MIN_CALL_ROWS", 1)
    emb, early, final, touched = _trained_layer(n, hashed)
    if hashed:
        delta = emb.export_pairs(final, since_step=emb.step(early))
        assert delta.evicted.size and delta.keys.size
    else:  # a direct table keeps no scores: the pairs of the keys trained since
        delta = (touched, emb.logical_rows(final, touched))
    every = n > 1 and not chunk_rows  # the 16-bit formats once
    for fmt in FORMATS if every else ("float32", "int8"):
        got = sok_jax.serving.apply_delta(emb, _serving(emb, early, fmt), delta)
        want = _serving(emb, final, fmt)
        assert type(got) is type(want)
        if not hashed:  # every row in place: touched rows as trained, the rest as they were
            for a, b in zip(jax.tree.leaves(got.table), jax.tree.leaves(want.table)):
                np.testing.assert_array_equal(a, b, err_msg=fmt)
            continue
        _assert_same_rows(
            _rows_by_key(got.table, got.slot_keys), _rows_by_key(want.table, want.slot_keys), fmt
        )
    if hashed:  # the lookup finds every row; evicted keys are unseen: zeros, counted
        size = 4 * n * SLOTS * NNZ
        ids = np.concatenate([delta.evicted[: size // 2], delta.keys[: size // 2]])
        ids = np.pad(ids, (0, size - ids.size), constant_values=-1).reshape(4 * n, SLOTS, NNZ)
        out, got = emb.apply(got, ids, training=False)
        want_out, _ = emb.apply(want, ids, training=False)
        np.testing.assert_array_equal(out, want_out)
        gone = np.isin(ids, delta.evicted)
        assert not np.any(np.asarray(out)[gone.all(-1)])
        assert int(np.sum(np.asarray(got.stats.unseen))) == min(delta.evicted.size, size // 2)


def test_call_widths_cover_each_device_with_little_padding(monkeypatch):
    """Against the rule's invariants for random counts and sizes: powers of
    two, non-increasing, at most CHUNK_ROWS; they cover `count` keys, and
    only the last call pads, by less than MIN_CALL_ROWS."""
    rng = np.random.default_rng()
    for _ in range(200):
        chunk = 1 << int(rng.integers(0, 12))
        low = 1 << int(rng.integers(0, 12))
        count = int(rng.integers(0, 5 * chunk + 3))
        monkeypatch.setattr(deltas, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(deltas, "MIN_CALL_ROWS", low)
        widths = deltas._call_widths(count)
        low = min(low, chunk)
        assert all(w & (w - 1) == 0 and low <= w <= chunk for w in widths), widths
        assert widths == sorted(widths, reverse=True)
        assert 0 <= sum(widths) - count < low or (count == 0 and widths == [low])
        assert sum(widths[:-1]) < count or count == 0  # every call but the last is full


def _collection(n):
    T, F = sok_jax.TableSpec, sok_jax.FeatureSpec
    tables = [
        T("users", 16 * n, 8, combiner="sum", placement="row"),
        T("items", 8 * n, 4, combiner="mean", use_hashtable=True, hash_options=LOGGED),
        T("tags", 16, 4, combiner="sum", use_hashtable=True, placement="replicated",
          hash_options=sok_jax.HashOptions(track_scores=True)),
    ]
    feats = [F("user", "users", 2), F("item", "items", 2), F("tag", "tags", 2)]
    return sok_jax.EmbeddingCollection(tables, feats, mesh=mesh_of(n), axis_name=AXIS)


def test_collection_delta_per_table():
    n = 8
    require_devices(n)
    rng = np.random.default_rng()
    coll = _collection(n)
    opt = sok_jax.optim.adagrad(0.3)
    step = _trainer(coll, opt)
    state = coll.init(int(rng.integers(1 << 30)))
    opt_state = coll.init_optimizer(opt, state)
    high = {"user": 16 * n, "item": 30 * n, "tag": 12}
    users, early = [], None
    for i in range(4):
        batch = {f: rng.integers(-1, h, (4 * n, 2)).astype(np.int32) for f, h in high.items()}
        state, opt_state = step(state, opt_state, batch)
        if i == 1:
            early = state
        elif i > 1:
            users.append(batch["user"])
    t = coll.step(early)
    touched = np.unique(np.concatenate(users))
    touched = touched[touched >= 0]
    keys, vectors = coll.export_pairs(state, "users")
    delta = {
        "items": coll.export_pairs(state, "items", since_step=t),
        "tags": coll.export_pairs(state, "tags", since_step=t),
        "users": (touched, vectors[np.searchsorted(keys, touched)]),
    }
    for fmt in ("float32", "int8"):
        got = sok_jax.serving.apply_delta(coll, _serving(coll, early, fmt), delta)
        assert type(got) is type(_serving(coll, early, fmt))
        want = _serving(coll, state, fmt)
        for unit, shard in want.shards.items():
            have = got.shards[unit]
            if shard.slot_keys is None:
                for a, b in zip(jax.tree.leaves(have.table), jax.tree.leaves(shard.table)):
                    np.testing.assert_array_equal(a, b, err_msg=f"{fmt} {unit}")
                continue
            _assert_same_rows(
                _rows_by_key(have.table, have.slot_keys),
                _rows_by_key(shard.table, shard.slot_keys),
                f"{fmt} {unit}",
            )
    # the inference tables look up what the final state's do
    batch = {f: rng.integers(-1, h, (4 * n, 2)).astype(np.int32) for f, h in high.items()}
    a, _ = coll.apply(got, batch, training=False)
    b, _ = coll.apply(want, batch, training=False)
    for f in a:
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)


def test_bad_deltas_are_refused_by_name():
    emb, early, final, _ = _trained_layer(1, True)
    delta = emb.export_pairs(final, since_step=emb.step(early))
    qstate = sok_jax.serving.quantize(emb, early, "int8")
    apply = sok_jax.serving.apply_delta
    with pytest.raises(ValueError, match="export of table 'items', not of 'table'"):
        apply(emb, qstate, delta._replace(table="items"))
    wide = np.zeros((3, D + 4), np.float32)
    with pytest.raises(ValueError, match="vectors are 12 wide, table 'table' has dim 8"):
        apply(emb, qstate, (np.arange(3), wide))
    with pytest.raises(ValueError, match="one TableExport .*, got a dict"):
        apply(emb, qstate, {"table": delta})
    with pytest.raises(ValueError, match="NaN or Inf"):
        apply(emb, qstate, (np.arange(2), np.full((2, D), np.nan, np.float32)))
    with pytest.raises(ValueError, match="keys must be distinct"):
        apply(emb, qstate, (np.asarray([5, 5]), np.zeros((2, D), np.float32)))
    other = _layer(1, True, dim=D + 4)
    with pytest.raises(ValueError, match="quantized state"):
        apply(other, qstate, delta)
    # a direct table: keys in range, nothing evicted
    direct = _layer(1, False)
    dstate = direct.init(0)
    with pytest.raises(ValueError, match="keys must lie in \\[0, 32\\)"):
        apply(direct, dstate, (np.asarray([40]), np.zeros((1, D), np.float32)))
    with pytest.raises(ValueError, match="evicts 1 keys, but table 'table' never evicts"):
        apply(direct, dstate, delta._replace(keys=delta.keys[:0], vectors=delta.vectors[:0],
                                            evicted=delta.evicted[:1]))
    # a collection: per table, tables it has
    coll = _collection(1)
    cstate = coll.init(0)
    with pytest.raises(ValueError, match="no table 'table'"):
        apply(coll, cstate, {"table": delta})
    with pytest.raises(ValueError, match="export of table 'table', not of 'items'"):
        apply(coll, cstate, {"items": delta._replace(vectors=delta.vectors[:, :4])})
    with pytest.raises(ValueError, match="is \\{table: TableExport"):
        apply(coll, cstate, delta)


@pytest.mark.parametrize("eviction,fmt", [(None, "float32"), ("lru", "int8")])
def test_a_full_serving_table_raises_and_keeps_its_state(eviction, fmt):
    """A delta of more keys than the serving table has rows (or, with
    eviction, than a bucket of 16 holds) is refused, never half-applied."""
    options = sok_jax.HashOptions(eviction=eviction, track_scores=True)
    big = _layer(1, True, rows=256, options=options)
    small = _layer(1, True, rows=16, options=options)
    keys = np.arange(40, dtype=np.int32)
    vectors = np.ones((40, D), np.float32)
    state = _serving(small, small.init(0), fmt)
    before = [np.asarray(x) for x in jax.tree.leaves(state)]
    with pytest.raises(ValueError, match="table 'table': 24 of the delta's keys found no free row"):
        sok_jax.serving.apply_delta(small, state, (keys, vectors))
    for a, b in zip(before, jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    # the same keys fit the table they were trained in
    sok_jax.serving.apply_delta(big, big.init(0), (keys, vectors))


def test_a_host_tier_layer_serves_and_follows_from_its_quantized_state():
    """Tables in host memory are served (and take deltas) as the HBM
    inference tables `quantize` makes of them; their float state is refused."""
    require_devices(2)
    emb = sok_jax.DistributedEmbedding(
        combiner="sum", max_vocabulary_size_per_gpu=ROWS, embedding_vec_size=D, slot_num=1,
        max_nnz=1, use_hashtable=False, key_dtype=jnp.int32, mesh=mesh_of(2), axis_name=AXIS,
        storage="host_cached", cache_rows=8,
    )
    state = emb.init(0)
    keys = np.arange(0, 2 * ROWS, 5, dtype=np.int32)[:12]
    vectors = np.random.default_rng().normal(size=(keys.size, D)).astype(np.float32)
    with pytest.raises(ValueError, match="stores its rows in host memory"):
        sok_jax.serving.apply_delta(emb, state, (keys, vectors))
    qstate = sok_jax.serving.apply_delta(
        emb, sok_jax.serving.quantize(emb, state, "int8"), (keys, vectors)
    )
    out, _ = emb.apply(qstate, keys.reshape(-1, 1, 1), training=False)
    want = dequantize(quantize_int8(jnp.asarray(vectors)))
    np.testing.assert_array_equal(np.asarray(out).reshape(keys.size, D), want)
