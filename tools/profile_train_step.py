"""The one-device sparse training step of bench_train_step (direct or, with
`--mode hash`, hash mode), for Nsight Compute: per-kernel times of whole
steps, and XLA's memory plan of the step.

Builds the same model and step as bench_train_step (lookup -> tanh head ->
sparse_grad -> apply_gradients, state donated), runs `--warmup` steps, then
brackets `--steps` steps with cuProfilerStart/Stop (driver API, through
ctypes), so that under

  ncu --profile-from-start off --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
      --csv python3 tools/profile_train_step.py

only the kernels of those steps are profiled. Without a GPU (or without
libcuda) the bracketing is skipped: `--small` runs on the CPU as a smoke
check.

It also prints the compiled step's memory analysis (argument, output,
aliased and temporary bytes), which on a GPU is the single temporary
allocation the step makes: a table-sized temporary there would be a copy of
the table that the in-place update was meant to avoid.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

# What this profiles is a benchmark's program: import it (and its `common`)
# from benchmarks/, beside this folder. sok_jax is the installed package.
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # xla_trace.py beside this file

import bench_train_step as bts  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import xla_trace  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from sok_jax import optim  # noqa: E402
from sok_jax.distributed import DistributedEmbedding  # noqa: E402


def _profiler(start: bool) -> bool:
    """cuProfilerStart/Stop on the primary context of device 0."""
    if jax.default_backend() != "gpu":
        return False
    try:
        cu = ctypes.CDLL("libcuda.so.1")
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        ok = cu.cuInit(0) == 0 and cu.cuDeviceGet(ctypes.byref(dev), 0) == 0
        ok = ok and cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
        ok = ok and cu.cuCtxSetCurrent(ctx) == 0
        ok = ok and (cu.cuProfilerStart() if start else cu.cuProfilerStop()) == 0
        return bool(ok)
    except OSError:
        return False


class _MemoryTrace:
    """Prints bytes in use and the peak (GiB) of device 0 at named stages."""

    def __init__(self, name, on):
        self.name, self.on = name, on

    def __call__(self, stage):
        if not self.on:
            return
        st = jax.devices()[0].memory_stats() or {}
        g = 2.0**30
        live = sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()) / g
        print(
            f"{self.name}: {stage:24} in use {st.get('bytes_in_use', 0) / g:8.3f} GiB, peak "
            f"{st.get('peak_bytes_in_use', 0) / g:8.3f} GiB, live arrays {live:8.3f} GiB",
            flush=True,
        )


def _trace(step, state, opt_state, ids, w, steps: int, title: str) -> None:
    """Wall ms per step (steps dispatched back to back, waited for once),
    then XLA's profile of as many steps: device ms per op."""
    def run(state, opt_state):
        state, opt_state, _ = step(state, opt_state, ids, w)
        return state, opt_state

    compiled = step.lower(state, opt_state, ids, w).compile()
    xla_trace.wall_then_top(run, (state, opt_state), steps, title, 40, compiled)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table-gb", type=float, default=4.0)
    p.add_argument("--optimizers", default="sgd,adam")
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--slots", type=int, default=26)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="profiled steps per optimizer")
    p.add_argument(
        "--memory-trace",
        action="store_true",
        help="print the device's bytes in use / peak after each stage instead "
        "of profiling (where does a step allocate?)",
    )
    p.add_argument(
        "--no-plan",
        action="store_true",
        help="skip the memory plan (lower + compile) before the first step",
    )
    p.add_argument(
        "--mode",
        default="direct",
        choices=["direct", "hash"],
        help="direct: key k is row k; hash: use_hashtable=True (the warm-up steps insert the "
        "batch's keys, so the profiled steps find them all)",
    )
    p.add_argument("--dist", default="uniform", choices=["uniform", "zipf"])
    p.add_argument(
        "--trace",
        action="store_true",
        help="no Nsight Compute: XLA's own profiler (tools/xla_trace.py) times each op's kernels "
        "over --steps steps, beside the wall time per step (their difference: the device idle)",
    )
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)
    if args.small:
        args.table_gb, args.batch = 2.0**-10, 64
    rows = int(args.table_gb * 2**30 // (args.dim * 4))
    mesh = Mesh(np.array(jax.devices()[:1]), (bts.AXIS,))
    emb = DistributedEmbedding(
        "mean",
        rows,
        args.dim,
        slot_num=args.slots,
        max_nnz=1,
        mesh=mesh,
        axis_name=bts.AXIS,
        use_hashtable=args.mode == "hash",
    )
    rng = np.random.default_rng(0)
    ns = argparse.Namespace(
        batch=args.batch, slots=args.slots, dim=args.dim, input_sets=1, dist=args.dist, zipf_a=1.1
    )
    ((ids, w),) = bts.make_input_sets(rng, ns, 1, rows, emb)[0]
    for name in args.optimizers.split(","):
        opt = optim.by_name(name, 0.01)
        mem = _MemoryTrace(name, args.memory_trace)
        # a random table (direct); hash: zeros and no keys, as a fresh table
        state = emb.init(0) if args.mode == "hash" else bts.make_state(emb, 0)
        mem("state made")
        opt_state = emb.init_optimizer(opt, state)
        mem("optimizer state made")
        step = bts.make_sparse_step(emb, opt)
        if not args.no_plan:
            print(
                f"{name}: memory plan (GiB) {bts.memory_plan(step, state, opt_state, ids, w)}",
                flush=True,
            )
            mem("memory plan compiled")
        for i in range(args.warmup):
            state, opt_state, _ = step(state, opt_state, ids, w)
            jax.block_until_ready(state)
            mem(f"step {i + 1}")
        if args.memory_trace:
            del state, opt_state
            mem("state deleted")
            continue
        if args.trace:
            _trace(step, state, opt_state, ids, w, args.steps, f"{args.mode} {name}")
            del state, opt_state
            continue
        on = _profiler(True)
        for _ in range(args.steps):
            state, opt_state, loss = step(state, opt_state, ids, w)
        jax.block_until_ready(state)
        if on:
            _profiler(False)
        print(
            f"{name}: {args.steps} steps {'profiled' if on else 'run (no profiler)'}, "
            f"loss {float(loss):.4g}",
            flush=True,
        )
        del state, opt_state


if __name__ == "__main__":
    main()
