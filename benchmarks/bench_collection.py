"""`EmbeddingCollection` on Criteo-shaped collections: bytes crossing the
network per step by plan, and the one-GPU training step.

Collections (one table per feature, one-hot features):
  * kaggle: the 26 Criteo Kaggle cardinalities (1.5 K ... 10.1 M rows);
  * mlperf: MLPerf DLRM-DCNv2's: the Criteo 1TB cardinalities capped at
    40 M rows, 204,184,588 rows (104.5 GB at D 128 in float32).

`--bytes` (runs on CPU, nothing allocated): for n = 2, 4, 8 forced host
devices, the sparse training step (lookup, sparse_update with row-wise
Adagrad) of the auto plan and of the all-row-wise plan is compiled from
abstract arrays, and the bytes each device sends in its collectives are
read off the compiled HLO: all-to-all (n-1)/n of its buffer, all-gather
(n-1)/n of its result, all-reduce 2 (n-1)/n of its buffer. Target: on the
kaggle shape at n = 8, auto sends at most 1/3 of all-row-wise. The
planner's own estimate is printed beside it.

`--step` (one GPU): the jitted sparse training step (lookup, a fixed dense
head, sparse_update, state donated) of the collection against the same work
as one table with per-feature key offsets (`DistributedEmbedding`, the SOK
v1 form; target: the collection within 1.1x) and against the pure-JAX way
(flax-style `jnp.take` per table, `jax.grad` w.r.t. every table, optax
Adagrad on the whole tables), at `--scale` (1.0: full size; the pure-JAX
way runs where it fits, an OOM is reported).

    python3 benchmarks/bench_collection.py --bytes --out bytes.json
    python3 benchmarks/bench_collection.py --step --shape mlperf --out step.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

if "--bytes" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import (  # noqa: E402
    GIB,
    finish,
    guarded,
    print_table,
    start_run,
    status,
    summarize,
    time_samples,
    zipf_keys,
)
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sok_jax  # noqa: E402
from sok_jax import optim  # noqa: E402

KAGGLE = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
MLPERF = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # fmt: skip
SHAPES = {"kaggle": KAGGLE, "mlperf": MLPERF}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", action="store_true", help="bytes per plan from compiled HLO (CPU)")
    p.add_argument("--step", action="store_true", help="one-GPU training step timings")
    p.add_argument("--shape", default="kaggle,mlperf", help="collections (comma separated)")
    p.add_argument("--devices", default="2,4,8", help="device counts for --bytes")
    p.add_argument("--batch", type=int, default=16384, help="batch per device")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--scale", type=float, default=1.0, help="tables shrunk by this factor")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--input-sets", type=int, default=2)
    p.add_argument("--copy-gb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke test)")
    a = p.parse_args(argv)
    if a.small:
        a.batch, a.dim, a.scale, a.iters, a.warmup, a.copy_gb = 64, 8, 1e-4, 3, 1, 2.0**-6
    if not (a.bytes or a.step):
        a.bytes = a.step = True
    a.shapes = [s for s in a.shape.split(",") if s]
    a.device_counts = [int(x) for x in a.devices.split(",") if x]
    return a


def cardinalities(shape, scale):
    return [max(2, int(round(c * scale))) for c in SHAPES[shape]]


def make_collection(cards, dim, mesh, batch, cf, pin=None, memory=None):
    tables = [
        sok_jax.TableSpec(f"t{i}", v, dim, placement=pin or "auto") for i, v in enumerate(cards)
    ]
    features = [sok_jax.FeatureSpec(f"t{i}", f"t{i}") for i in range(len(cards))]
    return sok_jax.EmbeddingCollection(
        tables,
        features,
        mesh=mesh,
        axis_name="x",
        batch_size=batch,
        capacity_factor=cf,
        memory_per_device=memory,
        optimizer=optim.rowwise_adagrad(0.01),
    )


def head_loss(outs, w):
    """A fixed dense head: sum over features of <tanh(out), w>."""
    return sum(jnp.sum(jnp.tanh(o) * w[: o.shape[-1]]) for o in outs.values())


def sparse_step(coll, opt):
    def step(state, opt_state, batch, w):
        outs, ctx, state = coll.lookup(state, batch)
        loss, d_outs = jax.value_and_grad(lambda o: head_loss(o, w))(outs)
        state, opt_state = coll.sparse_update(state, opt, opt_state, ctx, d_outs)
        return state, opt_state, loss

    return step


# ----------------------------------------------------------------- bytes


_OPS = ("all-to-all", "all-gather", "all-reduce")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "pred": 1}
_FACTOR = {"all-to-all": lambda n: (n - 1) / n, "all-gather": lambda n: (n - 1) / n}
_FACTOR["all-reduce"] = lambda n: 2 * (n - 1) / n


def collective_bytes(hlo: str, n: int) -> dict:
    """Bytes one device sends per collective kind, read off the compiled HLO:
    each instruction `%x = <shape> op(...)` of an op in _OPS (its result
    shape; tuples summed), times the op's share that leaves the device."""
    out = dict.fromkeys(_OPS, 0)
    for line in hlo.splitlines():
        for op in _OPS:
            marker = f" {op}("
            if marker not in line or "=" not in line:
                continue
            shape = line.split("=", 1)[1].split(marker, 1)[0]
            size = 0
            for dtype, dims in _ARRAY.findall(shape):
                count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                size += count * _BYTES.get(dtype, 4)
            out[op] += int(size * _FACTOR[op](n))
    return out


def abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def compiled_bytes(coll, n, batch):
    """Collective bytes of the compiled sparse step, from abstract arrays."""
    opt = optim.rowwise_adagrad(0.01)
    state = jax.eval_shape(lambda: coll.init(0))
    state = abstract(state, coll.state_shardings())
    opt_state = jax.eval_shape(lambda s: _opt_init(coll, opt, s), state)
    row = NamedSharding(coll.mesh, P("x"))
    ids = {
        name: jax.ShapeDtypeStruct((batch * n, 1), jnp.int32, sharding=row)
        for name in coll.feature_specs
    }
    w = jax.ShapeDtypeStruct((1024,), jnp.float32)
    lowered = jax.jit(sparse_step(coll, opt)).lower(state, opt_state, ids, w)
    return collective_bytes(lowered.compile().as_text(), n)


def _opt_init(coll, opt, state):
    """The optimizer state's shapes (init_optimizer runs programs per slot;
    its shapes are opt.init of each unit's table)."""
    return {k: opt.init(v.table) for k, v in state.shards.items()}


def show(rows, columns):
    """print_table over derived columns: (header, key or function of a row,
    format)."""
    derived = [{h: (f(r) if callable(f) else r.get(f)) for h, f, _ in columns} for r in rows]
    print_table(derived, [(h, h, fmt) for h, _, fmt in columns])


def run_bytes(args, result):
    rows = []
    for shape in args.shapes:
        cards = cardinalities(shape, args.scale)
        for n in args.device_counts:
            if n > len(jax.devices()):
                continue
            mesh = Mesh(np.array(jax.devices()[:n]), ("x",))
            res = {"shape": shape, "n": n, "batch": args.batch}

            def point(res=res, cards=cards, n=n, mesh=mesh):
                auto = make_collection(
                    cards, args.dim, mesh, args.batch * n, args.capacity_factor, memory=140 * GIB
                )
                row = make_collection(
                    cards,
                    args.dim,
                    mesh,
                    args.batch * n,
                    args.capacity_factor,
                    pin="row",
                    memory=140 * GIB,
                )
                res["placements"] = {t.table: t.placement for t in auto.plan.tables}
                res["auto"] = compiled_bytes(auto, n, args.batch)
                res["row"] = compiled_bytes(row, n, args.batch)
                res["auto_bytes"] = sum(res["auto"].values())
                res["row_bytes"] = sum(res["row"].values())
                res["ratio"] = res["auto_bytes"] / max(res["row_bytes"], 1)
                res["planner_auto"] = auto.plan.exchange_bytes
                res["planner_row"] = auto.plan.row_wise_exchange_bytes
                res["counts"] = {
                    p: sum(1 for v in res["placements"].values() if v == p)
                    for p in ("row", "table", "replicated")
                }
                print(auto.plan, flush=True)

            guarded(res, point)
            res["status"] = status(res)
            rows.append(res)
    result["bytes"] = rows
    show(
        rows,
        [
            ("shape", "shape", None),
            ("n", "n", None),
            ("auto MiB", lambda r: r.get("auto_bytes", 0) / 2**20, ".1f"),
            ("row MiB", lambda r: r.get("row_bytes", 0) / 2**20, ".1f"),
            ("auto/row", "ratio", ".3f"),
            ("plan auto MiB", lambda r: r.get("planner_auto", 0) / 2**20, ".1f"),
            (
                "row/table/repl",
                lambda r: "/".join(str(v) for v in r.get("counts", {}).values()),
                None,
            ),
            ("status", "status", None),
        ],
    )
    kaggle8 = [r for r in rows if r["shape"] == "kaggle" and r["n"] == 8 and "ratio" in r]
    if kaggle8:
        ok = kaggle8[0]["ratio"] <= 1 / 3
        print(
            f"target kaggle n=8 auto/row <= 0.333: {kaggle8[0]['ratio']:.3f} "
            f"({'met' if ok else 'MISSED'})"
        )
    return sum(1 for r in rows if "error" in r)


