"""Flax modules over `sok_jax.embed`: `Embed` (linen) and `NNXEmbed` (nnx).

The table is an ordinary parameter `[num_embeddings, features]`, so it is
initialized, checkpointed and trained like any other (jax.grad gives it the
dense cotangent built by sok_jax's deterministic kernel; any optax optimizer
works). For a table sharded over devices and sparse updates use
`sok_jax.DistributedEmbedding`.

Importing this module imports flax; `import sok_jax` alone never does.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sok_jax.embedding import embed


def _sok_default_init(key, shape, dtype=jnp.float32):
    """SOK's default: uniform(-0.05, 0.05)."""
    return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


class Embed(nn.Module):
    """Bag-of-ids embedding (linen).

    Attributes:
      num_embeddings: rows of the table.
      features: D, the size of each vector.
      combiner: "sum", "mean" or "sqrtn": how the ids of one (sample, slot)
        are reduced.
      embedding_init: initializer of the [num_embeddings, features] table
        (default uniform(-0.05, 0.05), as SOK).
      dtype: the table's parameter dtype (float32, bfloat16, float16).
      slot_num: slots per sample, only for 2-D BCOO ids.
      implementation: "ffi" (the custom calls) or "reference" (pure JAX).

    Call with ids in any form `sok_jax.embed` takes (padded
    [batch, slot_num, max_nnz] with -1 for "no key", `sok_jax.RaggedIds`,
    BCOO) and optional per-id `weights`; returns [batch, slot_num, features].
    """

    num_embeddings: int
    features: int
    combiner: str = "mean"
    embedding_init: Callable[..., Any] = _sok_default_init
    dtype: Any = jnp.float32
    slot_num: int | None = None
    implementation: str = "ffi"

    def setup(self):
        self.embedding = self.param(
            "embedding", self.embedding_init, (self.num_embeddings, self.features), self.dtype
        )

    def __call__(self, ids, weights=None):
        return embed(
            self.embedding,
            ids,
            combiner=self.combiner,
            weights=weights,
            slot_num=self.slot_num,
            implementation=self.implementation,
        )


try:  # flax.nnx exists from flax 0.8 on
    from flax import nnx
except ImportError:  # pragma: no cover - older flax
    nnx = None

if nnx is not None:

    class NNXEmbed(nnx.Module):
        """Bag-of-ids embedding (flax.nnx); the table is `self.embedding`, an
        `nnx.Param` [num_embeddings, features]. Arguments as `Embed`, plus
        `rngs` (uses its `params` stream)."""

        def __init__(
            self,
            num_embeddings: int,
            features: int,
            *,
            combiner: str = "mean",
            embedding_init: Callable[..., Any] = _sok_default_init,
            dtype: Any = jnp.float32,
            slot_num: int | None = None,
            implementation: str = "ffi",
            rngs: "nnx.Rngs",
        ):
            self.num_embeddings = num_embeddings
            self.features = features
            self.combiner = combiner
            self.slot_num = slot_num
            self.implementation = implementation
            self.embedding = nnx.Param(
                embedding_init(rngs.params(), (num_embeddings, features), dtype)
            )

        def __call__(self, ids, weights=None):
            return embed(
                self.embedding[...],
                ids,
                combiner=self.combiner,
                weights=weights,
                slot_num=self.slot_num,
                implementation=self.implementation,
            )


__all__ = ["Embed"] + (["NNXEmbed"] if nnx is not None else [])
