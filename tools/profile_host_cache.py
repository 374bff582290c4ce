"""Where a host-cached table's step spends its time, one GPU: each stage of
`CachedStorage.bring_in` and `sync_slots` timed alone as its own jitted
program at the sizes of `benchmarks/bench_host_cache.py` (rows R, cache
C = f * R, K key positions per step), by taking variants apart rather than
with hardware counters; and, with `--trace`, the whole donated sparse step
of `bench_host_cache.py` (hbm and host_cached at `--fraction`) under XLA's
profiler, its device time per HLO op with the JAX source that made it.

    python tools/profile_host_cache.py --rows 16777216 --fraction 0.5 --positions 425984
    python tools/profile_host_cache.py --trace --rows 16777216 --fraction 0.2 --dist zipf
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "benchmarks"))
sys.path.insert(0, _HERE)

import bench_host_cache  # noqa: E402
import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import xla_trace  # noqa: E402

from sok_jax.distributed import storage  # noqa: E402
from sok_jax.ops import ffi  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1 << 24)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--positions", type=int, default=16384 * 26)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--trace", action="store_true", help="trace whole steps instead of stages")
    p.add_argument("--dist", default="zipf", choices=("uniform", "zipf"))
    p.add_argument("--optimizer", default="sgd", choices=sorted(bench_host_cache.SLOTS))
    p.add_argument("--storages", type=common.str_list, default=["hbm", "host_cached"])
    p.add_argument("--hlo-dir", default=None, help="--trace: write each step's optimized HLO here")
    args = p.parse_args(argv)
    if args.trace:
        return trace_steps(args)
    r, k, d = args.rows, args.positions, args.dim
    c = int(r * args.fraction)
    rng = np.random.default_rng(0)
    tier = storage.CachedStorage(c, "lru")
    ids = jnp.asarray(common.draw_keys(rng, "zipf", k, r, 1.05))
    score = jnp.asarray(rng.integers(-1, 40, c), jnp.int32)
    mask = jnp.asarray(rng.random(c) < k / c)
    tags = jnp.asarray(rng.permutation(r)[:c], jnp.int32)
    slot_of = jnp.full((r,), -1, jnp.int32).at[tags].set(jnp.arange(c, dtype=jnp.int32))
    shard = storage.CachedShard(
        host=jnp.zeros((r, d), jnp.float32),
        cache=jnp.zeros((c, d), jnp.float32),
        tags=tags,
        slot_of=slot_of,
        score=score,
        step=jnp.full((1,), 40, jnp.int32),
        hand=jnp.zeros((1,), jnp.int32),
    )
    stages = {
        "argsort K (distinct rows)": (lambda x: jnp.argsort(x, stable=True), (ids,)),
        "argsort 2K (victim window)": (lambda x: jnp.argsort(x, stable=True), (score[: 2 * k],)),
        "nonzero C (size K)": (lambda x: jnp.nonzero(x, size=k, fill_value=c)[0], (mask,)),
        "cumsum C": (lambda x: jnp.cumsum(x.astype(jnp.int32)), (mask,)),
        "compare + sum C": (lambda a, b: jnp.sum(a != b), (tags, tags + 1)),
        "bring_in (whole)": (lambda sh, rows: tier.bring_in(sh, rows, ffi)[1], (shard, ids)),
    }
    rows = []
    for name, (fn, a) in stages.items():
        t = common.timeit(jax.jit(fn), *a, warmup=2, iters=args.iters)
        rows.append({"stage": name, "ms": t * 1e3})
        print(f"{name}: {t * 1e3:.3f} ms", flush=True)
    print(f"R {r}, C {c}, K {k}, D {d} on {jax.devices()[0].device_kind}")
    common.print_table(rows, [("stage", "stage"), ("ms", "ms", ".3f")])
    return 0


def _cache_counts(state):
    s = state.stats
    if s.cache_hits is None:
        return 0, 0, 0
    return tuple(
        int(np.asarray(x).sum()) for x in (s.cache_hits, s.cache_misses, s.cache_evictions)
    )


# The named scopes of the cache's stages (storage.py, tables.py), innermost first.
SCOPES = (
    "cache_bring_in/victims",
    "cache_bring_in/moves",
    "cache_bring_in",
    "cache_sync_slots",
    "cache_stale",
)


def trace_steps(args) -> int:
    """The bench's donated step per storage, traced after warm steps that
    fill the cache: device time per HLO op."""
    slots = 26
    batch = args.positions // slots
    rng = np.random.default_rng(0)
    batches = [
        jnp.asarray(
            common.draw_keys(rng, args.dist, batch * slots, args.rows, 1.05, hot_seed=0).reshape(
                batch, slots, 1
            )
        )
        for _ in range(32 + args.iters + 2)  # a fresh batch every step, as the bench
    ]
    layer_args = argparse.Namespace(dim=args.dim, slots=slots)
    head = jnp.asarray(np.random.default_rng(1).normal(size=(slots, args.dim)), jnp.float32)
    opt = bench_host_cache.make_optimizer(args.optimizer)
    for kind in args.storages:
        trace_one(args, kind, batches, layer_args, head, opt)
    return 0


def trace_one(args, kind, batches, layer_args, head, opt) -> None:
    """One storage's donated step, traced after 32 steps that fill its cache."""
    fraction = args.fraction if kind == "host_cached" else None
    emb = bench_host_cache.layer_for(layer_args, args.rows, kind, fraction)
    state = emb.init(0)
    opt_state = emb.init_optimizer(opt, state)
    step = bench_host_cache.stepper(emb, opt, state, opt_state, head)
    compiled = step.lower(state, opt_state, batches[0]).compile()
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        with open(os.path.join(args.hlo_dir, f"step_{kind}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    turn = [0]
    last = {}

    def run(state, opt_state):
        state, opt_state, _ = step(state, opt_state, batches[turn[0]])
        turn[0] += 1
        last["state"] = state
        return state, opt_state

    carry = (state, opt_state)
    for _ in range(32):  # fill the cache
        carry = run(*carry)
    before = _cache_counts(carry[0])
    rows = xla_trace.top_ops(run, carry, steps=args.iters, compiled=compiled)
    after = _cache_counts(last["state"])
    per_step = [(a - b) / (args.iters + 1) for a, b in zip(after, before)]
    if kind == "host_cached":
        print(
            "per traced step: hits {:.0f}, misses {:.0f}, evictions {:.0f}; rows over the "
            "host link {:.1f} MB".format(
                *per_step, (per_step[1] + per_step[2]) * args.dim * 4 / 1e6
            )
        )
    label = kind if fraction is None else f"{kind} {fraction:g}"
    xla_trace.print_top(
        rows,
        title=f"{label}, {args.dist}, {args.optimizer}, R {args.rows}, K {args.positions}",
        scopes=SCOPES,
    )


if __name__ == "__main__":
    sys.exit(main())
