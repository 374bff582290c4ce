"""Row strategies: where each key of a table lives and how its row is found,
chosen once when a layer or collection is built. One strategy serves one
storage array (`table` [n * R, D] sharded over the axis, or [R, D] on every
device, plus `slot_keys` in hash mode) and the tables it holds:

* `RowRows` / `RowHashRows` (placement "row"): one table, key k on device
  k % n (`owners.key_owner`; a hash table may take "hashed" placement,
  mix(k) % n, instead). Direct mode: at local row k // n, i.e. global row
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

A hash strategy built with `online` (a `scores.HashOptions`: eviction,
admission, scores) carries the hash part of its shard as a
`scores.HashShard` (keys and `HashScores`) instead of the keys alone; its
lookups then evict and admit (xla_ffi/hash_math.h has the rule), count into
`OwnerRows.online`, and, where the table evicts, record the rows they found
and the keys those held (`OwnerRows.held`, a `scores.HeldRows`) so that the
sparse update resets the slots of the rows given to new keys and skips the
rows whose key a later lookup evicted.
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
from sok_jax.distributed import scores
from sok_jax.distributed.host import (
    check_same_on_every_process,
    device_blocks,
    from_host,
    gather_shares,
    to_host,
)
from sok_jax.distributed.owners import key_owner
from sok_jax.ops import checks, hash_ops, reference


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
    that found no row because the shard is full. Online hash tables also
    give this device's counts {evicted, not_admitted, load}, and a table
    that evicts its `scores.HeldRows` (the rows of the keys looked up, the
    keys, which rows went to new keys); None otherwise."""

    table: Any
    slot_keys: Any
    rows: jax.Array
    hash_full: jax.Array
    online: Any = None
    held: Any = None
    cache: Any = None  # a cached table's {cache_hits, cache_misses, cache_evictions}


class FreshRows(NamedTuple):
    """The rows a hash lookup gave to new keys (`find_rows`), per position:
    whether it is a new key's first position, and the key; `make(keys)`
    gives keys' initial vectors. `write` puts them in a table."""

    is_new: jax.Array
    keys: jax.Array
    make: Callable

    def write(self, table, targets, scatter):
        """`scatter(table, at, vectors)` of the new keys' initial vectors at
        `targets` (per position, -1: none), with `at` -1 where no row.

        One pass over all K positions, with no data-dependent control flow:
        a loop over the new positions only needs its trip count on the host,
        and on the GPU that read stalls every step longer than making K
        vectors takes. Not differentiable (pass the table through
        `stop_gradient`)."""
        if self.is_new.shape[0] == 0:
            return table
        at = jnp.where(self.is_new & (targets >= 0), targets, -1)
        return scatter(table, at, self.make(self.keys))


