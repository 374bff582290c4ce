"""Inference tables (sok_jax.distributed.quantized, sok_jax.serving.quantize):
the int8 lookup kernel against a numpy oracle of dequantize-then-combine,
the quantization error per row, the quantized layer (direct and hash) and
collection (row, hash, replicated and sequence tables) against their float
twins on 1 and 8 devices, the refusals, and an exported quantized model
served in a fresh process.

Tolerances: the int8 lookup is the float lookup of the dequantized rows, so
kernel and layer agree with dequantize-then-combine up to float32 summation
order (`_SUM_RTOL` of each bag's sum of |weight * value|). Against the
float32 table, an int8 element is within scale / 2 of the trained one
(scale = the row's range / 255), so a bag of k unit-weight keys is within
k * max(scale) / 2 (sum; mean and sqrtn divide by k and sqrt(k)); 16-bit rows
are within 2^-8 (bfloat16) or 2^-11 (float16) of each element, their
outputs rounded once more."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from subprocesses import child_env, run_checked
from test_serving import sparse_trained

import sok_jax
from sok_jax.distributed.quantized import dequantize, quantize_int8
from sok_jax.ops import ffi, reference
from sok_jax.ops.quant_ops import QuantizedRows

D, SLOTS, NNZ, ROWS = 8, 3, 4, 64
_SUM_RTOL = 1e-5
_EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


# ------------------------------------------------------------ the kernel


def _int8_table(rng, rows, dim):
    q = rng.integers(0, 256, (rows, dim)).astype(np.uint8)
    sb = np.stack([rng.uniform(0.001, 0.05, rows), rng.normal(size=rows)], 1).astype(np.float32)
    return QuantizedRows(jnp.asarray(q), jnp.asarray(sb))


def _bags(rng, m, max_len, rows, key_dtype):
    lengths = rng.integers(0, max_len + 1, m)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    n = int(offsets[-1])
    ids = rng.integers(0, rows, n)
    ids = np.where(rng.random(n) < 0.1, rows + 3, ids)  # out of range
    ids = np.where(rng.random(n) < 0.1, -1, ids)  # padding
    return ids.astype(np.int64).astype(key_dtype), offsets


def _oracle(table, ids, offsets, weights, combiner):
    """float64: each bag's valid rows dequantized, weighted, summed, scaled;
    and each bag's sum of |weight * value| (the summation-order bound)."""
    q, sb = np.asarray(table.q, np.float64), np.asarray(table.scale_bias, np.float64)
    deq = q * sb[:, :1] + sb[:, 1:]
    rows = deq.shape[0]
    ids = ids.astype(np.int64)
    ids = np.where(ids == np.iinfo(np.uint32).max, -1, ids)  # uint32 padding
    m = offsets.shape[0] - 1
    out, mag = np.zeros((m, deq.shape[1])), np.zeros(m)
    for b in range(m):
        acc, ws, w2, a = np.zeros(deq.shape[1]), 0.0, 0.0, np.zeros(deq.shape[1])
        for j in range(offsets[b], offsets[b + 1]):
            if not 0 <= ids[j] < rows:
                continue
            wj = 1.0 if weights is None else float(weights[j])
            acc += wj * deq[ids[j]]
            a += np.abs(wj * deq[ids[j]])
            ws, w2 = ws + wj, w2 + wj * wj
        f = {"sum": 1.0, "mean": 1 / ws if ws else 0.0, "sqrtn": 1 / np.sqrt(w2) if w2 else 0.0}
        out[b], mag[b] = acc * f[combiner], np.max(a) * abs(f[combiner])
    return out, mag


@pytest.mark.parametrize("ops", [ffi, reference], ids=["ffi", "reference"])
@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("key_dtype", [np.int32, np.uint32])
@pytest.mark.parametrize("dim", [8, 5])
def test_int8_lookup_is_dequantize_then_combine(ops, combiner, weighted, key_dtype, dim):
    rng = np.random.default_rng()
    table = _int8_table(rng, 50, dim)
    ids, offsets = _bags(rng, 17, 6, 50, key_dtype)
    w = rng.uniform(0.2, 2.0, ids.shape[0]).astype(np.float32) if weighted else None
    got = ops.lookup_combine_int8(
        table, jnp.asarray(ids), jnp.asarray(offsets),
        jnp.asarray(w if weighted else np.zeros(0, np.float32)), combiner,
    )
    want, mag = _oracle(table, ids, offsets, w, combiner)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert np.all(np.abs(np.asarray(got) - want) <= _SUM_RTOL * (mag[:, None] + 1e-30))


