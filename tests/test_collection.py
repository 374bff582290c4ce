"""`sok_jax.EmbeddingCollection` on 1, 2 and 8 (forced host CPU) devices,
against a numpy oracle of its logical tables.

Every placement ("row", "table", "replicated") x direct/hash, with one
table per combiner (sum, mean, sqrtn, None = sequence output) at dims 1, 3,
16 and 128, two features on one table, weights, and padded, ragged and BCOO
ids: the outputs, the dense table gradients (jax.grad through `apply`) and
three sparse training steps (SGD and Adagrad, fused `sparse_update`) equal
the oracle. The oracle reads the logical tables through `export_pairs`,
and is independent of the code under test otherwise: a numpy loop over the
bags in float64. Also: the logical tables do not depend on the placement or
the device count; replicated tables stay bit-identical across devices; a
one-table collection equals `DistributedEmbedding`; the planner's choices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from oracles import build_form, pad_value, random_bags

import sok_jax
from sok_jax import optim

DIMS = (1, 3, 16, 128)
COMBINERS = ("sum", "mean", "sqrtn", None)
VOCAB = 400  # per table; hash tables see keys [0, VOCAB) of a capacity above it
BATCH = 16
TOL = dict(rtol=2e-5, atol=2e-5)


def make_collection(n, placement, hashed, dims=DIMS, **kw):
    """Four tables (one per combiner and dim) pinned to `placement`, five
    features: two on the first table (padded and ragged), BCOO on the
    second, weighted padded on the third, the sequence table padded. With
    one dim for all, the row-wise tables share one array."""
    tables = [
        sok_jax.TableSpec(
            f"t{i}",
            2 * VOCAB if hashed else VOCAB,
            d,
            combiner=c,
            use_hashtable=hashed,
            placement=placement,
        )
        for i, (c, d) in enumerate(zip(COMBINERS, dims))
    ]
    features = [
        sok_jax.FeatureSpec("f0a", "t0", 3),
        sok_jax.FeatureSpec("f0b", "t0", 2),
        sok_jax.FeatureSpec("f1", "t1", 4),
        sok_jax.FeatureSpec("f2", "t2", 3),
        sok_jax.FeatureSpec("f3", "t3", 3),
    ]
    forms = {"f0a": "padded", "f0b": "ragged", "f1": "bcoo", "f2": "padded", "f3": "padded"}
    weighted = {"f0a": False, "f0b": True, "f1": True, "f2": True, "f3": False}
    coll = sok_jax.EmbeddingCollection(
        tables, features, mesh=mesh_of(n), axis_name=AXIS, batch_size=BATCH, **kw
    )
    return coll, forms, weighted


def make_batch(coll, forms, weighted, rng, hashed):
    """({feature: ids}, {feature: weights}, {feature: BagSet}) of fresh keys."""
    batch, weights, bagsets = {}, {}, {}
    for name, f in coll.feature_specs.items():
        bags = random_bags(
            rng,
            batch=BATCH,
            slots=1,
            nnz=f.max_nnz,
            rows=VOCAB,
            key_dtype="int32",
            weighted=weighted[name],
            with_oob=not hashed,
        )
        built = build_form(bags, forms[name], rng)
        ids = built.ids
        if forms[name] == "padded":
            ids = ids.reshape(BATCH, f.max_nnz)
        batch[name] = ids
        if built.weights is not None:
            w = built.weights
            weights[name] = w.reshape(BATCH, f.max_nnz) if forms[name] == "padded" else w
        bagsets[name] = (bags, built)
    return batch, weights, bagsets


def logical(coll, state):
    """{table: {key: float64 vector}} through export_pairs."""
    out = {}
    for t in coll.table_specs:
        keys, vecs = coll.export_pairs(state, t)
        out[t] = {int(k): np.asarray(v, np.float64) for k, v in zip(keys, vecs)}
    return out


def _scale(combiner, ws):
    if combiner in ("sum", None):
        return 1.0
    t = sum(ws) if combiner == "mean" else float(np.sqrt(sum(w * w for w in ws)))
    return 1.0 / t if t > 0 else 0.0


def _terms(bags, b, hashed):
    """(position j, key, weight) of the valid ids of sample b."""
    out = []
    for j, k in enumerate(bags.keys[b][0]):
        valid = (k != pad_value("int32")) if hashed else (0 <= k < VOCAB)
        if valid:
            out.append((j, k, 1.0 if bags.weights is None else float(bags.weights[b][0][j])))
    return out


def np_outputs(coll, tables, bagsets, hashed):
    """{feature: the oracle's output} from logical tables `tables`."""
    outs = {}
    for name, f in coll.feature_specs.items():
        spec = coll.table_specs[f.table]
        vec = tables[f.table]
        zero = np.zeros(spec.embedding_dim)
        bags, built = bagsets[name]
        if spec.combiner is None:
            out = np.zeros((BATCH, f.max_nnz, spec.embedding_dim))
            for b in range(BATCH):
                for j, k, _ in _terms(bags, b, hashed):
                    col = built.positions[b][0][j] - b * f.max_nnz  # padded column
                    out[b, col] = vec.get(k, zero)
        else:
            out = np.zeros((BATCH, spec.embedding_dim))
            for b in range(BATCH):
                terms = _terms(bags, b, hashed)
                s = _scale(spec.combiner, [w for _, _, w in terms])
                for _, k, w in terms:
                    out[b] += w * s * vec.get(k, zero)
        outs[name] = out
    return outs


def np_grads(coll, bagsets, cot, hashed):
    """{table: {key: gradient of sum(cot * out) w.r.t. its vector}}."""
    grads = {t: {} for t in coll.table_specs}
    for name, f in coll.feature_specs.items():
        spec = coll.table_specs[f.table]
        g = grads[f.table]
        bags, built = bagsets[name]
        c = np.asarray(cot[name], np.float64)
        for b in range(BATCH):
            terms = _terms(bags, b, hashed)
            s = _scale(spec.combiner, [w for _, _, w in terms])
            for j, k, w in terms:
                if spec.combiner is None:
                    contrib = c[b, built.positions[b][0][j] - b * f.max_nnz]
                else:
                    contrib = w * s * c[b]
                g[k] = g.get(k, 0.0) + contrib
    return grads


def cotangents(coll, outs, rng):
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in outs.items()}


