"""Full training step, sparse path against the dense (optax) way, in one run.

For every point (GPU count n, total table size, optimizer) it measures one
jitted training step (forward, backward, update) of the same model:

  * sparse (the sok_jax way): `emb.lookup` -> a tiny dense head
    (loss = sum over batch, slots and D of tanh(out) * w, w [S, D] fixed) ->
    `jax.value_and_grad` w.r.t. the embedding output -> `emb.sparse_update`
    (the backward fused with `sok_jax.optim.sgd/adagrad/adam`); state and
    optimizer state donated (`donate_argnums=(0, 1)`), updated in place.
    Also timed ("2-pass", unless --no-two-pass): the two-call form
    `emb.sparse_grad` -> `emb.apply_gradients` on the same state.
  * dense: `jax.value_and_grad` of the same loss w.r.t. `state.table` through
    `emb.apply` (the full [rows, D] cotangent), then `optax.sgd/adagrad/adam`
    `update` + `optax.apply_updates` on the full table; state and optimizer
    state donated. Cost O(table) per step.

Sizes: `--table-gb` is the TOTAL logical table in GiB (rows = gb * 2**30 /
(D * 4)); on n devices each holds rows / n (strong scaling of the table).
`--batch` is per GPU (global batch = batch * n: weak scaling of the batch).
max_nnz 1, combiner mean, int32 keys (direct mode).

Correctness before timing (every n and size, SGD, one step, the same jitted
programs that are then timed): the vectors of the batch's keys after one
sparse step must equal a float64 numpy reference old - lr * sum(d_out) per
distinct key (old vectors and d_out from a lookup before the step), and keys
the batch did not touch must keep their exact bits; where the dense path fits
(see --mem-gb) the dense SGD step from the same initial table must give the
same vectors (to --tol, relative to the largest update). A point whose check
fails is not timed.

Timing: a sample runs steps back to back for at least --min-sample-ms
(20 ms) and blocks once, as a training loop runs them (dispatch is
asynchronous, so the host's ~0.3-0.4 ms per step of dispatch overlaps the
previous step); "sync ms" is one step dispatched and waited for, host
dispatch included (what a loop that blocks on every step would see).

Bytes that must move in one sparse step (the step is memory-bound),
U = distinct keys of the global batch, s = optimizer slots (sgd 0,
adagrad 1, adam 2), B = global batch, S = slots, D:
    bytes = U * D * 4                 (lookup: each touched row read once)
          + B * S * D * 4             (lookup output written once)
          + U * D * 4 * 2 * (1 + s)   (update: each touched row of the table
                                       and of every slot read + written once)
(ids, the head and the exchange buffers are left out: ids are B*S*4 bytes,
<1% here). GB/s = bytes / time over all GPUs; %copy = (bytes / n) / time
over the copy bandwidth of one GPU measured in this run.

Memory: `--mem-gb` (GiB per device, default 70). A path is skipped
("skipped (memory)") when its estimate per device exceeds it:
    sparse: table * (1 + s) / n
    dense:  table * (1 + s) / n + grad + updates + new table
            = table * (4 + s) / n
    (the new table too: a dense step that runs out of memory part-way can
    leave the allocator fragmented for the points after it, so such a
    point is skipped rather than attempted)
Anything that still runs out of memory is caught, reported ("OOM") and the
run goes on. XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95 here (JAX's
0.75 would leave too little of an 80 GB card for a 20 GiB table + Adam).
Run it with JAX's default preallocation: in growth mode
(XLA_PYTHON_CLIENT_PREALLOCATE=false) the allocator can fail a step whose
arrays fit the card (RESULTS.md, the 20 GiB Adam step).

After the table it prints the flatness (sparse-step time at each size over
the time at the smallest size; target within 15% from 1 to 20 GiB) and the
per-GPU-count results side by side.

Defaults are the GPU configuration. CPU smoke run:
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python benchmarks/bench_train_step.py --small --devices 1,4
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import (  # noqa: E402
    DISTS,
    GB,
    GIB,
    add_run_args,
    add_zipf_arg,
    draw_keys,
    finish,
    float_list,
    int_list,
    is_oom,
    print_table,
    shrink_run_args,
    start_run,
    str_list,
    summarize,
    time_samples,
    write_json,
)
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sok_jax import optim  # noqa: E402
from sok_jax.distributed import DistributedEmbedding  # noqa: E402

AXIS = "sok"
SLOTS = {"sgd": 0, "adagrad": 1, "adam": 2}
OPTAX = {"sgd": optax.sgd, "adagrad": optax.adagrad, "adam": optax.adam}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--table-gb",
        type=float_list,
        default=[1, 5, 10, 20],
        help="TOTAL logical table sizes in GiB, comma separated (default 1,5,10,20)",
    )
    p.add_argument(
        "--devices",
        type=int_list,
        default=[1],
        help="GPU counts: a mesh over the first n devices (default 1)",
    )
    p.add_argument(
        "--optimizers",
        type=str_list,
        default=["sgd", "adagrad", "adam"],
        help="sgd, adagrad, adam (default all three)",
    )
    p.add_argument("--batch", type=int, default=16384, help="samples per GPU (default 16384)")
    p.add_argument("--slots", type=int, default=26, help="slots per sample (default 26)")
    p.add_argument("--dim", type=int, default=128, help="embedding size D (default 128)")
    p.add_argument(
        "--dist",
        default="uniform",
        choices=DISTS,
        help="key distribution (default uniform)",
    )
    add_zipf_arg(p)
    p.add_argument("--lr", type=float, default=0.01, help="learning rate while timing")
    p.add_argument("--check-lr", type=float, default=0.1, help="SGD learning rate of the check")
    p.add_argument(
        "--mem-gb",
        type=float,
        default=None,
        help="GiB per device a path may need (estimate) before it is skipped (default 70)",
    )
    p.add_argument(
        "--capacity-factor",
        default=None,
        help="DistributedEmbedding capacity_factor: a number, or 'fit' (5%% above "
        "required_capacity_factor of the benchmark's batches); default None "
        "(every bucket holds the whole local batch)",
    )
    p.add_argument("--no-dense", action="store_true", help="time the sparse path only")
    p.add_argument(
        "--no-two-pass",
        action="store_true",
        help="do not also time the two-call sparse form (sparse_grad + "
        "apply_gradients) against the fused sparse_update",
    )
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=20.0,
        help="a timing sample runs steps back to back (as a training loop "
        "does: dispatch is asynchronous) for at least this long, and blocks "
        "once (default 20)",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="check: max|diff| <= tol * max|update| (default 1e-4)",
    )
    p.add_argument(
        "--flat-target",
        type=float,
        default=1.15,
        help="flatness target: largest/smallest sparse time (default 1.15)",
    )
    add_run_args(p, "tiny tables, batch 64, few iterations: a CPU smoke check")
    args = p.parse_args(argv)
    if args.capacity_factor not in (None, "fit"):
        try:
            args.capacity_factor = float(args.capacity_factor)
        except ValueError:
            p.error(f"--capacity-factor must be a number or 'fit', got {args.capacity_factor!r}")
    if args.small:
        args.table_gb = [2.0**-12, 2.0**-11, 2.0**-10]  # 256 KiB .. 1 MiB
        args.batch = 64
        shrink_run_args(args)
        if args.mem_gb is None:
            # So that the smoke run also exercises "skipped (memory)": on one
            # device, the largest table's dense Adam (6x table) is skipped.
            args.mem_gb = 5.5 * 2.0**-10
    if args.mem_gb is None:
        args.mem_gb = 70.0
    bad = set(args.optimizers) - set(SLOTS)
    if bad:
        p.error(f"unknown --optimizers {sorted(bad)}")
    return args


# --------------------------------------------------------------------------- model


def head_loss(out, w):
    """The tiny dense head: sum over batch, slots and D of tanh(out) * w."""
    return jnp.sum(jnp.tanh(out.astype(jnp.float32)) * w[None])


def make_sparse_step(emb, opt, fused=True):
    """fused: `emb.sparse_update` (the backward fused with the optimizer);
    else the two-call form `apply_gradients(sparse_grad(...))`."""

    def step(state, opt_state, ids, w):
        out, ctx, state = emb.lookup(state, ids)
        loss, d_out = jax.value_and_grad(head_loss)(out, w)
        if fused:
            state, opt_state = emb.sparse_update(state, opt, opt_state, ctx, d_out)
        else:
            sg = emb.sparse_grad(ctx, d_out)
            state, opt_state = emb.apply_gradients(state, opt, opt_state, sg)
        return state, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_dense_step(emb, tx):
    def step(state, opt_state, ids, w):
        def loss_fn(table):
            out, _ = emb.apply(dataclasses.replace(state, table=table), ids)
            return head_loss(out, w)

        loss, g = jax.value_and_grad(loss_fn)(state.table)
        updates, opt_state = tx.update(g, opt_state, state.table)
        table = optax.apply_updates(state.table, updates)
        return dataclasses.replace(state, table=table), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def optax_init(emb, tx, state):
    """optax state with every table-shaped leaf sharded like the table."""
    shapes = jax.eval_shape(tx.init, state.table)
    rep = NamedSharding(emb.mesh, P())

    def sh(s):
        if s.ndim == 2 and s.shape == state.table.shape:
            return emb.table_sharding
        return rep

    return jax.jit(tx.init, out_shardings=jax.tree.map(sh, shapes))(state.table)


def memory_plan(step, *args):
    """The compiled step's memory analysis in GiB (None where not given)."""
    try:
        m = step.lower(*args).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - a backend without the analysis
        return {"error": str(e)[:200]}
    if m is None:
        return None
    g = 2.0**30
    return {
        k: getattr(m, f"{k}_size_in_bytes") / g for k in ("argument", "output", "alias", "temp")
    }


