"""Row strategies: how a shard maps keys to its rows, chosen once when a
layer is built.

* `DirectRows`: the key is the row. Key k lives on device k % n at local row
  k // n; the physical (sharded) table holds it at global row
  (k % n) * rows_per_device + k // n (`global_rows`, the one place this
  layout is written). Keys must lie in [0, n * rows_per_device).
* `HashRows`: any integer key. Key k lives on device k % n, at the row its
  shard's hash table (`state.slot_keys`, see `sok_jax.ops.hash_ops`) gives
  it; training lookups insert unseen keys and initialize their rows.

Each strategy says what crosses the network for a key (`bucket_keys`), finds
the rows of the keys an owner received (`owner_rows`), creates a shard
(`init_shard`) and moves the logical (key, vector) pairs in and out of a
state (`export_pairs`, `import_pairs`). A key's initial vector depends only
on the seed and the key (`sok_jax.initializers.init_rows`), so the logical
table is the same under both strategies and on any device count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax import initializers
from sok_jax._compat import shard_map
from sok_jax.ops import checks, hash_ops


class BucketKeys(NamedTuple):
    """Per id position: whether it is a key of the table, the device that
    owns it, and the value sent to the owner for it (`value_bound`: when not
    None, every value lies in [0, value_bound), so the exchange plan may pack
    (owner, value) into one int32 sort key)."""

    valid: jax.Array
    owner: jax.Array
    value: jax.Array
    value_bound: int | None


class OwnerRows(NamedTuple):
    """On the owner, for the keys it received: the shard after any insertion
    (`table` and `slot_keys`, None when unchanged), the local row of each
    received key (-1: none) and the count of keys that found no row."""

    table: Any
    slot_keys: Any
    rows: jax.Array
    hash_full: jax.Array


@dataclasses.dataclass(frozen=True)
class _Shards:
    """What both strategies know of the layer: its mesh axis, its shard
    size and row format, and how a new key's vector is initialized."""

    mesh: Mesh
    axis_name: str
    num_devices: int
    rows_per_device: int
    dim: int
    dtype: Any
    initializer: Callable

    @property
    def table_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.axis_name, None))

    @property
    def row_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.axis_name))

    def owner(self, keys):
        return jnp.remainder(keys, self.num_devices).astype(jnp.int32)

    def check_pairs(self, keys, vectors):
        keys, vectors = np.asarray(keys), np.asarray(vectors)
        if keys.ndim != 1 or vectors.shape != (keys.shape[0], self.dim):
            raise ValueError(
                f"keys must be [K] and vectors [K, {self.dim}], got {keys.shape} and "
                f"{vectors.shape}"
            )
        if len(np.unique(keys)) != len(keys):
            raise ValueError("keys must be distinct")
        return keys, vectors