def _close(got, want, what):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, err_msg=what, **TOL)


def _assert_logical(got, want, what):
    for t in want:
        for k, v in want[t].items():
            _close(got[t][k], v, f"{what}: table {t} key {k}")


# Every placement x mode on 8 devices; a few on 1 and 2; row-wise tables of
# one dim (one shared array) on 1 and 8.
CASES = [(8, p, h, DIMS) for p in ("row", "table", "replicated") for h in (False, True)]
CASES += [(1, "row", False, DIMS), (1, "replicated", True, DIMS), (2, "table", True, DIMS)]
CASES += [(2, "row", True, DIMS), (8, "row", False, (16,) * 4), (1, "row", False, (16,) * 4)]


@pytest.mark.parametrize("n,placement,hashed,dims", CASES)
def test_outputs_and_gradients_equal_the_oracle(n, placement, hashed, dims):
    require_devices(n)
    rng = np.random.default_rng()
    coll, forms, weighted = make_collection(n, placement, hashed, dims)
    if dims != DIMS and placement == "row":  # the four tables share one array
        assert len({t.unit for t in coll.plan.tables}) == 1
    state = coll.init(int(rng.integers(1 << 30)))
    batch, weights, bagsets = make_batch(coll, forms, weighted, rng, hashed)

    outs, st = jax.jit(coll.apply)(state, batch, weights)
    before = logical(coll, st)  # hash mode: the keys this call inserted, initialized
    want = np_outputs(coll, before, bagsets, hashed)
    for name in want:
        _close(outs[name], want[name], f"output of {name}")
    for t, s in st.stats.items():
        assert int(np.sum(np.asarray(s.overflow))) == 0, t
        assert int(np.sum(np.asarray(s.hash_full))) == 0, t
    n_invalid = sum(int(np.sum(np.asarray(s.invalid))) for s in st.stats.values())
    if hashed:
        assert n_invalid == 0
    else:
        assert n_invalid > 0  # the oracle draws out-of-range ids: they are counted

    # The dense path: jax.grad of sum(cot * out) w.r.t. the tables.
    cot = cotangents(coll, outs, rng)

    def loss(tables, state):
        shards = {k: dataclasses.replace(v, table=tables[k]) for k, v in state.shards.items()}
        o, _ = coll.apply(dataclasses.replace(state, shards=shards), batch, weights)
        return sum(jnp.sum(o[k] * cot[k]) for k in o)

    tables = {k: v.table for k, v in st.shards.items()}
    d_tables = jax.jit(jax.grad(loss))(tables, st)
    shards = {k: dataclasses.replace(v, table=d_tables[k]) for k, v in st.shards.items()}
    d_logical = logical(coll, dataclasses.replace(st, shards=shards))
    want_g = np_grads(coll, bagsets, cot, hashed)
    for t in coll.table_specs:
        for k, v in d_logical[t].items():
            _close(v, want_g[t].get(k, 0.0), f"dense gradient of table {t} key {k}")

    # The sparse path: three fused SGD and Adagrad steps on the same batch.
    for name, opt, oracle in (
        ("sgd", optim.sgd(0.5), _sgd_oracle),
        ("adagrad", optim.adagrad(0.5, initial_accumulator_value=0.2), _adagrad_oracle),
    ):
        s = st
        opt_state = coll.init_optimizer(opt, s)

        @jax.jit
        def step(s, opt_state, opt=opt):
            o, ctx, s = coll.lookup(s, batch, weights)
            return coll.sparse_update(s, opt, opt_state, ctx, cot)

        want_t = {t: dict(v) for t, v in before.items()}
        acc = {t: {} for t in want_t}
        for _ in range(3):
            s, opt_state = step(s, opt_state)
            oracle(want_t, acc, want_g)
        _assert_logical(logical(coll, s), want_t, f"{name} after 3 steps")
        if placement == "replicated":
            for k, shard in s.shards.items():
                copies = [np.asarray(x.data) for x in shard.table.addressable_shards]
                for c in copies[1:]:
                    np.testing.assert_array_equal(c, copies[0], err_msg=f"replicas of {k}")


