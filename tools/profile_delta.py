"""Where `sok_jax.serving.apply_delta`'s time goes, one GPU: the delta of
`benchmarks/bench_serving.py` (a fraction of the rows of its Criteo-shaped
direct table, new vectors from the host) applied in place, whole and in its
parts, each part timed alone and waited for: the host checks
(`deltas._check_delta`), the inputs' trip to the device
(`deltas._device_calls`), the compiled update given inputs already on the
device, and for scale a plain `jax.device_put` of the delta's vectors
(on a GPU also staged through pinned host memory, in its two halves);
with --cprofile, the Python functions that take the whole call's time.

    python tools/profile_delta.py --fraction 0.01 --iters 20 --chunk-rows 65536,262144 --cprofile 15
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "benchmarks"))

import bench_serving  # noqa: E402
import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

import sok_jax  # noqa: E402
from sok_jax.distributed import deltas, storage  # noqa: E402


def median_ms(fn, iters: int) -> float:
    """The median wall time of `fn()` (which waits for its own results), ms."""
    return 1e3 * float(np.median(common.time_samples(fn, warmup=1, iters=iters, min_sample_s=0)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--table-rows", type=int, default=None, help="default: bench_serving's")
    p.add_argument(
        "--cprofile",
        type=int,
        default=0,
        help="also list the N Python functions with the most own time in the whole call",
    )
    p.add_argument(
        "--chunk-rows",
        default="",
        help="comma-separated CHUNK_ROWS values to time the whole call at, beside the default",
    )
    args = p.parse_args(argv)
    bench_args = bench_serving.parse_args(
        [] if args.table_rows is None else ["--table-rows", str(args.table_rows)]
    )
    embed, _, _, _, state = bench_serving.build(bench_args)
    layer = embed.layer
    keys, vectors = bench_serving.make_delta(layer, args.fraction, 1)
    name = deltas.quantized._only_unit(layer)
    unit = layer._tables.unit(name)
    rows = unit.rows
    tables, fmt, convert = deltas._serving_form(layer, state)
    run = deltas._program(layer, tables, unit, convert, fmt, True)
    live = jax.tree.map(lambda x: x.copy(), state)
    step = jax.device_put(np.int32(0))
    checked = deltas._check_delta(rows, name, (keys, vectors))

    def whole():
        nonlocal live
        live = sok_jax.serving.apply_delta(layer, live, (keys, vectors), donate=True)
        jax.block_until_ready(live.table)

    def check():
        deltas._check_delta(rows, name, (keys, vectors))

    def inputs():
        return [jax.block_until_ready(c) for c in deltas._device_calls(rows, name, checked)]

    placed = inputs()

    def update():
        nonlocal live
        table, hash_part = live.table, None
        for call in placed:
            table, hash_part, _ = run(table, hash_part, *call, step)
        live = dataclasses.replace(live, table=jax.block_until_ready(table))

    parts = [
        ("apply_delta in place (whole)", whole),
        ("host checks (_check_delta)", check),
        ("inputs to the device (_device_calls)", inputs),
        ("compiled update, inputs on the device", update),
        (
            "jax.device_put of the vectors alone",
            lambda: jax.block_until_ready(jax.device_put(vectors)),
        ),
    ]
    kind = storage.host_memory_kind()
    if kind is not None:  # a GPU: the same bytes staged through pinned host memory
        device = jax.devices()[0]
        pinned = SingleDeviceSharding(device, memory_kind=kind)
        to_device = jax.jit(lambda x: x, out_shardings=SingleDeviceSharding(device))
        staged = jax.device_put(vectors, pinned)
        parts += [
            (
                "  device_put into pinned host memory",
                lambda: jax.block_until_ready(jax.device_put(vectors, pinned)),
            ),
            (
                "  pinned host memory to the device (jit)",
                lambda: jax.block_until_ready(to_device(staged)),
            ),
        ]
    print(
        f"{jax.devices()[0].device_kind}: {len(keys)} rows of D {vectors.shape[1]} "
        f"({vectors.nbytes / 2**20:.1f} MiB), {len(placed)} program calls"
    )
    for label, fn in parts:
        print(f"  {label:52s} {median_ms(fn, args.iters):8.3f} ms")
    if args.cprofile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [whole() for _ in range(args.iters)])
        print(f"  own time of the whole call, {args.iters} calls:")
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.cprofile)
    default = deltas.CHUNK_ROWS
    for chunk in [int(c) for c in args.chunk_rows.split(",") if c]:
        deltas.CHUNK_ROWS = chunk
        widths = deltas._call_widths(len(keys))
        label = f"whole, CHUNK_ROWS {chunk} ({len(widths)} calls)"
        print(f"  {label:52s} {median_ms(whole, args.iters):8.3f} ms")
    deltas.CHUNK_ROWS = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
