"""Flax modules.

* `Embed` (linen) and `NNXEmbed` (NNX) over `sok_jax.embed`: one table as an
  ordinary parameter `[num_embeddings, features]`, initialized,
  checkpointed and trained like any other (jax.grad gives it the dense
  cotangent built by sok_jax's deterministic kernel; any optax optimizer).
* `ShardedEmbedding` (NNX) and `ShardedEmbed` (linen) over the sharded
  layers, `sok_jax.DistributedEmbedding` and `sok_jax.EmbeddingCollection`:
  their state lives in variables of its own collection, trained with the
  fused sparse update.

Flax's names: `param_dtype` is the table's storage dtype, `dtype` the dtype
of the output (None: the table's); the lookup accumulates in float32 either
way and casts once.

Importing this module imports flax; `import sok_jax` alone never does.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from sok_jax.distributed.state import check_stats
from sok_jax.embedding import embed
from sok_jax.initializers import sok_default_init
from sok_jax.ops import checks

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
        checks.positive_int("num_embeddings", self.num_embeddings)
        checks.positive_int("features", self.features)
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
        self.num_embeddings = checks.positive_int("num_embeddings", num_embeddings)
        self.features = checks.positive_int("features", features)
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


# --------------------------------------------------------------------------
# Sharded layers: DistributedEmbedding and EmbeddingCollection as modules.


class EmbeddingTables(nnx.Variable):
    """The functional state of a sharded layer (its tables, hash keys,
    counters and seed: an `EmbeddingState` or a `CollectionState`), a
    variable collection of its own: `nnx.state(model, EmbeddingTables)`."""


class EmbeddingSlots(nnx.Variable):
    """A sharded layer's sparse optimizer state (slots laid out like its
    tables): `nnx.state(model, EmbeddingSlots)`."""


def _value(var):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _assign(var, value):
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


class ShardedEmbedding(nnx.Module):
    """A `sok_jax.DistributedEmbedding` or `sok_jax.EmbeddingCollection` as an
    NNX module. Its state is an `EmbeddingTables` variable (sharded as the
    layer's `state_shardings()` say), and with `optimizer` (a
    `sok_jax.optim.SparseOptimizer`) its optimizer state an `EmbeddingSlots`
    variable; `nnx.state(model)` and orbax see both.

    The sparse step, in one jitted function (the dense parameters trained by
    optax, the tables by the fused sparse update):

        outs, ctx = model.embedding.lookup(ids)            # no gradient to the tables
        loss, (grads, d_outs) = nnx.value_and_grad(loss_fn, argnums=(0, 1))(model, outs)
        dense_optimizer.update(model, grads)                # nnx.Optimizer over nnx.Param
        model.embedding.sparse_update(ctx, d_outs)         # touched rows + slots in place

    `loss_fn(model, outs)` runs the dense part on the embedding outputs.
    `__call__` is the layer's `apply` (the dense-compatible lookup). Every
    lookup takes `training`, True by default as the layer's own methods (and
    SOK's): a hash table inserts, admits, evicts and stamps scores; evaluate
    with `training=False`, which only looks up.

    Args:
      layer: the sharded layer.
      seed: its `init` seed.
      optimizer: the sparse optimizer of `sparse_update`, or None.
      state: the layer's state to start from instead of `layer.init(seed)`
        (an `import_pairs` result, a checkpoint, a table initialized by your
        own program); the optimizer state starts fresh for it.
    """

    def __init__(self, layer, *, seed=0, optimizer=None, state=None):
        self.layer = layer
        self.optimizer = optimizer
        if state is None:
            state = layer.init(seed)
        self.tables = EmbeddingTables(state)
        self.slots = EmbeddingSlots(
            layer.init_optimizer(optimizer, state) if optimizer is not None else None
        )

    def __call__(self, ids, weights=None, *, training: bool = True):
        out, state = self.layer.apply(_value(self.tables), ids, weights, training=training)
        _assign(self.tables, state)
        return out

    def lookup(self, ids, weights=None, *, training: bool = True, prefetch=None):
        """The sparse path: (outputs, ctx); the outputs carry no gradient to
        the tables. Give their cotangent to `sparse_update(ctx, d_out)`.
        `prefetch`: the next batch's ids, for host-cached tables (the
        layer's `lookup`)."""
        out, ctx, state = self.layer.lookup(
            _value(self.tables), ids, weights, training=training, prefetch=prefetch
        )
        _assign(self.tables, state)
        return out, ctx

    def sparse_update(self, ctx, d_out):
        """The touched rows and their optimizer slots updated in place."""
        if self.optimizer is None:
            raise ValueError(
                "ShardedEmbedding.sparse_update needs the module built with optimizer="
            )
        state, slots = self.layer.sparse_update(
            _value(self.tables), self.optimizer, _value(self.slots), ctx, d_out
        )
        _assign(self.tables, state)
        _assign(self.slots, slots)

    @property
    def state(self):
        """The layer's state (for `export_pairs`, `check_stats`, ...)."""
        return _value(self.tables)

    def set_state(self, state) -> None:
        """Replaces the layer's state (with one the layer's own methods
        returned, e.g. `apply` differentiated w.r.t. the table; the
        optimizer state stays)."""
        _assign(self.tables, state)

    def check(self) -> None:
        """`sok_jax.check_stats` of the state (its counters accumulate from
        init)."""
        check_stats(_value(self.tables))

    def state_shardings(self):
        """The NamedShardings of `nnx.state(self)`, the same tree with a
        sharding for each array (the layer's `state_shardings()` and
        `optimizer_shardings`): jit's in/out_shardings of a step that carries
        the module's state split off (`nnx.split`) and donates it."""
        tables = self.layer.state_shardings()
        slots = _value(self.slots)
        slots = None if slots is None else self.layer.optimizer_shardings(slots)

        def sharding_of(var):
            return var.replace(tables if isinstance(var, EmbeddingTables) else slots)

        return jax.tree.map(
            sharding_of,
            nnx.state(self),
            is_leaf=lambda x: isinstance(x, (EmbeddingTables, EmbeddingSlots)),
        )


class ShardedEmbed(nn.Module):
    """A `sok_jax.DistributedEmbedding` or `sok_jax.EmbeddingCollection` as a
    linen module. Its state is the variable "state" of the collection
    "embedding" (make it mutable in `apply`); the sparse optimizer state is
    yours, beside it (`layer.init_optimizer(opt, variables["embedding"][...]
    ["state"])`).

    `module.apply(variables, ids, mutable=["embedding"])` looks up (the dense
    path: differentiable w.r.t. the tables); with `sparse=True` it returns
    (outputs, ctx) for `layer.sparse_update(state, opt, opt_state, ctx,
    d_out)` on the state it left in `variables["embedding"]`.

    Attributes:
      layer: the sharded layer.
      seed: its `init` seed.
    """

    layer: Any
    seed: int = 0

    @nn.compact
    def __call__(self, ids, weights=None, *, training: bool = True, sparse: bool = False):
        var = self.variable("embedding", "state", lambda: self.layer.init(self.seed))
        if sparse:
            out, ctx, var.value = self.layer.lookup(var.value, ids, weights, training=training)
            return out, ctx
        out, var.value = self.layer.apply(var.value, ids, weights, training=training)
        return out


__all__ += ["EmbeddingSlots", "EmbeddingTables", "ShardedEmbed", "ShardedEmbedding"]