def _sgd_oracle(tables, acc, grads):
    for t, g in grads.items():
        for k, v in g.items():
            tables[t][k] = tables[t][k] - 0.5 * v


def _adagrad_oracle(tables, acc, grads):
    for t, g in grads.items():
        for k, v in g.items():
            a = acc[t].get(k, 0.2) + v * v
            acc[t][k] = a
            tables[t][k] = tables[t][k] - 0.5 * v / np.sqrt(a + 1e-7)


def test_logical_tables_do_not_depend_on_placement_or_devices():
    """A key's initial vector depends on the seed, its table's name and the
    key: every placement on 1, 2 and 8 devices exports the same tables."""
    require_devices(8)
    got = []
    for n in (1, 2, 8):
        for placement in ("row", "table", "replicated"):
            coll, _, _ = make_collection(n, placement, False)
            got.append(logical(coll, coll.init(5)))
    for other in got[1:]:
        for t in got[0]:
            for k, v in got[0][t].items():
                np.testing.assert_array_equal(other[t][k], v)
    # ...and two tables of the same size and seed differ (the name seeds them).
    assert not np.allclose(got[0]["t2"][3][:3], got[0]["t1"][3])


def test_one_table_collection_equals_distributed_embedding():
    """S features on one row-wise table compute what DistributedEmbedding
    with slot_num=S does, on the same logical table, also over sparse
    training steps."""
    n, S, nnz = 8, 3, 2
    require_devices(n)
    rng = np.random.default_rng()
    emb = sok_jax.DistributedEmbedding(
        "mean",
        VOCAB // n,
        16,
        slot_num=S,
        max_nnz=nnz,
        mesh=mesh_of(n),
        axis_name=AXIS,
        use_hashtable=False,
    )
    coll = sok_jax.EmbeddingCollection(
        [sok_jax.TableSpec("t", VOCAB, 16, combiner="mean", placement="row")],
        [sok_jax.FeatureSpec(f"s{i}", "t", nnz) for i in range(S)],
        mesh=mesh_of(n),
        axis_name=AXIS,
    )
    e_state = emb.init(1)
    c_state = coll.import_pairs({"t": emb.export_pairs(e_state)})
    ids = rng.integers(-1, VOCAB, (BATCH, S, nnz)).astype(np.int32)
    batch = {f"s{i}": ids[:, i] for i in range(S)}
    opt = optim.adam(0.05)
    e_opt, c_opt = emb.init_optimizer(opt, e_state), coll.init_optimizer(opt, c_state)
    cot = rng.normal(size=(BATCH, S, 16)).astype(np.float32)

    @jax.jit
    def e_step(state, o):
        out, ctx, state = emb.lookup(state, ids)
        state, o = emb.sparse_update(state, opt, o, ctx, cot)
        return out, state, o

    @jax.jit
    def c_step(state, o):
        outs, ctx, state = coll.lookup(state, batch)
        state, o = coll.sparse_update(state, opt, o, ctx, {f"s{i}": cot[:, i] for i in range(S)})
        return outs, state, o

    for _ in range(3):
        e_out, e_state, e_opt = e_step(e_state, e_opt)
        c_out, c_state, c_opt = c_step(c_state, c_opt)
        for i in range(S):
            np.testing.assert_allclose(
                np.asarray(c_out[f"s{i}"]), np.asarray(e_out[:, i]), rtol=1e-6, atol=1e-6
            )
    keys, vecs = emb.export_pairs(e_state)
    c_keys, c_vecs = coll.export_pairs(c_state, "t")
    np.testing.assert_array_equal(c_keys, keys)
    np.testing.assert_allclose(c_vecs, vecs, rtol=1e-6, atol=1e-6)


