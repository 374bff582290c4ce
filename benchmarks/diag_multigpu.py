"""Which piece of the multi-GPU program crashes XLA's GPU compiler, under
which flags? Each (case, variant) runs in its own process so a segfault names
it, and each case prints the stage it reached (lower / compile / run), so a
crash while compiling is told apart from one while running.

History: on 2 H100s (2026-11-27, jax 0.11.2) a forward-only FFI apply ran;
jax.grad through the FFI backward segfaulted in backend_compile_and_load.

Run after gpu_session.sh has built:  python3 benchmarks/diag_multigpu.py
  --cases a,b  --variants default,no_lhs  --dump CASE (lists the last HLO
  passes XLA dumped before dying)  --gdb CASE (native backtrace, if gdb is
  installed). Exit status 0; the verdicts are in the printed lines.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HEAD = """
import jax, jax.numpy as jnp, numpy as np, sok_jax
from jax.sharding import Mesh, PartitionSpec as P
n = len(jax.devices()); mesh = Mesh(np.array(jax.devices()), ('x',))
from sok_jax.ops import embed_ops, hash_ops, optim_ops
smap = sok_jax.distributed._shard_map
def stages(f, *args):
    lo = jax.jit(f).lower(*args); print('STAGE lowered', flush=True)
    co = lo.compile(); print('STAGE compiled', flush=True)
    out = co(*args); jax.block_until_ready(out); print('STAGE ran', flush=True)
    return out
"""

CASES = {
    # One custom call per program, inside shard_map over all devices.
    "embed_fwd": """
def body(t, ids):
    return embed_ops.lookup_combine(t, ids, jnp.arange(9, dtype=jnp.int32), jnp.zeros((0,), jnp.float32), 'sum')
stages(smap(body, mesh, (P('x'), P('x')), P('x')), jnp.ones((64 * n, 4)), jnp.tile(jnp.arange(8, dtype=jnp.int32), n))""",
    "embed_bwd": """
def body(g, ids):
    return embed_ops.lookup_combine_bwd(g, ids, jnp.arange(9, dtype=jnp.int32), jnp.zeros((0,), jnp.float32), 'sum', 64).grads
stages(smap(body, mesh, (P('x'), P('x')), P('x')), jnp.ones((8 * n, 4)), jnp.tile(jnp.arange(8, dtype=jnp.int32), n))""",
    "embed_bwd_nosmap": """
g = jax.device_put(jnp.ones((8, 4)), jax.devices()[0]); ids = jax.device_put(jnp.arange(8, dtype=jnp.int32), jax.devices()[0])
stages(lambda g, ids: embed_ops.lookup_combine_bwd(g, ids, jnp.arange(9, dtype=jnp.int32), jnp.zeros((0,), jnp.float32), 'sum', 64).grads, g, ids)""",
    "rows_to_dense": """
def body(r, g, c):
    return embed_ops.rows_to_dense(embed_ops.SparseRowGrad(r, g, c), 64)
stages(smap(body, mesh, (P('x'), P('x'), P('x')), P('x')), jnp.tile(jnp.arange(8, dtype=jnp.int32), n), jnp.ones((8 * n, 4)), jnp.full((n,), 8, jnp.int32))""",
    "sgd": """
def body(t, r, g, c):
    return optim_ops.sgd_update(t, r, g, c, 0.1)
stages(smap(body, mesh, (P('x'),) * 4, P('x')), jnp.ones((64 * n, 4)), jnp.tile(jnp.arange(8, dtype=jnp.int32), n), jnp.ones((8 * n, 4)), jnp.full((n,), 8, jnp.int32))""",
    "adagrad": """
def body(t, a, r, g, c):
    return optim_ops.adagrad_update(t, a, r, g, c, 0.1)[0]
stages(smap(body, mesh, (P('x'),) * 5, P('x')), jnp.ones((64 * n, 4)), jnp.ones((64 * n, 4)), jnp.tile(jnp.arange(8, dtype=jnp.int32), n), jnp.ones((8 * n, 4)), jnp.full((n,), 8, jnp.int32))""",
    "hash": """
def body(sk, k):
    return hash_ops.find_or_insert(sk, k, insert=True)[1]
stages(smap(body, mesh, (P('x'), P('x')), P('x')), jnp.full((64 * n,), -1, jnp.int32), jnp.arange(8 * n, dtype=jnp.int32))""",
    "grad_ffi": """
