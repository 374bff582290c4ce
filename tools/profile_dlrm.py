"""Where the MLPerf DLRM-DCNv2 steps of `benchmarks/bench_dlrm.py` spend
their device time, one GPU, from XLA's own profiler (`xla_trace.py`): the
embedding-only step (lookup, backward, fused table update) and, with
--whole, the whole training step, of the mlperf preset (multi-hot, exact
Adagrad, 16-bit tables and accumulators) or, with --preset mlperf-onehot,
of the one-hot variant; device ms per HLO op, beside the wall time.

    python tools/profile_dlrm.py --scale 1.0 --steps 5 --whole
    python tools/profile_dlrm.py --small          # the CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "benchmarks"))
sys.path.insert(0, _HERE)  # xla_trace.py beside this file

import bench_dlrm  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import xla_trace  # noqa: E402
from dlrm_presets import PRESETS  # noqa: E402
from jax.sharding import Mesh  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="table size, 1.0 = MLPerf's full size")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--preset", default="mlperf", choices=["mlperf", "mlperf-onehot"])
    p.add_argument("--embedding", default="table", choices=["table", "collection"])
    p.add_argument("--steps", type=int, default=5, help="steps timed and profiled")
    p.add_argument("--rows", type=int, default=30, help="ops listed per profile")
    p.add_argument("--whole", action="store_true", help="also the whole training step")
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run)")
    args = p.parse_args(argv)
    if args.small:
        args.scale, args.batch, args.steps = 1e-5, 256, 2
    bench_args = bench_dlrm.parse_args(
        ["--scale", str(args.scale), "--batch", str(args.batch), "--embedding", args.embedding]
    )
    mesh = Mesh(np.array(jax.devices()[:1]), (bench_dlrm.AXIS,))
    preset = PRESETS[args.preset]
    model = bench_dlrm.SokModel(
        bench_args, mesh, args.scale, multi_hot=args.preset == "mlperf", preset=preset
    )
    state, init_s = model.init_state(0)
    print(
        f"{jax.devices()[0].device_kind}: preset {args.preset}, {args.embedding} embedding, "
        f"scale {args.scale:g} "
        f"({model.table_gb:.2f} GB of {model.table_dtype} tables), batch {args.batch}, "
        f"initialized in {init_s:.1f} s",
        flush=True,
    )
    batch = jax.jit(model.gen.batch)(0)
    d_pooled = jax.random.normal(jax.random.key(1), (args.batch, 26, 128), jnp.float32) * 1e-4
    u, nbytes = bench_dlrm.embedding_bytes(
        batch.sparse, args.batch, jnp.dtype(model.table_dtype).itemsize, model.slot_row_bytes
    )
    print(f"embedding step bytes: {nbytes / 1e9:.3f} GB ({u:,} distinct rows)", flush=True)

    emb_step = model.embedding_step()

    def embedding(state):
        return (emb_step(state, batch.sparse, d_pooled)[0],)

    compiled = emb_step.lower(state, batch.sparse, d_pooled).compile()
    xla_trace.wall_then_top(
        embedding, (state,), args.steps, "embedding-only step", args.rows, compiled
    )
    if args.whole:
        state, _ = model.init_state(0)  # the embedding steps consumed the last one
        whole = model.whole_step()

        def step(state, i):
            return whole(state, i)[0], i + 1

        compiled = whole.lower(state, 1).compile()
        xla_trace.wall_then_top(step, (state, 1), args.steps, "whole step", args.rows, compiled)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