def test_planner_choices():
    """The plan of a fixed set of tables on 8 devices (one-hot features,
    batch 16384 per device, no capacity factor, D 16): a tiny table
    replicated (its dense gradient sum is smaller than a bucket of its
    keys), a small one row-wise (a destination receives at most its 75 rows
    per device), mid-size ones table-wise in one column on distinct devices
    (one bucket for three tables), one larger than half the per-device
    budget row-wise; pins kept."""
    require_devices(8)
    sizes = {"tiny": 4, "small": 600, "mid0": 90_000, "mid1": 80_000, "mid2": 70_000}
    sizes.update({"huge": 40_000_000, "pinned": 50})
    tables = [
        sok_jax.TableSpec(k, v, 16, placement="row" if k == "pinned" else "auto")
        for k, v in sizes.items()
    ]
    features = [sok_jax.FeatureSpec(k, k) for k in sizes]
    coll = sok_jax.EmbeddingCollection(
        tables,
        features,
        mesh=mesh_of(8),
        axis_name=AXIS,
        batch_size=8 * 16384,
        memory_per_device=2 << 30,
    )
    plan = coll.plan
    got = {t.table: t.placement for t in plan.tables}
    assert got == {
        "tiny": "replicated",
        "small": "row",
        "mid0": "table",
        "mid1": "table",
        "mid2": "table",
        "huge": "row",
        "pinned": "row",
    }, got
    mids = [plan.table(m) for m in ("mid0", "mid1", "mid2")]
    assert len({t.unit for t in mids}) == 1  # one column
    assert len({t.devices for t in mids}) == 3  # on distinct devices
    assert plan.exchange_bytes < plan.row_wise_exchange_bytes
    text = str(plan)
    assert "huge" in text and "replicated" in text and "memory per device" in text


