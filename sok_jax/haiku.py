"""Haiku module over `sok_jax.embed`.

The table is an ordinary Haiku parameter `[num_embeddings, features]`
(`hk.get_parameter("embedding", ...)`), trained like any other through
`jax.grad` + optax. For a table sharded over devices and sparse updates use
`sok_jax.DistributedEmbedding`.

Importing this module imports haiku; `import sok_jax` alone never does.
"""

from __future__ import annotations

from typing import Any, Callable

import haiku as hk
import jax.numpy as jnp

from sok_jax.embedding import embed
from sok_jax.initializers import sok_default_init
from sok_jax.ops import checks


def default_embed_init(shape, dtype=jnp.float32):
    """SOK's default initializer, uniform(-0.05, 0.05), as a Haiku
    initializer: `(shape, dtype)`, drawing from `hk.next_rng_key()`."""
    return sok_default_init(hk.next_rng_key(), shape, dtype)


class Embed(hk.Module):
    """Bag-of-ids embedding.

    Args:
      num_embeddings: rows of the table.
      features: D, the size of each vector.
      combiner: "sum", "mean" or "sqrtn".
      embedding_init: Haiku initializer `init(shape, dtype)` of the table
        (default uniform(-0.05, 0.05), as SOK).
      param_dtype: the table's storage dtype (float32, bfloat16, float16).
      dtype: the output's dtype (None: the table's).
      slot_num: slots per sample, only for 2-D BCOO ids.
      implementation: "ffi" (the custom calls) or "reference" (pure JAX).
      name: module name.

    Call with ids in any form `sok_jax.embed` takes and optional per-id
    `weights`; returns [batch, slot_num, features].
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        combiner: str = "mean",
        embedding_init: Callable[..., Any] | None = None,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        slot_num: int | None = None,
        implementation: str = "ffi",
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.num_embeddings = checks.positive_int("num_embeddings", num_embeddings)
        self.features = checks.positive_int("features", features)
        self.combiner = combiner
        self.embedding_init = embedding_init or default_embed_init
        self.param_dtype = param_dtype
        self.dtype = dtype
        self.slot_num = slot_num
        self.implementation = implementation

    def __call__(self, ids, weights=None):
        table = hk.get_parameter(
            "embedding",
            (self.num_embeddings, self.features),
            self.param_dtype,
            init=self.embedding_init,
        )
        out = embed(
            table,
            ids,
            combiner=self.combiner,
            weights=weights,
            slot_num=self.slot_num,
            implementation=self.implementation,
        )
        return out if self.dtype is None else out.astype(self.dtype)


__all__ = ["Embed", "default_embed_init"]


class ShardedEmbed(hk.Module):
    """A `sok_jax.DistributedEmbedding` or `sok_jax.EmbeddingCollection` as a
    Haiku module (use `hk.transform_with_state`). Its state is the Haiku
    state "state" of this module; the sparse optimizer state is yours, beside
    it (`layer.init_optimizer(opt, state[module_name]["state"])`).

    Called, it looks up (the dense path, differentiable w.r.t. the tables);
    with `sparse=True` it returns (outputs, ctx) for `layer.sparse_update(
    state, opt, opt_state, ctx, d_out)` on the state it leaves, and takes
    `prefetch=` (the next batch's ids, for host-cached tables: the layer's
    `lookup`).

    Args:
      layer: the sharded layer.
      seed: its `init` seed.
      name: module name.
    """

    def __init__(self, layer, seed: int = 0, name: str | None = None):
        super().__init__(name=name)
        self.layer = layer
        self.seed = seed

    def __call__(
        self, ids, weights=None, *, training: bool = True, sparse: bool = False, prefetch=None
    ):
        # The state is a pytree, not one array: shape and dtype are only asked for.
        state = hk.get_state("state", (), jnp.float32, init=lambda *_: self.layer.init(self.seed))
        if sparse:
            out, ctx, state = self.layer.lookup(
                state, ids, weights, training=training, prefetch=prefetch
            )
            hk.set_state("state", state)
            return out, ctx
        out, state = self.layer.apply(state, ids, weights, training=training)
        hk.set_state("state", state)
        return out


__all__ += ["ShardedEmbed"]
