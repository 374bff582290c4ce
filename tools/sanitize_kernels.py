"""Every FFI target once per shape family, in one small process, checked
against the pure-JAX reference: the program to run under compute-sanitizer
(no test framework, no xdist, no multi-device setup: little for the
sanitizer to instrument besides the kernels).

  compute-sanitizer --tool memcheck --error-exitcode 99 \\
      python3 tools/sanitize_kernels.py [--shard i/k]
  (also runs on CPU: python3 tools/sanitize_kernels.py)

Shapes cover each kernel's edge cases: bags longer than the backward's 128-id
chunk, padding runs longer than a chunk, empty bags, ids out of range,
D not a multiple of the 16-byte vector, 16-bit tables, weights, and the
short-bag and long-bag forward shapes, the fixed-length (no offsets)
forward, the one-target dense backward, and the backward fused with the
optimizers (row-wise Adagrad also on rows wider than one pass of a lane
group; every rule also writing 16-bit tables by stochastic rounding, and
every rule with slots storing them in bfloat16 and float16); the
row movers (gather, scatter, copy of whole rows of any dtype)
against numpy, rank 1 and 2, row widths of every word path of their
kernels, no rows listed, and more listed rows than one grid covers; the
int8 inference lookup, ragged and fixed-length, against the reference's
dequantize-then-combine. Exit status 1 on a mismatch.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax.ops import embed_ops, ffi, hash_ops, optim_ops, reference

FAILED = []


def close(name, got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    ok = got.shape == want.shape and err <= tol * (1.0 + float(np.max(np.abs(want), initial=0.0)))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max|diff| {err:.2e}", flush=True)
    if not ok:
        FAILED.append(name)


def bags(rng, m, max_len, rows, p_bad=0.05, p_pad=0.1):
    lengths = rng.integers(0, max_len + 1, size=m)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    n = int(offsets[-1])
    ids = rng.integers(0, rows, size=n)
    bad = rng.random(n) < p_bad
    ids = np.where(bad, rng.choice([rows, rows + 7, -5], size=n), ids)
    ids = np.where(rng.random(n) < p_pad, -1, ids)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(offsets)


def embed_case(rng, dtype, rows, dim, m, max_len, weighted, combiner):
    tag = f"{jnp.dtype(dtype).name} D{dim} m{m} len<={max_len} {combiner}{' w' if weighted else ''}"
    table = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    ids, offsets = bags(rng, m, max_len, rows)
    w = (
        jnp.asarray(rng.uniform(0.5, 1.5, ids.shape[0]), jnp.float32)
        if weighted
        else jnp.zeros((0,), jnp.float32)
    )
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    out = jax.jit(embed_ops.lookup_combine, static_argnums=4)(table, ids, offsets, w, combiner)
    ref = reference.lookup_combine(table.astype(jnp.float32), ids, offsets, w, combiner)
    close("fwd " + tag, out, ref, tol)
    g = jnp.asarray(rng.normal(size=(m, dim)), jnp.float32)
    sp = jax.jit(embed_ops.lookup_combine_bwd, static_argnums=(4, 5))(
        g, ids, offsets, w, combiner, rows
    )
    dense = jax.jit(embed_ops.rows_to_dense, static_argnums=1)(sp, rows)
    want = reference.rows_to_dense(
        reference.lookup_combine_bwd(g, ids, offsets, w, combiner, rows), rows
    )
    close("bwd " + tag, dense, want, 1e-5)
    gt = g.astype(table.dtype)
    dense1 = jax.jit(embed_ops.lookup_combine_bwd_dense, static_argnums=(4, 5, 6))(
        gt, ids, offsets, w, combiner, rows, table.dtype
    )
    want1 = reference.rows_to_dense(
        reference.lookup_combine_bwd(gt, ids, offsets, w, combiner, rows), rows
    )
    close("bwd dense " + tag, dense1.astype(jnp.float32), want1, tol)
    if weighted:
        wg = jax.jit(embed_ops.weight_grad, static_argnums=5)(table, g, ids, offsets, w, combiner)
        _, vjp = jax.vjp(
            lambda ww: reference.lookup_combine(
                table.astype(jnp.float32), ids, offsets, ww, combiner
            ),
            w,
        )
        close("wgrad " + tag, wg, vjp(g.astype(table.dtype).astype(jnp.float32))[0], tol)
    return sp


def fixed_case(rng, dtype, rows, dim, m, nnz, weighted, combiner):
    """The fixed-length forward (no offsets read): bag b is [b*nnz, (b+1)*nnz)."""
    tag = f"{jnp.dtype(dtype).name} D{dim} m{m} nnz={nnz} {combiner}{' w' if weighted else ''}"
    table = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    ids, _ = bags(rng, m * nnz, 1, rows, p_pad=0.0)  # one id per position, some bad
    ids = jnp.where(jnp.asarray(rng.random(m * nnz) < 0.1), -1, jnp.resize(ids, (m * nnz,)))
    offsets = jnp.arange(m + 1, dtype=jnp.int32) * nnz
    w = (
        jnp.asarray(rng.uniform(0.5, 1.5, m * nnz), jnp.float32)
        if weighted
        else jnp.zeros((0,), jnp.float32)
    )
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    out = jax.jit(embed_ops.lookup_combine, static_argnums=(4, 5))(
        table, ids, offsets, w, combiner, nnz
    )
    ref = reference.lookup_combine(table.astype(jnp.float32), ids, offsets, w, combiner)
    close("fwd fixed " + tag, out, ref, tol)


def quant_case(rng, rows, dim, m, max_len, weighted, combiner, fixed_nnz):
    """The int8 inference lookup (sok_quant_fwd) against the reference's
    dequantize-then-combine: ragged bags (empty and long ones included) or
    fixed-length ones (fixed_nnz > 0, offsets unread); D a multiple of 4
    (4-code loads) or not, and past 32 lanes' chunks (D 600)."""
    from sok_jax.ops import quant_ops

    tag = f"D{dim} m{m} len<={max_len} nnz={fixed_nnz} {combiner}{' w' if weighted else ''}"
    q = jnp.asarray(rng.integers(0, 256, (rows, dim)), jnp.uint8)
    sb = np.stack([rng.uniform(1e-3, 0.05, rows), rng.normal(size=rows)], 1)
    table = quant_ops.QuantizedRows(q, jnp.asarray(sb, jnp.float32))
    if fixed_nnz:
        ids, _ = bags(rng, m * fixed_nnz, 1, rows, p_pad=0.0)
        ids = jnp.resize(ids, (m * fixed_nnz,))
        offsets = jnp.arange(m + 1, dtype=jnp.int32) * fixed_nnz
    else:
        ids, offsets = bags(rng, m, max_len, rows)
    w = (
        jnp.asarray(rng.uniform(0.5, 1.5, ids.shape[0]), jnp.float32)
        if weighted
        else jnp.zeros((0,), jnp.float32)
    )
    out = jax.jit(quant_ops.lookup_combine_int8, static_argnums=(4, 5))(
        table, ids, offsets, w, combiner, fixed_nnz
    )
    ref = reference.lookup_combine_int8(table, ids, offsets, w, combiner)
    close("int8 fwd " + tag, out, ref, 1e-5)