class Stepper:
    """Threads the donated (state, opt_state) through repeated steps, so that
    `time_samples` can call it with (ids, w) only. Returns the new state
    (blocking on it waits for the whole step, update included)."""

    def __init__(self, step, state, opt_state):
        self.step, self.state, self.opt_state = step, state, opt_state
        self.loss = None

    def __call__(self, ids, w):
        self.state, self.opt_state, self.loss = self.step(self.state, self.opt_state, ids, w)
        return self.state, self.opt_state

    def release(self):
        """The state to carry to the next measurement; the optimizer state
        is dropped (the next one makes its own)."""
        state, self.state, self.opt_state = self.state, None, None
        return state


def make_state(emb, seed):
    """The embedding state with a random table, built directly.

    `emb.init(seed)` initializes each key's vector separately (vmap of
    per-key fold_in + uniform), which at 20 GiB is slow and needs large
    temporaries; the benchmark does not need the per-key invariant, so the
    table is drawn in one jitted `jax.random.uniform(-0.05, 0.05)` (SOK's
    default range) straight into the table's sharding, and the rest of the
    state (seed, stats) comes from the state of a one-row-per-device copy of
    the layer. Deterministic in `seed` (used to rebuild the same table).
    """
    small = DistributedEmbedding(
        emb.combiner,
        1,
        emb.embedding_vec_size,
        slot_num=emb.slot_num,
        max_nnz=emb.max_nnz,
        mesh=emb.mesh,
        axis_name=emb.axis_name,
        use_hashtable=False,
    ).init(seed)
    shape = (emb.num_rows, emb.embedding_vec_size)
    make = jax.jit(
        lambda k: jax.random.uniform(k, shape, jnp.float32, -0.05, 0.05),
        out_shardings=emb.table_sharding,
    )
    table = jax.block_until_ready(make(jax.random.key(seed)))
    # init() shares one zeros array among the three stats fields; a donated
    # state must not hold the same buffer twice, so give each its own copy.
    stats = jax.tree.map(lambda x: jnp.array(x, copy=True), small.stats)
    seed_data = jnp.array(small.seed, copy=True)
    return dataclasses.replace(small, table=table, stats=stats, seed=seed_data)


