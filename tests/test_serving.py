"""sok_jax.serving: an inference function exported with its trained state,
loaded in a fresh Python process, gives the live model's outputs exactly;
what does not fit the serving process is refused with a clear error."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from subprocesses import child_env, run_checked

import sok_jax

pytest.importorskip("flatbuffers")  # jax.export's serialization

D, SLOTS, NNZ = 8, 3, 2


def sparse_trained(emb, rng, high, learning_rate):
    """A state of `emb` (slot_num, max_nnz and D of its own) after three
    sparse adagrad steps on batches of 4 samples per device, ids in
    [-1, high)."""
    opt = sok_jax.optim.adagrad(learning_rate)
    state = emb.init(int(rng.integers(1 << 30)))
    opt_state = emb.init_optimizer(opt, state)

    @jax.jit
    def step(state, opt_state, ids, g):
        _, ctx, state = emb.lookup(state, ids)
        return emb.sparse_update(state, opt, opt_state, ctx, g)

    b, shape = 4 * emb.num_devices, (emb.slot_num, emb.max_nnz)
    for _ in range(3):
        ids = rng.integers(-1, high, (b, *shape)).astype(np.int32)
        g = rng.normal(size=(b, emb.slot_num, emb.embedding_vec_size)).astype(np.float32)
        state, opt_state = step(state, opt_state, ids, g)
    return state


def trained_model(n, hashed):
    """(infer(params, ids), params, ids): a layer trained a few sparse steps
    (a hash table inserts its keys), and a dense head over its output."""
    emb = sok_jax.DistributedEmbedding(
        combiner="mean", max_vocabulary_size_per_gpu=64, embedding_vec_size=D, slot_num=SLOTS,
        max_nnz=NNZ, use_hashtable=hashed, key_dtype=jnp.int32, mesh=mesh_of(n), axis_name=AXIS,
    )
    rng = np.random.default_rng()
    high = 10_000 if hashed else 64 * n
    state = sparse_trained(emb, rng, high, 0.1)
    w = jnp.asarray(rng.normal(size=(SLOTS * D,)), jnp.float32)

    def infer(params, ids):
        st, w = params
        out, _ = emb.apply(st, ids, training=False)
        return jax.nn.sigmoid(out.reshape(out.shape[0], -1) @ w)

    ids = rng.integers(-1, high, (4 * n, SLOTS, NNZ)).astype(np.int32)
    return infer, (state, w), ids


LOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import sok_jax
    predict = sok_jax.serving.load(sys.argv[1])
    np.save(sys.argv[3], np.asarray(predict(np.load(sys.argv[2]))))
    """
)


@pytest.mark.parametrize("n,hashed", [(1, False), (8, True)])
def test_exported_model_serves_the_same_outputs_in_a_fresh_process(tmp_path, n, hashed):
    require_devices(n)
    infer, params, ids = trained_model(n, hashed)
    want = np.asarray(jax.jit(infer)(params, ids))
    art = tmp_path / "model"
    sok_jax.serving.export(infer, params, ids, str(art))
    np.save(tmp_path / "ids.npy", ids)
    got_path = tmp_path / "got.npy"
    cmd = [sys.executable, "-c", LOAD, str(art), str(tmp_path / "ids.npy"), str(got_path)]
    run_checked(cmd, child_env(devices=n, same_platform=True), cwd=tmp_path)
    np.testing.assert_array_equal(np.load(got_path), want)


def test_an_artifact_for_more_devices_is_refused(tmp_path):
    require_devices(8)
    infer, params, ids = trained_model(8, False)
    art = tmp_path / "model"
    sok_jax.serving.export(infer, params, ids, str(art))
    np.save(tmp_path / "ids.npy", ids)
    cmd = [sys.executable, "-c", LOAD, str(art), str(tmp_path / "ids.npy"), str(tmp_path / "o.npy")]
    proc = subprocess.run(cmd, env=child_env(devices=2), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "exported for 8 devices; this process has 2" in proc.stderr


def test_export_refuses_an_existing_artifact_and_host_tables(tmp_path):
    infer, params, ids = trained_model(1, False)
    sok_jax.serving.export(infer, params, ids, str(tmp_path / "a"))
    with pytest.raises(FileExistsError, match="already holds"):
        sok_jax.serving.export(infer, params, ids, str(tmp_path / "a"))
    if sok_jax.distributed.storage.host_memory_kind() is None:
        return  # the CPU has no host memory space: nothing to refuse
    emb = sok_jax.DistributedEmbedding(
        combiner="sum", max_vocabulary_size_per_gpu=64, embedding_vec_size=D, slot_num=SLOTS,
        max_nnz=NNZ, use_hashtable=False, key_dtype=jnp.int32, mesh=mesh_of(1), axis_name=AXIS,
        storage="host",
    )
    with pytest.raises(ValueError, match="serving reads tables from HBM"):
        sok_jax.serving.export(lambda st, i: emb.apply(st, i)[0], emb.init(0), ids, str(tmp_path / "b"))
