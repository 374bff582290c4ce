"""Flax modules over `sok_jax.embed`: `Embed` (linen) and `NNXEmbed` (nnx).

The table is an ordinary parameter `[num_embeddings, features]`, so it is
initialized, checkpointed and trained like any other (jax.grad gives it the
dense cotangent built by sok_jax's deterministic kernel; any optax optimizer
works). For a table sharded over devices and sparse updates use
`sok_jax.DistributedEmbedding`.

Flax's names: `param_dtype` is the table's storage dtype, `dtype` the dtype
of the output (None: the table's); the lookup accumulates in float32 either
way and casts once.

Importing this module imports flax; `import sok_jax` alone never does.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from sok_jax.embedding import embed
from sok_jax.initializers import sok_default_init

# SOK's default initializer, uniform(-0.05, 0.05).
default_embed_init = sok_default_init


def _embed(table, ids, weights, combiner, slot_num, implementation, dtype):
    out = embed(
        table,
        ids,
        combiner=combiner,
        weights=weights,
        slot_num=slot_num,
        implementation=implementation,
    )
    return out if dtype is None else out.astype(dtype)


class Embed(nn.Module):
    """Bag-of-ids embedding (linen).

    Attributes:
      num_embeddings: rows of the table.
      features: D, the size of each vector.
      combiner: "sum", "mean" or "sqrtn": how the ids of one (sample, slot)
        are reduced.
      embedding_init: initializer of the [num_embeddings, features] table
        (default uniform(-0.05, 0.05), as SOK).
      param_dtype: the table's storage dtype (float32, bfloat16, float16).
      dtype: the output's dtype (None: the table's).
      slot_num: slots per sample, only for 2-D BCOO ids.
      implementation: "ffi" (the custom calls) or "reference" (pure JAX).

    Call with ids in any form `sok_jax.embed` takes (padded
    [batch, slot_num, max_nnz] with -1 for "no key", `sok_jax.RaggedIds`,
    BCOO) and optional per-id `weights`; returns [batch, slot_num, features].
    """

    num_embeddings: int
    features: int
    combiner: str = "mean"
    embedding_init: Callable[..., Any] = default_embed_init
    param_dtype: Any = jnp.float32
    dtype: Any = None
    slot_num: int | None = None
    implementation: str = "ffi"

    def setup(self):
        self.embedding = self.param(
            "embedding",
            self.embedding_init,
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids, weights=None):
        return _embed(
            self.embedding,
            ids,
            weights,
            self.combiner,
            self.slot_num,
            self.implementation,
            self.dtype,
        )


class NNXEmbed(nnx.Module):
    """Bag-of-ids embedding (flax.nnx); the table is `self.embedding`, an
    `nnx.Param` [num_embeddings, features]. Arguments as `Embed`; `rngs`
    (keyword-only) gives the table's initial values from its `params`
    stream."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        combiner: str = "mean",
        embedding_init: Callable[..., Any] = default_embed_init,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        slot_num: int | None = None,
        implementation: str = "ffi",
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.features = features
        self.combiner = combiner
        self.dtype = dtype
        self.slot_num = slot_num
        self.implementation = implementation
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
        )

    def __call__(self, ids, weights=None):
        return _embed(
            self.embedding[...],
            ids,
            weights,
            self.combiner,
            self.slot_num,
            self.implementation,
            self.dtype,
        )


__all__ = ["Embed", "NNXEmbed", "default_embed_init"]