@pytest.mark.parametrize("ops", [ffi, reference], ids=["ffi", "reference"])
def test_int8_lookup_of_fixed_length_bags_reads_no_offsets(ops):
    rng = np.random.default_rng()
    table = _int8_table(rng, 40, 12)
    ids = rng.integers(-1, 45, 30 * 3).astype(np.int32)
    offsets = np.arange(31, dtype=np.int32) * 3
    got = ops.lookup_combine_int8(
        table, jnp.asarray(ids), jnp.asarray(offsets), jnp.zeros((0,), jnp.float32), "mean", 3
    )
    want, mag = _oracle(table, ids, offsets, None, "mean")
    assert np.all(np.abs(np.asarray(got) - want) <= _SUM_RTOL * (mag[:, None] + 1e-30))


def test_int8_lookup_checks_its_table():
    t = _int8_table(np.random.default_rng(), 10, 4)
    ids, off, w = jnp.zeros((2,), jnp.int32), jnp.asarray([0, 2], jnp.int32), jnp.zeros((0,))
    w = w.astype(jnp.float32)
    with pytest.raises(ValueError, match="q must be uint8"):
        ffi.lookup_combine_int8(t._replace(q=t.q.astype(jnp.int8)), ids, off, w, "sum")
    with pytest.raises(ValueError, match="scale_bias must be float32 \\[10, 2\\]"):
        ffi.lookup_combine_int8(t._replace(scale_bias=t.scale_bias[:9]), ids, off, w, "sum")


# ------------------------------------------------------------ quantize


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_rows_are_within_half_a_step(dtype):
    rng = np.random.default_rng()
    t = rng.normal(size=(200, 16)) * rng.uniform(0.01, 10.0, (200, 1))
    t[:3] = 0.25  # constant rows: scale 0, exact
    t = jnp.asarray(t, dtype)
    qt = quantize_int8(t)
    w = np.asarray(t, np.float64)
    scale = np.asarray(qt.scale_bias[:, 0], np.float64)
    err = np.abs(np.asarray(dequantize(qt), np.float64) - w)
    # scale / 2, plus float32 rounding of the code and of q * scale + bias
    bound = scale / 2 + 4 * np.finfo(np.float32).eps * np.max(np.abs(w), axis=1)
    assert np.all(err <= bound[:, None])
    assert np.all(err[:3] == 0)
    np.testing.assert_allclose(scale, (w.max(1) - w.min(1)) / 255, rtol=1e-6)


def test_memory_per_row():
    assert sok_jax.serving.bytes_per_row(64, "int8") == 72  # 64 codes + scale + bias
    assert sok_jax.serving.bytes_per_row(64, "bfloat16") == 128  # float32: 256


# ----------------------------------------------------------- the layer


def _trained(n, hashed, rng, combiner="sum"):
    emb = sok_jax.DistributedEmbedding(
        combiner=combiner, max_vocabulary_size_per_gpu=ROWS, embedding_vec_size=D,
        slot_num=SLOTS, max_nnz=NNZ, use_hashtable=hashed, key_dtype=jnp.int32,
        mesh=mesh_of(n), axis_name=AXIS,
    )
    high = 1000 if hashed else ROWS * n
    state = sparse_trained(emb, rng, high, 0.5)
    # unseen hash keys, padding and (direct) out-of-range ids
    ids = rng.integers(-1, high + 20, (4 * n, SLOTS, NNZ)).astype(np.int32)
    return emb, state, ids


