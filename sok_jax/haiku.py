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
import jax
import jax.numpy as jnp

from sok_jax.embedding import embed


def _sok_default_init(shape, dtype=jnp.float32):
    # Haiku initializers take (shape, dtype) and draw from hk.next_rng_key().
    return jax.random.uniform(hk.next_rng_key(), shape, dtype, -0.05, 0.05)


class Embed(hk.Module):
    """Bag-of-ids embedding.

    Args:
      num_embeddings: rows of the table.
      features: D, the size of each vector.
      combiner: "sum", "mean" or "sqrtn".
      embedding_init: Haiku initializer `init(shape, dtype)` of the table
        (default uniform(-0.05, 0.05), as SOK).
      dtype: the table's parameter dtype.
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
        dtype: Any = jnp.float32,
        slot_num: int | None = None,
        implementation: str = "ffi",
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.num_embeddings = num_embeddings
        self.features = features
        self.combiner = combiner
        self.embedding_init = embedding_init or _sok_default_init
        self.dtype = dtype
        self.slot_num = slot_num
        self.implementation = implementation

    def __call__(self, ids, weights=None):
        table = hk.get_parameter(
            "embedding", (self.num_embeddings, self.features), self.dtype, init=self.embedding_init
        )
        return embed(
            table,
            ids,
            combiner=self.combiner,
            weights=weights,
            slot_num=self.slot_num,
            implementation=self.implementation,
        )


__all__ = ["Embed"]
