"""Tables larger than the HBM given to them: the sparse training step of a
host-resident table, without cache and behind an HBM cache, against the same
table all in HBM, in one run.

For every (optimizer, key distribution) it measures one jitted sparse step
(`emb.lookup` -> a fixed head, loss = sum(tanh(out) * w) -> the cotangent ->
`emb.sparse_update`, state and optimizer state donated, out_shardings the
layer's) of one `DistributedEmbedding` (one device, direct mode, max_nnz 1,
combiner sum) in each storage:

  * hbm: the table and its slots in HBM (where `--hbm-gb` holds them);
  * host: in pinned host memory, every touched row read and updated over
    the host link (`storage="host"`);
  * cached f: in pinned host memory behind an HBM cache of f x the rows
    (`storage="host_cached"`, LRU), for each f of `--fractions`.

Correctness before timing: the losses of the first `--check-steps` steps
(the same batches from the same initial table) must equal the hbm run's bit
for bit where it ran (a cached table computes exactly what the HBM table
computes), else the host run's.

Columns: step ms (median over `--iters` samples of steps back to back), x
hbm (the ratio to the hbm step of the same optimizer and keys, same run),
hit rate (distinct rows found in the cache over all distinct rows, over the
timed steps), host MB per step (rows moved over the host link: misses read
in, evictions written back, each with its slots: (misses + evictions) x D x 4
x (1 + slots) bytes; for "host" every distinct row read and written with its
slots), and %h2d: those bytes per second over the host-to-device bandwidth of
pinned memory measured in this run (a jitted copy of a `--h2d-gb` array).

`--prefetch on|both`: cached points whose step's lookup also prefetches the
next batch (`lookup(..., prefetch=)`), its row moves running on a GPU side
stream beside the rest of the step. `--dense-layers L` puts a dense half in
the step for them to hide behind: the lookup's output [B, S*D] through L
bfloat16 layers of 1024 units (ReLU), forward and backward w.r.t. the
weights (not trained, and feeding no gradient to the table), the same in
every point.

Steady state before timing: a cached point runs fresh batches until its
cache is full and evicting (up to `--max-warm-steps`), then `--warm-steps`
more; the others run `--warm-steps`. A cache still filling would time a
step that writes nothing back. The warm-up batches are drawn from their own
seeded stream, the same for every point.
Keys: uniform, or Zipf(`--zipf-a`, default 1.05) with hot keys scattered
over the table by one fixed bijection (the same hot keys every step, as a
cache needs); every step draws a batch of its own (no batch repeats, so the
cache never sees a small rotating working set).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sok_jax  # noqa: E402
from sok_jax import optim  # noqa: E402
from sok_jax.distributed.storage import host_memory_kind  # noqa: E402

POINT_FIELDS = [
    ("dist", "keys"),
    ("optimizer", "optimizer"),
    ("label", "storage"),
    ("ms", "step ms", ".3f"),
    ("x_hbm", "x hbm", ".2f"),
    ("hit_rate", "hit rate", ".3f"),
    ("host_mb", "host MB/step", ".1f"),
    ("h2d_pct", "%h2d", ".0f"),
    ("warm_steps", "warm steps"),
    ("status", "status"),
]
WAYS = {"off": [False], "on": [True], "both": [False, True]}  # a point timed each way
SLOTS = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 0, "adam": 2}


def h2d_bandwidth(nbytes: int, warmup: int, iters: int) -> float:
    """Bytes/s of a jitted copy of a pinned-host float32 array to the device
    (nan where the backend has no pinned host memory distinct from HBM)."""
    kind = host_memory_kind()
    if kind is None:
        return float("nan")
    dev = jax.devices()[0]
    n = max(1, nbytes // 4)
    host = NamedSharding(Mesh(np.array([dev]), ("x",)), P(), memory_kind=kind)
    device = NamedSharding(Mesh(np.array([dev]), ("x",)), P())
    xs = [jax.device_put(jnp.full((n,), float(i), jnp.float32), host) for i in range(2)]
    copy = jax.jit(lambda x: x, out_shardings=device)
    t = common.timeit(copy, warmup=warmup, iters=iters, arg_sets=[(x,) for x in xs])
    del xs
    return n * 4 / t


def make_optimizer(name: str):
    return {
        "sgd": lambda: optim.sgd(0.01),
        "adagrad": lambda: optim.adagrad(0.01),
        "rowwise_adagrad": lambda: optim.rowwise_adagrad(0.01),
        "adam": lambda: optim.adam(0.001),
    }[name]()


def layer_for(
    args, rows: int, storage: str, fraction: float | None, overlap_moves=False, policy="lru"
):
    kw = {}
    if storage == "host_cached":
        kw = dict(
            cache_rows=int(rows * fraction),
            cache_policy=policy,
            cache_overlap_moves=overlap_moves,
        )
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    return sok_jax.DistributedEmbedding(
        combiner="sum",
        max_vocabulary_size_per_gpu=rows,
        embedding_vec_size=args.dim,
        slot_num=args.slots,
        max_nnz=1,
        use_hashtable=False,
        key_dtype=jnp.int32,
        mesh=mesh,
        axis_name="x",
        storage=storage,
        **kw,
    )


def dense_weights(args):
    """The `--dense-layers` weights (bfloat16), or None."""
    if not args.dense_layers:
        return None
    rng = np.random.default_rng(2)
    widths = [args.slots * args.dim] + [1024] * args.dense_layers
    return [
        jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.bfloat16)
        for a, b in zip(widths[:-1], widths[1:])
    ]


def dense_half(dense, out):
    """The `--dense-layers` half on the lookup's output: forward and backward
    (the weights' gradients, summed into one scalar so that none is left
    out). It feeds no gradient to the table: its bfloat16 matmuls may take
    other algorithms in another compile, and the points' losses must match
    bit for bit."""

    def mean_out(weights):
        x = jax.lax.stop_gradient(out).reshape(out.shape[0], -1).astype(jnp.bfloat16)
        for w in weights:
            x = jax.nn.relu(x @ w)
        return jnp.mean(x.astype(jnp.float32))

    value, grads = jax.value_and_grad(mean_out)(dense)
    return value + sum(jnp.sum(g.astype(jnp.float32)) for g in grads)


def stepper(emb, opt, state, opt_state, head, dense=None, prefetch=False):
    """The jitted donated sparse step: (state, opt_state, ids, upcoming) ->
    (state, opt_state, loss, the dense half's scalar or 0); with `prefetch`
    its lookup prefetches `upcoming` (the next batch)."""
    loss_sharding = NamedSharding(emb.mesh, P())

    def step(state, opt_state, ids, upcoming):
        kw = dict(prefetch=upcoming) if prefetch else {}
        out, ctx, state = emb.lookup(state, ids, **kw)
        loss, d_out = jax.value_and_grad(lambda o: jnp.sum(jnp.tanh(o) * head))(out)
        side = jnp.float32(0) if dense is None else dense_half(dense, out)
        state, opt_state = emb.sparse_update(state, opt, opt_state, ctx, d_out)
        return state, opt_state, loss, side

    return jax.jit(
        step,
        donate_argnums=(0, 1),
        out_shardings=(
            emb.state_shardings(),
            emb.optimizer_shardings(opt_state),
            loss_sharding,
            loss_sharding,
        ),
    )


def warm_batches(args, rows, dist):
    """Endless fresh batches for the warm-up, the same stream for every
    point (its own seed: the checked and timed batches are drawn apart)."""
    rng = np.random.default_rng(args.seed + 1)
    while True:
        keys = common.draw_keys(
            rng, dist, args.batch * args.slots, rows, args.zipf_a, hot_seed=args.seed
        )
        yield jnp.asarray(keys.reshape(args.batch, args.slots, 1))


def run_point(
    res, args, rows, storage, fraction, overlap, policy, opt_name, batches, reference_losses,
    prefetch=False,
):
    emb = layer_for(args, rows, storage, fraction, overlap, policy)
    opt = make_optimizer(opt_name)
    state = emb.init(args.seed)
    opt_state = emb.init_optimizer(opt, state)
    head = jnp.asarray(np.random.default_rng(1).normal(size=(args.slots, args.dim)), jnp.float32)
    step = stepper(emb, opt, state, opt_state, head, dense_weights(args), prefetch)

    def batch(i):
        return batches[i % len(batches)]

    # Correctness: the first steps' losses equal the reference run's bits.
    losses = []
    for i in range(args.check_steps):
        state, opt_state, loss, _ = step(state, opt_state, batch(i), batch(i + 1))
        losses.append(float(loss))
    res["losses"] = losses
    if reference_losses is not None and losses != reference_losses:
        raise AssertionError(f"losses {losses} differ from the reference run's {reference_losses}")

    def counts(st):
        s = st.stats
        if s.cache_hits is None:
            return 0, 0, 0
        return tuple(int(np.asarray(x).sum()) for x in (s.cache_hits, s.cache_misses, s.cache_evictions))

    warm = warm_batches(args, rows, res["dist"])
    upcoming = next(warm)

    def warm_step(step, state, opt_state):
        nonlocal upcoming
        ids, upcoming = upcoming, next(warm)
        return step(state, opt_state, ids, upcoming)[:2]

    filled = 0
    if storage == "host_cached":
        while counts(state)[2] == 0 and filled < args.max_warm_steps:
            for _ in range(5):
                state, opt_state = warm_step(step, state, opt_state)
                filled += 1
        if counts(state)[2] == 0:
            raise AssertionError(
                f"the cache still had not evicted after {filled} warm-up steps: raise "
                "--max-warm-steps (a point timed while its cache fills is not steady state)"
            )
    res["warm_steps"] = filled + args.warm_steps
    for _ in range(args.warm_steps):
        state, opt_state = warm_step(step, state, opt_state)
    jax.block_until_ready(state)

    # Timed: samples of `inner` steps back to back.
    before = counts(state)
    samples, k, steps = [], 0, 0
    inner = args.inner
    for _ in range(args.iters):
        t0 = time.perf_counter()
        for _ in range(inner):
            state, opt_state, loss, side = step(state, opt_state, batch(k), batch(k + 1))
            k += 1
        jax.block_until_ready((loss, side))
        samples.append((time.perf_counter() - t0) / inner)
        steps += inner
    after = counts(state)
    hits, misses, evictions = (a - b for a, b in zip(after, before))
    res["ms"] = statistics.median(samples) * 1e3
    res["spread"] = common.summarize(samples)["spread"]
    row_bytes = args.dim * 4 * (1 + SLOTS[opt_name])
    if storage == "host_cached":
        res["hit_rate"] = hits / max(hits + misses, 1)
        res["host_mb"] = (misses + evictions) / steps * row_bytes / 1e6
    elif storage == "host":
        distinct = np.mean([len(np.unique(np.asarray(b))) for b in batches])
        res["host_mb"] = 2 * distinct * row_bytes / 1e6
    del state, opt_state, step
    gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--table-gb", type=float, default=8.0, help="table size in GiB (float32)")
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--slots", type=int, default=26)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--fractions", type=common.float_list, default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--optimizers", type=common.str_list, default=["sgd", "adagrad", "rowwise_adagrad"])
    p.add_argument("--storages", type=common.str_list, default=["hbm", "host", "host_cached"])
    common.add_dists_arg(p)
    p.add_argument("--zipf-a", type=float, default=1.05)
    p.add_argument("--hbm-gb", type=float, default=60.0, help="run 'hbm' where table+slots fit")
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--warm-steps", type=int, default=10, help="after a cache is full")
    p.add_argument("--max-warm-steps", type=int, default=1000, help="to fill a cache")
    p.add_argument("--inner", type=int, default=5, help="steps per timed sample")
    p.add_argument(
        "--num-batches",
        type=int,
        default=0,
        help="distinct batches rotated (0: one per step, none repeats: a cache must not "
        "see a small rotating working set)",
    )
    p.add_argument("--h2d-gb", type=float, default=1.0)
    p.add_argument(
        "--policies",
        type=common.str_list,
        default=["lru"],
        help="cache_policy of the cached points (lru, lfu): each cached point timed with each",
    )
    for flag, what in (
        ("--overlap-moves", "cached tables write back on a side stream while they load "
         "(cache_overlap_moves)"),
        ("--prefetch", "cached points whose lookup prefetches the next batch"),
    ):
        p.add_argument(
            flag,
            nargs="?",
            const="on",
            default="off",
            choices=list(WAYS),
            help=f"{what}: off, on (the flag alone), or both, each cached point timed each way "
            "in this run",
        )
    p.add_argument(
        "--dense-layers",
        type=int,
        default=0,
        help="a dense half in the step (bfloat16 layers of 1024 units) for prefetched moves "
        "to hide behind; 0: none",
    )
    common.add_run_args(p, "tiny sizes (CPU smoke test)")
    args = p.parse_args(argv)
    common.check_dists(p, args.dists)
    if set(args.policies) - {"lru", "lfu"}:
        p.error(f"--policies: lru or lfu, got {args.policies}")
    if args.small:
        common.shrink_run_args(args)
        args.table_gb, args.batch, args.slots, args.dim = 2.0**-12, 16, 4, 8
        args.fractions, args.warm_steps, args.inner, args.h2d_gb = [0.5], 2, 1, 2.0**-8
        args.check_steps = 2
        args.dense_layers = min(args.dense_layers, 1)

    t_start = time.perf_counter()
    rows = int(args.table_gb * common.GIB) // (args.dim * 4)
    result = common.start_run(
        "bench_host_cache",
        args,
        f"table {args.table_gb} GiB ({rows} rows x D {args.dim}), batch {args.batch} x "
        f"{args.slots}, fractions {args.fractions}",
        points=[],
    )
    h2d = h2d_bandwidth(int(args.h2d_gb * common.GIB), args.warmup, args.iters)
    result["h2d_Bps"] = h2d
    print(f"host-to-device bandwidth (pinned, jitted copy): {h2d / common.GB:.1f} GB/s", flush=True)

    rng = np.random.default_rng(args.seed)
    n_fail = n_points = 0
    steps = args.check_steps + args.iters * args.inner
    num_batches = args.num_batches or steps
    for dist in args.dists:
        batches = [
            jnp.asarray(
                common.draw_keys(
                    rng, dist, args.batch * args.slots, rows, args.zipf_a, hot_seed=args.seed
                ).reshape(args.batch, args.slots, 1)
            )
            for _ in range(num_batches)
        ]
        for opt_name in args.optimizers:
            table_bytes = rows * args.dim * 4 * (1 + SLOTS[opt_name])
            # (storage, cache fraction, cache_overlap_moves, cache_policy, prefetch)
            points = []
            if "hbm" in args.storages and table_bytes <= args.hbm_gb * common.GIB:
                points.append(("hbm", None, False, None, False))
            if "host" in args.storages:
                points.append(("host", None, False, None, False))
            if "host_cached" in args.storages:
                points += [
                    ("host_cached", f, o, pol, pre)
                    for f in args.fractions
                    for o in WAYS[args.overlap_moves]
                    for pol in args.policies
                    for pre in WAYS[args.prefetch]
                ]
            reference = None
            base_ms = None
            for storage, fraction, overlap, policy, prefetch in points:
                res = dict(dist=dist, optimizer=opt_name, storage=storage, fraction=fraction)
                res["overlap_moves"], res["policy"], res["prefetch"] = overlap, policy, prefetch
                label = storage if fraction is None else f"cached {fraction:g}"
                label += " overlap" if overlap else ""
                label += " lfu" if policy == "lfu" else ""
                label += " prefetch" if prefetch else ""
                print(f"-- {dist} {opt_name} {label}", flush=True)
                n_points += 1
                ok = common.guarded(
                    res,
                    run_point,
                    res,
                    args,
                    rows,
                    storage,
                    fraction,
                    overlap,
                    policy,
                    opt_name,
                    batches,
                    reference,
                    prefetch,
                )
                n_fail += not ok
                if ok and reference is None:
                    reference = res["losses"]
                if ok and storage == "hbm":
                    base_ms = res["ms"]
                if ok and base_ms:
                    res["x_hbm"] = res["ms"] / base_ms
                if ok and "host_mb" in res and res["ms"]:
                    res["h2d_pct"] = 100 * res["host_mb"] * 1e6 / (res["ms"] / 1e3) / h2d
                res["label"] = label
                res["status"] = common.status(res)
                print(f"   {common.point_line(res, POINT_FIELDS)}", flush=True)
                result["points"].append(res)
        gc.collect()

    common.print_table(result["points"], POINT_FIELDS)
    return common.finish(result, args.out, n_points, n_fail, t_start)


if __name__ == "__main__":
    sys.exit(main())
