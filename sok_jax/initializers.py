"""Per-key initialization: a row's initial vector is a function of the seed
(for a table of a collection: the seed folded with the table's name) and the
global key alone, never of the device count, the placement, the shard or (in
hash mode) the row a key lands in. So the logical table key -> vector is the
same on 1 or 8 devices, under every placement and in any insertion order.
"""

from __future__ import annotations

import zlib
from typing import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def _uniform_symmetric(scale: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


# SOK's default initializer: uniform(-0.05, 0.05), `init(key, shape, dtype)`.
sok_default_init: Initializer = _uniform_symmetric(0.05)

_NAMED = {
    "random_uniform": lambda: sok_default_init,
    "uniform": lambda: sok_default_init,
    "random_normal": lambda: jax.nn.initializers.normal(0.05),
    "normal": lambda: jax.nn.initializers.normal(0.05),
    "truncated_normal": lambda: jax.nn.initializers.truncated_normal(0.05),
    "zeros": lambda: jax.nn.initializers.zeros,
    "ones": lambda: jax.nn.initializers.ones,
}


def resolve(initializer) -> Initializer:
    """A name from SOK/Keras ("random_uniform", "zeros", ...) or a callable
    `init(key, shape, dtype)` such as any `jax.nn.initializers` entry that
    accepts a 1-D shape."""
    if callable(initializer):
        return initializer
    if initializer not in _NAMED:
        raise ValueError(
            f"embedding_initializer must be a callable or one of {sorted(_NAMED)}, "
            f"got {initializer!r}"
        )
    return _NAMED[initializer]()


def as_key(seed):
    """An int seed, a typed PRNG key, or raw uint32[2] key data -> typed key."""
    if hasattr(seed, "dtype") and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if hasattr(seed, "shape") and tuple(seed.shape) == (2,) and seed.dtype == jnp.uint32:
        return jax.random.wrap_key_data(seed)
    return jax.random.key(seed)


def _key_words(keys):
    """A 64-bit key as two uint32 words, so fold_in sees all of it."""
    if keys.dtype == jnp.int64 or keys.dtype == jnp.uint64:
        lo = (keys & 0xFFFFFFFF).astype(jnp.uint32)
        hi = (keys >> 32).astype(jnp.uint32)
        return lo, hi
    return keys.astype(jnp.uint32), jnp.zeros(keys.shape, jnp.uint32)


def init_rows(initializer: Initializer, seed, keys, dim: int, dtype=jnp.float32, *, into=None):
    """Initial vectors [len(keys), dim] of the given global keys; with
    `into=(table, row)`, written into `table` at rows [row, row + len(keys))
    instead, and the table returned.

    Large key sets are initialized in blocks of `_INIT_BLOCK` keys (a loop
    writing each block in place), so that the temporaries stay a block's
    size, not the table's."""
    base = as_key(seed)
    lo, hi = _key_words(keys)

    def one(a, b):
        k = jax.random.fold_in(jax.random.fold_in(base, a), b)
        return initializer(k, (dim,), jnp.float32)

    n = keys.shape[0]
    out, base_row = into if into is not None else (None, 0)
    if n <= _INIT_BLOCK:
        rows = jax.vmap(one)(lo, hi).astype(dtype)
        return rows if out is None else jax.lax.dynamic_update_slice(out, rows, (base_row, 0))

    # Blocks written in place into the output; the last block starts at
    # n - _INIT_BLOCK (it may redo rows of the one before: the same values).
    def block(i, out):
        start = jnp.minimum(i * _INIT_BLOCK, n - _INIT_BLOCK)
        words = (jax.lax.dynamic_slice(w, (start,), (_INIT_BLOCK,)) for w in (lo, hi))
        rows = jax.vmap(one)(*words).astype(dtype)
        return jax.lax.dynamic_update_slice(out, rows, (base_row + start, 0))

    out = jnp.zeros((n, dim), dtype) if out is None else out
    return jax.lax.fori_loop(0, -(-n // _INIT_BLOCK), block, out)


_INIT_BLOCK = 1 << 20


def table_id(name: str) -> int:
    """A stable 31-bit id of a table name (not of its position in a list), so
    that adding or reordering tables leaves every other table's vectors."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def table_seed(seed, tid):
    """The key data of one table's vectors: `seed` folded with its id (a
    Python int or a traced int32, e.g. picked per device)."""
    return jax.random.key_data(jax.random.fold_in(as_key(seed), tid))