# --------------------------------------------------------------------------- inputs


def make_input_sets(rng, args, n, vocab, emb):
    B, S, D = args.batch * n, args.slots, args.dim
    rep = NamedSharding(emb.mesh, P())
    sets, host, distinct = [], [], []
    for _ in range(max(1, args.input_sets)):
        keys = draw_keys(rng, args.dist, B * S, vocab, args.zipf_a)
        ids = keys.reshape(B, S, 1).astype(np.int32)
        w = rng.standard_normal((S, D)).astype(np.float32)
        sets.append((jax.device_put(ids, emb.batch_sharding), jax.device_put(w, rep)))
        host.append((ids, w))
        distinct.append(int(np.unique(keys).size))
    return sets, host, distinct


def untouched_probe(rng, ids, vocab, n, S):
    """[8n, S, 1] keys that the batch `ids` does not contain."""
    want = 8 * n * S
    cand = rng.integers(0, vocab, size=4 * want + 64)
    cand = np.unique(cand[~np.isin(cand, ids.reshape(-1))])
    rng.shuffle(cand)
    if cand.size < want:  # tiny vocabularies: pad with keys of the batch' complement
        rest = np.setdiff1d(np.arange(vocab), ids.reshape(-1))
        cand = np.concatenate([cand, rest])
    if cand.size == 0:
        return None
    cand = np.resize(cand, want)
    return cand.reshape(8 * n, S, 1).astype(np.int32)


