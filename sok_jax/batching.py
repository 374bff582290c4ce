"""Batches the devices do not divide: `pad_batch` rounds the last, short
batch of an epoch up to a multiple of the device count with samples that
look up nothing, and says which samples are real.

    padded = sok_jax.pad_batch(batch, emb.num_devices)
    out, state = emb.apply(state, padded.batch, training=False)
    out = out[padded.mask]                      # the real samples' outputs

Padding samples hold the "no key" value in every id (key-dtype) array, so
they look up nothing, count nowhere and get no gradient; every other array
(weights, dense features, labels) is padded with zeros.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from sok_jax.ids import RaggedIds
from sok_jax.ops import checks


class PaddedBatch(NamedTuple):
    """batch: the given structure, each array's leading (sample) axis padded
    to a multiple; mask: bool [padded size], True for the real samples (the
    first `count`); count: the real samples."""

    batch: Any
    mask: np.ndarray
    count: int


def _is_leaf(x) -> bool:
    return isinstance(x, (RaggedIds, jsparse.BCOO))


def _samples(x) -> int:
    """The samples of one leaf of a batch."""
    if isinstance(x, jsparse.BCOO):
        raise ValueError(
            "pad_batch takes padded ids (arrays) or RaggedIds, not BCOO: convert the BCOO "
            "to padded ids first"
        )
    if isinstance(x, RaggedIds):
        return (int(x.offsets.shape[0]) - 1) // x.slot_num
    if not hasattr(x, "shape") or len(x.shape) == 0:
        raise ValueError(
            f"pad_batch: every leaf must be an array with a leading sample axis, got {x!r}"
        )
    return int(x.shape[0])


def _fill(dtype):
    """The padding value of an array: "no key" for key dtypes, else zero."""
    dt = np.dtype(dtype)
    return checks.padding_value(dt) if dt in checks.KEY_DTYPES else dt.type(0)


def _pad(x, extra: int):
    """One leaf with `extra` padding samples appended."""
    if isinstance(x, RaggedIds):  # empty bags: offsets repeat their end
        xp = np if isinstance(x.offsets, np.ndarray) else jnp
        tail = xp.full((extra * x.slot_num,), x.offsets[-1], dtype=x.offsets.dtype)
        return RaggedIds(x.values, xp.concatenate([x.offsets, tail]), x.slot_num)
    xp = np if isinstance(x, (np.ndarray, np.generic)) else jnp
    widths = [(0, extra)] + [(0, 0)] * (len(x.shape) - 1)
    return xp.pad(x, widths, constant_values=_fill(x.dtype))


def pad_batch(batch, multiple: int) -> PaddedBatch:
    """Pads a batch's samples to a multiple of `multiple` (the devices of the
    layer's axis: `emb.num_devices`).

    Args:
      batch: padded ids [B, ...] (numpy or jax), `RaggedIds` (padded with
        empty bags), or any pytree of them with arrays beside (a
        collection's {feature: ids}, weights, dense features, labels), all
        with the same B samples.
      multiple: a positive int.

    Returns:
      A `PaddedBatch`: the batch with ceil(B / multiple) * multiple samples,
      the mask of the real ones and their count. Numpy arrays stay numpy.

    Raises:
      ValueError: no arrays, leaves of different sample counts, a BCOO leaf,
        or `multiple` not a positive int.
    """
    multiple = checks.positive_int("multiple", multiple)
    leaves = jax.tree.leaves(batch, is_leaf=_is_leaf)
    sizes = sorted({_samples(x) for x in leaves})
    if len(sizes) != 1:
        raise ValueError(
            "pad_batch: every array needs the same number of samples (leading axis), got "
            f"{sizes or 'no arrays'}"
        )
    count = sizes[0]
    extra = -count % multiple
    padded = jax.tree.map(lambda x: _pad(x, extra), batch, is_leaf=_is_leaf)
    return PaddedBatch(padded, np.arange(count + extra) < count, count)


__all__ = ["PaddedBatch", "pad_batch"]
