"""The pure-JAX way to do a model-parallel embedding lookup (the comparison
program for `bench_distributed.py`).

What someone would write without sok_jax, with only `shard_map`, `argsort`,
`lax.all_to_all` and `jnp.take`. Table layout is the same as
`sok_jax.DistributedEmbedding` (direct mode): key k lives on device k % n at
local row k // n, the table is [n * rows_per_gpu, D] sharded P(axis, None), and
ids [B, slot_num, max_nnz] int32 (-1 = no key) are sharded P(axis).

Per device (N = local_batch * slot_num * max_nnz positions):
  1. owner = k % n (padding -> n, sorted last); `argsort` by owner (stable);
  2. bucket rank = sorted position - start of the owner's bucket; the send
     buffer [n, C] gets local row k // n at (owner, rank), -1 elsewhere, with
     C = N (every local key may go to one destination: never overflows) and no
     deduplication (a key repeated in the batch crosses the network each time);
  3. `all_to_all` the rows; the owner does `jnp.take` on its shard (-1 -> 0);
  4. `all_to_all` the [n*C, D] vectors back; un-permute to the N positions;
  5. masked mean over max_nnz (an empty bag gives zeros).

`jax.grad` of it w.r.t. the table is XLA's own transpose: the reverse
all_to_all of the vector cotangents and a scatter-add into the dense shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# `jax.shard_map` without replication checks on old and new jax alike: a
# version shim, not part of the program being compared.
from sok_jax.distributed import shard_map


def capacity(local_batch: int, slot_num: int, max_nnz: int) -> int:
    """Per-destination bucket of the baseline: all local positions."""
    return local_batch * slot_num * max_nnz


def make_lookup(mesh, axis_name: str):
    """Returns `lookup(table, ids) -> out [B, S, D]` (mean combiner), not jitted."""
    n = int(mesh.shape[axis_name])

    def body(table, ids):
        b, s, nnz = ids.shape
        d = table.shape[1]
        flat = ids.reshape(-1)
        N = flat.shape[0]
        C = N
        valid = flat >= 0
        owner = jnp.where(valid, flat % n, n)
        perm = jnp.argsort(owner, stable=True)
        s_owner = owner[perm]
        s_key = flat[perm]
        counts = jnp.bincount(owner, length=n + 1)
        start = jnp.cumsum(counts) - counts
        rank = jnp.arange(N, dtype=jnp.int32) - start[s_owner]
        s_valid = s_owner < n
        dest = jnp.where(s_valid, s_owner * C + rank, n * C)  # n*C: dropped
        send = (
            jnp.full((n * C,), -1, jnp.int32)
            .at[dest]
            .set(jnp.where(s_valid, s_key // n, -1).astype(jnp.int32), mode="drop")
        )
        recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)
        vecs = jnp.take(table, jnp.maximum(recv, 0), axis=0)
        vecs = jnp.where((recv >= 0)[:, None], vecs, 0.0)
        back = jax.lax.all_to_all(vecs, axis_name, 0, 0, tiled=True)  # [n*C, D]
        got = jnp.take(back, jnp.minimum(dest, n * C - 1), axis=0)
        got = jnp.where(s_valid[:, None], got, 0.0)
        inv = jnp.argsort(perm)  # un-permute: position i took sorted slot inv[i]
        per_pos = jnp.take(got, inv, axis=0).reshape(b, s, nnz, d)
        cnt = jnp.sum(valid.reshape(b, s, nnz), axis=-1, keepdims=True).astype(table.dtype)
        return jnp.sum(per_pos, axis=2) / jnp.maximum(cnt, 1.0)

    return shard_map(body, mesh, (P(axis_name, None), P(axis_name)), P(axis_name))