def sgd_reference(before, ids, w, lr):
    """Vectors of the batch's keys after one SGD step, float64 numpy.

    before: [B, S, D] vectors per position (max_nnz 1: out == the row)."""
    D = before.shape[-1]
    keys = ids.reshape(-1)
    b64 = before.reshape(-1, D).astype(np.float64)
    d_out = w.astype(np.float64)[None] * (1.0 - np.tanh(before.astype(np.float64)) ** 2)
    d_out = d_out.reshape(-1, D)
    uniq, inv = np.unique(keys, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    starts = np.searchsorted(inv[order], np.arange(uniq.size))
    g = np.add.reduceat(d_out[order], starts, axis=0)  # [U, D]
    return (b64 - lr * g[inv]).reshape(before.shape)


def _cmp(after, ref, before):
    """max|after - ref| relative to the largest update, plus raw numbers."""
    after = np.asarray(after, np.float64)
    upd = float(np.max(np.abs(ref - before))) if ref.size else 0.0
    diff = float(np.max(np.abs(after - ref))) if ref.size else 0.0
    ok = bool(np.all(np.isfinite(after)))
    return {
        "max_abs_diff": diff,
        "max_update": upd,
        "rel": diff / upd if upd > 0 else float("inf"),
        "finite": ok,
    }


# --------------------------------------------------------------------------- one size


def failed_points(base, optimizers, e, **extra):
    """One point per optimizer for a size whose setup or check raised `e`."""
    msg = ("OOM: " if is_oom(e) else "") + f"{type(e).__name__}: {e}"
    tb = traceback.format_exc()[-4000:]
    return [dict(base, opt=name, error=msg[:4000], traceback=tb, **extra) for name in optimizers]


def _fail(res, key, e):
    msg = f"{type(e).__name__}: {e}"
    res[key] = "OOM" if is_oom(e) else "failed"
    if is_oom(e):  # what was still held when the allocation failed
        live = [a for a in jax.live_arrays() if not a.is_deleted()]
        res.setdefault("live_gib", {})[key] = sum(a.nbytes for a in live) / GIB
        print(f"  {key}: {len(live)} live arrays, {res['live_gib'][key]:.2f} GiB", flush=True)
    res.setdefault("errors", {})[key] = msg[:4000]
    res.setdefault("tracebacks", {})[key] = traceback.format_exc()[-4000:]
    print(f"  {key} {res[key]}: {msg.splitlines()[0][:400] if msg else ''}", flush=True)


def check_point(emb, args, state, sets, host, n, vocab, rng):
    """One SGD step sparse (and dense where it fits) against the reference.

    Returns (check dict, state after the sparse step)."""
    S = args.slots
    chk = {}
    look = jax.jit(lambda st, ids: emb.lookup(st, ids, training=False)[0])
    ids_d, w_d = sets[0]
    ids_h, w_h = host[0]
    probe_h = untouched_probe(rng, ids_h, vocab, n, S)
    probe_d = jax.device_put(probe_h, emb.batch_sharding) if probe_h is not None else None

    before = np.asarray(look(state, ids_d), np.float64)
    before_u = np.asarray(look(state, probe_d)) if probe_d is not None else None
    ref = sgd_reference(before, ids_h, w_h, args.check_lr)

    opt = optim.sgd(args.check_lr)
    step = make_sparse_step(emb, opt)
    state, _, loss = step(state, emb.init_optimizer(opt, state), ids_d, w_d)
    after = np.asarray(look(state, ids_d))
    sp = _cmp(after, ref, before)
    sp["loss"] = float(loss)
    if probe_d is not None:
        sp["untouched_equal"] = bool(np.array_equal(np.asarray(look(state, probe_d)), before_u))
    chk["sparse_vs_ref"] = sp
    ok = sp["finite"] and sp["rel"] <= args.tol and sp.get("untouched_equal", True)
    print(
        f"  check sparse SGD step vs float64 reference: max|diff| {sp['max_abs_diff']:.3g} "
        f"(largest update {sp['max_update']:.3g}, rel {sp['rel']:.3g}), untouched keys "
        f"unchanged: {sp.get('untouched_equal')}",
        flush=True,
    )
    if not ok:
        raise AssertionError(f"sparse step mismatch: {sp}")

    table_gib = emb.num_rows * emb.embedding_vec_size * 4 / GIB
    need = table_gib * 4 / n  # sparse state kept + dense table, grad, updates
    if args.no_dense:
        chk["dense"] = "skipped (--no-dense)"
    elif need > args.mem_gb:
        chk["dense"] = "skipped (memory)"
        print(
            f"  check dense SGD step: skipped (memory: ~{need:.1f} GiB/device > "
            f"--mem-gb {args.mem_gb:g})",
            flush=True,
        )
    else:
        try:
            st_d = make_state(emb, args.seed)  # the same initial table
            tx = optax.sgd(args.check_lr)
            dstep = make_dense_step(emb, tx)
            st_d, _, dloss = dstep(st_d, optax_init(emb, tx, st_d), ids_d, w_d)
            after_d = np.asarray(look(st_d, ids_d))
            dn = _cmp(after_d, ref, before)
            dn["vs_sparse"] = _cmp(after_d, np.asarray(after, np.float64), before)["rel"]
            dn["loss"] = float(dloss)
            if probe_d is not None:
                dn["untouched_equal"] = bool(
                    np.array_equal(np.asarray(look(st_d, probe_d)), before_u)
                )
            del st_d
            chk["dense_vs_ref"] = dn
            print(
                f"  check dense SGD step: vs reference rel {dn['rel']:.3g}, vs sparse rel "
                f"{dn['vs_sparse']:.3g}, loss dense {dn['loss']:.6g} sparse {sp['loss']:.6g}",
                flush=True,
            )
            if not (
                dn["finite"]
                and dn["rel"] <= args.tol
                and dn["vs_sparse"] <= args.tol
                and dn.get("untouched_equal", True)
            ):
                raise AssertionError(f"dense step disagrees with the sparse step: {dn}")
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. OOM: the sparse check stands
            chk["dense"] = ("OOM" if is_oom(e) else "failed") + f": {str(e)[:300]}"
            print(f"  check dense SGD step: {chk['dense'][:300]}", flush=True)
    gc.collect()
    return chk, state


def time_size(n, gb, emb, args, rng, copy_bw, results):
    """Checks and times every optimizer at one (n, table size)."""
    S, D = args.slots, args.dim
    B = args.batch * n
    rows = emb.num_rows
    table_gib = rows * D * 4 / GIB
    base = {
        "n": n,
        "table_gb": gb,
        "table_gib": table_gib,
        "rows": rows,
        "rows_per_gpu": emb.max_vocabulary_size_per_gpu,
        "batch": B,
    }

    t0 = time.perf_counter()
    state = make_state(emb, args.seed)
    base["init_s"] = time.perf_counter() - t0
    sets, host, distinct = make_input_sets(rng, args, n, rows, emb)
    U = float(np.mean(distinct))
    base["distinct_keys"] = U
    if args.capacity_factor is not None:
        cf = args.capacity_factor
        if cf == "fit":  # 5% above what the benchmark's own batches need
            need = max(float(emb.required_capacity_factor(ids)) for ids, _ in sets)
            cf = min(1.05 * need, float(n))
        emb = DistributedEmbedding(
            emb.combiner,
            emb.max_vocabulary_size_per_gpu,
            emb.embedding_vec_size,
            slot_num=emb.slot_num,
            max_nnz=emb.max_nnz,
            mesh=emb.mesh,
            axis_name=emb.axis_name,
            capacity_factor=float(cf),
            use_hashtable=False,
        )
        base["capacity_factor"] = float(cf)
        print(
            f"  capacity_factor {float(cf):.4f} (capacity {emb._capacity(args.batch)} "
            f"of {args.batch * args.slots} per destination)",
            flush=True,
        )

    try:
        chk, state = check_point(emb, args, state, sets, host, n, rows, rng)
        base["check"] = chk
        check_status = "ok"
    except Exception as e:  # noqa: BLE001
        print(f"  CHECK FAILED: {type(e).__name__}: {str(e)[:1000]}", flush=True)
        results += failed_points(base, args.optimizers, e, check="FAILED")
        return
    del host
    gc.collect()

    def live_state(st):
        if st is None or st.table.is_deleted():
            print("  (state was lost with a failed step; rebuilding the table)", flush=True)
            return make_state(emb, args.seed)
        return st

    kw = dict(
        warmup=args.warmup, iters=args.iters, arg_sets=sets, min_sample_s=args.min_sample_ms * 1e-3
    )
    sync_kw = dict(kw, min_sample_s=0)  # one step, then block: dispatch included
    for name in args.optimizers:
        s = SLOTS[name]
        res = dict(base, opt=name, slots=s, check=check_status)
        res["bytes"] = U * D * 4 * (1 + 2 * (1 + s)) + B * S * D * 4
        res["sparse_mem_gib"] = table_gib * (1 + s) / n
        res["dense_mem_gib"] = table_gib * (4 + s) / n
        print(f"-- n={n} table {gb:g} GiB {name}", flush=True)

        # ---- sparse
        if res["sparse_mem_gib"] > args.mem_gb:
            res["sparse"] = "skipped (memory)"
            print(
                f"  sparse: skipped (memory: ~{res['sparse_mem_gib']:.1f} GiB/device)", flush=True
            )
        else:
            stp = None
            try:
                state = live_state(state)
                opt = optim.by_name(name, args.lr)
                step, opt_state = make_sparse_step(emb, opt), emb.init_optimizer(opt, state)
                # On a GPU the step's temporaries are one allocation: a
                # table-sized one would be a copy the in-place update avoids.
                plan = res["sparse_memory_gib"] = memory_plan(step, state, opt_state, *sets[0])
                print(f"  sparse step memory plan (GiB): {plan}", flush=True)
                stp = Stepper(step, state, opt_state)
                state = opt_state = None
                res["sparse_timing"] = summarize(time_samples(stp, **kw))
                res["sparse_sync_ms"] = summarize(time_samples(stp, **sync_kw))["median_s"] * 1e3
                if not args.no_two_pass:  # the same state through the two-call form
                    stp.step = make_sparse_step(emb, opt, fused=False)
                    res["two_pass_ms"] = summarize(time_samples(stp, **kw))["median_s"] * 1e3
                res["sparse"] = "ok"
                t = res["sparse_timing"]["median_s"]
                res["sparse_ms"] = t * 1e3
                res["gbs"] = res["bytes"] / t / GB
                res["pct_copy"] = 100.0 * res["bytes"] / n / t / copy_bw
                res["loss"] = float(stp.loss)
                if "two_pass_ms" in res:
                    res["fused_gain"] = res["two_pass_ms"] / res["sparse_ms"]
                    print(
                        f"  two-pass form (sparse_grad + apply_gradients) "
                        f"{res['two_pass_ms']:.3f} ms: fused {res['fused_gain']:.2f}x",
                        flush=True,
                    )
                print(
                    f"  sparse {res['sparse_ms']:.3f} ms (spread "
                    f"{res['sparse_timing']['spread']:.2f}; one synchronized step "
                    f"{res['sparse_sync_ms']:.3f} ms), {res['gbs']:.0f} GB/s, "
                    f"{res['pct_copy']:.1f}% of copy per GPU",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                _fail(res, "sparse", e)
            if stp is not None:
                state = stp.release()
            del stp
            gc.collect()

        # ---- dense
        if args.no_dense:
            res["dense"] = "skipped (--no-dense)"
        elif res["dense_mem_gib"] > args.mem_gb:
            res["dense"] = "skipped (memory)"
            print(
                f"  dense: skipped (memory: ~{res['dense_mem_gib']:.1f} GiB/device > "
                f"--mem-gb {args.mem_gb:g})",
                flush=True,
            )
        else:
            stp = None
            try:
                state = live_state(state)
                tx = OPTAX[name](args.lr)
                stp = Stepper(make_dense_step(emb, tx), state, optax_init(emb, tx, state))
                state = None
                res["dense_timing"] = summarize(time_samples(stp, **kw))
                res["dense"] = "ok"
                res["dense_ms"] = res["dense_timing"]["median_s"] * 1e3
                if "sparse_ms" in res:
                    res["speedup"] = res["dense_ms"] / res["sparse_ms"]
                print(
                    f"  dense {res['dense_ms']:.3f} ms"
                    + (f", dense/sparse {res['speedup']:.1f}x" if "speedup" in res else ""),
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                _fail(res, "dense", e)
            if stp is not None:
                state = stp.release()
            del stp
            gc.collect()
        results.append(res)
        if args.out:
            write_json(args.out, {"partial": True, "points": results})
    del state, sets
    gc.collect()


# --------------------------------------------------------------------------- main

COLUMNS = [
    ("n", "GPUs"),
    ("table_gb", "table GiB", "g"),
    ("opt", "opt"),
    ("distinct_k", "touched(K)", ".1f"),
    ("sparse_ms", "sparse ms", ".3f"),
    ("sparse_sync_ms", "sync ms", ".3f"),
    ("two_pass_ms", "2-pass ms", ".3f"),
    ("fused_gain", "fused x", ".2f"),
    ("dense_col", "dense ms"),
    ("speedup", "dense/sparse", ".1f"),
    ("gbs", "sparse GB/s", ".0f"),
    ("pct_copy", "%copy/GPU", ".1f"),
    ("flat", "vs smallest", ".3f"),
    ("check", "check"),
    ("status", "status"),
]


def _row(r):
    out = dict(r)
    if "distinct_keys" in r:
        out["distinct_k"] = r["distinct_keys"] / 1e3
    if "dense_ms" in r:
        out["dense_col"] = f"{r['dense_ms']:.3f}"
    else:
        out["dense_col"] = r.get("dense", "-")
    st = []
    if r.get("sparse") not in (None, "ok"):
        st.append(f"sparse {r['sparse']}")
    if "error" in r:
        st.append(r["error"].splitlines()[0][:50])
    out["status"] = "; ".join(st) or "ok"
    return out


def main(argv=None):
    args = parse_args(argv)
    result = start_run(
        "train_step",
        args,
        f"tables {args.table_gb} GiB (total), devices {args.devices}, optimizers "
        f"{args.optimizers}, batch {args.batch}/GPU x {args.slots} slots x max_nnz 1, "
        f"D {args.dim}, keys {args.dist}, mem limit {args.mem_gb:g} GiB/device, warmup "
        f"{args.warmup}, iters {args.iters}, input sets {args.input_sets}",
        points=[],
    )
    env, copy_bw = result["env"], result["copy_bandwidth_Bps"]
    points = result["points"]
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    ndev = len(jax.devices())

    for n in args.devices:
        if n > ndev:
            print(f"\n== n={n}: only {ndev} devices, skipped", flush=True)
            for gb in args.table_gb:
                for name in args.optimizers:
                    points.append(
                        {"n": n, "table_gb": gb, "opt": name, "error": f"only {ndev} devices"}
                    )
            continue
        mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
        for gb in args.table_gb:
            rows = int(gb * GIB // (args.dim * 4))
            rpg = max(1, rows // n)
            print(
                f"\n== n={n}: table {gb:g} GiB total = {rpg * n} rows x {args.dim} "
                f"({rpg} rows/GPU), global batch {args.batch * n}",
                flush=True,
            )
            try:
                emb = DistributedEmbedding(
                    "mean",
                    rpg,
                    args.dim,
                    slot_num=args.slots,
                    max_nnz=1,
                    mesh=mesh,
                    axis_name=AXIS,
                    use_hashtable=False,
                )
                time_size(n, gb, emb, args, rng, copy_bw, points)
            except Exception as e:  # noqa: BLE001 - e.g. the table does not fit
                print(f"  FAILED: {type(e).__name__}: {str(e)[:1000]}", flush=True)
                points += failed_points({"n": n, "table_gb": gb}, args.optimizers, e)
            jax.clear_caches()
            gc.collect()
            if args.out:
                write_json(args.out, result)

    # flatness: sparse time relative to the smallest size, per (n, optimizer)
    flat_rows = []
    for n in args.devices:
        for name in args.optimizers:
            pts = sorted(
                (p for p in points if p["n"] == n and p["opt"] == name and "sparse_ms" in p),
                key=lambda p: p["table_gb"],
            )
            if not pts:
                continue
            t0 = pts[0]["sparse_ms"]
            row = {"n": n, "opt": name, "base_gb": pts[0]["table_gb"]}
            for p in pts:
                p["flat"] = p["sparse_ms"] / t0
                row[f"{p['table_gb']:g}"] = p["flat"]
            row["worst"] = max(p["flat"] for p in pts)
            row["ok"] = "yes" if row["worst"] <= args.flat_target else "NO"
            flat_rows.append(row)
    result["flatness"] = flat_rows

    print(
        f"\ncopy bandwidth {copy_bw / GB:.1f} GB/s on {env['device_kind']}; batch "
        f"{args.batch}/GPU x {args.slots} x 1, D {args.dim}, keys {args.dist}; touched(K) = "
        f"distinct keys per global batch; dense/sparse > 1 means the sparse step is faster; "
        f"GB/s = bytes (see docstring) / sparse time; vs smallest = sparse time / sparse "
        f"time at the smallest table"
    )
    result["table"] = print_table([_row(p) for p in points], COLUMNS)

    print(
        f"\nflatness (sparse step time / time at the smallest table; target <= "
        f"{args.flat_target:.2f}):"
    )
    size_cols = [(f"{gb:g}", f"{gb:g} GiB", ".3f") for gb in args.table_gb]
    print_table(
        flat_rows,
        [("n", "GPUs"), ("opt", "opt")] + size_cols + [("worst", "worst", ".3f"), ("ok", "ok")],
    )

    if len(args.devices) > 1:
        print(
            "\nper GPU count side by side (table total fixed: strong scaling of the table; "
            "batch per GPU fixed: weak scaling of the batch), ms per step:"
        )
        side = []
        for gb in args.table_gb:
            for name in args.optimizers:
                row = {"table_gb": gb, "opt": name}
                for n in args.devices:
                    p = next(
                        (
                            p
                            for p in points
                            if p["n"] == n and p["table_gb"] == gb and p["opt"] == name
                        ),
                        None,
                    )
                    if p is None:
                        continue
                    row[f"s{n}"] = p.get("sparse_ms", p.get("sparse", "err"))
                    row[f"d{n}"] = p.get("dense_ms", p.get("dense", "err"))
                side.append(row)
        cols = [("table_gb", "table GiB", "g"), ("opt", "opt")]
        cols += [(f"s{n}", f"sparse n={n}", ".3f") for n in args.devices]
        cols += [(f"d{n}", f"dense n={n}", ".3f") for n in args.devices]
        print_table(side, cols)
        result["side_by_side"] = side

    n_fail = sum(
        1 for p in points if "error" in p or p.get("sparse") not in ("ok", "skipped (memory)")
    )
    return finish(result, args.out, len(points), n_fail, t_start)


if __name__ == "__main__":
    sys.exit(main())
