"""Which piece of the multi-GPU lookup crashes XLA's compiler? Each case runs
in its own process so a segfault names its case."""
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
