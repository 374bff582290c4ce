"""sok_jax.flax.Embed / NNXEmbed and sok_jax.haiku.Embed: each one's output is
`sok_jax.embed` of its own parameter, and a few optax steps through it lower
a loss."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sok_jax

optax = pytest.importorskip("optax")

ROWS, DIM, BATCH, SLOTS, NNZ = 50, 8, 16, 3, 4


def _ids(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, ROWS, size=(BATCH, SLOTS, NNZ)).astype(np.int32)  # -1: no key
    w = rng.uniform(0.5, 1.5, size=ids.shape).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(w)


def _target(seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(BATCH, SLOTS, DIM)), jnp.float32)


def _train(loss_fn, params, steps=20):
    """Adam on `params`; returns the losses before and after."""
    tx = optax.adam(0.05)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    first = None
    for _ in range(steps):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    return first, float(loss_fn(params))


def test_sok_jax_does_not_import_frameworks():
    # `import sok_jax` must stay light: flax/haiku only when their module is used.
    code = "import sys, sok_jax; assert 'flax' not in sys.modules and 'haiku' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_flax_linen_embed(combiner, weighted):
    pytest.importorskip("flax")
    from sok_jax.flax import Embed

    ids, w = _ids()
    w = w if weighted else None
    mod = Embed(ROWS, DIM, combiner=combiner)
    params = mod.init(jax.random.key(0), ids, w)
    table = params["params"]["embedding"]
    assert table.shape == (ROWS, DIM)
    assert float(jnp.max(jnp.abs(table))) <= 0.05  # SOK's default init
    out = mod.apply(params, ids, w)
    want = sok_jax.embed(table, ids, combiner=combiner, weights=w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)

    target = _target()
    first, last = _train(lambda p: jnp.mean((mod.apply(p, ids, w) - target) ** 2), params)
    assert last < 0.7 * first


def test_flax_linen_embed_custom_init_and_jit():
    pytest.importorskip("flax")
    from sok_jax.flax import Embed

    ids, _ = _ids(3)
    mod = Embed(ROWS, DIM, embedding_init=jax.nn.initializers.normal(1.0))
    params = mod.init(jax.random.key(1), ids)
    out = jax.jit(mod.apply)(params, ids)
    want = sok_jax.embed(params["params"]["embedding"], ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert float(jnp.std(params["params"]["embedding"])) > 0.5


def test_flax_nnx_embed():
    nnx = pytest.importorskip("flax.nnx")
    from sok_jax.flax import NNXEmbed

    ids, w = _ids(4)
    mod = NNXEmbed(ROWS, DIM, combiner="sum", rngs=nnx.Rngs(0))
    assert isinstance(mod.embedding, nnx.Param)
    table = mod.embedding[...]
    out = mod(ids, w)
    np.testing.assert_allclose(
        np.asarray(out),
        np.asarray(sok_jax.embed(table, ids, combiner="sum", weights=w)),
        rtol=1e-6,
        atol=1e-6,
    )

    target = _target()
    graphdef, params = nnx.split(mod, nnx.Param)

    def loss_fn(params):
        return jnp.mean((nnx.merge(graphdef, params)(ids, w) - target) ** 2)

    first, last = _train(loss_fn, params)
    assert last < 0.7 * first


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_haiku_embed(combiner):
    hk = pytest.importorskip("haiku")
    from sok_jax.haiku import Embed

    ids, w = _ids(5)
    f = hk.without_apply_rng(
        hk.transform(lambda ids, w: Embed(ROWS, DIM, combiner=combiner, name="emb")(ids, w))
    )
    params = f.init(jax.random.key(2), ids, w)
    table = params["emb"]["embedding"]
    assert table.shape == (ROWS, DIM)
    assert float(jnp.max(jnp.abs(table))) <= 0.05
    out = f.apply(params, ids, w)
    want = sok_jax.embed(table, ids, combiner=combiner, weights=w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)

    target = _target()
    first, last = _train(lambda p: jnp.mean((f.apply(p, ids, w) - target) ** 2), params)
    assert last < 0.7 * first


def test_param_dtype_is_storage_and_dtype_is_output():
    """Flax's names: param_dtype stores the table, dtype is the output's."""
    pytest.importorskip("flax")
    hk = pytest.importorskip("haiku")
    from flax import nnx

    from sok_jax.flax import Embed, NNXEmbed
    from sok_jax.haiku import Embed as HkEmbed

    ids, w = _ids(6)
    linen = Embed(ROWS, DIM, combiner="sum", param_dtype=jnp.bfloat16, dtype=jnp.float32)
    params = linen.init(jax.random.key(0), ids, w)
    table = params["params"]["embedding"]
    out = linen.apply(params, ids, w)
    mod = NNXEmbed(ROWS, DIM, param_dtype=jnp.bfloat16, dtype=jnp.float32, rngs=nnx.Rngs(0))
    f = hk.without_apply_rng(
        hk.transform(
            lambda ids, w: HkEmbed(ROWS, DIM, "sum", param_dtype=jnp.float16, name="e")(ids, w)
        )
    )
    hk_params = f.init(jax.random.key(1), ids, w)
    assert table.dtype == jnp.bfloat16 and mod.embedding[...].dtype == jnp.bfloat16
    assert hk_params["e"]["embedding"].dtype == jnp.float16
    assert out.dtype == jnp.float32 and mod(ids, w).dtype == jnp.float32
    assert f.apply(hk_params, ids, w).dtype == jnp.float16  # dtype None: the table's
    want = sok_jax.embed(table, ids, combiner="sum", weights=w).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("features", [0, -1, 2.5])
def test_modules_refuse_sizes_that_are_not_positive_integers(features):
    pytest.importorskip("flax")
    hk = pytest.importorskip("haiku")
    from flax import nnx

    from sok_jax.flax import Embed, NNXEmbed
    from sok_jax.haiku import Embed as HkEmbed

    ids, _ = _ids()
    with pytest.raises(ValueError, match="features must be a positive integer"):
        NNXEmbed(ROWS, features, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="features must be a positive integer"):
        Embed(ROWS, features).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="features must be a positive integer"):
        hk.transform(lambda ids: HkEmbed(ROWS, features)(ids)).init(jax.random.key(0), ids)