# ------------------------------------------------------------------ step


def uniform(shape, sharding, seed):
    """uniform(-0.05, 0.05) of `shape` drawn in one jitted program into
    `sharding` (per-key init is not what is timed)."""
    make = jax.jit(
        lambda key: jax.random.uniform(key, shape, jnp.float32, -0.05, 0.05),
        out_shardings=sharding,
    )
    return make(jax.random.key(seed))


def random_state(coll, seed):
    """The collection's state with random tables, one program per unit."""
    shapes = jax.eval_shape(lambda: coll.init(seed))
    shardings = coll.state_shardings()
    shards = {
        k: sok_jax.distributed.TableShard(
            uniform(v.table.shape, shardings.shards[k].table, seed + i), None
        )
        for i, (k, v) in enumerate(shapes.shards.items())
    }
    stats = jax.tree.map(jnp.zeros_like, shapes.stats)
    return sok_jax.CollectionState(shards, jax.random.key_data(jax.random.key(seed)), stats)


def batches(args, cards, n_sets, rng):
    return [
        {
            f"t{i}": zipf_keys(rng, args.batch, c).reshape(-1, 1).astype(np.int32)
            for i, c in enumerate(cards)
        }
        for _ in range(n_sets)
    ]


def time_fn(step, state, opt_state, sets, w, args):
    """Steps back to back over the input sets, state carried (donated)."""
    holder = {"s": state, "o": opt_state}

    def call(batch):
        holder["s"], holder["o"], loss = step(holder["s"], holder["o"], batch, w)
        return loss

    samples = time_samples(
        call,
        arg_sets=[(b,) for b in sets],
        warmup=args.warmup,
        iters=args.iters,
        min_sample_s=0.02,
    )
    return summarize(samples)


def time_collection(res, args, cards, sets, mesh, w, opt):
    coll = make_collection(cards, args.dim, mesh, args.batch, None, memory=140 * GIB)
    step = jax.jit(sparse_step(coll, opt), donate_argnums=(0, 1))
    state = random_state(coll, args.seed)
    res["plan"] = str(coll.plan)
    res["collection"] = time_fn(step, state, coll.init_optimizer(opt, state), sets, w, args)


def time_one_table(res, args, cards, sets, mesh, w, opt):
    """The same work as one table with per-feature key offsets (SOK v1)."""
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int32)
    emb = sok_jax.DistributedEmbedding(
        "sum",
        int(sum(cards)),
        args.dim,
        slot_num=len(cards),
        max_nnz=1,
        mesh=mesh,
        axis_name="x",
        use_hashtable=False,
    )
    table = uniform((emb.num_rows, args.dim), emb.table_sharding, args.seed)
    seed = jax.random.key_data(jax.random.key(0))
    state = sok_jax.EmbeddingState(table, None, seed, emb.zero_stats())
    joined = [
        np.stack([b[f"t{i}"][:, 0] + offsets[i] for i in range(len(cards))], 1)[..., None]
        for b in sets
    ]

    def step(state, opt_state, ids, w):
        out, ctx, state = emb.lookup(state, ids)
        loss, d = jax.value_and_grad(lambda o: jnp.sum(jnp.tanh(o) * w))(out)
        state, opt_state = emb.sparse_update(state, opt, opt_state, ctx, d)
        return state, opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    res["one_table"] = time_fn(step, state, emb.init_optimizer(opt, state), joined, w, args)