class StoredRows(NamedTuple):
    """One table's rows on the host (`export_rows`): its keys, their vectors,
    the rows of the storage array that hold them, and their scores (None
    without)."""

    keys: np.ndarray
    vectors: np.ndarray
    rows: np.ndarray
    last_seen: Any = None
    count: Any = None


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
    online: Any = None  # scores.HashOptions of an online hash table
    # owners.key_owner's rule for placement "row"; "hashed" only in hash mode.
    key_placement: str = "mod"

    placement = "row"  # "row", "table" or "replicated"
    hashed = False
    scored = False
    evicting = False

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

    def init_block(self, seed, device, start, count):
        """One device: the initial vectors [count, D] of its local rows
        [start, start + count) (rows past the shard: any values), as
        `init_shard` makes them; None where a fresh shard's rows are zeros
        (hash mode). For a unit of one member (a host-stored unit always is)."""
        return None

    def fresh_hash_part(self):
        """One device: the hash part of a fresh shard (None in direct mode)."""
        return None

    def home_devices(self, keys, name=None) -> np.ndarray:
        """Host: the device whose shard holds each key of table `name`
        (int64 [K]; 0 for a replicated table, which every device holds
        whole). Direct-mode keys must be in range."""
        raise NotImplementedError

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

    def check_pairs(self, keys, vectors, share: bool = False, *extra, what="import_pairs"):
        """The pairs to import (and `extra` per-key arrays, or None), the same
        on every process: as given (checked identical across processes), or
        with `share` every process's share gathered. Keys must be integers
        that fit `key_dtype`, never the padding value; vectors finite.
        ValueError naming `what` (the caller) otherwise."""
        keys = checks.host_keys(keys, self.key_dtype, f"{what}: keys", padding_ok=False)
        vectors = checks.host_vectors(vectors, f"{what}: vectors")
        given = [np.asarray(x) for x in extra if x is not None]
        if share:
            keys, vectors, *given = gather_shares(keys, vectors, *given)
        else:
            check_same_on_every_process(what, keys, vectors, *given)
        if keys.ndim != 1 or vectors.shape != (keys.shape[0], self.dim):
            raise ValueError(
                f"{what}: keys must be [K] and vectors [K, {self.dim}], got {keys.shape} and "
                f"{vectors.shape}"
            )
        if any(x.shape[:1] != keys.shape for x in given):
            raise ValueError(
                f"{what}: every per-key array must be [{keys.shape[0]}, ...] like keys"
            )
        if not checks.all_distinct(keys):
            raise ValueError(f"{what}: keys must be distinct")
        it = iter(given)
        return (keys, vectors, *(None if x is None else next(it) for x in extra))

    def export_pairs(self, table, slot_keys, name):
        """One table's (keys, vectors) on the host."""
        r = self.export_rows(table, slot_keys, name)
        return r.keys, r.vectors

    def import_pairs(self, table, slot_keys, name, keys, vectors, share=False):
        """(table, slot_keys) holding the given pairs of one table."""
        table, slot_keys, _ = self.import_rows(table, slot_keys, name, keys, vectors, share)
        return table, slot_keys

    def _write_direct(self, table, rows, vectors):
        host = to_host(table).copy()
        host[rows] = vectors
        return from_host(host.astype(self.dtype), table.sharding)  # its memory kind kept

    def find_rows(self, hash_part, seed, received, training, like):
        """`owner_rows` leaving the table alone: (OwnerRows, FreshRows or
        None). `like` is a table of the shard's shape and dtype."""
        return self.owner_rows(None, hash_part, seed, received, training), None

    def _check_direct_keys(self, keys, member: Member):
        k = keys.astype(np.int64)
        if k.size and (k.min() < 0 or k.max() >= member.vocabulary_size):
            raise ValueError(
                f"table {member.name!r}: direct-mode keys must lie in [0, {member.vocabulary_size})"
            )
        return k


# ----------------------------------------------------------------- direct


@jax.custom_vjp
def _pass_grad(value, source):
    """`value` (computed from `source` outside autodiff), its cotangent
    passed straight to `source`: with the new keys' rows written into the
    table, `jax.grad` w.r.t. the table sees each new key's first gradient
    at its row, as the sparse path does. The rows handed out were free
    (unused by any key): nothing else depends on their old values."""
    return value


def _pass_grad_fwd(value, source):
    return value, None


def _pass_grad_bwd(_, g):
    return None, g


_pass_grad.defvjp(_pass_grad_fwd, _pass_grad_bwd)


class _Direct:
    """Direct-mode pieces: a member's keys are 0..vocabulary_size-1, each at
    the row `global_rows(key, name)` of the physical array."""

    def export_rows(self, table, slot_keys, name) -> StoredRows:
        keys = np.arange(self.members[self.member_index(name)].vocabulary_size, dtype=np.int64)
        rows = self.global_rows(keys, name)
        return StoredRows(keys, to_host(table)[rows], rows)

    def home_devices(self, keys, name=None):
        return self.global_rows(keys, name) // self.rows_per_device

    def import_rows(self, table, slot_keys, name, keys, vectors, share=False, **_):
        keys, vectors = self.check_pairs(keys, vectors, share)
        k = self._check_direct_keys(keys, self.members[self.member_index(name)])
        rows = self.global_rows(k, name)
        return self._write_direct(table, rows, vectors), slot_keys, rows


