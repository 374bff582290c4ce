"""What the row movers reach over the host link, by access pattern, one GPU:
`copy_rows` between a pinned-host store and an HBM cache (the kernel a
host-cached table moves its rows with) for K rows of `--dim` float32,
reading (host -> HBM) and writing (HBM -> host), with the host rows
consecutive, random but sorted by address, or random; beside a jitted
copy of a whole pinned-host array to HBM (the DMA engines' rate). Tells
whether a slow cached step is the link, the randomness of the rows, or
the kernel.

    python tools/host_link_rows.py --rows 16777216 --k 262144 --dim 128

GB/s count the row bytes moved (K x D x 4) over the median time of one
jitted call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sok_jax.distributed.storage import host_memory_kind  # noqa: E402
from sok_jax.ops import ffi  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1 << 24, help="rows of the host store")
    p.add_argument("--k", type=int, default=1 << 18, help="rows moved per call")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    kind = host_memory_kind()
    if kind is None:
        print("no pinned host memory apart from the device's on this backend: nothing to measure")
        return 0
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    on_host = NamedSharding(mesh, P(), memory_kind=kind)
    on_device = NamedSharding(mesh, P())
    r, k, d = args.rows, args.k, args.dim
    host = jax.device_put(np.zeros((r, d), np.float32), on_host)
    cache = jax.device_put(jnp.zeros((k, d), jnp.float32), on_device)
    slots = jnp.arange(k, dtype=jnp.int32)
    rng = np.random.default_rng(0)
    random_rows = rng.choice(r, size=k, replace=False).astype(np.int32)
    patterns = {
        "consecutive": np.arange(k, dtype=np.int32),
        "random, sorted": np.sort(random_rows),
        "random": random_rows,
    }
    moved = k * d * 4
    read = jax.jit(ffi.copy_rows, donate_argnums=0, out_shardings=on_device)
    write = jax.jit(ffi.copy_rows, donate_argnums=0, out_shardings=on_host)
    rows_out = []
    for name, rows in patterns.items():
        rows = jnp.asarray(rows)
        times = {}
        for way in ("read", "write"):
            samples = []
            for _ in range(args.iters + 2):
                t0 = time.perf_counter()
                if way == "read":
                    cache = read(cache, slots, host, rows)
                    cache.block_until_ready()
                else:
                    host = write(host, rows, cache, slots)
                    host.block_until_ready()
                samples.append(time.perf_counter() - t0)
            times[way] = float(np.median(samples[2:]))
        rows_out.append(
            {
                "rows": name,
                "read_gbps": moved / times["read"] / common.GB,
                "write_gbps": moved / times["write"] / common.GB,
            }
        )
    whole = jax.device_put(jnp.ones((k * d,), jnp.float32), on_host)
    dma = common.timeit(jax.jit(lambda x: x, out_shardings=on_device), whole, iters=args.iters)
    print(f"{k} rows of {d * 4} B from a store of {r} rows; a jitted copy of {moved / 1e6:.0f} MB "
          f"of pinned host memory to HBM: {moved / dma / common.GB:.1f} GB/s")
    common.print_table(
        rows_out,
        [("rows", "host rows"), ("read_gbps", "host->HBM GB/s", ".1f"),
         ("write_gbps", "HBM->host GB/s", ".1f")],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