def optim_case(rng, rows, dim, sp):
    table = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    acc = jnp.full((rows, dim), 0.1, jnp.float32)
    args = (sp.rows, sp.grads, sp.count)
    close(
        "sgd",
        optim_ops.sgd_update(table.copy(), *args, 0.1),
        reference.sgd_update(table, *args, 0.1),
        1e-6,
    )
    got = optim_ops.adagrad_update(table.copy(), acc.copy(), *args, 0.1)
    want = reference.adagrad_update(table, acc, *args, 0.1)
    for i, (a, b) in enumerate(zip(got, want)):
        close(f"adagrad[{i}]", a, b, 1e-5)


def fused_case(
    rng, dtype, rows, dim, m, max_len, name, grad_f32, hot=False, sr=False, slot_dtype="float32"
):
    """The backward fused with the optimizer against the two-call form on
    the same device (the same sums in the same order, then the same rule:
    the pure-JAX reference sums in another order, and Adam's first step,
    lr * g / (|g| + eps), turns the rounding of a near-zero sum into
    differences of ~1e-3). `hot`: half the ids name row 5 (one run of
    thousands of positions: the chunked long-run path). `sr`: both write the
    table by stochastic rounding (the same words: same seed, same count).
    `slot_dtype`: the optimizer's slots' storage (16-bit ones are rounded as
    the table is)."""
    from sok_jax import optim

    tag = f"fused {name} {jnp.dtype(dtype).name} D{dim} len<={max_len}{' g32' if grad_f32 else ''}"
    tag += (" hot row" if hot else "") + (" sr" if sr else "")
    tag += "" if slot_dtype == "float32" else f" slots {slot_dtype}"
    table = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    ids, offsets = bags(rng, m, max_len, rows)
    if hot:
        ids = jnp.where(jnp.asarray(rng.random(ids.shape[0]) < 0.5), 5, ids)
    w = jnp.asarray(rng.uniform(0.5, 1.5, ids.shape[0]), jnp.float32)
    g = jnp.asarray(rng.normal(size=(m, dim)), jnp.float32 if grad_f32 else dtype)
    opt = optim.by_name(name, 0.1, stochastic_rounding=sr, seed=7, slot_dtype=slot_dtype)
    st = opt.init(table)
    got_t, got_s = jax.jit(opt.update_bags, static_argnums=6)(table, st, g, ids, offsets, w, "mean")
    sp = embed_ops.lookup_combine_bwd(g, ids, offsets, w, "mean", rows)
    want_t, want_s = opt.update(table, opt.init(table), sp)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    close(tag, got_t.astype(jnp.float32), want_t.astype(jnp.float32), tol)
    slot_tol = 1e-4 if slot_dtype == "float32" else 2e-2
    for i, (a, b) in enumerate(zip(got_s.slots, want_s.slots)):
        close(f"{tag} slot {i}", a.astype(jnp.float32), b.astype(jnp.float32), slot_tol)