def time_pure_jax(res, args, cards, sets, mesh, w, opt):
    """jnp.take per table, jax.grad w.r.t. every table, optax Adagrad."""
    del mesh, opt
    tables = {f"t{i}": uniform((c, args.dim), None, i) for i, c in enumerate(cards)}
    tx = optax.adagrad(0.01)

    def step(tables, opt_state, batch, w):
        def loss_fn(tables):
            return head_loss({k: jnp.take(tables[k], batch[k][:, 0], axis=0) for k in tables}, w)

        loss, g = jax.value_and_grad(loss_fn)(tables)
        upd, opt_state = tx.update(g, opt_state, tables)
        return optax.apply_updates(tables, upd), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    res["pure_jax"] = time_fn(step, tables, tx.init(tables), sets, w, args)


def run_step(args, result):
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    rows = []
    rng = np.random.default_rng(args.seed)
    w = jnp.asarray(rng.standard_normal(args.dim), jnp.float32)
    opt = optim.rowwise_adagrad(0.01)
    for shape in args.shapes:
        cards = cardinalities(shape, args.scale)
        sets = batches(args, cards, max(1, args.input_sets), rng)
        res = {
            "shape": shape,
            "rows": sum(cards),
            "table_gib": sum(cards) * args.dim * 4 / GIB,
            "batch": args.batch,
        }
        for name, fn in (
            ("collection", time_collection),
            ("one_table", time_one_table),
            ("pure_jax", time_pure_jax),
        ):
            sub = {}
            if not guarded(sub, fn, sub, args, cards, sets, mesh, w, opt):
                res[name + "_status"] = status(sub)
            res.update({k: v for k, v in sub.items() if k not in ("error", "traceback")})
            if name in res:
                print(f"  {shape} {name}: {res[name]['median_s'] * 1e3:.3f} ms", flush=True)
            jax.clear_caches()
        if "plan" in res:
            print(res["plan"], flush=True)
        rows.append(res)
    result["step"] = rows

    def ms(key):
        return lambda r: r[key]["median_s"] * 1e3 if key in r else r.get(key + "_status")

    def ratio(a, b):
        return lambda r: r[a]["median_s"] / r[b]["median_s"] if a in r and b in r else None

    show(
        rows,
        [
            ("shape", "shape", None),
            ("GiB", "table_gib", ".1f"),
            ("collection ms", ms("collection"), ".3f"),
            ("one-table ms", ms("one_table"), ".3f"),
            ("pure-JAX ms", ms("pure_jax"), ".3f"),
            ("coll/one-table", ratio("collection", "one_table"), ".3f"),
            ("pure-JAX/coll", ratio("pure_jax", "collection"), ".2f"),
            (
                "samples/s",
                lambda r: args.batch / r["collection"]["median_s"] if "collection" in r else None,
                ",.0f",
            ),
        ],
    )
    for r in rows:
        x = ratio("collection", "one_table")(r)
        if x is not None:
            print(
                f"target {r['shape']} collection/one-table <= 1.10: {x:.3f} "
                f"({'met' if x <= 1.1 else 'MISSED'})"
            )
    return sum(1 for r in rows if "collection" not in r)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = start_run("bench_collection", args, f"{vars(args)}")
    fails = 0
    if args.bytes:
        fails += run_bytes(args, result)
    if args.step:
        fails += run_step(args, result)
    return finish(
        result, args.out, len(result.get("bytes", [])) + len(result.get("step", [])), fails, t0
    )


if __name__ == "__main__":
    sys.exit(main())