import dataclasses
emb = sok_jax.DistributedEmbedding('mean', 1024, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x')
st = emb.init(0); ids = jnp.asarray(np.random.default_rng(0).integers(-1, 1024 * n, (8 * n, 2, 2)), jnp.int32)
stages(jax.grad(lambda t: emb.apply(dataclasses.replace(st, table=t), ids)[0].sum()), st.table)""",
    # grad through shard_map of a custom_vjp whose residual is a zero-size
    # array (what sok_jax saved for absent weights before 2026-11-27).
    "zero_resid_jax": """
@jax.custom_vjp
def f(t, w): return t * 2.0
f.defvjp(lambda t, w: (t * 2.0, w), lambda w, g: (g * 2.0 + w.sum(), jnp.zeros_like(w)))
body = lambda t: jax.lax.all_to_all(f(t, jnp.zeros((0,), jnp.float32)), 'x', 0, 0, tiled=True)
stages(jax.grad(lambda t: smap(body, mesh, (P('x'),), P('x'))(t).sum()), jnp.ones((8 * n, 4)))""",
    "zero_resid_ffi": """
@jax.custom_vjp
def f(t, ids, w): return embed_ops.lookup_combine(t, ids, jnp.arange(ids.shape[0] + 1, dtype=jnp.int32), w, 'sum')
def f_bwd(res, g):
    t, ids, w = res
    s = embed_ops.lookup_combine_bwd(g, ids, jnp.arange(ids.shape[0] + 1, dtype=jnp.int32), w, 'sum', t.shape[0])
    return embed_ops.rows_to_dense(s, t.shape[0]), None, jnp.zeros_like(w)
f.defvjp(lambda t, ids, w: (f(t, ids, w), (t, ids, w)), f_bwd)
body = lambda t, ids: jax.lax.all_to_all(f(t, ids, jnp.zeros((0,), jnp.float32)), 'x', 0, 0, tiled=True)
ids = jnp.tile(jnp.arange(8, dtype=jnp.int32), n)
stages(jax.grad(lambda t: smap(body, mesh, (P('x'), P('x')), P('x'))(t, ids).sum()), jnp.ones((64 * n, 4)))""",
    "grad_ffi_w": """
import dataclasses
emb = sok_jax.DistributedEmbedding('sqrtn', 1024, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x')
st = emb.init(0); rng = np.random.default_rng(0); ids = jnp.asarray(rng.integers(-1, 1024 * n, (8 * n, 2, 2)), jnp.int32)
w = jnp.asarray(rng.uniform(0.5, 1.5, (8 * n, 2, 2)), jnp.float32)
stages(jax.grad(lambda t, w: emb.apply(dataclasses.replace(st, table=t), ids, w)[0].sum(), argnums=(0, 1)), st.table, w)""",
    "sparse_step": """
emb = sok_jax.DistributedEmbedding('mean', 1024, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x')
opt = sok_jax.optim.adagrad(0.1); st = emb.init(0); os_ = emb.init_optimizer(opt, st)
ids = jnp.asarray(np.random.default_rng(0).integers(-1, 1024 * n, (8 * n, 2, 2)), jnp.int32)
def step(st, os_, ids):
    out, ctx, st = emb.lookup(st, ids)
    return emb.apply_gradients(st, opt, os_, emb.sparse_grad(ctx, 2 * out))
stages(step, st, os_, ids)""",
    "hash_step": """
emb = sok_jax.DistributedEmbedding('sum', 64, 16, slot_num=2, max_nnz=2, mesh=mesh, axis_name='x', use_hashtable=True)
opt = sok_jax.optim.sgd(0.1); st = emb.init(0); os_ = emb.init_optimizer(opt, st)
ids = jnp.asarray(np.random.default_rng(0).integers(-1, 10**6, (8 * n, 2, 2)), jnp.int32)
def step(st, os_, ids):
    out, ctx, st = emb.lookup(st, ids)
    return emb.apply_gradients(st, opt, os_, emb.sparse_grad(ctx, 2 * out))
stages(step, st, os_, ids)""",
}

VARIANTS = {
    "default": {},
    "no_lhs": {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"},
    "no_cmdbuf": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="},
    "no_shardy": {"JAX_USE_SHARDY_PARTITIONER": "0"},
    "autotune0": {"XLA_FLAGS": "--xla_gpu_autotune_level=0"},
}


def run(case, variant, extra_env=None, prefix=(), timeout=180):
    env = dict(os.environ)
    env.update(VARIANTS[variant])
    if extra_env:
        env.update(extra_env)
    cmd = list(prefix) + [sys.executable, "-c", HEAD + CASES[case]]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode() + (e.stderr or b"").decode(), "timeout"
    reached = [l.split()[1] for l in text.splitlines() if l.startswith("STAGE ")]
    return rc, (reached[-1] if reached else "none"), text


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--variants", default="default")
    p.add_argument("--dump", default="")
    p.add_argument("--gdb", default="")
    a = p.parse_args()
    for v in a.variants.split(","):
        for c in a.cases.split(","):
            rc, reached, text = run(c, v)
            tail = " | ".join(text.strip().splitlines()[-2:])[:300] if rc else ""
            print(f"[{v}] {c}: rc={rc} last_stage={reached} {tail}", flush=True)
    if a.dump:
        d = tempfile.mkdtemp()
        flags = f"--xla_dump_to={d} --xla_dump_hlo_pass_re=.* --xla_dump_hlo_as_text"
        rc, reached, _ = run(a.dump, "default", {"XLA_FLAGS": flags})
        files = sorted(glob.glob(os.path.join(d, "*")), key=os.path.getmtime)
        print(f"[dump] {a.dump}: rc={rc} last_stage={reached}; {len(files)} files; last written:")
        for f in files[-8:]:
            print("   ", os.path.basename(f))
        shutil.rmtree(d, ignore_errors=True)
    if a.gdb:
        if shutil.which("gdb"):
            rc, reached, text = run(
                a.gdb,
                "default",
                prefix=("gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args"),
                timeout=300,
            )
            frames = [l for l in text.splitlines() if l.startswith("#")]
            print(f"[gdb] {a.gdb}: rc={rc} last_stage={reached}")
            print("\n".join(x[:220] for x in frames[:40]))
        else:
            print("[gdb] not installed")


if __name__ == "__main__":
    main()