@dataclasses.dataclass(frozen=True)
class RowRows(_Direct, _Strategy):
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
        if n == 1:  # the same rows, without two passes of int64 division
            return keys + self.offset(m)
        return (keys % n) * self.rows_per_device + self.offset(m) + keys // n

    def bucket_keys(self, flat_ids, member_index: int) -> BucketKeys:
        n = self.num_devices
        m = self.members[member_index]
        valid, keys = checks.valid_rows(flat_ids, m.vocabulary_size)
        owner = jnp.where(valid, key_owner(keys, n, "mod"), n)
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

    def init_block(self, seed, device, start, count):
        rows = start + jnp.arange(count, dtype=jnp.int32)
        return self._init(seed, self.member, rows * self.num_devices + device)

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


@dataclasses.dataclass(frozen=True)
class TableRows(_Direct, _Strategy):
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

    def init_block(self, seed, device, start, count):
        keys = start + jnp.arange(count, dtype=jnp.int32)
        table_seed = initializers.table_seed(seed, self._seed_ids()[device])
        return initializers.init_rows(self.initializer, table_seed, keys, self.dim, self.dtype)

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        return OwnerRows(None, None, received, jnp.zeros((), jnp.int32))

    def global_rows(self, keys, name):
        return self.member_index(name) * self.rows_per_device + np.asarray(keys, np.int64)


@dataclasses.dataclass(frozen=True)
class ReplicatedRows(_Direct, _Strategy):
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

    def global_rows(self, keys, name=None):
        return np.asarray(keys, np.int64)


# ------------------------------------------------------------------- hash


