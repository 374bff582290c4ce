"""The per-device data path of a sharded lookup, read top to bottom (every
function here runs inside `shard_map`, on one device's slice of the batch):

  1. `plan`: bucket the valid keys by owner and remove duplicates per
     destination (one sort), so each distinct key crosses the network once;
     each destination bucket holds `capacity` keys, the rest are counted in
     `stats.overflow`, never silently lost;
  2. `all_to_all` the bucketed values (keys, or local rows);
  3. on the owner, the rows of the received keys (`rows.*.owner_rows`: in
     hash mode find-or-insert them), then gather them with the FFI lookup;
  4. `all_to_all` the vectors back;
  5. combine per (sample, slot) with the FFI combine, reading the received
     vectors through the plan's inverse index.

Steps 3 and 5 are `sok_jax.embedding._lookup` (custom_vjp), and the
all_to_all transposes to itself, so `jax.grad` runs this path in reverse.
The sparse backward (`owner_bags`) runs the same reverse exchange without
the dense gradient: the requesting side sums its positions' gradients per
received slot, sends them back, and the owner reduces them per row.

`local_forward` is the path with nothing to exchange (one device, direct
mode, a capacity that holds the batch): the single-shard lookup.

No zero-size array crosses a `shard_map` boundary (absent pieces are None);
guarded by tests/test_distributed.py::test_no_zero_size_array_crosses_shard_map.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sok_jax.distributed.state import EmbeddingStats, ExchangeContext
from sok_jax.embedding import LookupContext, _lookup
from sok_jax.ids import Bags
from sok_jax.ops import checks, resolve


class ExchangePlan(NamedTuple):
    """Where each distinct key of one device's batch goes.

    send: [n * capacity] the values for each destination's bucket (keys in
      hash mode, the owner's local rows in direct mode; empty slots hold the
      send format's empty value).
    recv_index: int32 [N]: per id position, the slot of its vector in the
      [n * capacity] buffer that comes back (-1: padding, invalid, overflow).
    overflow: int32: distinct keys that found their bucket full.
    invalid: int32: ids that are neither padding nor keys of the table.
    largest_bucket: int32: the most distinct keys bound for one destination.
    """

    send: jax.Array
    recv_index: jax.Array
    overflow: jax.Array
    invalid: jax.Array
    largest_bucket: jax.Array


class DeviceLookup(NamedTuple):
    """One device's lookup: the combined output [b, S, D], the shard after
    any insertion (`table`, `slot_keys`: None when the lookup leaves it as it
    was), the counters, and the context for the sparse backward."""

    out: jax.Array
    table: Any
    slot_keys: Any
    stats: EmbeddingStats
    ctx: Any


class OwnerBags(NamedTuple):
    """The backward as bags over the owner's table rows: the cotangent per
    bag, the bags (ids, offsets, weights in the ops' layout) and the combiner
    to differentiate."""

    grad_out: jax.Array
    ids: jax.Array
    offsets: jax.Array
    weights: jax.Array
    combiner: str


def _counts(overflow, invalid, hash_full) -> EmbeddingStats:
    return EmbeddingStats(overflow.reshape(1), invalid.reshape(1), hash_full.reshape(1))


@dataclasses.dataclass(frozen=True)
class Exchange:
    """The data path of one table sharded over `axis_name` by `rows`."""

    rows: Any  # a row strategy (sok_jax.distributed.rows)
    axis_name: str
    combiner: str
    implementation: str
    key_dtype: Any

    @property
    def num_devices(self) -> int:
        return self.rows.num_devices

    def all_to_all(self, x):
        return jax.lax.all_to_all(x, self.axis_name, 0, 0, tiled=True)

    def plan(self, flat_ids, capacity: int) -> ExchangePlan:
        """Step 1: bucket by owner and dedup per destination (one sort)."""
        n = self.num_devices
        N = flat_ids.shape[0]
        valid, owner, value, bound = self.rows.bucket_keys(flat_ids)
        invalid = jnp.sum(~valid & ~checks.is_padding(flat_ids)).astype(jnp.int32)
        iota = jnp.arange(N, dtype=jnp.int32)
        if bound is not None:
            # (owner, value) packed into one int32 below n * bound: a plain
            # key/value sort (a radix sort on the GPU), not a comparator sort.
            packed = jnp.where(valid, owner * bound + value, n * bound).astype(jnp.int32)
            s_packed, perm = jax.lax.sort((packed, iota), num_keys=1)
            s_owner = jnp.minimum(s_packed // bound, n).astype(jnp.int32)
            s_value = s_packed - s_owner * bound
            differs = s_packed[1:] != s_packed[:-1]
        else:
            s_owner, s_value, perm = jax.lax.sort((owner, value, iota), num_keys=2)
            differs = (s_owner[1:] != s_owner[:-1]) | (s_value[1:] != s_value[:-1])
        real = s_owner < n
        first = jnp.concatenate([jnp.ones((1,), bool), differs]) & real
        run = jnp.cumsum(first.astype(jnp.int32)) - 1
        per_owner = jax.ops.segment_sum(first.astype(jnp.int32), s_owner, n + 1)[:n]
        start = jnp.cumsum(per_owner) - per_owner
        rank = run - start[jnp.minimum(s_owner, n - 1)]
        fits = real & (rank < capacity)
        slot = jnp.where(fits, s_owner * capacity + rank, -1)
        overflow = jnp.sum(first & ~fits).astype(jnp.int32)
        send_dtype, empty = self.rows.send_format(self.key_dtype)
        target = jnp.where(first & fits, slot, n * capacity)
        send = (
            jnp.full((n * capacity,), empty, send_dtype)
            .at[target]
            .set(s_value.astype(send_dtype), mode="drop")
        )
        recv_index = jnp.zeros((N,), jnp.int32).at[perm].set(slot)
        return ExchangePlan(send, recv_index, overflow, invalid, jnp.max(per_owner))

    def forward(self, table, slot_keys, seed, bags: Bags, capacity: int, training, sparse):
        """Steps 1-5 on one device: a `DeviceLookup` with an `ExchangeContext`.
        `sparse`: the output carries no gradient to the table."""
        impl = self.implementation
        plan = self.plan(bags.ids, capacity)
        received = self.all_to_all(plan.send)  # [n*C] keys or local rows
        owner = self.rows.owner_rows(table, slot_keys, seed, received, training)
        # After an insertion: new rows carry their initial vectors.
        src = owner.table if owner.table is not None else table
        src = jax.lax.stop_gradient(src) if sparse else src
        singles = jnp.arange(received.shape[0] + 1, dtype=jnp.int32)
        no_weights = jnp.zeros((0,), jnp.float32)
        vectors = _lookup("sum", impl, 1, src, owner.rows, singles, no_weights)  # a gather
        back = self.all_to_all(vectors)  # [n*C, D], bucket-major by destination
        out = _lookup(
            self.combiner, impl, bags.fixed_nnz, back, plan.recv_index, bags.offsets, bags.weights
        )
        out = out.reshape(*bags.batch_shape, table.shape[1])
        weights = bags.weights if bags.weights.shape[0] else None
        ctx = ExchangeContext(owner.rows, plan.recv_index, bags.offsets, weights)
        stats = _counts(plan.overflow, plan.invalid, owner.hash_full)
        return DeviceLookup(out, owner.table, owner.slot_keys, stats, ctx)

    def local_forward(self, table, bags: Bags, sparse):
        """The single-shard lookup of the whole batch on the local table (one
        device, direct mode): a `DeviceLookup` with a `LookupContext`. The
        same function and counters as `forward`; nothing can overflow."""
        src = jax.lax.stop_gradient(table) if sparse else table
        num_rows = table.shape[0]
        valid, _ = checks.valid_rows(bags.ids, num_rows)
        invalid = jnp.sum(~valid & ~checks.is_padding(bags.ids)).astype(jnp.int32)
        out = _lookup(
            self.combiner,
            self.implementation,
            bags.fixed_nnz,
            src,
            bags.ids,
            bags.offsets,
            bags.weights,
        )
        out = out.reshape(*bags.batch_shape, table.shape[1])
        weights = bags.weights if bags.weights.shape[0] else None
        ctx = LookupContext(
            bags.ids, bags.offsets, weights, num_rows, self.combiner, self.implementation
        )
        zero = jnp.zeros((), jnp.int32)
        return DeviceLookup(out, None, None, _counts(zero, invalid, zero), ctx)

    def owner_bags(self, ctx, d_out) -> OwnerBags:
        """The sparse backward up to the owner: `OwnerBags` over this device's
        table rows. A `LookupContext` (no exchange) gives the lookup's own
        bags; an `ExchangeContext` runs the reverse exchange: the requesting
        side sums its positions' gradients per received slot and sends them
        to the owners, whose bags are one slot each."""
        g = d_out.reshape(-1, d_out.shape[-1])
        if isinstance(ctx, LookupContext):
            return OwnerBags(g, ctx.ids, ctx.offsets, ctx.bag_weights(), ctx.combiner)
        ops = resolve(self.implementation)
        weights = jnp.zeros((0,), jnp.float32) if ctx.weights is None else ctx.weights
        slots = ctx.owner_rows.shape[0]  # n*C: the slots of the returned buffer
        per_slot = ops.lookup_combine_bwd(
            g, ctx.recv_index, ctx.offsets, weights, self.combiner, slots
        )
        d_back = ops.rows_to_dense(per_slot, slots, jnp.float32)
        d_vectors = self.all_to_all(d_back)
        singles = jnp.arange(slots + 1, dtype=jnp.int32)
        return OwnerBags(d_vectors, ctx.owner_rows, singles, jnp.zeros((0,), jnp.float32), "sum")
