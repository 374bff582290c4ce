"""Hash table: find-or-insert throughput, and the training step in hash mode.

Part 1, the `sok_hash_find_or_insert` kernel on one device (int64 keys,
jax_enable_x64 on). A table of `--capacity` slots is filled to each load
factor (0.25, 0.5, 0.75 by default) with the keys of ranks [0, load * cap)
of a key universe (rank r -> key r * A + B mod 2**64, A odd: distinct,
spread-out int64 keys), then batches of `--batch-keys` keys are timed:
  * find present      insert=False, every key already in the table (hits);
  * find-or-insert    insert=True, the same present keys (the hit path of
    present             training's find-or-insert: nothing new to insert);
  * find mixed        insert=False, ranks drawn over [0, cap): a fraction
                      ~load of them present, the others probe to a free slot;
  * insert mixed      insert=True on the same mixed keys, each call starting
                      from the table at `load` (not donated, so XLA copies
                      the table first; that copy is subtracted: copy overhead
                      = t(find present, not donated) - t(find present,
                      donated)); raw and corrected numbers are reported.
The first three run with slot_keys donated (jit donate_argnums=0), as in a
training step: otherwise XLA copies the table on every call (the output
aliases the input). Key distributions: uniform over the ranks, and Zipf
(`--zipf-a`, hot ranks first, so the hot keys are the present ones).
keys/s counts every key of the batch (duplicates included).
Checks before timing, at every point: the fill reported no failure and one
new key per inserted key; every present key is found, at a slot that holds
it, with the same rows on a second call; find-or-insert of present keys
inserts nothing and returns the same rows; in the mixed batch exactly the
present keys are found; inserting it fails nowhere, gives every key a slot
holding it, reports one is_new per distinct absent key, and leaves the
non-donated input table as it was.

Part 2, the full sparse training step (lookup, tiny dense head, value_and_grad
w.r.t. the output, sparse_grad, apply_gradients with sparse SGD; state and
optimizer state donated; the same step as benchmarks/bench_train_step.py) in
hash mode (`use_hashtable=True, key_dtype=int64`) against direct mode (int32
keys), same batch (`--step-batch`/GPU x 26 slots x max_nnz 1, D 128) and the
same table size (`--step-table-gb` GiB total). The keys of a batch are ranks
drawn over a universe of `--step-load` x rows (uniform or Zipf), given as
the rank itself (direct) or its int64 key (hash); the hash table is filled
with the whole universe first (steps over it), so in the timed steps every
key is found, at load `--step-load`. Both steps are checked first (one SGD
step against a float64 numpy reference from lookups before and after, and in
hash mode: no key lost, no full shard, no overflow). Reports ms and the
ratio hash/direct (target <= 1.3).

CPU smoke run:
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python benchmarks/bench_hash.py --small
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_train_step import (  # noqa: E402
    Stepper,
    _cmp,
    make_sparse_step,
    make_state,
    sgd_reference,
)
from common import (  # noqa: E402
    GIB,
    add_dists_arg,
    add_run_args,
    add_zipf_arg,
    check_dists,
    draw_keys,
    finish,
    float_list,
    guarded,
    int_list,
    print_table,
    shrink_run_args,
    start_run,
    status,
    summarize,
    time_samples,
    write_json,
)
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sok_jax import optim  # noqa: E402
from sok_jax.distributed import DistributedEmbedding, check_stats  # noqa: E402
from sok_jax.ops import hash_ops  # noqa: E402

AXIS = "sok"
_A = np.uint64(0x9E3779B97F4A7C15)  # odd: rank -> key is a bijection mod 2**64
_B = np.uint64(0x632BE59BD9B4E019)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacity", type=int, default=2**24, help="hash table slots (default 2**24)")
    p.add_argument("--batch-keys", type=int, default=2**20, help="keys per batch (default 2**20)")
    p.add_argument(
        "--loads",
        type=float_list,
        default=[0.25, 0.5, 0.75],
        help="load factors (default 0.25,0.5,0.75)",
    )
    add_dists_arg(p)
    add_zipf_arg(p)
    p.add_argument(
        "--step-table-gb",
        type=float,
        default=4.0,
        help="training step: TOTAL table size in GiB (default 4)",
    )
    p.add_argument(
        "--step-devices", type=int_list, default=[1], help="training step: GPU counts (default 1)"
    )
    p.add_argument("--step-batch", type=int, default=16384, help="training step: samples/GPU")
    p.add_argument("--step-slots", type=int, default=26, help="training step: slots (default 26)")
    p.add_argument("--step-dim", type=int, default=128, help="training step: D (default 128)")
    p.add_argument(
        "--step-load",
        type=float,
        default=0.5,
        help="training step: distinct keys / table rows (default 0.5)",
    )
    add_dists_arg(p, "--step-dists", "training step: ")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate while timing")
    p.add_argument("--check-lr", type=float, default=0.1, help="SGD learning rate of the check")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="step check: max|diff| <= tol * max|update| (default 1e-4)",
    )
    p.add_argument("--ratio-target", type=float, default=1.3, help="hash/direct target (1.3)")
    p.add_argument("--skip-kernel", action="store_true", help="skip part 1")
    p.add_argument("--skip-step", action="store_true", help="skip part 2")
    add_run_args(p, "tiny sizes: a CPU smoke check")
    args = p.parse_args(argv)
    if args.small:
        args.capacity = 2**14
        args.batch_keys = 2**11
        args.step_table_gb = 2.0**-10
        args.step_batch = 64
        shrink_run_args(args)
    check_dists(p, args.dists, args.step_dists)
    return args


def scramble(ranks):
    """Rank -> int64 key, a bijection of 64-bit words (never EMPTY = -1 here)."""
    with np.errstate(over="ignore"):
        k = (np.asarray(ranks).astype(np.uint64) * _A + _B).view(np.int64)
    if np.any(k == -1):
        raise AssertionError("a key hit EMPTY (-1); change _B")
    return k


def draw_ranks(rng, dist, n, vocab, a):
    """int64 ranks of [0, vocab); Zipf unscattered: rank 0 is the hottest."""
    return draw_keys(rng, dist, n, vocab, a, dtype=np.int64, scatter=False)


# --------------------------------------------------------------------------- part 1

_find_don = jax.jit(lambda sk, k: hash_ops.find_or_insert(sk, k, insert=False), donate_argnums=0)
_foi_don = jax.jit(lambda sk, k: hash_ops.find_or_insert(sk, k, insert=True), donate_argnums=0)
_find_nd = jax.jit(lambda sk, k: hash_ops.find_or_insert(sk, k, insert=False))
_foi_nd = jax.jit(lambda sk, k: hash_ops.find_or_insert(sk, k, insert=True))


class Donated:
    """Threads the donated slot_keys through repeated calls of `fn(sk, keys)`."""

    def __init__(self, fn, sk):
        self.fn, self.sk = fn, sk

    def __call__(self, keys):
        self.sk, rows, _, _ = self.fn(self.sk, keys)
        return self.sk, rows


def fill(cap, npresent, batch):
    """A table holding the keys of ranks [0, npresent), inserted in rank order."""
    sk = hash_ops.empty_slot_keys(cap, jnp.int64)
    for s in range(0, npresent, batch):
        keys = scramble(np.arange(s, min(s + batch, npresent)))
        sk, rows, is_new, failed = _foi_don(sk, jnp.asarray(keys))
        if int(failed) or int(jnp.sum(is_new)) != keys.size or int(jnp.min(rows)) < 0:
            raise AssertionError(
                f"fill: failed={int(failed)}, new={int(jnp.sum(is_new))} of "
                f"{keys.size} distinct keys"
            )
    return sk


def kernel_point(res, args, dist, load, rng):
    cap, nb = args.capacity, args.batch_keys
    npresent = int(load * cap)
    res["present_keys"] = npresent
    sk = fill(cap, npresent, nb)
    sk_host = np.asarray(sk)
    if int(np.sum(sk_host != -1)) != npresent:
        raise AssertionError(f"table holds {int(np.sum(sk_host != -1))} keys, expected {npresent}")

    present_r = [draw_ranks(rng, dist, nb, npresent, args.zipf_a) for _ in range(args.input_sets)]
    mixed_r = [draw_ranks(rng, dist, nb, cap, args.zipf_a) for _ in range(args.input_sets)]
    present = [jnp.asarray(scramble(r)) for r in present_r]
    mixed = [jnp.asarray(scramble(r)) for r in mixed_r]
    res["mixed_present_frac"] = float(np.mean(mixed_r[0] < npresent))
    res["mixed_new_distinct"] = int(np.unique(mixed_r[0][mixed_r[0] >= npresent]).size)
    res["present_distinct"] = int(np.unique(present_r[0]).size)

    # ---- checks
    keys_h = scramble(present_r[0])
    sk, rows1, _, f1 = _find_don(sk, present[0])
    sk, rows2, _, _ = _find_don(sk, present[0])
    rows1, rows2 = np.asarray(rows1), np.asarray(rows2)
    if not (
        rows1.min() >= 0
        and np.array_equal(sk_host[rows1], keys_h)
        and np.array_equal(rows1, rows2)
        and int(f1) == 0
    ):
        raise AssertionError(
            "find of present keys: a key not found, at a wrong slot, or rows "
            "differ between two calls"
        )
    sk, rows3, new3, f3 = _foi_don(sk, present[0])
    if not (np.array_equal(np.asarray(rows3), rows1) and int(jnp.sum(new3)) == 0 and int(f3) == 0):
        raise AssertionError("find-or-insert of present keys changed something")
    mk_h = scramble(mixed_r[0])
    sk, rowsm, _, _ = _find_don(sk, mixed[0])
    rowsm = np.asarray(rowsm)
    is_present = mixed_r[0] < npresent
    if not (
        np.all((rowsm >= 0) == is_present)
        and np.array_equal(sk_host[rowsm[is_present]], mk_h[is_present])
    ):
        raise AssertionError("find of mixed keys: found set != present set, or wrong slots")
    new_sk, rowsi, newi, fi = _foi_nd(sk, mixed[0])
    new_h, rowsi = np.asarray(new_sk), np.asarray(rowsi)
    if not (
        int(fi) == 0
        and rowsi.min() >= 0
        and np.array_equal(new_h[rowsi], mk_h)
        and int(jnp.sum(newi)) == res["mixed_new_distinct"]
        and np.array_equal(np.asarray(sk), sk_host)
    ):
        raise AssertionError(
            f"insert of mixed keys: failed={int(fi)}, is_new={int(jnp.sum(newi))} vs "
            f"{res['mixed_new_distinct']} new distinct keys, or wrong slots / input modified"
        )
    del new_sk, new_h
    res["check"] = "ok"

    # ---- timing
    kw = dict(warmup=args.warmup, iters=args.iters)
    t = {}
    d = Donated(_find_don, sk)
    t["find_present"] = summarize(time_samples(d, arg_sets=[(k,) for k in present], **kw))
    d.fn = _foi_don
    t["foi_present"] = summarize(time_samples(d, arg_sets=[(k,) for k in present], **kw))
    d.fn = _find_don
    t["find_mixed"] = summarize(time_samples(d, arg_sets=[(k,) for k in mixed], **kw))
    sk = d.sk
    if not np.array_equal(np.asarray(sk), sk_host):
        raise AssertionError("the table changed during find / find-or-insert of present keys")
    t["find_present_nodonate"] = summarize(
        time_samples(_find_nd, arg_sets=[(sk, k) for k in present], **kw)
    )
    t["insert_mixed_nodonate"] = summarize(
        time_samples(_foi_nd, arg_sets=[(sk, k) for k in mixed], **kw)
    )
    res["timings"] = t
    med = {k: v["median_s"] for k, v in t.items()}
    copy_over = max(0.0, med["find_present_nodonate"] - med["find_present"])
    res["copy_overhead_ms"] = copy_over * 1e3
    for k in ("find_present", "foi_present", "find_mixed"):
        res[f"{k}_Mkps"] = nb / med[k] / 1e6
    res["insert_raw_Mkps"] = nb / med["insert_mixed_nodonate"] / 1e6
    t_ins = med["insert_mixed_nodonate"] - copy_over
    res["insert_Mkps"] = nb / t_ins / 1e6 if t_ins > 0 else None
    del sk, d


KCOLS = [
    ("dist", "keys"),
    ("load", "load", ".2f"),
    ("find_present_Mkps", "find present Mkey/s", ".1f"),
    ("foi_present_Mkps", "find-or-insert present", ".1f"),
    ("find_mixed_Mkps", "find mixed", ".1f"),
    ("insert_Mkps", "insert mixed", ".1f"),
    ("insert_raw_Mkps", "insert raw (+copy)", ".1f"),
    ("mixed_present_frac", "mixed present", ".2f"),
    ("mixed_new_distinct", "new/batch"),
    ("check", "check"),
    ("status", "status"),
]


# --------------------------------------------------------------------------- part 2


def step_point(res, args, n, dist, rng):
    if n > len(jax.devices()):
        raise ValueError(f"only {len(jax.devices())} devices")
    S, D = args.step_slots, args.step_dim
    B = args.step_batch * n
    mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
    rows = int(args.step_table_gb * GIB // (D * 4))
    rpg = max(1, rows // n)
    universe = max(1, int(args.step_load * rpg * n))
    res.update(rows=rpg * n, rows_per_gpu=rpg, universe=universe, batch=B)
    print(
        f"  table {rpg * n} rows x {D} ({rpg}/GPU), universe {universe} keys, batch {B} x {S}",
        flush=True,
    )

    rep = lambda m: NamedSharding(m, P())  # noqa: E731
    ranks = [
        draw_ranks(rng, dist, B * S, universe, args.zipf_a).reshape(B, S, 1)
        for _ in range(args.input_sets)
    ]
    ws = [rng.standard_normal((S, D)).astype(np.float32) for _ in range(args.input_sets)]
    res["distinct_keys"] = float(np.mean([np.unique(r).size for r in ranks]))

    out = {}
    for mode in ("direct", "hash"):
        hashed = mode == "hash"
        emb = DistributedEmbedding(
            "mean",
            rpg,
            D,
            slot_num=S,
            max_nnz=1,
            use_hashtable=hashed,
            key_dtype=jnp.int64 if hashed else jnp.int32,
            mesh=mesh,
            axis_name=AXIS,
        )
        conv = (lambda r: scramble(r)) if hashed else (lambda r: r.astype(np.int32))
        sets = [
            (jax.device_put(conv(r), emb.batch_sharding), jax.device_put(w, rep(mesh)))
            for r, w in zip(ranks, ws)
        ]
        t0 = time.perf_counter()
        if hashed:
            state = emb.init(args.seed)  # zeros + empty slot keys: cheap
        else:
            state = make_state(emb, args.seed)  # fast random table (see bench_train_step)
        opt = optim.sgd(args.check_lr)
        step = make_sparse_step(emb, opt)
        ost = emb.init_optimizer(opt, state)
        if hashed:
            # Fill: steps over the whole universe (in rank order), so every key
            # of the timed batches is already in the table.
            chunk = B * S
            for s in range(0, universe, chunk):
                r = np.arange(s, s + chunk) % universe
                ids = jax.device_put(scramble(r).reshape(B, S, 1), emb.batch_sharding)
                state, ost, _ = step(state, ost, ids, sets[0][1])
            check_stats(state)  # raises on a full shard / overflow / invalid ids
            used = int(jnp.sum(state.slot_keys != -1))
            if used != universe:
                raise AssertionError(
                    f"hash table holds {used} keys after the fill, expected {universe}"
                )
            res["hash_load_per_gpu"] = [
                float(np.mean(np.asarray(sh.data) != -1))
                for sh in state.slot_keys.addressable_shards
            ]
        res[f"{mode}_setup_s"] = time.perf_counter() - t0

        # ---- check one SGD step against the reference
        look = jax.jit(lambda st, ids, emb=emb: emb.lookup(st, ids, training=False)[0])
        ids_d, w_d = sets[0]
        before = np.asarray(look(state, ids_d), np.float64)
        if hashed and np.any(np.all(before == 0, axis=-1)):
            raise AssertionError("hash mode: a key of the batch was not found before the step")
        ref = sgd_reference(before, ranks[0], ws[0], args.check_lr)
        state, ost, _ = step(state, ost, ids_d, w_d)
        after = np.asarray(look(state, ids_d))
        c = _cmp(after, ref, before)
        if hashed:
            check_stats(state)
            c["keys_after"] = int(jnp.sum(state.slot_keys != -1))
            if c["keys_after"] != universe:
                raise AssertionError(f"the step changed the key count to {c['keys_after']}")
        res[f"{mode}_check"] = c
        print(
            f"  {mode}: check SGD step rel {c['rel']:.3g} (max|diff| {c['max_abs_diff']:.3g}, "
            f"largest update {c['max_update']:.3g})",
            flush=True,
        )
        if not (c["finite"] and c["rel"] <= args.tol):
            raise AssertionError(f"{mode} step mismatch: {c}")

        # ---- timing (SGD at --lr)
        opt = optim.sgd(args.lr)
        stp = Stepper(make_sparse_step(emb, opt), state, emb.init_optimizer(opt, state))
        del state, ost
        tim = summarize(time_samples(stp, warmup=args.warmup, iters=args.iters, arg_sets=sets))
        if hashed:
            check_stats(stp.state)
        res[f"{mode}_timing"] = tim
        res[f"{mode}_ms"] = out[mode] = tim["median_s"] * 1e3
        print(f"  {mode}: {out[mode]:.3f} ms/step (spread {tim['spread']:.2f})", flush=True)
        del stp, sets
        jax.clear_caches()
        gc.collect()
    res["ratio"] = out["hash"] / out["direct"]
    res["ratio_ok"] = "yes" if res["ratio"] <= args.ratio_target else "NO"


SCOLS = [
    ("n", "GPUs"),
    ("dist", "keys"),
    ("rows_m", "rows(M)", ".4g"),
    ("distinct_m", "distinct/batch(M)", ".4g"),
    ("direct_ms", "direct ms", ".3f"),
    ("hash_ms", "hash ms", ".3f"),
    ("ratio", "hash/direct", ".3f"),
    ("ratio_ok", "<=target"),
    ("status", "status"),
]


# --------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    result = start_run(
        "hash",
        args,
        f"capacity {args.capacity}, batch {args.batch_keys} int64 keys, loads "
        f"{args.loads}, keys {args.dists} (zipf a={args.zipf_a}); step: table "
        f"{args.step_table_gb:g} GiB, devices {args.step_devices}, batch {args.step_batch}/GPU "
        f"x {args.step_slots} x 1, D {args.step_dim}, load {args.step_load}, warmup "
        f"{args.warmup}, iters {args.iters}",
        kernel=[],
        step=[],
    )
    env = result["env"]
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()

    if not args.skip_kernel:
        print(
            f"\n== part 1: find_or_insert, capacity {args.capacity} "
            f"({args.capacity * 8 / 2**20:.0f} MiB of int64 slot keys)",
            flush=True,
        )
        for dist in args.dists:
            for load in args.loads:
                print(f"-- {dist} load {load:g}", flush=True)
                res = {
                    "dist": dist,
                    "load": load,
                    "capacity": args.capacity,
                    "batch_keys": args.batch_keys,
                }
                if guarded(res, kernel_point, res, args, dist, load, rng):
                    print(
                        f"  find present {res['find_present_Mkps']:.1f} Mkey/s, "
                        f"find-or-insert present {res['foi_present_Mkps']:.1f}, find mixed "
                        f"{res['find_mixed_Mkps']:.1f}, insert mixed "
                        f"{res['insert_Mkps'] or float('nan'):.1f} (raw "
                        f"{res['insert_raw_Mkps']:.1f}, copy overhead "
                        f"{res['copy_overhead_ms']:.3f} ms)",
                        flush=True,
                    )
                result["kernel"].append(res)
                gc.collect()
                if args.out:
                    write_json(args.out, result)

    if not args.skip_step:
        print("\n== part 2: training step, hash (int64) vs direct (int32), sparse SGD", flush=True)
        for n in args.step_devices:
            for dist in args.step_dists:
                print(f"-- n={n} {dist}", flush=True)
                res = {"n": n, "dist": dist}
                if guarded(res, step_point, res, args, n, dist, rng):
                    print(
                        f"  hash/direct {res['ratio']:.3f} (target <= {args.ratio_target})",
                        flush=True,
                    )
                result["step"].append(res)
                jax.clear_caches()
                gc.collect()
                if args.out:
                    write_json(args.out, result)

    if result["kernel"]:
        print(
            f"\nfind_or_insert, {args.batch_keys} int64 keys per batch, capacity "
            f"{args.capacity}, {env['device_kind']}; Mkey/s (all keys of a batch); insert "
            f"mixed = copy-corrected (each call from the table at `load`)"
        )
        rows = [dict(r, status=status(r)) for r in result["kernel"]]
        result["kernel_table"] = print_table(rows, KCOLS)
    if result["step"]:
        print(
            f"\ntraining step (sparse SGD), table {args.step_table_gb:g} GiB total, batch "
            f"{args.step_batch}/GPU x {args.step_slots} x 1, D {args.step_dim}, key universe "
            f"{args.step_load:g} x rows; target hash/direct <= {args.ratio_target}"
        )
        rows = []
        for r in result["step"]:
            rr = dict(r, status=status(r))
            if "rows" in r:
                rr["rows_m"] = r["rows"] / 1e6
            if "distinct_keys" in r:
                rr["distinct_m"] = r["distinct_keys"] / 1e6
            rows.append(rr)
        result["step_table"] = print_table(rows, SCOLS)
    points = result["kernel"] + result["step"]
    n_fail = sum("error" in r for r in points)
    return finish(result, args.out, len(points), n_fail, t_start)


if __name__ == "__main__":
    sys.exit(main())
