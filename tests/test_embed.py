"""`sok_jax.embed` / `lookup` / `sparse_grad` / `count_invalid_ids` against a
numpy brute force (conftest) and the pure-JAX reference implementation."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse
from jax.test_util import check_grads
from oracles import (
    COMBINERS,
    FORMS,
    KEY_DTYPES,
    TABLE_DTYPES,
    assert_close,
    build_form,
    np_count_invalid,
    np_embed,
    np_embed_grads,
    np_sparse_rows,
    oob_values,
    pad_value,
    random_bags,
    random_table,
    round_to,
    x64_if,
)

import sok_jax


def _embed_fn(combiner, implementation, slot_num, check_ids=False):
    def f(table, ids, weights):
        return sok_jax.embed(
            table,
            ids,
            combiner=combiner,
            weights=weights,
            slot_num=slot_num,
            implementation=implementation,
            check_ids=check_ids,
        )

    return f


@functools.partial(jax.jit, static_argnames=("combiner", "slot_num"))
def _values_and_grads(table, weights, ids, c, *, combiner, slot_num):
    """Per implementation: the output of embed and the grads of sum(c * out)
    w.r.t. the table (and the weights when given), in one jitted program.
    Module-level so that its cache hits across tests of the same shapes."""
    res = {}
    for impl in ("ffi", "reference"):
        f = _embed_fn(combiner, impl, slot_num)

        def loss(table, weights):
            out = f(table, ids, weights)  # noqa: B023 - called in this iteration
            return jnp.sum(c * out.astype(jnp.float32)), out

        argnums = (0,) if weights is None else (0, 1)
        (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(table, weights)
        res[impl] = (out, grads[0], None if weights is None else grads[1])
    return res


def _check_against_oracles(
    rng,
    *,
    combiner,
    form,
    key_dtype,
    table_dtype,
    dim,
    nnz,
    weighted,
    batch,
    slots,
    rows=11,
    with_oob=True,
):
    with x64_if(key_dtype):
        bags = random_bags(
            rng,
            batch=batch,
            slots=slots,
            nnz=nnz,
            rows=rows,
            key_dtype=key_dtype,
            weighted=weighted,
            with_oob=with_oob,
        )
        built = build_form(bags, form, rng)
        table, table64 = random_table(rng, rows, dim, table_dtype)
        c = rng.normal(size=(batch, slots, dim)).astype(np.float32)
        # The cotangent reaching embed is c in the table's dtype.
        c_eff = round_to(c, table_dtype)

        want = np_embed(table64, bags, combiner)
        want_dt, want_dw = np_embed_grads(table64, bags, combiner, c_eff, built)
        scale = max(1.0, float(np.abs(want).max()))
        gscale = max(1.0, float(np.abs(want_dt).max()))

        weights = None if built.weights is None else jnp.asarray(built.weights)
        results = _values_and_grads(
            table, weights, built.ids, jnp.asarray(c), combiner=combiner, slot_num=built.slot_num
        )
        for impl, (out, dt, dw) in results.items():
            assert out.shape == (batch, slots, dim) and out.dtype == table.dtype
            assert dt.shape == table.shape and dt.dtype == table.dtype
            assert_close(out, round_to(want, table_dtype), table_dtype, scale, f"{impl} forward")
            assert_close(dt, round_to(want_dt, table_dtype), table_dtype, gscale, f"{impl} d_table")
            if weighted:
                assert dw.shape == built.weight_shape and dw.dtype == jnp.float32
                wscale = max(1.0, float(np.abs(want_dw).max()))
                tol = 1e-5 if table_dtype == "float32" else 1e-4
                np.testing.assert_allclose(
                    np.asarray(dw, np.float64),
                    want_dw,
                    rtol=tol,
                    atol=tol * wscale,
                    err_msg=f"{impl} d_weights",
                )
        # FFI vs reference directly (both float32-accumulated).
        ffi, ref = results["ffi"], results["reference"]
        assert_close(
            ffi[0],
            np.asarray(ref[0].astype(jnp.float32)),
            table_dtype,
            scale,
            "ffi vs reference forward",
        )
        assert_close(
            ffi[1],
            np.asarray(ref[1].astype(jnp.float32)),
            table_dtype,
            gscale,
            "ffi vs reference d_table",
        )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("key_dtype", KEY_DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("combiner", COMBINERS)
def test_combiner_form_key_dtype(combiner, form, key_dtype, weighted, seed):
    """Full product of combiner x id form x key dtype (float32 table, D=3)."""
    rng = np.random.default_rng(
        [seed, COMBINERS.index(combiner), FORMS.index(form), KEY_DTYPES.index(key_dtype), weighted]
    )
    _check_against_oracles(
        rng,
        combiner=combiner,
        form=form,
        key_dtype=key_dtype,
        table_dtype="float32",
        dim=3,
        nnz=5,
        weighted=weighted,
        batch=3,
        slots=4,
    )


def _dtype_cases():
    cases = []
    for td in TABLE_DTYPES:
        for i, (dim, nnz, weighted) in enumerate(
            itertools.product([1, 3, 4, 129], [1, 64], [False, True])
        ):
            # Rotate combiner and form so that each table dtype meets every
            # (combiner, form) pair; key dtypes rotate on top.
            combiner = COMBINERS[i % 3]
            form = FORMS[(i // 3) % 3]
            key = KEY_DTYPES[(i + TABLE_DTYPES.index(td)) % 3]
            cases.append(
                pytest.param(
                    td,
                    dim,
                    nnz,
                    weighted,
                    combiner,
                    form,
                    key,
                    id=f"{td}-D{dim}-nnz{nnz}-{'w' if weighted else 'u'}-{combiner}-{form}-{key}",
                )
            )
    return cases


@pytest.mark.parametrize("table_dtype,dim,nnz,weighted,combiner,form,key_dtype", _dtype_cases())
def test_table_dtype_dim_nnz(table_dtype, dim, nnz, weighted, combiner, form, key_dtype):
    rng = np.random.default_rng([7, TABLE_DTYPES.index(table_dtype), dim, nnz, weighted])
    _check_against_oracles(
        rng,
        combiner=combiner,
        form=form,
        key_dtype=key_dtype,
        table_dtype=table_dtype,
        dim=dim,
        nnz=nnz,
        weighted=weighted,
        batch=2,
        slots=3,
        rows=13 if nnz == 1 else 40,
    )


# --------------------------------------------------------------------------
# Finite-difference gradients.


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("combiner", COMBINERS)
def test_check_grads(combiner, form):
    rng = np.random.default_rng([11, COMBINERS.index(combiner), FORMS.index(form)])
    bags = random_bags(
        rng, batch=2, slots=3, nnz=4, rows=9, key_dtype="int32", weighted=True, with_oob=True
    )
    # No zero-weight bag here: mean/sqrtn are not differentiable there.
    bags.weights = [
        [[float(w) for w in rng.uniform(0.5, 1.5, size=len(ks))] for ks in row] for row in bags.keys
    ]
    built = build_form(bags, form, rng)
    table = jnp.asarray(rng.normal(size=(9, 4)).astype(np.float32))
    weights = jnp.asarray(built.weights)
    f = _embed_fn(combiner, "ffi", built.slot_num)
    check_grads(lambda t: f(t, built.ids, weights), (table,), order=1, modes=["rev"])
    check_grads(
        lambda w: f(table, built.ids, w),
        (weights,),
        order=1,
        modes=["rev"],
        eps=1e-3,
        atol=1e-2,
        rtol=1e-2,
    )
    # Unweighted: the table only.
    check_grads(lambda t: f(t, built.ids, None), (table,), order=1, modes=["rev"])


# --------------------------------------------------------------------------
# The sparse form.


@functools.partial(jax.jit, static_argnames=("combiner", "slot_num", "implementation"))
def _lookup_and_sparse_grad(table, ids, weights, d_out, *, combiner, slot_num, implementation):
    out, ctx = sok_jax.lookup(
        table,
        ids,
        combiner=combiner,
        weights=weights,
        slot_num=slot_num,
        implementation=implementation,
    )
    return out, sok_jax.sparse_grad(ctx, d_out)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("combiner", COMBINERS)
def test_sparse_grad(combiner, form):
    # Key and table dtypes rotate over the (combiner, form) grid.
    i = 3 * COMBINERS.index(combiner) + FORMS.index(form)
    key_dtype = KEY_DTYPES[i % 3]
    table_dtype = TABLE_DTYPES[(i // 3 + i) % 3]
    rng = np.random.default_rng([13, i])
    rows, dim = 23, 5
    with x64_if(key_dtype):
        bags = random_bags(
            rng,
            batch=3,
            slots=3,
            nnz=6,
            rows=rows,
            key_dtype=key_dtype,
            weighted=True,
            with_oob=True,
        )
        built = build_form(bags, form, rng)
        table, table64 = random_table(rng, rows, dim, table_dtype)
        weights = jnp.asarray(built.weights)
        d_out_np = round_to(rng.normal(size=(3, 3, dim)), table_dtype)
        d_out = jnp.asarray(d_out_np.astype(np.float32)).astype(table_dtype)
        want_rows = np_sparse_rows(bags)
        want_dt, _ = np_embed_grads(table64, bags, combiner, d_out_np)
        want_out = np_embed(table64, bags, combiner)

        runs = []
        for impl in ("ffi", "reference"):
            runs.append(
                (
                    impl,
                    _lookup_and_sparse_grad(
                        table,
                        built.ids,
                        weights,
                        d_out,
                        combiner=combiner,
                        slot_num=built.slot_num,
                        implementation=impl,
                    ),
                )
            )
        # Eagerly too (no jit), through the public functions.
        out, ctx = sok_jax.lookup(
            table, built.ids, combiner=combiner, weights=weights, slot_num=built.slot_num
        )
        runs.append(("ffi-eager", (out, sok_jax.sparse_grad(ctx, d_out))))

        for impl, (out, sg) in runs:
            assert isinstance(sg, sok_jax.SparseRowGrad)
            assert out.dtype == table.dtype
            assert_close(
                out,
                round_to(want_out, table_dtype),
                table_dtype,
                max(1.0, float(np.abs(want_out).max())),
                impl,
            )
            rows_, grads, count = (np.asarray(x) for x in sg)
            cap = rows_.shape[0]
            assert count.shape == (1,) and count.dtype == np.int32 and rows_.dtype == np.int32
            assert grads.shape == (cap, dim) and grads.dtype == np.float32, (impl, grads.dtype)
            k = int(count[0])
            assert k == len(want_rows), (impl, k, want_rows)
            np.testing.assert_array_equal(rows_[:k], want_rows, err_msg=impl)
            assert np.all(np.diff(rows_[:k]) > 0)
            np.testing.assert_array_equal(rows_[k:], -1, err_msg=impl)
            np.testing.assert_array_equal(grads[k:], 0.0, err_msg=impl)
            np.testing.assert_allclose(
                grads[:k],
                want_dt[want_rows],
                rtol=1e-5,
                atol=1e-5 * max(1.0, float(np.abs(want_dt).max())),
                err_msg=impl,
            )
        # Deterministic run to run, bit for bit.
        again = _lookup_and_sparse_grad(
            table,
            built.ids,
            weights,
            d_out,
            combiner=combiner,
            slot_num=built.slot_num,
            implementation="ffi",
        )[1]
        for x, y in zip(runs[0][1][1], again):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lookup_output_not_differentiable_wrt_table():
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.normal(size=(5, 2)).astype(np.float32))
    ids = rng.integers(0, 5, size=(2, 2, 3)).astype(np.int32)
    g = jax.grad(lambda t: jnp.sum(sok_jax.lookup(t, ids, combiner="sum")[0]))(table)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# --------------------------------------------------------------------------
# Invalid ids.


def _first_bad(built, bags):
    """The first id, in the form's canonical order, that is neither padding
    nor a row."""
    pad = pad_value(bags.key_dtype)

    def bad(k):
        return int(k) != pad and not 0 <= int(k) < bags.rows

    if isinstance(built.ids, sok_jax.RaggedIds):
        total = int(np.asarray(built.ids.offsets)[-1])
        seq = np.asarray(built.ids.values)[:total]
    elif isinstance(built.ids, jsparse.BCOO):
        data = np.asarray(built.ids.data)
        idx = np.asarray(built.ids.indices)
        inb = np.all(idx < np.asarray(built.ids.shape), axis=1)
        order = np.argsort(idx[inb, 0].astype(np.int64) * built.ids.shape[1] + idx[inb, 1])
        seq = data[inb][order]
    else:
        seq = np.asarray(built.ids).ravel()
    return next(int(k) for k in seq if bad(k))


@pytest.mark.parametrize("key_dtype", KEY_DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_invalid_ids(form, key_dtype):
    rng = np.random.default_rng([17, FORMS.index(form), KEY_DTYPES.index(key_dtype)])
    rows, dim = 10, 4
    with x64_if(key_dtype):
        bags = random_bags(
            rng,
            batch=3,
            slots=4,
            nnz=5,
            rows=rows,
            key_dtype=key_dtype,
            weighted=False,
            with_oob=True,
        )
        # Make sure at least one bad id is present.
        bags.keys[2][3][0] = oob_values(key_dtype, rows)[-1]
        built = build_form(bags, form, rng)
        table, table64 = random_table(rng, rows, dim, "float32")
        n_bad = np_count_invalid(bags)
        assert n_bad >= 1

        # Counted exactly (padding and unused ragged capacity excluded).
        count = sok_jax.count_invalid_ids(built.ids, rows, slot_num=built.slot_num)
        assert int(count) == n_bad
        count_jit = jax.jit(lambda i: sok_jax.count_invalid_ids(i, rows, slot_num=built.slot_num))
        assert int(count_jit(built.ids)) == n_bad

        # They contribute nothing: same as replacing them with padding.
        clean = random_bags(
            np.random.default_rng(0),
            batch=3,
            slots=4,
            nnz=5,
            rows=rows,
            key_dtype=key_dtype,
            weighted=False,
        )
        pad = pad_value(key_dtype)
        clean.keys = [
            [[k if 0 <= k < rows or k == pad else pad for k in ks] for ks in row]
            for row in bags.keys
        ]
        assert np_count_invalid(clean) == 0
        built_clean = build_form(clean, form, np.random.default_rng(1))
        for combiner in COMBINERS:
            got = sok_jax.embed(table, built.ids, combiner=combiner, slot_num=built.slot_num)
            got_clean = sok_jax.embed(
                table, built_clean.ids, combiner=combiner, slot_num=built.slot_num
            )
            np.testing.assert_allclose(np.asarray(got), np.asarray(got_clean), rtol=1e-6, atol=1e-6)
            assert_close(got, np_embed(table64, bags, combiner), "float32")

        # check_ids=True raises naming the first bad id, eagerly and under jit.
        first = _first_bad(built, bags)
        pattern = rf"(?<![0-9]){re.escape(str(first))}(?![0-9])"
        f = _embed_fn("sum", "ffi", built.slot_num, check_ids=True)
        with pytest.raises(ValueError, match=pattern):
            jax.block_until_ready(f(table, built.ids, None))
        with pytest.raises(Exception, match=pattern):
            jax.block_until_ready(jax.jit(f)(table, built.ids, None))

        # ...and stays silent (and changes nothing) on clean ids.
        g = _embed_fn("sum", "ffi", built.slot_num, check_ids=True)
        got = jax.block_until_ready(jax.jit(g)(table, built_clean.ids, None))
        got_eager = jax.block_until_ready(g(table, built_clean.ids, None))
        want = sok_jax.embed(table, built_clean.ids, combiner="sum", slot_num=built.slot_num)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(got_eager), np.asarray(want))


# --------------------------------------------------------------------------
# Bad shapes and dtypes.


def _bad_cases():
    t = np.zeros((6, 3), np.float32) + 0.5
    ids = np.array([[[0, 1], [2, -1]]], np.int32)
    bcoo = jsparse.BCOO(
        (jnp.array([1, 2], jnp.int32), jnp.array([[0, 0], [1, 1]], jnp.int32)), shape=(2, 2)
    )
    ragged = sok_jax.RaggedIds.from_lengths(
        np.array([1, 2, 3, 0], np.int32), np.array([[1, 2]], np.int32)
    )
    return [
        ("table", dict(table=t[0], ids=ids)),
        ("table", dict(table=t[None], ids=ids)),
        ("table", dict(table=t.astype(np.float64), ids=ids)),
        ("table", dict(table=t.astype(np.int32), ids=ids)),
        ("ids", dict(table=t, ids=ids[0])),
        ("ids", dict(table=t, ids=ids.reshape(-1))),
        ("ids", dict(table=t, ids=ids.astype(np.float32))),
        ("ids", dict(table=t, ids=ids.astype(np.int16))),
        ("jax_enable_x64", dict(table=t, ids=ids.astype(np.int64))),
        ("weights", dict(table=t, ids=ids, weights=np.ones((1, 2, 3), np.float32))),
        ("weights", dict(table=t, ids=ids, weights=np.ones((4,), np.float32))),
        ("weights", dict(table=t, ids=ids, weights=np.ones((1, 2, 2), np.int32))),
        ("weights", dict(table=t, ids=bcoo, slot_num=1, weights=np.ones((3,), np.float32))),
        ("weights", dict(table=t, ids=ragged, weights=np.ones((3,), np.float32))),
        ("combiner", dict(table=t, ids=ids, combiner="max")),
        ("combiner", dict(table=t, ids=ids, combiner="MEAN")),
        ("slot_num", dict(table=t, ids=bcoo)),
        ("slot_num", dict(table=t, ids=bcoo, slot_num=3)),
        ("implementation", dict(table=t, ids=ids, implementation="cuda")),
    ]


@pytest.mark.parametrize(
    "name,kwargs", _bad_cases(), ids=lambda x: x if isinstance(x, str) else None
)
def test_bad_inputs_raise_value_error(name, kwargs):
    kwargs = dict(kwargs)
    table, ids = kwargs.pop("table"), kwargs.pop("ids")
    with pytest.raises(ValueError, match=name):
        sok_jax.embed(table, ids, **kwargs)
    # Not silently accepted under jit either (numpy args closed over so
    # that jit does not canonicalize their dtypes first).
    with pytest.raises(ValueError, match=name):
        jax.jit(lambda: sok_jax.embed(table, ids, **kwargs))()


def test_int64_ids_do_not_truncate_without_x64():
    table = jnp.ones((4, 2), jnp.float32)
    ids = np.array([[[2**32 + 1, 1]]], np.int64)  # would alias row 1 if truncated
    with pytest.raises(ValueError, match="ids"):
        sok_jax.embed(table, ids)
    with pytest.raises(ValueError, match="ids"):
        sok_jax.count_invalid_ids(ids, 4)
    with pytest.raises(ValueError, match="ids"):
        sok_jax.lookup(table, ids)


def test_int64_ids_with_x64():
    with x64_if("int64"):
        rng = np.random.default_rng(5)
        table, table64 = random_table(rng, 4, 3, "float32")
        ids = np.array([[[2**32 + 1, 1, -1], [3, 2**40, 0]]], np.int64)
        out = sok_jax.embed(table, ids, combiner="sum")
        np.testing.assert_allclose(np.asarray(out[0, 0]), table64[1], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out[0, 1]), table64[3] + table64[0], rtol=1e-6)
        assert int(sok_jax.count_invalid_ids(ids, 4)) == 2


# --------------------------------------------------------------------------
# vmap.


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_vmap_matches_loop(combiner, weighted):
    rng = np.random.default_rng([19, COMBINERS.index(combiner), weighted])
    V, B, S, nnz, rows, dim = 3, 2, 3, 4, 8, 5
    table, _ = random_table(rng, rows, dim, "float32")
    ids = rng.integers(-1, rows + 2, size=(V, B, S, nnz)).astype(np.int32)
    ids[0, 0, 0] = -1  # an all-padding bag
    weights = rng.uniform(0.25, 1.5, size=ids.shape).astype(np.float32) if weighted else None
    c = jnp.asarray(rng.normal(size=(V, B, S, dim)).astype(np.float32))

    def one(table, ids, w):
        return sok_jax.embed(table, ids, combiner=combiner, weights=w)

    in_axes = (None, 0, 0 if weighted else None)
    got = jax.jit(jax.vmap(one, in_axes=in_axes))(table, ids, weights)
    want = np.stack(
        [np.asarray(one(table, ids[v], None if weights is None else weights[v])) for v in range(V)]
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)

    # Gradient through vmap w.r.t. the shared table (and the weights).
    def loss(table, w):
        return jnp.sum(c * jax.vmap(one, in_axes=in_axes)(table, ids, w))

    def loss_loop(table, w):
        return sum(
            jnp.sum(c[v] * one(table, ids[v], None if w is None else w[v])) for v in range(V)
        )

    argnums = (0, 1) if weighted else (0,)
    w = None if weights is None else jnp.asarray(weights)
    g = jax.jit(jax.grad(loss, argnums=argnums))(table, w)
    g_loop = jax.grad(loss_loop, argnums=argnums)(table, w)
    for a, b in zip(g, g_loop):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table_dtype", TABLE_DTYPES)
@pytest.mark.parametrize("nnz", [1, 3])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_fixed_nnz_and_dense_backward_ops(combiner, nnz, table_dtype):
    """The op-level fast paths against their general forms and numpy: the
    forward with `fixed_nnz` (no offsets read) equals the offsets form, and
    the one-target dense backward equals `rows_to_dense(lookup_combine_bwd)`
    exactly (the same sums) and the numpy gradient."""
    from sok_jax.ops import embed_ops

    rng = np.random.default_rng()
    rows, dim, batch, slots = 37, 12, 5, 4
    bags = random_bags(
        rng,
        batch=batch,
        slots=slots,
        nnz=nnz,
        rows=rows,
        key_dtype="int32",
        weighted=True,
        with_oob=True,
    )
    built = build_form(bags, "padded", rng)
    table, table64 = random_table(rng, rows, dim, table_dtype)
    ids = jnp.asarray(built.ids).reshape(-1)
    m = batch * slots
    offsets = jnp.arange(m + 1, dtype=jnp.int32) * nnz
    w = jnp.asarray(built.weights, jnp.float32).reshape(-1)
    fwd = jax.jit(embed_ops.lookup_combine, static_argnums=(4, 5))
    general = fwd(table, ids, offsets, w, combiner, 0)
    fixed = fwd(table, ids, offsets, w, combiner, nnz)
    assert_close(fixed, np.asarray(general.astype(jnp.float32)), table_dtype, 1.0, "fixed_nnz")
    want = np_embed(table64, bags, combiner).reshape(m, dim)
    assert_close(
        fixed,
        round_to(want, table_dtype),
        table_dtype,
        max(1.0, float(np.abs(want).max())),
        "fixed_nnz vs numpy",
    )

    g_np = round_to(rng.normal(size=(batch, slots, dim)), table_dtype)
    g = jnp.asarray(g_np.astype(np.float32)).astype(table_dtype).reshape(m, dim)
    two_step = embed_ops.rows_to_dense(
        embed_ops.lookup_combine_bwd(g, ids, offsets, w, combiner, rows), rows, table.dtype
    )
    one_step = embed_ops.lookup_combine_bwd_dense(g, ids, offsets, w, combiner, rows, table.dtype)
    assert one_step.shape == (rows, dim) and one_step.dtype == table.dtype
    np.testing.assert_array_equal(
        np.asarray(one_step.astype(jnp.float32)), np.asarray(two_step.astype(jnp.float32))
    )
    want_dt, _ = np_embed_grads(table64, bags, combiner, g_np)
    assert_close(
        one_step,
        round_to(want_dt, table_dtype),
        table_dtype,
        max(1.0, float(np.abs(want_dt).max())),
        "dense backward vs numpy",
    )

    with pytest.raises(ValueError, match="fixed_nnz"):
        embed_ops.lookup_combine(table, ids, offsets, w, combiner, nnz + 1)


def test_fixed_nnz_reaches_the_kernel():
    """Padded and BCOO ids take the offsets-free forward (fixed_nnz = max_nnz
    in the lowered custom call); ragged ids keep reading offsets (0)."""
    rng = np.random.default_rng()
    nnz = int(rng.integers(2, 5))
    ids = jnp.asarray(rng.integers(-1, 9, size=(3, 2, nnz)), jnp.int32)
    table = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    ragged = sok_jax.RaggedIds.from_lengths(ids.reshape(-1), jnp.full((3, 2), nnz, jnp.int32))
    bcoo = jsparse.BCOO.fromdense(ids.reshape(6, nnz) + 1, nse=6 * nnz)
    for form, want, kw in ((ids, nnz, {}), (bcoo, nnz, {"slot_num": 2}), (ragged, 0, {})):
        hlo = jax.jit(lambda t, i, kw=kw: sok_jax.embed(t, i, **kw)).lower(table, form).as_text()
        m = re.search(r"fixed_nnz = (\d+)", hlo)
        assert m is not None and int(m.group(1)) == want, (type(form).__name__, hlo[:2000])


def test_bag_of_positions_counts_the_bag_ends_before_each_position():
    """The bag rule's position -> bag map (a running count of bag ends)
    against numpy's search, on random non-decreasing offsets, some past the
    positions or below 0, and empty bags."""
    from sok_jax.ops import checks

    rng = np.random.default_rng()
    where = jax.jit(checks.bag_of_positions, static_argnums=1)
    for m, n in [(0, 5), (1, 0), (9, 37)] * 10:  # three shapes: three compiles
        offsets = np.sort(rng.integers(-2, n + 4, m + 1)).astype(np.int32)
        bag, inside = where(offsets, n)
        pos = np.arange(n)
        np.testing.assert_array_equal(bag, np.searchsorted(offsets[1:], pos, side="right"))
        np.testing.assert_array_equal(inside, (pos >= offsets[0]) & (pos < offsets[-1]))
