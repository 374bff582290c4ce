"""Where a host-cached table's step spends its time, one GPU: each stage of
`CachedStorage.bring_in` and `sync_slots` timed alone as its own jitted
program at the sizes of `benchmarks/bench_host_cache.py` (rows R, cache
C = f * R, K key positions per step), by taking variants apart rather than
with hardware counters.

    python tools/profile_host_cache.py --rows 16777216 --fraction 0.5 --positions 425984
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from sok_jax.distributed import storage  # noqa: E402
from sok_jax.ops import ffi  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1 << 24)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--positions", type=int, default=16384 * 26)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
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
    )
    m = jnp.int32(k // 4)
    stages = {
        "argsort K (distinct rows)": (lambda x: jnp.argsort(x, stable=True), (ids,)),
        "lowest_slots C": (lambda s, m: storage._lowest_slots(s, m, k), (score, m)),
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


if __name__ == "__main__":
    sys.exit(main())