class _Hashed:
    """Hash-mode pieces: an empty shard, the insertion of received keys, the
    export and import of the stored keys of a block, and, for an online
    table (`online`: a `scores.HashOptions`), its scores: then the hash
    part of the shard is a `scores.HashShard` (keys and scores), else its
    `slot_keys` alone."""

    hashed = True

    @property
    def scored(self) -> bool:
        return self.online is not None

    @property
    def evicting(self) -> bool:
        return self.online is not None and self.online.eviction is not None

    def _empty_shard(self):
        return jnp.zeros((self.rows_per_device, self.dim), self.dtype), self.fresh_hash_part()

    def fresh_hash_part(self):
        keys = hash_ops.empty_slot_keys(self.rows_per_device, self.key_dtype)
        if not self.scored:
            return keys
        sc = scores.empty_scores(self.rows_per_device, self.key_dtype, self.online)
        return scores.HashShard(keys, sc)

    def hash_sharding(self):
        """The sharding of the hash part of the shard: slot_keys', or a
        `HashShard` of it for every leaf."""
        s = self.slot_keys_sharding
        if not self.scored:
            return s
        return jax.tree.map(lambda _: s, jax.eval_shape(lambda: self._empty_shard()[1]))

    def _lookup(self, table, hash_part, table_seed, keys, training):
        """Finds `keys` in the shard; with `training`, inserts the unseen ones
        (evicting or admitting as the table does) and writes their initial
        vectors. Returns (OwnerRows, per-position status or None)."""
        found, status, fresh = self._find(hash_part, table_seed, keys, training, table)
        if fresh is not None:
            written = fresh.write(jax.lax.stop_gradient(table), found.rows, reference.scatter_rows)
            table = _pass_grad(written, table)
        return found._replace(table=table), status

    def _find(self, hash_part, table_seed, keys, training, like):
        """`_lookup` without the write: (OwnerRows with table None, status
        or None, FreshRows with `training`, else None). `like`: a table of
        the shard's shape and dtype."""
        if self.scored:
            run = scores.OnlineLookup(self.ops, self.online).run
            hash_part, r, counts = run(hash_part, keys, training)
            rows, is_new, status = r.rows, r.is_new, r.status
            failed = hash_ops.failures(status)
        else:
            hash_part, rows, is_new, failed = self.ops.find_or_insert(
                hash_part, keys, insert=training
            )
            counts = status = None
        fresh = None
        if training:

            def make(keys):
                return initializers.init_rows(
                    self.initializer, table_seed, keys, like.shape[1], like.dtype
                )

            fresh = FreshRows(is_new.astype(bool) & (rows >= 0), keys, make)
        # An evicting table reuses rows: the sparse update resets the slots of
        # the new keys' rows and skips the rows a later lookup gave away.
        held = None
        if self.evicting:
            held = scores.HeldRows(rows, keys, (is_new == 1) & training)
        found = OwnerRows(None, hash_part, rows, failed.reshape(()).astype(jnp.int32), counts, held)
        return found, status, fresh

    def _find_or_insert(self, table, hash_part, table_seed, keys, training) -> OwnerRows:
        return self._lookup(table, hash_part, table_seed, keys, training)[0]

    def find_rows(self, hash_part, seed, received, training, like):
        """`owner_rows` leaving the table alone: (OwnerRows, FreshRows or
        None). `like` is a table of the shard's shape and dtype."""
        found, _, fresh = self._find(hash_part, self._owner_seed(seed), received, training, like)
        return found, fresh

    def evict_stale(self, hash_part, max_age):
        """One device: frees the rows no training lookup saw in the last
        `max_age` steps. Returns (hash_part, rows freed)."""
        return scores.evict_stale(hash_part, max_age)

    # ------------------------------------------------------------- host side
    def _keys_and_scores(self, hash_part):
        if not self.scored:
            return to_host(hash_part), None, None
        sc = hash_part.scores
        return to_host(hash_part.slot_keys), to_host(sc.last_seen), to_host(sc.count)

    def _stored(self, table, hash_part, block=slice(None)) -> StoredRows:
        keys, last_seen, count = self._keys_and_scores(hash_part)
        table = to_host(table)[block]
        keys = keys[block]
        used = keys != checks.padding_value(self.key_dtype)
        rows = np.nonzero(used)[0] + (block.start or 0)
        if last_seen is not None:
            last_seen, count = last_seen[block][used], count[block][used]
        return StoredRows(keys[used], table[used], rows, last_seen, count)

    def shard_state(self, hash_part, device=None) -> dict:
        """Host: the step, per-shard sketches [S, depth * width] (None
        without admission) and eviction logs of the table's shards (one
        device's with `device`, the one copy for a replicated table)."""
        sc = hash_part.scores
        shards = 1 if self.replicated else self.num_devices
        pick = (lambda x: x) if device is None else (lambda x: x[device : device + 1])

        def per_shard(x):
            return None if x is None else pick(to_host(x).reshape(shards, -1))

        return {
            "step": int(per_shard(sc.step).max()),
            "sketch": per_shard(sc.sketch),
            "log_keys": per_shard(sc.log_keys),
            "log_steps": per_shard(sc.log_steps),
            "log_floor": None if sc.log_floor is None else int(per_shard(sc.log_floor).max()),
            "log_total": None if sc.log_total is None else int(per_shard(sc.log_total).sum()),
        }

    def _plain_lookup(self, hash_part, k, insert: bool):
        """`hash_lookup` of keys `k` in a scored shard without admission,
        under the table's eviction policy (with eviction a key is searched
        in its home bucket only); an insertion stamps the rows with step 1."""
        sc = hash_part.scores
        return self.ops.hash_lookup(
            hash_part.slot_keys,
            k,
            insert=insert,
            last_seen=sc.last_seen,
            count=sc.count,
            step=jnp.int32(1),
            policy=self.online.eviction,
        )

    def place_keys(self, hash_part, k, ls, ct):
        """One device: inserts keys `k` (padding: none), without admission,
        and with scores sets their last_seen and count to `ls`, `ct`.
        Returns (hash_part, the row of each key (-1: none), the keys that
        got no row or took another key's row (int32): a full shard, or with
        eviction a full bucket)."""
        if not self.scored:
            hash_part, got, _, failed = self.ops.find_or_insert(hash_part, k, insert=True)
            return hash_part, got, failed
        sc = hash_part.scores
        r = self._plain_lookup(hash_part, k, insert=True)
        pad = jnp.asarray(checks.padding_value(k.dtype), k.dtype)
        failed = hash_ops.failures(r.status) + jnp.sum(r.evicted != pad, dtype=jnp.int32)
        target = jnp.where(r.rows >= 0, r.rows, r.slot_keys.shape[0])
        sc = dataclasses.replace(
            sc,
            last_seen=r.last_seen.at[target].set(ls, mode="drop"),
            count=r.count.at[target].set(ct, mode="drop"),
            used=scores.count_used(r.slot_keys),
        )
        return scores.HashShard(r.slot_keys, sc), r.rows, failed

    def remove_keys(self, hash_part, k):
        """One device: frees the rows of keys `k` (padding, and keys holding
        no row: nothing), as `evict_stale` frees rows, without logging them.
        Only a table that evicts frees rows (its lookups read whole buckets)."""
        r = self._plain_lookup(hash_part, k, insert=False)
        rows = hash_part.slot_keys.shape[0]
        target = jnp.where(r.rows >= 0, r.rows, rows)
        gone = jnp.zeros((rows,), bool).at[target].set(True, mode="drop")
        return scores.free_rows(hash_part, gone)[0]

    def _load(self, table, hash_part, k, v, ls, ct):
        """One device: inserts keys `k` (padding: none) and writes their
        vectors, and with scores their last_seen and count. Returns
        (hash_part, table, failed [1], rows)."""
        hash_part, got, failed = self.place_keys(hash_part, k, ls, ct)
        # The row mover: the table may be a host store (XLA's scatter takes
        # no host operand); the keys are distinct, so are their rows.
        table = self.ops.scatter_rows(table, got, v.astype(table.dtype))
        return hash_part, table, failed.reshape(1), got

    def _load_blocks(self, table, hash_part, keys, vectors, owner, last_seen=None, count=None):
        """Inserts each key into the hash table of device owner[i] and writes
        its vector (and scores); raises if a shard cannot place them all.
        Returns (table, hash_part, the global row of each key)."""
        n = self.num_devices
        zeros = np.zeros(len(keys), np.int32)
        (send_keys, send_vecs, send_ls, send_ct), at = device_blocks(
            owner,
            n,
            [
                (keys, checks.padding_value(self.key_dtype)),
                (np.asarray(vectors, np.float32), 0),
                (zeros if last_seen is None else last_seen, 0),
                (zeros if count is None else count, 0),
            ],
        )
        row, mat = P(self.axis_name), P(self.axis_name, None)
        fn = shard_map(self._load, self.mesh, (mat, row, row, mat, row, row), (row, mat, row, row))
        shardings = (
            jax.tree.map(lambda x: x.sharding, hash_part),
            table.sharding,  # a host store stays in host memory
            self.row_sharding,
            self.row_sharding,
        )
        hash_part, table, failed, got = jax.jit(fn, out_shardings=shardings)(
            table,
            hash_part,
            from_host(send_keys, self.row_sharding),
            from_host(send_vecs, NamedSharding(self.mesh, mat)),
            from_host(send_ls.astype(np.int32), self.row_sharding),
            from_host(send_ct.astype(np.int32), self.row_sharding),
        )
        if int(np.sum(to_host(failed))):
            raise ValueError(self._cannot_place())
        rows = np.asarray(owner, np.int64) * self.rows_per_device + to_host(got)[at]
        return table, hash_part, rows

    def _cannot_place(self):
        where = "a bucket of 16 rows" if self.evicting else "a hash shard"
        return (
            f"import_pairs: {where} could not place all of its keys; import into a layer with "
            "more rows per shard (max_vocabulary_size_per_gpu / vocabulary_size)"
        )

    def _check_fits(self, counts):
        most = max(counts, default=0)
        if most > self.rows_per_device:
            raise ValueError(
                f"a shard would hold {most} keys but has {self.rows_per_device} rows "
                "(max_vocabulary_size_per_gpu)"
            )

    def _check_scores(self, last_seen, count):
        if (last_seen is None) != (count is None):
            raise ValueError("import_pairs: last_seen and count must be given together")

    def _import_checked(self, table, hash_part, name, keys, vectors, last_seen, count):
        owner = self.home_devices(keys, name)
        self._check_fits(np.bincount(owner, minlength=self.num_devices).tolist())
        return self._load_blocks(table, hash_part, keys, vectors, owner, last_seen, count)

    def import_rows(
        self, table, hash_part, name, keys, vectors, share=False, last_seen=None, count=None
    ):
        """(table, hash_part, global row of each key) holding the given pairs
        of table `name` (and their scores, where the table keeps scores)."""
        self._check_scores(last_seen, count)
        keys, vectors, last_seen, count = self.check_pairs(keys, vectors, share, last_seen, count)
        if self.scored and last_seen is None:  # rows imported without scores
            last_seen = np.zeros(len(keys), np.int32)
            count = np.zeros(len(keys), np.int32)
        return self._import_checked(table, hash_part, name, keys, vectors, last_seen, count)