@dataclasses.dataclass(frozen=True)
class DirectRows(_Shards):
    """The key is the row (see the module docstring)."""

    uses_slot_keys = False

    @property
    def num_rows(self) -> int:
        return self.num_devices * self.rows_per_device

    def global_rows(self, keys):
        """Row of each key in the physical [n * rows_per_device, D] table."""
        keys = np.asarray(keys, np.int64)
        n = self.num_devices
        return (keys % n) * self.rows_per_device + keys // n

    def bucket_keys(self, flat_ids) -> BucketKeys:
        valid, keys = checks.valid_rows(flat_ids, self.num_rows)
        owner = jnp.where(valid, self.owner(keys), self.num_devices)
        local = jnp.where(valid, keys // self.num_devices, 0).astype(jnp.int32)
        return BucketKeys(valid, owner, local, self.rows_per_device)

    def send_format(self, key_dtype):
        """(dtype, value of an empty bucket slot) of what is sent: local rows."""
        del key_dtype
        return jnp.dtype(jnp.int32), -1

    def init_shard(self, seed, device):
        """Device `device`'s shard: the initial vector of each of its keys
        (local row r holds key r * n + device); no hash table."""
        local = jnp.arange(self.rows_per_device, dtype=jnp.int32)
        keys = local * self.num_devices + device
        return initializers.init_rows(self.initializer, seed, keys, self.dim, self.dtype), None

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        """The received values are local rows already (-1: an empty slot)."""
        del table, slot_keys, seed, training
        return OwnerRows(None, None, received, jnp.zeros((), jnp.int32))

    def export_pairs(self, state):
        table = np.asarray(jax.device_get(state.table))
        keys = np.arange(self.num_rows, dtype=np.int64)
        return keys, table[self.global_rows(keys)]

    def import_pairs(self, state, keys, vectors):
        """`state` with the given pairs written over its initial vectors."""
        keys, vectors = self.check_pairs(keys, vectors)
        k = keys.astype(np.int64)
        if k.size and (k.min() < 0 or k.max() >= self.num_rows):
            raise ValueError(f"direct-mode keys must lie in [0, {self.num_rows})")
        table = np.asarray(jax.device_get(state.table)).copy()
        table[self.global_rows(k)] = vectors
        table = jax.device_put(table.astype(self.dtype), self.table_sharding)
        return dataclasses.replace(state, table=table)


@jax.custom_vjp
def _insert_rows(table, target, fresh):
    """table.at[target].set(fresh) (drop out of range), with a straight-through
    gradient: the cotangent of a freshly initialized row goes to the same row
    of the input table. So `jax.grad` w.r.t. `state.table` sees each new
    key's first gradient, as the sparse path (`sparse_grad`) does. The rows
    handed out were free (unused by any key): nothing else depends on their
    old values."""
    return table.at[target].set(fresh, mode="drop")


def _insert_rows_fwd(table, target, fresh):
    return _insert_rows(table, target, fresh), None


def _insert_rows_bwd(_, g):
    return g, None, None


_insert_rows.defvjp(_insert_rows_fwd, _insert_rows_bwd)


@dataclasses.dataclass(frozen=True)
class HashRows(_Shards):
    """Any key; each shard maps its keys to rows by its hash table (see the
    module docstring). `ops`: the implementation of `find_or_insert`."""

    key_dtype: Any = jnp.int32
    ops: Any = None

    uses_slot_keys = True

    def bucket_keys(self, flat_ids) -> BucketKeys:
        valid = ~checks.is_padding(flat_ids)
        owner = jnp.where(valid, self.owner(flat_ids), self.num_devices)
        return BucketKeys(valid, owner, flat_ids, None)

    def send_format(self, key_dtype):
        """(dtype, value of an empty bucket slot) of what is sent: the keys."""
        return jnp.dtype(key_dtype), checks.padding_value(key_dtype)

    def init_shard(self, seed, device):
        """An empty shard: rows are handed out on insertion and initialized
        then."""
        del seed, device
        table = jnp.zeros((self.rows_per_device, self.dim), self.dtype)
        return table, hash_ops.empty_slot_keys(self.rows_per_device, self.key_dtype)

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        """Finds the received keys in the shard; with `training`, inserts the
        unseen ones and writes their initial vectors."""
        slot_keys, rows, is_new, failed = self.ops.find_or_insert(
            slot_keys, received, insert=training
        )
        if training:
            fresh = initializers.init_rows(
                self.initializer, seed, received, table.shape[1], table.dtype
            )
            target = jnp.where(is_new.astype(bool) & (rows >= 0), rows, table.shape[0])
            table = _insert_rows(table, target, fresh)
        return OwnerRows(table, slot_keys, rows, failed.reshape(()).astype(jnp.int32))

    def export_pairs(self, state):
        table = np.asarray(jax.device_get(state.table))
        slot_keys = np.asarray(jax.device_get(state.slot_keys))
        used = slot_keys != checks.padding_value(self.key_dtype)
        return slot_keys[used], table[used]

    def import_pairs(self, state, keys, vectors):
        """`state` (empty) with each key inserted in its owner's hash table
        and its vector written to the row it got."""
        keys, vectors = self.check_pairs(keys, vectors)
        n, rows, d = self.num_devices, self.rows_per_device, self.dim
        owner = np.remainder(keys.astype(np.int64), n)
        per_owner = np.bincount(owner, minlength=n)
        if per_owner.max(initial=0) > rows:
            raise ValueError(
                f"a shard would hold {per_owner.max()} keys but has {rows} rows "
                "(max_vocabulary_size_per_gpu)"
            )
        width = max(int(per_owner.max(initial=0)), 1)
        send_keys = np.full((n, width), checks.padding_value(self.key_dtype), self.key_dtype)
        send_vecs = np.zeros((n, width, d), np.float32)
        for dev in range(n):
            mine = owner == dev
            send_keys[dev, : mine.sum()] = keys[mine]
            send_vecs[dev, : mine.sum()] = vectors[mine]

        def load(slot_keys, table, k, v):
            slot_keys, got, _, failed = self.ops.find_or_insert(slot_keys, k, insert=True)
            target = jnp.where(got >= 0, got, table.shape[0])
            table = table.at[target].set(v.astype(table.dtype), mode="drop")
            return slot_keys, table, failed.reshape(1)

        axis = self.axis_name
        row, mat = P(axis), P(axis, None)
        fn = shard_map(load, self.mesh, (row, mat, row, mat), (row, mat, row))
        slot_keys, table, failed = jax.jit(fn)(
            state.slot_keys,
            state.table,
            jax.device_put(send_keys.reshape(-1), self.row_sharding),
            jax.device_put(send_vecs.reshape(n * width, d), self.table_sharding),
        )
        if int(np.sum(jax.device_get(failed))):
            raise ValueError("import_pairs: a hash shard could not place all of its keys")
        return dataclasses.replace(state, table=table, slot_keys=slot_keys)
