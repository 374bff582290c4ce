"""Which piece of the multi-GPU lookup crashes XLA's compiler? Each case runs
in its own process so a segfault names its case. On 2 H100s (2026-11-27,
jax 0.11.2) apply_* and init_only ran; grad with the FFI backward segfaulted.
Run: python3 benchmarks/diag_multigpu.py after gpu_session.sh has built."""
import os, subprocess, sys

CASES = {
    "a2a_1d_int32": """
x = jnp.arange(n * 64, dtype=jnp.int32)
f = sok_jax.distributed._shard_map(lambda v: jax.lax.all_to_all(v, 'x', 0, 0, tiled=True), mesh, (P('x'),), P('x'))
print(jax.jit(f)(x)[:4])""",
    "apply_reference": """
emb = sok_jax.DistributedEmbedding('mean', 1024, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x', implementation='reference')
st = emb.init(0); ids = jnp.asarray(np.random.default_rng(0).integers(-1, 1024 * n, (8 * n, 2, 2)), jnp.int32)
print(jax.jit(emb.apply)(st, ids)[0].sum())""",
    "apply_ffi": """
emb = sok_jax.DistributedEmbedding('mean', 1024, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x')
st = emb.init(0); ids = jnp.asarray(np.random.default_rng(0).integers(-1, 1024 * n, (8 * n, 2, 2)), jnp.int32)
print(jax.jit(emb.apply)(st, ids)[0].sum())""",
    "grad_ffi": """
import dataclasses
emb = sok_jax.DistributedEmbedding('mean', 1024, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x')
st = emb.init(0); ids = jnp.asarray(np.random.default_rng(0).integers(-1, 1024 * n, (8 * n, 2, 2)), jnp.int32)
f = jax.jit(jax.grad(lambda t: emb.apply(dataclasses.replace(st, table=t), ids)[0].sum()))
print(f(st.table).sum())""",
    # One custom call at a time inside shard_map: which one crashes the
    # compiler? (rows_to_dense has one result, embed_bwd and the hash several.)
    "only_rows_to_dense": """
from sok_jax.ops import embed_ops
def body(r, g, c):
    return embed_ops.rows_to_dense(embed_ops.SparseRowGrad(r, g, c), 64)
f = sok_jax.distributed._shard_map(body, mesh, (P('x'), P('x'), P('x')), P('x'))
print(jax.jit(f)(jnp.tile(jnp.arange(8, dtype=jnp.int32), n), jnp.ones((8 * n, 4)), jnp.full((n,), 8, jnp.int32)).sum())""",
    "only_embed_bwd": """
from sok_jax.ops import embed_ops
def body(g, ids):
    r = embed_ops.lookup_combine_bwd(g, ids, jnp.arange(9, dtype=jnp.int32), jnp.zeros((0,), jnp.float32), 'sum', 64)
    return r.grads
f = sok_jax.distributed._shard_map(body, mesh, (P('x'), P('x')), P('x'))
print(jax.jit(f)(jnp.ones((8 * n, 4)), jnp.tile(jnp.arange(8, dtype=jnp.int32), n)).sum())""",
    "only_hash": """
from sok_jax.ops import hash_ops
def body(sk, k):
    return hash_ops.find_or_insert(sk, k, insert=True)[1]
f = sok_jax.distributed._shard_map(body, mesh, (P('x'), P('x')), P('x'))
print(jax.jit(f)(jnp.full((64 * n,), -1, jnp.int32), jnp.arange(8 * n, dtype=jnp.int32)).sum())""",
    "init_only": """
emb = sok_jax.DistributedEmbedding('mean', 1024, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x')
print(emb.init(0).table.sum())""",
}
HEAD = """
import jax, jax.numpy as jnp, numpy as np, sok_jax
from jax.sharding import Mesh, PartitionSpec as P
n = len(jax.devices()); mesh = Mesh(np.array(jax.devices()), ('x',))
"""
for flags in ["", "--xla_gpu_enable_command_buffer="]:
    for name, body in CASES.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        r = subprocess.run([sys.executable, "-c", HEAD + body], env=env, capture_output=True, text=True, timeout=120)
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        print(f"[{flags or 'default'}] {name}: rc={r.returncode} :: {' | '.join(tail)[:400]}", flush=True)