def test_one_exchange_per_direction():
    """All non-replicated tables share one all_to_all per direction: two in
    the lookup (keys, vectors), one more in the sparse update (cotangents)."""
    require_devices(8)
    tables = [
        sok_jax.TableSpec("a", 4000, 8, placement="row"),
        sok_jax.TableSpec("b", 300, 4, combiner="mean", placement="table"),
        sok_jax.TableSpec("c", 200, 4, combiner="mean", placement="table"),
        sok_jax.TableSpec("h", 500, 16, use_hashtable=True),
        sok_jax.TableSpec("r", 7, 2, placement="replicated"),
    ]
    features = [sok_jax.FeatureSpec(t.name, t.name, 2) for t in tables]
    coll = sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(8), axis_name=AXIS)
    state = coll.init(0)
    opt = optim.sgd(0.1)
    opt_state = coll.init_optimizer(opt, state)
    batch = {t.name: np.zeros((BATCH, 2), np.int32) for t in tables}

    def lookup(state):
        return coll.lookup(state, batch)[0]

    def step(state, opt_state):
        outs, ctx, state = coll.lookup(state, batch)
        return coll.sparse_update(state, opt, opt_state, ctx, outs)

    def count(text):
        return text.count("all_to_all") + text.count("all-to-all")

    assert count(jax.jit(lookup).lower(state).as_text()) == 2
    assert count(jax.jit(step).lower(state, opt_state).as_text()) == 3


