"""A few bench_lookup points, each function called `--calls` times, for
Nsight Compute: by default the forwards (ours for fixed-length bags, the
previous offsets-reading kernel, XLA's gather of the pure-JAX way); with
`--fns sok_fb,jax_fb` the forward+backward programs, for per-kernel times
(`ncu --metrics gpu__time_duration.sum`).

  ncu --kernel-name regex:'EmbedFwd|gather' --launch-count 12 \\
      --section SpeedOfLight --section Occupancy --section WarpStateStats \\
      python3 tools/profile_lookup.py
  (also runs on CPU as a smoke check: python3 tools/profile_lookup.py --small)

Each function is called twice (the first call compiles); the table is 4 GiB
as in bench_lookup.
"""

from __future__ import annotations

import argparse
import os
import sys

# What this profiles is a benchmark's program: import it (and its `common`)
# from benchmarks/, beside this folder. sok_jax is the installed package.
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_lookup import build_fns, make_ids  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table-gb", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument(
        "--points", default="128:1:uniform,128:4:zipf", help="D:nnz:dist, comma separated"
    )
    p.add_argument(
        "--fns",
        default="sok_fwd,prev_fwd,jax_fwd",
        help="bench_lookup functions (sok_/prev_/jax_ + fwd or fb), comma separated",
    )
    p.add_argument("--calls", type=int, default=2, help="calls of each (the first compiles)")
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)
    if args.small:
        args.table_gb, args.batch = 2.0**-10, 64
    fns = build_fns("mean")
    rng = np.random.default_rng(0)
    for point in args.points.split(","):
        d, nnz, dist = point.split(":")
        d, nnz = int(d), int(nnz)
        rows = int(args.table_gb * 2**30 // (d * 4))
        table = jax.random.normal(jax.random.key(d), (rows, d), jnp.float32)
        ids = jnp.asarray(make_ids(rng, dist, args.batch, 26, nnz, False, rows, 1.1)[0])
        cot = jax.random.normal(jax.random.key(1), (args.batch, 26, d), jnp.float32)
        for name in args.fns.split(","):
            extra = (cot,) if name.endswith("_fb") else ()
            for _ in range(args.calls):
                jax.block_until_ready(fns[name](table, ids, *extra))
            print(f"{point} {name} done", flush=True)
        del table


if __name__ == "__main__":
    main()
