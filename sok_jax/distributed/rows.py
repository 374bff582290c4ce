"""Row strategies: where each key of a table lives and how its row is found,
chosen once when a layer or collection is built. One strategy serves one
storage array (`table` [n * R, D] sharded over the axis, or [R, D] on every
device, plus `slot_keys` in hash mode) and the tables it holds:

* `RowRows` / `RowHashRows` (placement "row"): one table, key k on device
  k % n. Direct mode: at local row k // n, i.e. global row
  (k % n) * R + k // n (`global_rows`, the one place this layout is
  written). Hash mode: at the row its owner's hash table gives it.
* `TableRows` / `TableHashRows` (placement "table"): a column of up to n
  tables, table `members[d]` wholly on device d (direct: key k at local row
  k; hash: at the row device d's hash table gives it). The keys of a member
  table all go to its device.
* `ReplicatedRows` / `ReplicatedHashRows` (placement "replicated"): one
  table held whole by every device; lookups need no exchange. In hash mode
  every device inserts the keys of the whole batch in the same order, so the
  replicas stay identical.

The exchanged strategies say what crosses the network for a key
(`bucket_keys`) and find the rows of the keys an owner received
(`owner_rows`); the replicated ones find the rows of local keys
(`local_rows`). All create their shard (`init_shard`) and move one table's
logical (key, vector) pairs in and out (`export_pairs`, `import_pairs`). A
key's initial vector depends only on the seed, its table and the key
(`sok_jax.initializers`), so the logical tables are the same under every
strategy and on any device count.
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
from sok_jax.distributed.host import check_same_on_every_process, from_host, gather_shares, to_host
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
    """The shard after any insertion (`table` and `slot_keys`, None when
    unchanged), the local row of each key (-1: none) and the count of keys
    that found no row because the shard is full."""

    table: Any
    slot_keys: Any
    rows: jax.Array
    hash_full: jax.Array


@dataclasses.dataclass(frozen=True)
class Member:
    """A logical table held by a storage array: its name (for messages), its
    rows (direct mode: its keys are [0, vocabulary_size)) and the id its
    initial vectors are seeded with (None: the seed as given, as
    `DistributedEmbedding` does)."""

    name: str
    vocabulary_size: int
    seed_id: int | None = None


@dataclasses.dataclass(frozen=True)
class _Strategy:
    """What every strategy knows: the mesh axis, the block of R rows each
    device holds, the row format, the initializer, the tables held, and
    `ops` (the implementation of `find_or_insert`)."""

    mesh: Mesh
    axis_name: str
    rows_per_device: int
    dim: int
    dtype: Any
    initializer: Callable
    members: tuple
    key_dtype: Any = jnp.dtype(jnp.int32)
    ops: Any = None

    placement = "row"  # "row", "table" or "replicated"
    hashed = False

    @property
    def exchanged(self) -> bool:
        return self.placement != "replicated"

    @property
    def replicated(self) -> bool:
        return self.placement == "replicated"

    @property
    def num_devices(self) -> int:
        return int(self.mesh.shape[self.axis_name])

    @property
    def table_sharding(self) -> NamedSharding:
        return NamedSharding(
            self.mesh, P(None, None) if self.replicated else P(self.axis_name, None)
        )

    @property
    def slot_keys_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(None) if self.replicated else P(self.axis_name))

    @property
    def row_sharding(self) -> NamedSharding:
        """Per-device vectors (counters, the batch) over the axis."""
        return NamedSharding(self.mesh, P(self.axis_name))

    def _seed(self, seed, member: Member):
        if member.seed_id is None:
            return seed
        return initializers.table_seed(seed, member.seed_id)

    def _init(self, seed, member, keys, into=None):
        return initializers.init_rows(
            self.initializer, self._seed(seed, member), keys, self.dim, self.dtype, into=into
        )

    def send_format(self):
        """(dtype, value of an empty bucket slot) of what is sent for a key."""
        if self.hashed:
            return jnp.dtype(self.key_dtype), checks.padding_value(self.key_dtype)
        return jnp.dtype(jnp.int32), -1

    def max_distinct(self) -> int | None:
        """The most distinct keys one destination can receive from one
        device (direct mode: the rows it holds), None where unbounded."""
        return None if self.hashed else self.rows_per_device

    def member_index(self, name: str) -> int:
        for i, m in enumerate(self.members):
            if m is not None and m.name == name:
                return i
        raise KeyError(name)

    def check_pairs(self, keys, vectors, share: bool = False):
        """The pairs to import, the same on every process: as given (checked
        identical across processes), or with `share` every process's share
        gathered."""
        keys, vectors = np.asarray(keys), np.asarray(vectors)
        if share:
            keys, vectors = gather_shares(keys, vectors)
        else:
            check_same_on_every_process("import_pairs", keys, vectors)
        if keys.ndim != 1 or vectors.shape != (keys.shape[0], self.dim):
            raise ValueError(
                f"keys must be [K] and vectors [K, {self.dim}], got {keys.shape} and "
                f"{vectors.shape}"
            )
        if len(np.unique(keys)) != len(keys):
            raise ValueError("keys must be distinct")
        return keys, vectors

    def _check_direct_keys(self, keys, member: Member):
        k = keys.astype(np.int64)
        if k.size and (k.min() < 0 or k.max() >= member.vocabulary_size):
            raise ValueError(
                f"table {member.name!r}: direct-mode keys must lie in [0, {member.vocabulary_size})"
            )
        return k


# ----------------------------------------------------------------- direct


@jax.custom_vjp
def _insert_rows(table, target, fresh):
    """table.at[target].set(fresh) (drop out of range), with a straight-through
    gradient: the cotangent of a freshly initialized row goes to the same row
    of the input table. So `jax.grad` w.r.t. the table sees each new key's
    first gradient, as the sparse path does. The rows handed out were free
    (unused by any key): nothing else depends on their old values."""
    return table.at[target].set(fresh, mode="drop")


def _insert_rows_fwd(table, target, fresh):
    return _insert_rows(table, target, fresh), None


def _insert_rows_bwd(_, g):
    return g, None, None


_insert_rows.defvjp(_insert_rows_fwd, _insert_rows_bwd)


def _owner(keys, n):
    return jnp.remainder(keys, n).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RowRows(_Strategy):
    """Placement "row", direct mode: one or more tables in one array (as
    FBGEMM's table-batched embeddings), each device holding a block of
    ceil(V_m / n) rows per member m, one after the other: key k of member m
    on device k % n at local row offset_m + k // n."""

    placement = "row"

    @property
    def member(self) -> Member:
        return self.members[0]

    def member_rows(self, m: int) -> int:
        """Rows member m takes on each device (all of R for a lone table)."""
        if len(self.members) == 1:
            return self.rows_per_device
        return -(-self.members[m].vocabulary_size // self.num_devices)

    def offset(self, m: int) -> int:
        return sum(self.member_rows(j) for j in range(m))

    def global_rows(self, keys, name=None):
        """Row of each key (of the member named `name`, default the first)
        in the physical [n * R, D] array."""
        m = 0 if name is None else self.member_index(name)
        keys = np.asarray(keys, np.int64)
        n = self.num_devices
        return (keys % n) * self.rows_per_device + self.offset(m) + keys // n

    def bucket_keys(self, flat_ids, member_index: int) -> BucketKeys:
        n = self.num_devices
        m = self.members[member_index]
        valid, keys = checks.valid_rows(flat_ids, m.vocabulary_size)
        owner = jnp.where(valid, _owner(keys, n), n)
        local = jnp.where(valid, self.offset(member_index) + keys // n, 0).astype(jnp.int32)
        return BucketKeys(valid, owner, local, self.rows_per_device)

    def init_shard(self, seed, device):
        """Local row offset_m + r of device d holds key r * n + d of member m
        (each member's block written in place into the shard)."""
        table = jnp.zeros((self.rows_per_device, self.dim), self.dtype)
        for m, member in enumerate(self.members):
            keys = jnp.arange(self.member_rows(m), dtype=jnp.int32) * self.num_devices + device
            table = self._init(seed, member, keys, into=(table, self.offset(m)))
        return table, None

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        """The received values are local rows already (-1: an empty slot)."""
        return OwnerRows(None, None, received, jnp.zeros((), jnp.int32))

    def local_rows(self, table, slot_keys, seed, flat_ids, members, training) -> OwnerRows:
        """One device: every key is a local row (the no-exchange path)."""
        rows = []
        for ids, m in zip(flat_ids, members):
            valid, r = checks.valid_rows(ids, self.members[m].vocabulary_size)
            rows.append(jnp.where(valid, r + self.offset(m), -1))
        return OwnerRows(None, None, jnp.concatenate(rows), jnp.zeros((), jnp.int32))

    def export_pairs(self, table, slot_keys, name):
        m = self.members[self.member_index(name)]
        keys = np.arange(m.vocabulary_size, dtype=np.int64)
        return keys, to_host(table)[self.global_rows(keys, name)]

    def import_pairs(self, table, slot_keys, name, keys, vectors, share=False):
        keys, vectors = self.check_pairs(keys, vectors, share)
        k = self._check_direct_keys(keys, self.members[self.member_index(name)])
        host = to_host(table).copy()
        host[self.global_rows(k, name)] = vectors
        return from_host(host.astype(self.dtype), self.table_sharding), slot_keys


@dataclasses.dataclass(frozen=True)
class TableRows(_Strategy):
    """Placement "table", direct mode: a column of tables, `members[d]` (or
    None) on device d at local rows [0, its vocabulary_size)."""

    placement = "table"

    def bucket_keys(self, flat_ids, member_index: int) -> BucketKeys:
        n = self.num_devices
        valid, keys = checks.valid_rows(flat_ids, self.members[member_index].vocabulary_size)
        owner = jnp.where(valid, member_index, n).astype(jnp.int32)
        return BucketKeys(valid, owner, keys, self.rows_per_device)

    def _seed_ids(self):
        return jnp.asarray([0 if m is None else m.seed_id for m in self.members], jnp.int32)

    def init_shard(self, seed, device):
        """Device d's block holds its member's keys 0..R-1 (rows past its
        vocabulary are never read)."""
        keys = jnp.arange(self.rows_per_device, dtype=jnp.int32)
        table_seed = initializers.table_seed(seed, self._seed_ids()[device])
        rows = initializers.init_rows(self.initializer, table_seed, keys, self.dim, self.dtype)
        return rows, None

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        return OwnerRows(None, None, received, jnp.zeros((), jnp.int32))

    def global_rows(self, keys, name):
        return self.member_index(name) * self.rows_per_device + np.asarray(keys, np.int64)

    def export_pairs(self, table, slot_keys, name):
        m = self.members[self.member_index(name)]
        keys = np.arange(m.vocabulary_size, dtype=np.int64)
        return keys, to_host(table)[self.global_rows(keys, name)]

    def import_pairs(self, table, slot_keys, name, keys, vectors, share=False):
        keys, vectors = self.check_pairs(keys, vectors, share)
        k = self._check_direct_keys(keys, self.members[self.member_index(name)])
        host = to_host(table).copy()
        host[self.global_rows(k, name)] = vectors
        return from_host(host.astype(self.dtype), self.table_sharding), slot_keys


@dataclasses.dataclass(frozen=True)
class ReplicatedRows(_Strategy):
    """Placement "replicated", direct mode: every device holds the table."""

    placement = "replicated"

    @property
    def member(self) -> Member:
        return self.members[0]

    def init_shard(self, seed, device):
        keys = jnp.arange(self.rows_per_device, dtype=jnp.int32)
        return self._init(seed, self.member, keys), None

    def local_rows(self, table, slot_keys, seed, flat_ids, members, training) -> OwnerRows:
        valid, rows = checks.valid_rows(jnp.concatenate(flat_ids), self.member.vocabulary_size)
        return OwnerRows(None, None, jnp.where(valid, rows, -1), jnp.zeros((), jnp.int32))

    def export_pairs(self, table, slot_keys, name):
        keys = np.arange(self.member.vocabulary_size, dtype=np.int64)
        return keys, to_host(table)[keys]

    def import_pairs(self, table, slot_keys, name, keys, vectors, share=False):
        keys, vectors = self.check_pairs(keys, vectors, share)
        k = self._check_direct_keys(keys, self.member)
        host = to_host(table).copy()
        host[k] = vectors
        return from_host(host.astype(self.dtype), self.table_sharding), slot_keys


# ------------------------------------------------------------------- hash


class _Hashed:
    """Hash-mode pieces: an empty shard, the insertion of received keys, and
    the export of the stored keys of a block."""

    hashed = True

    def _empty_shard(self):
        table = jnp.zeros((self.rows_per_device, self.dim), self.dtype)
        return table, hash_ops.empty_slot_keys(self.rows_per_device, self.key_dtype)

    def _find_or_insert(self, table, slot_keys, table_seed, keys, training) -> OwnerRows:
        """Finds `keys` in the shard; with `training`, inserts the unseen ones
        and writes their initial vectors."""
        slot_keys, rows, is_new, failed = self.ops.find_or_insert(slot_keys, keys, insert=training)
        if training:
            fresh = initializers.init_rows(
                self.initializer, table_seed, keys, table.shape[1], table.dtype
            )
            target = jnp.where(is_new.astype(bool) & (rows >= 0), rows, table.shape[0])
            table = _insert_rows(table, target, fresh)
        return OwnerRows(table, slot_keys, rows, failed.reshape(()).astype(jnp.int32))

    def _stored(self, table, slot_keys):
        table, slot_keys = to_host(table), to_host(slot_keys)
        used = slot_keys != checks.padding_value(self.key_dtype)
        return slot_keys[used], table[used]

    def _load_blocks(self, table, slot_keys, keys_per_block, vectors_per_block):
        """Inserts each block's keys into that device's hash table and writes
        their vectors; raises if a block cannot place them all."""
        n, d = self.num_devices, self.dim
        width = max(max((len(k) for k in keys_per_block), default=0), 1)
        send_keys = np.full((n, width), checks.padding_value(self.key_dtype), self.key_dtype)
        send_vecs = np.zeros((n, width, d), np.float32)
        for dev, (k, v) in enumerate(zip(keys_per_block, vectors_per_block)):
            send_keys[dev, : len(k)] = k
            send_vecs[dev, : len(k)] = v

        def load(slot_keys, table, k, v):
            slot_keys, got, _, failed = self.ops.find_or_insert(slot_keys, k, insert=True)
            target = jnp.where(got >= 0, got, table.shape[0])
            table = table.at[target].set(v.astype(table.dtype), mode="drop")
            return slot_keys, table, failed.reshape(1)

        row, mat = P(self.axis_name), P(self.axis_name, None)
        fn = shard_map(load, self.mesh, (row, mat, row, mat), (row, mat, row))
        slot_keys, table, failed = jax.jit(fn)(
            slot_keys,
            table,
            from_host(send_keys.reshape(-1), self.row_sharding),
            from_host(send_vecs.reshape(n * width, d), NamedSharding(self.mesh, mat)),
        )
        if int(np.sum(to_host(failed))):
            raise ValueError("import_pairs: a hash shard could not place all of its keys")
        return table, slot_keys

    def _check_fits(self, counts):
        most = max(counts, default=0)
        if most > self.rows_per_device:
            raise ValueError(
                f"a shard would hold {most} keys but has {self.rows_per_device} rows "
                "(max_vocabulary_size_per_gpu)"
            )


@dataclasses.dataclass(frozen=True)
class RowHashRows(_Hashed, _Strategy):
    """Placement "row", hash mode: key k on device k % n, at the row its
    owner's hash table gives it."""

    placement = "row"

    @property
    def member(self) -> Member:
        return self.members[0]

    def bucket_keys(self, flat_ids, member_index: int) -> BucketKeys:
        n = self.num_devices
        valid = ~checks.is_padding(flat_ids)
        owner = jnp.where(valid, _owner(flat_ids, n), n)
        return BucketKeys(valid, owner, flat_ids, None)

    def init_shard(self, seed, device):
        return self._empty_shard()

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        return self._find_or_insert(
            table, slot_keys, self._seed(seed, self.member), received, training
        )

    def export_pairs(self, table, slot_keys, name):
        return self._stored(table, slot_keys)

    def import_pairs(self, table, slot_keys, name, keys, vectors, share=False):
        keys, vectors = self.check_pairs(keys, vectors, share)
        owner = np.remainder(keys.astype(np.int64), self.num_devices)
        blocks = [owner == d for d in range(self.num_devices)]
        self._check_fits([int(b.sum()) for b in blocks])
        return self._load_blocks(
            table, slot_keys, [keys[b] for b in blocks], [vectors[b] for b in blocks]
        )


@dataclasses.dataclass(frozen=True)
class TableHashRows(_Hashed, _Strategy):
    """Placement "table", hash mode: `members[d]` on device d, at the rows
    device d's hash table gives its keys."""

    placement = "table"

    def bucket_keys(self, flat_ids, member_index: int) -> BucketKeys:
        valid = ~checks.is_padding(flat_ids)
        owner = jnp.where(valid, member_index, self.num_devices).astype(jnp.int32)
        return BucketKeys(valid, owner, flat_ids, None)

    def init_shard(self, seed, device):
        return self._empty_shard()

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        ids = jnp.asarray([0 if m is None else m.seed_id for m in self.members], jnp.int32)
        device = jax.lax.axis_index(self.axis_name)
        table_seed = initializers.table_seed(seed, ids[device])
        return self._find_or_insert(table, slot_keys, table_seed, received, training)

    def export_pairs(self, table, slot_keys, name):
        d, r = self.member_index(name), self.rows_per_device
        block = slice(d * r, (d + 1) * r)
        return self._stored(to_host(table)[block], to_host(slot_keys)[block])

    def import_pairs(self, table, slot_keys, name, keys, vectors, share=False):
        keys, vectors = self.check_pairs(keys, vectors, share)
        self._check_fits([len(keys)])
        d = self.member_index(name)
        blocks_k = [keys if i == d else keys[:0] for i in range(self.num_devices)]
        blocks_v = [vectors if i == d else vectors[:0] for i in range(self.num_devices)]
        return self._load_blocks(table, slot_keys, blocks_k, blocks_v)


@dataclasses.dataclass(frozen=True)
class ReplicatedHashRows(_Hashed, _Strategy):
    """Placement "replicated", hash mode: every device holds the whole hash
    table and inserts the keys of the whole batch (gathered over the axis)
    in the same order, so the replicas stay identical."""

    placement = "replicated"

    @property
    def member(self) -> Member:
        return self.members[0]

    def init_shard(self, seed, device):
        return self._empty_shard()

    def local_rows(self, table, slot_keys, seed, flat_ids, members, training) -> OwnerRows:
        flat_ids = jnp.concatenate(flat_ids)
        every = jax.lax.all_gather(flat_ids, self.axis_name, tiled=True)
        got = self._find_or_insert(table, slot_keys, self._seed(seed, self.member), every, training)
        mine = jax.lax.axis_index(self.axis_name) * flat_ids.shape[0]
        rows = jax.lax.dynamic_slice(got.rows, (mine,), flat_ids.shape)
        # Full-table misses of this device's own positions (every device sees them all).
        missed = (
            (rows < 0) & ~checks.is_padding(flat_ids) if training else jnp.zeros_like(rows, bool)
        )
        return got._replace(rows=rows, hash_full=jnp.sum(missed).astype(jnp.int32))

    def export_pairs(self, table, slot_keys, name):
        return self._stored(table, slot_keys)

    def import_pairs(self, table, slot_keys, name, keys, vectors, share=False):
        keys, vectors = self.check_pairs(keys, vectors, share)
        self._check_fits([len(keys)])

        def load(slot_keys, table, k, v):
            slot_keys, got, _, failed = self.ops.find_or_insert(slot_keys, k, insert=True)
            target = jnp.where(got >= 0, got, table.shape[0])
            return slot_keys, table.at[target].set(v.astype(table.dtype), mode="drop"), failed

        replicated = NamedSharding(self.mesh, P())
        slot_keys, table, failed = jax.jit(load)(
            slot_keys,
            table,
            from_host(keys, replicated),
            from_host(vectors.astype(np.float32), replicated),
        )
        if int(to_host(failed)):
            raise ValueError("import_pairs: the hash table could not place all of its keys")
        return table, slot_keys


STRATEGIES = {
    ("row", False): RowRows,
    ("row", True): RowHashRows,
    ("table", False): TableRows,
    ("table", True): TableHashRows,
    ("replicated", False): ReplicatedRows,
    ("replicated", True): ReplicatedHashRows,
}
