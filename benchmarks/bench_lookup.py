"""Lookup + combine: `sok_jax.embed` against the pure-JAX way, in one run.

For every point (D, max_nnz, key distribution) it measures, on one device:
  * forward: jitted `embed(table, ids)` vs `jnp.take` + masked reduce;
  * forward+backward: jitted `jax.value_and_grad` w.r.t. the table of
    `sum(embed(table, ids) * cotangent)` (value_and_grad, not grad, so XLA
    cannot drop the forward: the loss needs it) vs the same through the
    pure-JAX forward (whose backward is XLA's scatter-add).
Both implementations are checked against each other at every point before
anything is timed (forward max |diff| and gradient relative error, with
asserts), so a fast wrong kernel cannot pass.

A/B against the previous kernels in the same run ("prev": the forward that
reads the bag offsets, `fixed_nnz=0`; the backward as two targets, sparse
rows then `rows_to_dense`), checked against the same oracle (forward) and
bit-equal (gradient) before timing.

Physical limit: the bytes that must move, over the copy bandwidth measured
on the same card in the same run (lookup and backward are memory-bound).
  forward bytes  = valid lookups * D * 4   (each looked-up row read once)
                 + B * S * D * 4           (output written)
                 + ids bytes               (padded: B*S*nnz*4; ragged: valid*4
                                            + offsets (B*S+1)*4)
  fwd+bwd bytes  = forward bytes + B*S*D*4 (output cotangent read)
                 + rows * D * 4            (dense table cotangent written once)
With Zipf keys many lookups hit the same hot rows, which the L2 cache serves,
so the forward's effective GB/s can exceed the copy bandwidth; the JSON also
records the number of distinct rows touched.

Defaults are the GPU configuration (4 GiB table, batch 16384 x 26 slots,
D in {16, 64, 128}, max_nnz in {1, 4, 32 ragged}, uniform and Zipf(1.1) keys,
combiner mean). `--small` shrinks everything to run on CPU in well under a
minute:   JAX_PLATFORMS=cpu python benchmarks/bench_lookup.py --small
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    GB,
    add_dists_arg,
    add_run_args,
    add_zipf_arg,
    check_dists,
    draw_keys,
    finish,
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

import sok_jax  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--table-gb",
        type=float,
        default=4.0,
        help="table size in GiB; rows = table_gb * 2**30 / (D * 4) (default 4)",
    )
    p.add_argument("--batch", type=int, default=16384, help="samples per batch (default 16384)")
    p.add_argument("--slots", type=int, default=26, help="slots per sample (default 26)")
    p.add_argument(
        "--dims",
        type=int_list,
        default=[16, 64, 128],
        help="embedding sizes D, comma separated (default 16,64,128)",
    )
    p.add_argument(
        "--nnz",
        type=int_list,
        default=[1, 4, 32],
        help="max_nnz values, comma separated (default 1,4,32)",
    )
    p.add_argument(
        "--ragged",
        type=int_list,
        default=[32],
        help="max_nnz values whose bags have ragged lengths uniform in [1, max_nnz], "
        "given to sok as RaggedIds (others: every bag full) (default 32)",
    )
    add_dists_arg(p)
    add_zipf_arg(p)
    p.add_argument(
        "--combiner",
        default="mean",
        choices=["sum", "mean", "sqrtn"],
        help="combiner (default mean)",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="forward check: max|sok - jax| <= tol * max(1, max|jax|)",
    )
    p.add_argument(
        "--grad-tol",
        type=float,
        default=1e-3,
        help="gradient check: relative norm and max|diff|/max|ref| <= grad_tol",
    )
    add_run_args(p, "tiny table, batch 64, few iterations: a CPU smoke check")
    args = p.parse_args(argv)
    if args.small:
        args.table_gb = 2.0**-10  # 1 MiB
        args.batch = 64
        shrink_run_args(args)
    check_dists(p, args.dists)
    return args


# --------------------------------------------------------------------------- ids


def make_ids(rng, dist, batch, slots, nnz, ragged, vocab, zipf_a):
    """Host ids for one input set.

    Returns (padded int32 [B, S, nnz] with -1 for no key,
             lengths int32 [B, S] or None when every bag is full,
             number of valid keys).
    """
    if ragged:
        lengths = rng.integers(1, nnz + 1, size=(batch, slots), dtype=np.int64).astype(np.int32)
    else:
        lengths = None
    n_valid = int(lengths.sum()) if ragged else batch * slots * nnz
    keys = draw_keys(rng, dist, n_valid, vocab, zipf_a)
    if ragged:
        padded = np.full((batch, slots, nnz), -1, np.int32)
        mask = np.arange(nnz, dtype=np.int32)[None, None, :] < lengths[:, :, None]
        padded[mask] = keys  # row-major: bag (b, s) in order, like the ragged values
    else:
        padded = keys.reshape(batch, slots, nnz)
    return padded, lengths, n_valid


def to_sok_ids(padded, lengths):
    """What sok gets: the padded array, or RaggedIds with capacity B*S*max_nnz."""
    if lengths is None:
        return jnp.asarray(padded)
    flat = padded.reshape(-1)
    values = np.full(flat.shape, -1, np.int32)
    valid = flat[flat >= 0]
    values[: valid.size] = valid
    return sok_jax.RaggedIds.from_lengths(jnp.asarray(values), jnp.asarray(lengths))


# --------------------------------------------------------------------------- the two ways


def pure_jax_embed(table, ids, combiner):
    """The pure-JAX way, written out: take + masked reduce over nnz."""
    mask = ids >= 0
    rows = jnp.where(mask, ids, 0)
    vecs = jnp.take(table, rows, axis=0, mode="clip").astype(jnp.float32)  # [B, S, nnz, D]
    w = mask.astype(jnp.float32)
    summed = jnp.sum(vecs * w[..., None], axis=2)  # [B, S, D]
    count = jnp.sum(w, axis=2, keepdims=True)
    if combiner == "mean":
        summed = summed / jnp.maximum(count, 1.0)
    elif combiner == "sqrtn":
        summed = summed * jax.lax.rsqrt(jnp.maximum(count, 1.0))
    return summed.astype(table.dtype)


def _prev_embed(combiner):
    """The previous kernels, for an A/B in the same run: the forward reading
    the bag offsets (fixed_nnz=0) and the two-target backward (sparse rows,
    then `rows_to_dense`)."""
    from sok_jax import ids as ids_lib
    from sok_jax.ops import embed_ops

    @jax.custom_vjp
    def f(table, ids, offsets, w):
        return embed_ops.lookup_combine(table, ids, offsets, w, combiner, 0)

    def fwd(table, ids, offsets, w):
        return f(table, ids, offsets, w), (table, ids, offsets, w)

    def bwd(res, g):
        table, ids, offsets, w = res
        sp = embed_ops.lookup_combine_bwd(g, ids, offsets, w, combiner, table.shape[0])
        return embed_ops.rows_to_dense(sp, table.shape[0], table.dtype), None, None, None

    f.defvjp(fwd, bwd)

    def embed(table, ids):
        bags = ids_lib.to_bags(ids)
        out = f(table, bags.ids, bags.offsets, bags.weights)
        return out.reshape(*bags.batch_shape, table.shape[1])

    return embed


def build_fns(combiner):
    def sok_fwd(table, ids):
        return sok_jax.embed(table, ids, combiner=combiner)

    prev_fwd = _prev_embed(combiner)

    def jax_fwd(table, ids):
        return pure_jax_embed(table, ids, combiner)

    def loss_of(f):
        def loss(table, ids, cot):
            return jnp.sum(f(table, ids).astype(jnp.float32) * cot)

        return loss

    return {
        "sok_fwd": jax.jit(sok_fwd),
        "prev_fwd": jax.jit(prev_fwd),
        "prev_fb": jax.jit(jax.value_and_grad(loss_of(prev_fwd))),
        "jax_fwd": jax.jit(jax_fwd),
        "sok_fb": jax.jit(jax.value_and_grad(loss_of(sok_fwd))),
        "jax_fb": jax.jit(jax.value_and_grad(loss_of(jax_fwd))),
    }


@jax.jit
def diff_stats(x, ref):
    x = x.astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    d = x - ref
    nref = jnp.sqrt(jnp.sum(ref * ref))
    return {
        "max_abs_diff": jnp.max(jnp.abs(d)),
        "max_abs_ref": jnp.max(jnp.abs(ref)),
        "rel_norm": jnp.sqrt(jnp.sum(d * d)) / jnp.where(nref > 0, nref, 1.0),
        "finite": jnp.all(jnp.isfinite(x)),
    }


def _host(stats):
    return {k: (bool(v) if k == "finite" else float(v)) for k, v in stats.items()}


@functools.partial(jax.jit, static_argnums=1)
def _distinct_rows(ids, rows):
    idx = jnp.where(ids >= 0, ids, rows).reshape(-1)
    return jnp.sum(jnp.zeros((rows,), jnp.int8).at[idx].set(1, mode="drop"), dtype=jnp.int32)


def distinct_rows(ids, rows):
    """How many distinct table rows the padded ids touch."""
    return int(_distinct_rows(ids, rows))


# --------------------------------------------------------------------------- one point


def run_point(res, args, fns, table, rows, D, nnz, dist, rng, copy_bw):
    """Checks and times one point, filling `res` as it goes (so a failure
    keeps what was learnt before it)."""
    B, S = args.batch, args.slots
    ragged = res["ragged"]

    t0 = time.perf_counter()
    sets = []
    valid_counts = []
    for k in range(max(1, args.input_sets)):
        padded, lengths, n_valid = make_ids(rng, dist, B, S, nnz, ragged, rows, args.zipf_a)
        jax_ids = jnp.asarray(padded)
        sok_ids = to_sok_ids(padded, lengths)
        cot = jax.random.normal(
            jax.random.key(args.seed * 1000 + 17 * k + D + nnz), (B, S, D), jnp.float32
        )
        sets.append((jax_ids, sok_ids, cot))
        valid_counts.append(n_valid)
        del padded, lengths
    res["ids_gen_s"] = time.perf_counter() - t0
    valid = float(np.mean(valid_counts))
    res["valid_lookups"] = valid
    res["distinct_rows"] = distinct_rows(sets[0][0], rows)

    # ---- checks (fresh random ids and table, before any timing)
    jax_ids, sok_ids, cot = sets[0]
    o_sok = fns["sok_fwd"](table, sok_ids)
    o_jax = fns["jax_fwd"](table, jax_ids)
    o_prev = fns["prev_fwd"](table, sok_ids)
    if o_sok.shape != (B, S, D):
        raise AssertionError(f"sok output shape {o_sok.shape}, expected {(B, S, D)}")
    fwd = _host(diff_stats(o_sok, o_jax))
    prev = _host(diff_stats(o_prev, o_jax))
    del o_sok, o_jax, o_prev
    if not prev["max_abs_diff"] <= args.tol * max(1.0, prev["max_abs_ref"]):
        raise AssertionError(f"previous forward mismatch: {prev}")
    res["fwd_check"] = fwd
    print(
        f"  check fwd: max|diff|={fwd['max_abs_diff']:.3g} (max|ref|={fwd['max_abs_ref']:.3g}, "
        f"rel-norm={fwd['rel_norm']:.3g})",
        flush=True,
    )
    if not (fwd["finite"] and fwd["max_abs_diff"] <= args.tol * max(1.0, fwd["max_abs_ref"])):
        raise AssertionError(
            f"forward mismatch: max|diff| {fwd['max_abs_diff']:.3g} > tol {args.tol:g} * "
            f"max(1, {fwd['max_abs_ref']:.3g}) (finite={fwd['finite']})"
        )

    (l_sok, g_sok) = fns["sok_fb"](table, sok_ids, cot)
    (l_jax, g_jax) = fns["jax_fb"](table, jax_ids, cot)
    g_prev = fns["prev_fb"](table, sok_ids, cot)[1]
    if not bool(jnp.array_equal(g_prev, g_sok)):  # the same sums, one target or two
        raise AssertionError("one-target dense backward differs from the two-target one")
    del g_prev
    grad = _host(diff_stats(g_sok, g_jax))
    grad["loss_sok"], grad["loss_jax"] = float(l_sok), float(l_jax)
    del g_sok, g_jax, l_sok, l_jax
    res["grad_check"] = grad
    print(
        f"  check grad: rel-norm={grad['rel_norm']:.3g} max|diff|={grad['max_abs_diff']:.3g} "
        f"(max|ref|={grad['max_abs_ref']:.3g})",
        flush=True,
    )
    g_ok = (
        grad["finite"]
        and grad["rel_norm"] <= args.grad_tol
        and grad["max_abs_diff"] <= args.grad_tol * max(grad["max_abs_ref"], 1e-30)
    )
    if not g_ok:
        raise AssertionError(
            f"gradient mismatch: rel-norm {grad['rel_norm']:.3g}, max|diff| "
            f"{grad['max_abs_diff']:.3g} vs max|ref| {grad['max_abs_ref']:.3g}, grad-tol "
            f"{args.grad_tol:g} (finite={grad['finite']})"
        )

    # ---- bytes that must move
    out_bytes = B * S * D * 4
    ids_bytes = valid * 4 + (B * S + 1) * 4 if ragged else B * S * nnz * 4
    fwd_bytes = valid * D * 4 + out_bytes + ids_bytes
    fb_bytes = fwd_bytes + out_bytes + rows * D * 4
    res.update(fwd_bytes=fwd_bytes, fb_bytes=fb_bytes)

    # ---- timing
    kw = dict(warmup=args.warmup, iters=args.iters)
    timings = {}
    for name, fn, argsets in [
        ("sok_fwd", fns["sok_fwd"], [(table, s) for _, s, _ in sets]),
        ("prev_fwd", fns["prev_fwd"], [(table, s) for _, s, _ in sets]),
        ("jax_fwd", fns["jax_fwd"], [(table, j) for j, _, _ in sets]),
        ("sok_fb", fns["sok_fb"], [(table, s, c) for _, s, c in sets]),
        ("prev_fb", fns["prev_fb"], [(table, s, c) for _, s, c in sets]),
        ("jax_fb", fns["jax_fb"], [(table, j, c) for j, _, c in sets]),
    ]:
        timings[name] = summarize(time_samples(fn, arg_sets=argsets, **kw))
        gc.collect()
    res["timings"] = timings

    def ms(name):
        return timings[name]["median_s"] * 1e3

    for kind, nbytes in (("fwd", fwd_bytes), ("fb", fb_bytes)):
        t_sok = timings[f"sok_{kind}"]["median_s"]
        t_jax = timings[f"jax_{kind}"]["median_s"]
        res[f"sok_{kind}_ms"] = ms(f"sok_{kind}")
        res[f"jax_{kind}_ms"] = ms(f"jax_{kind}")
        res[f"{kind}_gbs"] = nbytes / t_sok / GB
        res[f"jax_{kind}_gbs"] = nbytes / t_jax / GB
        res[f"{kind}_pct_copy"] = 100.0 * nbytes / t_sok / copy_bw
        res[f"{kind}_speedup"] = t_jax / t_sok
        res[f"prev_{kind}_ms"] = ms(f"prev_{kind}")
        res[f"{kind}_vs_prev"] = timings[f"prev_{kind}"]["median_s"] / t_sok


# --------------------------------------------------------------------------- main

COLUMNS = [
    ("D", "D"),
    ("nnz_label", "nnz"),
    ("dist", "keys"),
    ("lookups_m", "lookups(M)", ".2f"),
    ("sok_fwd_ms", "sok fwd ms", ".3f"),
    ("jax_fwd_ms", "jax fwd ms", ".3f"),
    ("fwd_gbs", "fwd GB/s", ".0f"),
    ("fwd_pct_copy", "fwd %copy", ".1f"),
    ("fwd_speedup", "fwd jax/sok", ".2f"),
    ("fwd_vs_prev", "fwd prev/sok", ".2f"),
    ("sok_fb_ms", "sok f+b ms", ".3f"),
    ("jax_fb_ms", "jax f+b ms", ".3f"),
    ("fb_gbs", "f+b GB/s", ".0f"),
    ("fb_pct_copy", "f+b %copy", ".1f"),
    ("fb_speedup", "f+b jax/sok", ".2f"),
    ("fb_vs_prev", "f+b prev/sok", ".2f"),
    ("fwd_maxdiff", "fwd max|diff|", ".2e"),
    ("status", "status"),
]


def _row(res):
    r = dict(res)
    r["nnz_label"] = f"{res['nnz']}{'r' if res.get('ragged') else ''}"
    if "valid_lookups" in res:
        r["lookups_m"] = res["valid_lookups"] / 1e6
    if "fwd_check" in res:
        r["fwd_maxdiff"] = res["fwd_check"]["max_abs_diff"]
    r["status"] = status(res)
    return r


def main(argv=None):
    args = parse_args(argv)
    result = start_run(
        "lookup",
        args,
        f"table {args.table_gb:g} GiB, batch {args.batch} x {args.slots} slots, "
        f"D {args.dims}, max_nnz {args.nnz} (ragged: {args.ragged}), keys {args.dists} "
        f"(zipf a={args.zipf_a}), combiner {args.combiner}, warmup {args.warmup}, "
        f"iters {args.iters}, input sets {args.input_sets}",
        points=[],
    )
    env, copy_bw = result["env"], result["copy_bandwidth_Bps"]
    rng = np.random.default_rng(args.seed)
    fns = build_fns(args.combiner)
    t_start = time.perf_counter()

    for D in args.dims:
        rows = int(args.table_gb * 2**30 // (D * 4))
        points = [(nnz, dist) for nnz in args.nnz for dist in args.dists]
        print(
            f"\n== D={D}: table {rows} x {D} float32 ({rows * D * 4 / 2**30:.2f} GiB)", flush=True
        )
        table = None
        try:
            init = jax.jit(lambda key: jax.random.normal(key, (rows, D), jnp.float32))  # noqa: B023
            table = jax.block_until_ready(init(jax.random.key(args.seed + D)))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report and go on
            msg = f"{type(e).__name__}: {e}"
            print(f"  table allocation FAILED: {msg[:500]}", flush=True)
            for nnz, dist in points:
                result["points"].append(
                    {
                        "D": D,
                        "nnz": nnz,
                        "ragged": nnz in args.ragged,
                        "dist": dist,
                        "rows": rows,
                        "error": msg,
                    }
                )
        if table is not None:
            for nnz, dist in points:
                label = f"D={D} nnz={nnz}{' ragged' if nnz in args.ragged else ''} {dist}"
                print(f"-- {label}", flush=True)
                t0 = time.perf_counter()
                res = {
                    "D": D,
                    "nnz": nnz,
                    "ragged": nnz in args.ragged,
                    "dist": dist,
                    "rows": rows,
                    "combiner": args.combiner,
                }
                if guarded(res, run_point, res, args, fns, table, rows, D, nnz, dist, rng, copy_bw):
                    print(
                        f"  sok fwd {res['sok_fwd_ms']:.3f} ms ({res['fwd_gbs']:.0f} GB/s, "
                        f"{res['fwd_pct_copy']:.1f}% of copy), jax fwd {res['jax_fwd_ms']:.3f} "
                        f"ms, jax/sok {res['fwd_speedup']:.2f}x | sok f+b "
                        f"{res['sok_fb_ms']:.3f} ms ({res['fb_gbs']:.0f} GB/s, "
                        f"{res['fb_pct_copy']:.1f}%), jax f+b {res['jax_fb_ms']:.3f} ms, "
                        f"jax/sok {res['fb_speedup']:.2f}x",
                        flush=True,
                    )
                res["point_s"] = time.perf_counter() - t0
                result["points"].append(res)
                gc.collect()
                if args.out:
                    write_json(args.out, result)
        del table
        jax.clear_caches()
        gc.collect()

    print(
        f"\ncopy bandwidth {copy_bw / GB:.1f} GB/s on {env['device_kind']}; "
        f"combiner {args.combiner}; 'r' = ragged bags (len uniform in [1, max_nnz]); "
        f"jax/sok > 1 means sok is faster; f+b = value_and_grad w.r.t. the table"
    )
    result["table"] = print_table([_row(p) for p in result["points"]], COLUMNS)
    n_fail = sum("error" in p for p in result["points"])
    return finish(result, args.out, len(result["points"]), n_fail, t_start)


if __name__ == "__main__":
    sys.exit(main())