def hash_case(rng, capacity, n_keys, dtype):
    """Find-or-insert with LRU scores on a prefilled table: the target equals
    the reference bit for bit (one rule on every platform), outputs and
    table alike."""
    slots = hash_ops.empty_slot_keys(capacity, dtype)
    ls = jnp.zeros((capacity,), jnp.int32)
    ct = jnp.zeros((capacity,), jnp.int32)
    pre = jnp.asarray(rng.integers(-3, 4 * capacity, size=capacity), dtype)
    keys = jnp.asarray(rng.integers(-3, 4 * capacity, size=n_keys), dtype)
    ok = True
    for policy in (None, "lru"):
        first = hash_ops.hash_lookup(
            slots, pre, insert=True, last_seen=ls, count=ct, step=1, policy=policy
        )
        args = (first.slot_keys, keys)
        kw = dict(insert=True, last_seen=first.last_seen, count=first.count, step=2, policy=policy)
        got = hash_ops.hash_lookup(*args, **kw)
        want = reference.hash_lookup(*args, **kw)
        for name, g, w in zip(got._fields, got, want):
            same = np.array_equal(np.asarray(g), np.asarray(w))
            if not same:
                print(f"FAIL hash cap {capacity} keys {n_keys} {policy}: {name}", flush=True)
            ok &= same
    print(f"{'ok  ' if ok else 'FAIL'} hash cap {capacity} keys {n_keys}: equals the reference")
    if not ok:
        FAILED.append("hash")


def row_list(rng, k, rows, distinct):
    """k int32 indices into a table of `rows` rows, about a tenth naming no
    row; with `distinct` the ones naming a row are distinct (once the table's
    rows run out, the rest name none)."""
    good = rng.permutation(rows) if distinct else rng.integers(0, max(rows, 1), size=k)
    n = min(k, len(good))
    bad = (rng.random(k) < 0.1) | (np.arange(k) >= n) | (rows == 0)
    out = np.zeros(k, np.int64)
    out[:n] = good[:n]
    out = np.where(bad, rng.choice([rows, -1, -7, 2**31 - 1, -(2**31)], size=k), out)
    return jnp.asarray(out.astype(np.int32))