@dataclasses.dataclass(frozen=True)
class RowHashRows(_Hashed, _Strategy):
    """Placement "row", hash mode: key k on device `key_owner(k, n,
    key_placement)`, at the row its owner's hash table gives it."""

    placement = "row"

    @property
    def member(self) -> Member:
        return self.members[0]

    def bucket_keys(self, flat_ids, member_index: int) -> BucketKeys:
        n = self.num_devices
        valid = ~checks.is_padding(flat_ids)
        owner = jnp.where(valid, key_owner(flat_ids, n, self.key_placement), n)
        return BucketKeys(valid, owner, flat_ids, None)

    def init_shard(self, seed, device):
        return self._empty_shard()

    def _owner_seed(self, seed):
        return self._seed(seed, self.member)

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        return self._find_or_insert(table, slot_keys, self._owner_seed(seed), received, training)

    def export_rows(self, table, slot_keys, name) -> StoredRows:
        return self._stored(table, slot_keys)

    def home_devices(self, keys, name=None):
        return np.asarray(
            key_owner(keys.astype(self.key_dtype), self.num_devices, self.key_placement), np.int64
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

    def _owner_seed(self, seed):
        """This device's member's seed."""
        ids = jnp.asarray([0 if m is None else m.seed_id for m in self.members], jnp.int32)
        return initializers.table_seed(seed, ids[jax.lax.axis_index(self.axis_name)])

    def owner_rows(self, table, slot_keys, seed, received, training) -> OwnerRows:
        return self._find_or_insert(table, slot_keys, self._owner_seed(seed), received, training)

    def export_rows(self, table, slot_keys, name) -> StoredRows:
        d, r = self.member_index(name), self.rows_per_device
        return self._stored(table, slot_keys, slice(d * r, (d + 1) * r))

    def home_devices(self, keys, name):
        return np.full(len(keys), self.member_index(name), np.int64)


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
        got, status = self._lookup(table, slot_keys, self._seed(seed, self.member), every, training)
        mine = jax.lax.axis_index(self.axis_name) * flat_ids.shape[0]
        rows = jax.lax.dynamic_slice(got.rows, (mine,), flat_ids.shape)
        # Full-table misses of this device's own positions (every device sees them all).
        if status is None:
            missed = (
                (rows < 0) & ~checks.is_padding(flat_ids)
                if training
                else jnp.zeros_like(rows, bool)
            )
            return got._replace(rows=rows, hash_full=jnp.sum(missed).astype(jnp.int32))
        own = jax.lax.dynamic_slice(status, (mine,), flat_ids.shape)
        online = dict(got.online)
        online["not_admitted"] = jnp.sum(own == hash_ops.NOT_ADMITTED).astype(jnp.int32)
        full = jnp.sum(own == hash_ops.FULL).astype(jnp.int32)
        return got._replace(rows=rows, hash_full=full, online=online)

    def export_rows(self, table, slot_keys, name) -> StoredRows:
        return self._stored(table, slot_keys)

    def home_devices(self, keys, name=None):
        return np.zeros(len(keys), np.int64)

    def _import_checked(self, table, hash_part, name, keys, vectors, last_seen, count):
        self._check_fits([len(keys)])
        replicated = NamedSharding(self.mesh, P())
        if last_seen is None:
            last_seen = count = np.zeros(len(keys), np.int32)
        hash_part, table, failed, got = jax.jit(self._load)(
            table,
            hash_part,
            from_host(keys, replicated),
            from_host(vectors.astype(np.float32), replicated),
            from_host(np.asarray(last_seen, np.int32), replicated),
            from_host(np.asarray(count, np.int32), replicated),
        )
        if int(np.sum(to_host(failed))):
            raise ValueError(self._cannot_place())
        return table, hash_part, to_host(got).astype(np.int64)


STRATEGIES = {
    ("row", False): RowRows,
    ("row", True): RowHashRows,
    ("table", False): TableRows,
    ("table", True): TableHashRows,
    ("replicated", False): ReplicatedRows,
    ("replicated", True): ReplicatedHashRows,
}
