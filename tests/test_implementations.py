"""One implementation switch: `sok_jax.ops.resolve`. "ffi" and "reference"
offer the same ops, and a layer built with implementation="reference" runs
no custom call at all, in hash mode too (lookup, insertion, sparse update,
import), while computing what the FFI layer computes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices

import sok_jax
from sok_jax.ops import ffi, reference, resolve

ROWS, DIM, SLOTS, NNZ, BATCH = 64, 8, 3, 4, 16


def test_both_implementations_offer_every_op():
    for name in ffi.OPS:
        assert callable(getattr(ffi, name)), name
        assert callable(getattr(reference, name)), name
    assert resolve("ffi") is ffi and resolve("reference") is reference
    with pytest.raises(ValueError, match="implementation"):
        resolve("cuda")


def _layer(n, implementation):
    return sok_jax.DistributedEmbedding(
        "mean",
        ROWS,
        DIM,
        slot_num=SLOTS,
        max_nnz=NNZ,
        use_hashtable=True,
        mesh=mesh_of(n),
        axis_name=AXIS,
        implementation=implementation,
    )


def _batch(rng):
    """Ids from a pool of fewer keys than one shard's rows: no shard fills up
    (which keys win the last free rows of a full shard is the insertion
    rule's business, tested in test_hash_ops)."""
    pool = np.concatenate([[-1], rng.choice(10_000, ROWS // 2, replace=False)])
    ids = rng.choice(pool, size=(BATCH, SLOTS, NNZ)).astype(np.int32)
    return ids, rng.uniform(0.5, 1.5, ids.shape).astype(np.float32)


def _step(emb, opt):
    def step(state, opt_state, ids, w):
        out, ctx, state = emb.lookup(state, ids, w)
        d_out = jax.numpy.cos(out)  # any cotangent that depends on the output
        state, opt_state = emb.sparse_update(state, opt, opt_state, ctx, d_out)
        return out, state, opt_state

    return step


@pytest.mark.parametrize("n", [1, 4])
def test_reference_layer_runs_no_custom_call_and_matches_ffi(n):
    require_devices(n)
    rng = np.random.default_rng()
    ids, w = _batch(rng)
    results = {}
    for impl in ("ffi", "reference"):
        emb = _layer(n, impl)
        opt = sok_jax.optim.adagrad(0.1, implementation=impl)
        state = emb.init(3)
        opt_state = emb.init_optimizer(opt, state)
        step = _step(emb, opt)
        hlo = jax.jit(step).lower(state, opt_state, ids, w).as_text()
        assert ("sok_" in hlo) == (impl == "ffi"), impl
        out, state, opt_state = jax.jit(step)(state, opt_state, ids, w)
        keys, vectors = emb.export_pairs(state)
        again = emb.import_pairs(keys, vectors)
        np.testing.assert_array_equal(emb.export_pairs(again)[0], keys)
        np.testing.assert_allclose(emb.export_pairs(again)[1], vectors)
        results[impl] = (np.asarray(out), keys, vectors, np.asarray(state.slot_keys))
    f, r = results["ffi"], results["reference"]
    np.testing.assert_allclose(f[0], r[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f[1], r[1])
    np.testing.assert_allclose(f[2], r[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f[3], r[3])  # one insertion rule on every platform