def rows_case(rng, dtype, width, rows, k):
    """The row movers through `sok_jax.ops.ffi` against numpy, exactly: the
    gather and the copy's source read repeated rows and indices naming no row;
    the scatter and the copy write rows distinct where in range, into a
    donated dst (in place)."""
    tail = () if width is None else (width,)
    tag = f"{jnp.dtype(dtype).name} {[rows, *tail]} K{k}"

    def table(n):
        return np.asarray(rng.normal(size=(n, *tail)) * 100, dtype)

    def names(r, n):
        r = np.asarray(r)
        return (r >= 0) & (r < n)

    src, r = table(rows), row_list(rng, k, rows, False)
    want = np.zeros((k, *tail), dtype)
    ok = names(r, rows)
    want[ok] = src[np.asarray(r)[ok]]
    close("gather_rows " + tag, jax.jit(ffi.gather_rows)(src, r), want, 0.0)

    dst, r, values = table(rows), row_list(rng, k, rows, True), table(k)
    want = dst.copy()
    ok = names(r, rows)
    want[np.asarray(r)[ok]] = values[ok]
    got = jax.jit(ffi.scatter_rows, donate_argnums=0)(jnp.asarray(dst), r, values)
    close("scatter_rows " + tag, got, want, 0.0)

    def on_the_side(dst, r, values):  # finished at the join
        return ffi.join_rows(ffi.scatter_rows_async(dst, r, values), r, values)

    got = jax.jit(on_the_side, donate_argnums=0)(jnp.asarray(dst), r, values)
    close("scatter_rows_async + join_rows " + tag, got, want, 0.0)

    n_src = rows // 2 + 3
    src, d, s = table(n_src), row_list(rng, k, rows, True), row_list(rng, k, n_src, False)
    count = int(rng.integers(0, k + 1))  # only the leading pairs are read
    want = dst.copy()
    ok = names(d, rows) & names(s, n_src) & (np.arange(k) < count)
    want[np.asarray(d)[ok]] = src[np.asarray(s)[ok]]
    got = jax.jit(ffi.copy_rows, donate_argnums=0)(jnp.asarray(dst), d, src, s, count)
    close(f"copy_rows {tag} from {n_src} rows, count {count}", got, want, 0.0)

    def copy_on_the_side(dst, d, src, s, count):  # finished at the join
        return ffi.join_rows(ffi.copy_rows_async(dst, d, src, s, count))

    got = jax.jit(copy_on_the_side, donate_argnums=0)(jnp.asarray(dst), d, src, s, count)
    close(f"copy_rows_async + join_rows {tag} from {n_src} rows, count {count}", got, want, 0.0)


def cases(rng):
    """Every case as a closure, in a fixed order (so --shard splits are stable)."""
    out = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for dim in (1, 3, 16, 129, 128):
            for max_len in (1, 4, 300):  # short bags, long bags, runs past a chunk
                for combiner, weighted in (("sum", False), ("mean", True), ("sqrtn", False)):
                    out.append(
                        lambda a=(dtype, dim, max_len, weighted, combiner): embed_case(
                            rng, a[0], 997, a[1], 96, a[2], a[3], a[4]
                        )
                    )
    out.append(
        lambda: optim_case(
            rng, 997, 128, embed_case(rng, jnp.float32, 997, 128, 96, 4, False, "sum")
        )
    )
    for dtype in (jnp.float32, jnp.bfloat16):
        for dim in (1, 3, 128, 129, 600):
            for nnz in (1, 2, 5):
                for combiner, weighted in (("sum", True), ("mean", False), ("sqrtn", True)):
                    out.append(
                        lambda a=(dtype, dim, nnz, weighted, combiner): fixed_case(
                            rng, a[0], 997, a[1], 77, a[2], a[3], a[4]
                        )
                    )
    out.append(lambda: special_cases(rng))
    for capacity, n_keys in ((64, 40), (64, 500), (4096, 3000)):
        out.append(lambda a=(capacity, n_keys): hash_case(rng, a[0], a[1], jnp.int32))
    for dtype in (jnp.float32, jnp.bfloat16):
        for dim in (3, 128, 129):
            for max_len in (1, 4, 300):
                for name, grad_f32 in (("sgd", False), ("adam", True), ("ftrl", False)):
                    out.append(
                        lambda a=(dtype, dim, max_len, name, grad_f32): fused_case(
                            rng, a[0], 997, a[1], 96, a[2], a[3], a[4]
                        )
                    )
    # Row-wise Adagrad fused: rows of one pass of a lane group and wider (D =
    # 67: the scalar path past 64 columns; 264, 600: the 4-wide path past
    # 256), short runs and a hot row's chunked long run, every table type.
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        for dim in (3, 67, 128, 129, 264, 600):
            for max_len, grad_f32, hot in (
                (1, False, False),
                (300, True, False),
                (300, False, True),
            ):
                out.append(
                    lambda a=(dtype, dim, max_len, grad_f32, hot): fused_case(
                        rng, a[0], 997, a[1], 96, a[2], "rowwise_adagrad", a[3], a[4]
                    )
                )
    # Stochastic rounding of 16-bit tables, every rule, fused and unfused: the
    # scalar path (D 3, short bags) and the 4-wide path (D 128, runs past a
    # chunk).
    for dtype in (jnp.bfloat16, jnp.float16):
        for dim, max_len in ((3, 4), (128, 300)):
            for name in ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"):
                out.append(
                    lambda a=(dtype, dim, max_len, name): fused_case(
                        rng, a[0], 997, a[1], 96, a[2], a[3], a[3] == "adam", sr=True
                    )
                )
    # 16-bit optimizer slots, every rule with slots, rounded to nearest and
    # stochastically: the scalar path (D 3, short bags) and the 4-wide path
    # (D 128, runs past a chunk).
    for slot_dtype in ("bfloat16", "float16"):
        for dim, max_len in ((3, 4), (128, 300)):
            for name in ("adagrad", "rowwise_adagrad", "adam", "ftrl"):
                for sr in (False, True):
                    out.append(
                        lambda a=(slot_dtype, dim, max_len, name, sr): fused_case(
                            rng, jnp.bfloat16, 997, a[1], 96, a[2], a[3], False, sr=a[4],
                            slot_dtype=a[0],
                        )
                    )
    # The row movers: rank 1, and rows of 16k bytes (uint4 words), 4k (uint32)
    # and others (bytes): f32 W16, f32 W3, f16 W3.
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32):
        for width in (None, 3, 16):
            out.append(lambda a=(dtype, width): rows_case(rng, a[0], a[1], 997, 300))
    out.append(lambda: rows_case(rng, jnp.float32, 16, 211, 0))  # no rows listed
    out.append(lambda: rows_case(rng, jnp.float16, 3, 0, 20))  # a table of no rows
    # Past the grid's 65536 blocks of 8 rows: warps stride over the rest.
    out.append(lambda: rows_case(rng, jnp.int32, None, 600_000, 65536 * 8 + 4099))
    # The int8 inference lookup: ragged (short, long, past-a-warp bags) and
    # fixed-length bags, D of the 1-code and 4-code loads.
    for dim in (1, 3, 16, 129, 600):
        for max_len, nnz in ((1, 0), (4, 0), (300, 0), (0, 1), (0, 5)):
            for combiner, weighted in (("sum", True), ("mean", False), ("sqrtn", True)):
                out.append(
                    lambda a=(dim, max_len, nnz, weighted, combiner): quant_case(
                        rng, 997, a[0], 96, a[1], a[3], a[4], a[2]
                    )
                )
    return out