def test_bad_batches_raise_naming_what_is_wrong():
    require_devices(2)
    coll, _, _ = make_collection(2, "row", False)
    state = coll.init(0)
    ok = {name: np.zeros((BATCH, f.max_nnz), np.int32) for name, f in coll.feature_specs.items()}

    def bad(match, batch=None, weights=None):
        with pytest.raises(ValueError, match=match):
            coll.apply(state, batch if batch is not None else ok, weights)

    bad(r"lacks \['f1'\]", {k: v for k, v in ok.items() if k != "f1"})
    bad(r"unknown features \['zz'\]", {**ok, "zz": ok["f1"]})
    bad("f1.*more than its max_nnz=4", {**ok, "f1": np.zeros((BATCH, 5), np.int32)})
    bad("f2.*key_dtype", {**ok, "f2": np.zeros((BATCH, 3), np.uint32)})
    bad("f2.*jax_enable_x64", {**ok, "f2": np.zeros((BATCH, 3), np.int64)})
    bad("same batch size", {**ok, "f2": np.zeros((BATCH // 2, 3), np.int32)})
    bad("divisible", {k: v[:3] for k, v in ok.items()})
    bad("f3.*sequence.*no weights", weights={"f3": np.ones((BATCH, 3), np.float32)})
    bad("f1.*ids must be", {**ok, "f1": np.zeros((BATCH, 4, 1), np.int32)})
    with pytest.raises(ValueError, match="reads table 'nope'"):
        sok_jax.EmbeddingCollection(
            [sok_jax.TableSpec("t", 4, 2)], [sok_jax.FeatureSpec("f", "nope")], mesh=mesh_of(2)
        )
    with pytest.raises(ValueError, match="no feature reads"):
        sok_jax.EmbeddingCollection(
            [sok_jax.TableSpec("t", 4, 2), sok_jax.TableSpec("u", 4, 2)],
            [sok_jax.FeatureSpec("f", "t")],
            mesh=mesh_of(2),
        )
    for kw, match in (
        (dict(embedding_dim=2.5), "embedding_dim"),
        (dict(vocabulary_size=0), "vocabulary_size"),
        (dict(combiner="max"), "combiner"),
        (dict(placement="column"), "placement"),
        (dict(dtype=jnp.int32), "dtype"),
    ):
        with pytest.raises(ValueError, match=match):
            sok_jax.TableSpec("t", **{"vocabulary_size": 4, "embedding_dim": 2, **kw})
    with pytest.raises(ValueError, match="max_nnz"):
        sok_jax.FeatureSpec("f", "t", 0)


def test_counters_per_table_and_hash_full():
    """Overflow, invalid ids and full hash shards are counted per table and
    device; check_stats names the table."""
    n = 4
    require_devices(n)
    tables = [
        sok_jax.TableSpec("d", 64, 4, placement="row"),
        sok_jax.TableSpec("h", 8, 4, use_hashtable=True, placement="row"),
    ]
    features = [sok_jax.FeatureSpec("d", "d", 2), sok_jax.FeatureSpec("h", "h", 2)]
    coll = sok_jax.EmbeddingCollection(tables, features, mesh=mesh_of(n), axis_name=AXIS)
    rng = np.random.default_rng()
    d_ids = rng.integers(0, 64, (BATCH, 2)).astype(np.int32)
    d_ids[0, 0] = 64  # invalid, on device 0
    d_ids[BATCH - 1, 1] = -5  # invalid, on the last device
    h_ids = rng.permutation(10_000)[: BATCH * 2].reshape(BATCH, 2).astype(np.int32)
    _, st = jax.jit(coll.apply)(coll.init(0), {"d": d_ids, "h": h_ids})
    np.testing.assert_array_equal(np.asarray(st.stats["d"].invalid), [1, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(st.stats["h"].invalid), 0)
    full = int(np.sum(np.asarray(st.stats["h"].hash_full)))
    assert full == BATCH * 2 - 8  # 32 distinct keys, 8 rows (2 per device)
    with pytest.raises(sok_jax.EmbeddingError, match="table 'h'.*full") as err:
        sok_jax.check_stats(st)
    assert "table 'd'" in str(err.value)


def test_export_import_across_device_counts_and_orbax():
    """Pairs exported from 8 devices import on 2 (another plan) and give the
    same outputs; orbax restores the whole state bit for bit."""
    require_devices(8)
    ocp = pytest.importorskip("orbax.checkpoint")
    rng = np.random.default_rng()
    coll8, forms, weighted = make_collection(8, "table", True)
    state = coll8.init(3)
    batch, weights, _ = make_batch(coll8, forms, weighted, rng, True)
    out8, state = jax.jit(coll8.apply)(state, batch, weights)
    pairs = {t: coll8.export_pairs(state, t) for t in coll8.table_specs}
    coll2, _, _ = make_collection(2, "row", True)
    moved = coll2.import_pairs(pairs, seed=3)
    out2, _ = jax.jit(lambda s: coll2.apply(s, batch, weights, training=False))(moved)
    for k in out8:
        np.testing.assert_allclose(np.asarray(out2[k]), np.asarray(out8[k]), **TOL)

    import tempfile

    path = tempfile.mkdtemp() + "/ckpt"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        state,
        coll8.state_shardings(),
    )
    restored = ckpt.restore(path, abstract)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sparse_grad_then_apply_equals_sparse_update():
    require_devices(8)
    rng = np.random.default_rng()
    coll, forms, weighted = make_collection(8, "replicated", False)
    state = coll.init(2)
    batch, weights, _ = make_batch(coll, forms, weighted, rng, False)
    opt = optim.adam(0.1)
    o0 = coll.init_optimizer(opt, state)
    outs, ctx, st = jax.jit(lambda s: coll.lookup(s, batch, weights))(state)
    cot = cotangents(coll, outs, rng)
    fused = jax.jit(lambda s, o: coll.sparse_update(s, opt, o, ctx, cot))(st, o0)
    grads = jax.jit(lambda: coll.sparse_grad(ctx, cot))()
    o1 = coll.init_optimizer(opt, state)
    two = jax.jit(lambda s, o: coll.apply_gradients(s, opt, o, grads))(st, o1)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