@pytest.mark.parametrize("n,hashed", [(1, False), (1, True), (8, False), (8, True)])
@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float16"])
@pytest.mark.parametrize("combiner", ["sum", "sqrtn"])
def test_quantized_layer_matches_the_float_layer(n, hashed, dtype, combiner):
    require_devices(n)
    rng = np.random.default_rng()
    emb, state, ids = _trained(n, hashed, rng, combiner)
    qstate = sok_jax.serving.quantize(emb, state, dtype)
    infer = jax.jit(lambda st, i: emb.apply(st, i, training=False))
    want, fstate = infer(state, ids)
    got, qnew = infer(qstate, ids)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # the same routing: the float layer over the dequantized rows
    deq = dataclasses.replace(state, table=dequantize(qstate.table))
    exact, _ = infer(deq, ids)
    got, want, exact = (np.asarray(x, np.float64) for x in (got, want, exact))
    keys = (np.asarray(ids) >= 0).sum(-1, keepdims=True)  # valid keys per bag, at most
    size = {"sum": keys, "sqrtn": np.sqrt(keys)}[combiner]
    if dtype == "int8":
        np.testing.assert_allclose(got, exact, rtol=_SUM_RTOL, atol=1e-6)
        row_err = np.max(np.abs(np.asarray(dequantize(qstate.table)) - np.asarray(state.table)))
        assert row_err <= np.max(np.asarray(qstate.table.scale_bias[:, 0])) / 2 * (1 + 1e-4)
        assert np.all(np.abs(got - want) <= row_err * size * (1 + 1e-4) + 1e-6)
    else:
        mag = np.max(np.abs(exact)) + np.max(np.abs(np.asarray(state.table))) * size
        assert np.all(np.abs(got - exact) <= 2 * _EPS[dtype] * mag)
        assert np.all(np.abs(got - want) <= 3 * _EPS[dtype] * mag)
    # unseen keys and invalid ids are counted as the float table counts them
    # (the float state's counters accumulate from init, the quantized one's
    # from quantize: compare what this call added)
    for field in ("invalid", "hash_full", "overflow"):
        added = np.asarray(getattr(fstate.stats, field)) - np.asarray(getattr(state.stats, field))
        np.testing.assert_array_equal(getattr(qnew.stats, field), added, err_msg=field)
    if hashed:  # keys never trained: zeros, counted once per (asking device, key)
        unseen = _unseen_keys(emb, state, np.asarray(ids))
        assert int(np.sum(np.asarray(qnew.stats.unseen))) == unseen > 0
    else:
        assert qnew.stats.unseen is None and int(np.sum(np.asarray(qnew.stats.invalid))) > 0


def _unseen_keys(emb, state, ids):
    """Distinct (device slice of the batch, key) pairs whose key the hash
    table does not hold."""
    held = set(emb.export_pairs(state)[0].tolist())
    n = emb.num_devices
    return sum(
        len({k for k in part.ravel().tolist() if k >= 0 and k not in held})
        for part in np.split(ids, n)
    )