def special_cases(rng):
    # Padding runs longer than the backward's chunk (a run of -1 sentinels).
    ids = jnp.full((1000,), -1, jnp.int32).at[::97].set(5)
    offsets = jnp.asarray([0, 400, 1000], jnp.int32)
    g = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    sp = embed_ops.lookup_combine_bwd(g, ids, offsets, jnp.zeros((0,), jnp.float32), "mean", 16)
    close(
        "bwd padding run",
        embed_ops.rows_to_dense(sp, 16),
        reference.rows_to_dense(
            reference.lookup_combine_bwd(g, ids, offsets, jnp.zeros((0,), jnp.float32), "mean", 16),
            16,
        ),
        1e-5,
    )
    # One row repeated far past a chunk (the chunked long-run path).
    ids = jnp.where(jnp.arange(1000) % 50 == 0, 7, 5).astype(jnp.int32)
    g = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 1000), jnp.float32)
    sp = embed_ops.lookup_combine_bwd(g, ids, offsets, w, "sqrtn", 16)
    close(
        "bwd hot row",
        embed_ops.rows_to_dense(sp, 16),
        reference.rows_to_dense(reference.lookup_combine_bwd(g, ids, offsets, w, "sqrtn", 16), 16),
        1e-5,
    )
    close(
        "bwd dense hot row",
        embed_ops.lookup_combine_bwd_dense(g, ids, offsets, w, "sqrtn", 16),
        reference.rows_to_dense(reference.lookup_combine_bwd(g, ids, offsets, w, "sqrtn", 16), 16),
        1e-5,
    )


def main(argv):
    """`--shard i/k` runs cases i, i + k, ... (several sanitizer processes in
    parallel: each case is mostly compilation)."""
    i, k = 0, 1
    if len(argv) == 2 and argv[0] == "--shard":
        i, k = (int(x) for x in argv[1].split("/"))
    rng = np.random.default_rng([0, i])
    print(
        "backend:",
        jax.default_backend(),
        jax.devices()[0].device_kind,
        f"shard {i}/{k}",
        flush=True,
    )
    for j, case in enumerate(cases(rng)):
        if j % k == i:
            case()
    print(f"{len(FAILED)} failed" + (f": {FAILED}" if FAILED else ""), flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
