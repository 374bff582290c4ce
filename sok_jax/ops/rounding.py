"""Stochastic rounding of a sparse update's write into a 16-bit table or slot.

`StochasticRounding(seed, step)` asks an update (`optim_ops.*_update`,
`embed_ops.bwd_update` and their `reference` twins) to write the table's new
float32 values by stochastic rounding instead of round-to-nearest-even: each
value goes to one of its two neighbours in bfloat16 / float16 with
probability proportional to its distance from the other, so the expected
stored value is the float32 one and updates far below half an ulp still move
the weights on average. A float32 table stores its values as they are. A
16-bit optimizer slot (`slot_dtype`) is written by the same rule.

The random word of element (row, col) at step `step` is a pure function of
(seed, step, row, col) (`row`: the row's index in the table updated, a
shard's local row), so the CPU and CUDA targets and the pure-JAX
`stochastic_round` here write the same bits. Slot k of the row draws from
the row's key salted for k (`rounding_words(..., slot=k)`), never the bits of
its weight; a row-wise slot ([R]) is column 0. This module is the operation-
for-operation twin of xla_ffi/rounding_math.h (uint32 arithmetic only); that
file documents the rounding rule at the edges of each format.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from sok_jax.ops.hash_ops import _fmix32  # xla_ffi/hash_math.h Fmix32

__all__ = [
    "StochasticRounding",
    "check_seed",
    "rounding_call",
    "rounding_words",
    "stochastic_round",
]

_U32 = jnp.uint32


class StochasticRounding(NamedTuple):
    """Stochastic rounding of an update's writes into a 16-bit table and
    16-bit slots.

    Attributes:
      seed: a Python int in [0, 2**32).
      step: the update's step, an integer scalar >= 0 that may be traced
        (the optimizers pass their state's `count`); taken modulo 2**32.
    """

    seed: int
    step: Any


def check_seed(seed) -> int:
    """`seed` as a Python int: TypeError unless an integer (bools excluded),
    ValueError outside [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        try:
            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"seed must be an integer, got {seed!r}") from None
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
    return seed


def _step_word(step):
    """The step as a traced uint32 (integer dtypes only)."""
    step = jnp.asarray(step)
    if step.size != 1 or step.ndim > 1 or not jnp.issubdtype(step.dtype, jnp.integer):
        raise ValueError(
            f"stochastic_rounding.step must be an integer scalar, got {step.dtype} {step.shape}"
        )
    return step.reshape(()).astype(_U32)


def rounding_call(stochastic_rounding, *arrays):
    """What an update target takes for `stochastic_rounding` on `arrays` (its
    table and slots): the `stochastic_rounding` attribute (np.int32 0 or 1)
    and the float32 words appended to its hparams (rounding_math.h
    StochasticRounding: seed and step as 16-bit halves, low first). None, or
    float32 arrays only: (0, ())."""
    if stochastic_rounding is None or all(
        jnp.dtype(a.dtype) == jnp.float32 for a in arrays
    ):
        return np.int32(0), ()
    if not isinstance(stochastic_rounding, StochasticRounding):
        raise TypeError(
            "stochastic_rounding must be None or a StochasticRounding(seed, step), "
            f"got {type(stochastic_rounding).__name__}"
        )
    seed = check_seed(stochastic_rounding.seed)
    step = _step_word(stochastic_rounding.step)
    halves = (
        jnp.float32(seed & 0xFFFF),
        jnp.float32(seed >> 16),
        (step & 0xFFFF).astype(jnp.float32),
        (step >> 16).astype(jnp.float32),
    )
    return np.int32(1), halves


# ---------------------------------------------------------------------------
# The pure-JAX twin of xla_ffi/rounding_math.h
# ---------------------------------------------------------------------------


_SEED_SALT = 0x9E3779B9
_COLUMN_STEP = 0x9E3779B9
_SLOT_SALTS = (0x85EBCA6B, 0xC2B2AE35)  # rounding_math.h kRoundingSlotSalt0, 1


def rounding_words(seed, step, rows, cols, slot=None):
    """uint32 random words of the elements (rows[i], cols[j]) at (seed, step):
    [len(rows), len(cols)]; with `slot` (0 or 1), those of that optimizer
    slot of the rows (rounding_math.h RoundingSlotKey). `rows`, `cols`:
    integer arrays (rows taken modulo 2**32)."""
    step_key = _fmix32(_fmix32(_U32(check_seed(seed) ^ _SEED_SALT)) ^ _step_word(step))
    row_key = _fmix32(step_key ^ jnp.asarray(rows).astype(_U32))
    if slot is not None:
        row_key = _fmix32(row_key ^ _U32(_SLOT_SALTS[slot]))
    cols = jnp.asarray(cols).astype(_U32)
    return _fmix32(row_key[:, None] + cols[None, :] * _U32(_COLUMN_STEP))


def _bf16_bits(u, r):
    nan = (u & _U32(0x7FFFFFFF)) > _U32(0x7F800000)
    return jnp.where(nan, (u >> 16) | _U32(0x40), (u + (r & _U32(0xFFFF))) >> 16)


def _f16_bits(u, r):
    sign = (u >> 16) & _U32(0x8000)
    a = u & _U32(0x7FFFFFFF)
    # float16 normals (and overflow)
    t = a + (r & _U32(0x1FFF))
    normal = sign | (((t >> 23) - _U32(112)) << 10) | ((t >> 13) & _U32(0x3FF))
    normal = jnp.where(t >= _U32(0x47800000), sign | _U32(0x7C00), normal)
    # float16 subnormals: |x| = m / 2^s steps of 2^-24
    e = a >> 23
    m = (a & _U32(0x7FFFFF)) | _U32(0x800000)
    s = _U32(126) - jnp.minimum(e, _U32(126))
    short = s < _U32(32)
    s_in = jnp.where(short, s, _U32(0))
    mask = (_U32(1) << s_in) - _U32(1)
    up_short = (r & mask) < (m & mask)
    drop = jnp.where(short, _U32(0), s - _U32(32))
    top = jnp.where(drop < _U32(24), m >> jnp.minimum(drop, _U32(31)), _U32(0))
    up_long = r < top
    q = jnp.where(short, m >> s_in, _U32(0))
    up = jnp.where(short, up_short, up_long).astype(_U32)
    sub = jnp.where(e == _U32(0), sign, sign | (q + up))
    out = jnp.where(a >= _U32(0x38800000), normal, sub)
    return jnp.where(a > _U32(0x7F800000), sign | _U32(0x7E00), out)


def stochastic_round(x, dtype, words):
    """float32 `x` stochastically rounded to `dtype` with the uint32 random
    `words` (same shape): bfloat16 or float16; float32 returns `x`."""
    dtype = jnp.dtype(dtype)
    x = jnp.asarray(x, jnp.float32)
    if dtype == jnp.float32:
        return x
    u = lax.bitcast_convert_type(x, _U32)
    if dtype == jnp.bfloat16:
        bits = _bf16_bits(u, words)
    elif dtype == jnp.float16:
        bits = _f16_bits(u, words)
    else:
        raise ValueError(f"stochastic rounding writes bfloat16 or float16, got {dtype}")
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), dtype)