def test_quantized_state_is_read_only_and_checked():
    rng = np.random.default_rng()
    emb, state, ids = _trained(1, True, rng)
    qstate = sok_jax.serving.quantize(emb, state, "int8")
    with pytest.raises(ValueError, match="must be one of"):
        sok_jax.serving.quantize(emb, state, "int4")
    with pytest.raises(ValueError, match="quantized already"):
        sok_jax.serving.quantize(emb, qstate, "int8")
    with pytest.raises(ValueError, match="read-only: look it up with training=False"):
        emb.apply(qstate, ids)
    with pytest.raises(ValueError, match="read-only: look it up with training=False"):
        emb.lookup(qstate, ids)
    opt = sok_jax.optim.adagrad(0.1)
    with pytest.raises(ValueError, match="read-only int8 inference tables"):
        emb.init_optimizer(opt, qstate)
    with pytest.raises(ValueError, match="read-only int8 inference tables"):
        emb.export_pairs(qstate)
    # a quantized state of another dim or vocabulary: at trace time
    other = sok_jax.DistributedEmbedding(
        combiner="sum", max_vocabulary_size_per_gpu=ROWS, embedding_vec_size=D + 4,
        slot_num=SLOTS, max_nnz=NNZ, use_hashtable=True, key_dtype=jnp.int32,
        mesh=mesh_of(1), axis_name=AXIS,
    )
    with pytest.raises(ValueError, match="quantized state.*this layer expects"):
        jax.jit(lambda s, i: other.apply(s, i, training=False)).lower(qstate, ids)
    bf16 = sok_jax.serving.quantize(emb, state, jnp.bfloat16)
    assert bf16.dtype == "bfloat16" and bf16.table.dtype == jnp.bfloat16
    float_state = sok_jax.serving.quantize(other, other.init(0), "float16")
    with pytest.raises(ValueError, match="quantized state"):
        emb.apply(float_state, ids, training=False)
    nan = dataclasses.replace(state, table=state.table.at[3, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="NaN or Inf"):
        sok_jax.serving.quantize(emb, nan, "int8")


# ------------------------------------------------------------- serving

LOAD = """
import sys
import numpy as np
import sok_jax
predict = sok_jax.serving.load(sys.argv[1])
np.save(sys.argv[3], np.asarray(predict(np.load(sys.argv[2]))))
"""


@pytest.mark.parametrize(
    "n,hashed,dtype", [(1, False, "int8"), (8, True, "int8"), (1, True, "bfloat16")]
)
def test_exported_quantized_model_serves_the_same_outputs_in_a_fresh_process(
    tmp_path, n, hashed, dtype
):
    require_devices(n)
    rng = np.random.default_rng()
    emb, state, ids = _trained(n, hashed, rng, "mean")
    qstate = sok_jax.serving.quantize(emb, state, dtype)
    w = jnp.asarray(rng.normal(size=(SLOTS * D,)), jnp.float32)

    def infer(params, ids):
        st, w = params
        out, _ = emb.apply(st, ids, training=False)
        return jax.nn.sigmoid(out.reshape(out.shape[0], -1) @ w)

    want = np.asarray(jax.jit(infer)((qstate, w), ids))
    art = tmp_path / "model"
    sok_jax.serving.export(infer, (qstate, w), ids, str(art))
    np.save(tmp_path / "ids.npy", ids)
    got = tmp_path / "got.npy"
    run_checked(
        [sys.executable, "-c", LOAD, str(art), str(tmp_path / "ids.npy"), str(got)],
        child_env(devices=n, same_platform=True),
        cwd=tmp_path,
    )
    np.testing.assert_array_equal(np.load(got), want)


# ---------------------------------------------------------- collection


def _collection(n, rng):
    """A collection of a direct table placed by row, a hash table, a
    replicated table and a sequence (no combiner) table, trained a few
    sparse steps; and a batch holding padding and unseen keys."""
    T, F = sok_jax.TableSpec, sok_jax.FeatureSpec
    tables = [
        T("users", 32 * n, 8, combiner="mean", placement="row"),
        T("items", 64, 4, combiner="sum", use_hashtable=True),
        T("small", 16, 8, combiner="sqrtn", placement="replicated"),
        T("clicks", 24, 4, combiner=None),
    ]
    feats = [F("user", "users", 3), F("item", "items", 2), F("cat", "small", 2),
             F("hist", "clicks", 3)]
    coll = sok_jax.EmbeddingCollection(tables, feats, mesh=mesh_of(n), axis_name=AXIS)
    high = {"user": 32 * n, "item": 500, "cat": 16, "hist": 24}
    b = 4 * n

    def batch(extra=0):
        return {
            f.name: rng.integers(-1, high[f.name] + extra, (b, f.max_nnz)).astype(np.int32)
            for f in feats
        }

    opt = sok_jax.optim.adagrad(0.5)
    state = coll.init(int(rng.integers(1 << 30)))
    opt_state = coll.init_optimizer(opt, state)

    @jax.jit
    def step(state, opt_state, ids):
        outs, ctx, state = coll.lookup(state, ids)
        g = {k: jnp.ones_like(v) for k, v in outs.items()}
        return coll.sparse_update(state, opt, opt_state, ctx, g)

    for _ in range(3):
        state, opt_state = step(state, opt_state, batch())
    return coll, state, batch(extra=20)


@pytest.mark.parametrize("n", [1, 8])
def test_quantized_collection_matches_the_float_collection(n):
    require_devices(n)
    rng = np.random.default_rng()
    coll, state, ids = _collection(n, rng)
    qstate = sok_jax.serving.quantize(coll, state, "int8")
    infer = jax.jit(lambda st, i: coll.apply(st, i, training=False))
    want, fstate = infer(state, ids)
    got, qnew = infer(qstate, ids)
    deq = dataclasses.replace(
        state,
        shards={
            k: dataclasses.replace(v, table=dequantize(qstate.shards[k].table))
            for k, v in state.shards.items()
        },
    )
    exact, _ = infer(deq, ids)
    for f in want:
        assert got[f].dtype == jnp.float32 and got[f].shape == want[f].shape
        np.testing.assert_allclose(got[f], exact[f], rtol=_SUM_RTOL, atol=1e-6, err_msg=f)
        # at most max_nnz keys per bag, each element within scale / 2
        err = max(
            float(np.max(np.asarray(s.table.scale_bias[:, 0]))) for s in qstate.shards.values()
        )
        assert np.max(np.abs(np.asarray(got[f]) - np.asarray(want[f]))) <= 3 * err / 2 + 1e-6
    assert int(np.sum(np.asarray(qnew.stats["items"].unseen))) > 0
    for t in ("users", "small", "clicks"):
        assert qnew.stats[t].unseen is None
        added = np.asarray(fstate.stats[t].invalid) - np.asarray(state.stats[t].invalid)
        np.testing.assert_array_equal(qnew.stats[t].invalid, added)
    with pytest.raises(ValueError, match="read-only: look it up with training=False"):
        coll.apply(qstate, ids)
    with pytest.raises(ValueError, match="read-only int8 inference tables"):
        coll.export_pairs(qstate)
