"""Moving whole arrays between the host and a mesh that may span several
processes (JAX's multi-controller runtime, `jax.distributed`): the one
place the host helpers (export, import, inspection, `check_stats`) read or
write global arrays.

A global array is read on every process: directly where this process holds
all of it, gathered over the processes otherwise. A host array goes to the
mesh from every process, each writing the shards on its own devices; it
must then be the same on every process (checked), or be this process's
share of a whole that `gather_shares` assembles first.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x):
    """The whole of `x` (a jax.Array, possibly spanning processes) as numpy,
    on every process; None stays None."""
    if x is None:
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _digest(x: np.ndarray) -> np.ndarray:
    h = hashlib.sha256(np.ascontiguousarray(x).tobytes() + str(x.shape).encode()).digest()
    return np.frombuffer(h[:16], np.uint32)


def check_same_on_every_process(what: str, *arrays) -> None:
    """Raises ValueError when the processes pass different `arrays`."""
    if jax.process_count() == 1:
        return
    mine = np.concatenate([_digest(np.asarray(a)) for a in arrays])
    every = np.asarray(multihost_utils.process_allgather(mine))
    if not (every == mine[None]).all():
        raise ValueError(
            f"{what}: the processes passed different arrays; pass the same on every process, "
            "or each process's share with share=True"
        )


def from_host(x, sharding) -> jax.Array:
    """A global array of `sharding` holding the host array `x` (the same on
    every process)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def gather_shares(*arrays):
    """Each process's share of some rows (arrays of equal length per
    process, different between processes) -> the concatenation of every
    process's share, in process order, on every process."""
    if jax.process_count() == 1:
        return tuple(np.asarray(a) for a in arrays)
    arrays = [np.asarray(a) for a in arrays]
    length = np.asarray([arrays[0].shape[0]], np.int64)
    lengths = np.asarray(multihost_utils.process_allgather(length)).reshape(-1)
    most = int(lengths.max())
    out = []
    for a in arrays:
        padded = np.zeros((most, *a.shape[1:]), a.dtype)
        padded[: a.shape[0]] = a
        every = np.asarray(multihost_utils.process_allgather(padded))
        out.append(np.concatenate([every[p, : lengths[p]] for p in range(len(lengths))]))
    return tuple(out)


def device_blocks(owner, n: int, columns, width: int | None = None):
    """Host: per-key arrays laid out as `n` blocks of `width` rows, one per
    device, for an input sharded over the axis: block d holds the keys with
    owner[i] == d in their order, then the column's fill value.

    Args:
      owner: int [K], each key's block in [0, n).
      columns: (array [K, ...], fill) pairs.
      width: rows per block (default: the largest block's, at least 1).

    Returns:
      (the blocks, one [n * width, ...] array per column; int64 [K], the
      flat position of each key in them).
    """
    owner = np.asarray(owner, np.int64).reshape(-1)
    counts = np.bincount(owner, minlength=n)
    most = int(counts.max(initial=0))
    width = max(most, 1) if width is None else int(width)
    if most > width:
        raise ValueError(f"device_blocks: a block holds {most} keys, more than width={width}")
    order = np.argsort(owner, kind="stable")
    starts = np.cumsum(counts) - counts
    at = np.empty(owner.shape[0], np.int64)
    at[order] = owner[order] * width + np.arange(owner.shape[0]) - starts[owner[order]]
    blocks = []
    for values, fill in columns:
        values = np.asarray(values)
        block = np.full((n * width, *values.shape[1:]), fill, values.dtype)
        block[at] = values
        blocks.append(block)
    return blocks, at
