"""Live deltas: a serving state brought up to date with the rows training
changed since it was made, without rebuilding it.

    delta = emb.export_pairs(train_state, since_step=t)       # the trainer
    qstate = sok_jax.serving.apply_delta(emb, qstate, delta)  # the server

The state is what a server looks up: a float state (`EmbeddingState`,
`CollectionState`) or an inference table in any row format
(`QuantizedState`, `QuantizedCollectionState`). The delta is a layer's
`TableExport` from `export_pairs(state, since_step=t)`, or a collection's
{table: TableExport} (all its tables or some), or in place of any
TableExport plain `(keys, vectors)` pairs. Per table, `apply_delta`:

  * frees the rows of the delta's evicted keys (a hash table that evicts):
    a lookup of such a key gives zeros and counts it in `stats.unseen`;
  * inserts the keys the table does not hold (a hash table; the training
    insertion rule without admission) and writes every key's vector in the
    table's row format as `quantize` converts a row (int8: codes with the
    row's own scale and bias; 16-bit: rounded to nearest), so each row the
    delta names holds bit for bit what `quantize` of the trained state
    holds for it;
  * with scores, gives each key the delta's last_seen and count (plain
    pairs carry none: 0, as `import_pairs` gives them), and the table the
    delta's step where that is later.

Rows the delta does not name keep their values. So a serving state made
from the trained state of step t, given `export_pairs(since_step=t)` of a
later state, holds that later state's rows (its logical table: a hash key
may sit in another row than in training).

A direct table keeps no scores, so `export_pairs(since_step=t)` refuses it;
its delta is the pairs of the keys training touched, e.g. `(keys,
emb.logical_rows(state, keys))`, or a whole export.

Each table's update is one compiled program (cached on the model), called
on blocks of at most CHUNK_ROWS keys per device, of power-of-two sizes
(`_call_widths`: only the last call pads), so a server following training
compiles a few sizes. The vectors go to the devices from the delta's own
arrays (no host copy but the last call's padding), and the call waits,
once at the end, for a hash table's programs to say whether every key
found a row. A delta that does not fit (a shard, or with eviction a
bucket, full: the serving table has fewer rows than the training table,
or misses evictions the delta does not list) raises and leaves the given
state as it was (unless donated).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sok_jax._compat import shard_map
from sok_jax.distributed import quantized
from sok_jax.distributed.collection import EmbeddingCollection
from sok_jax.distributed.eager import eager_cache
from sok_jax.distributed.host import device_blocks, from_host, to_host
from sok_jax.distributed.layer import DistributedEmbedding
from sok_jax.distributed.online import TableExport, join_hash_part, split_hash_part
from sok_jax.ops import checks


class _Delta(NamedTuple):
    """One table's delta, checked, on the host."""

    keys: np.ndarray
    vectors: np.ndarray
    evicted: np.ndarray
    last_seen: Any  # int32 [K] where the table keeps scores and the delta has them, else None
    count: Any
    step: int


def _check_delta(rows, name: str, given) -> _Delta:
    """`given` (a TableExport or (keys, vectors)) as a `_Delta` of table
    `name` held by strategy `rows`; ValueError naming what does not fit."""
    what = f"apply_delta: table {name!r}"
    if isinstance(given, TableExport):
        if given.table is not None and given.table != name:
            raise ValueError(
                f"{what}: the delta is an export of table {given.table!r}, not of {name!r}"
            )
        keys, vectors, evicted = given.keys, given.vectors, given.evicted
        last_seen, count, step = given.last_seen, given.count, int(given.step)
    elif isinstance(given, (tuple, list)) and len(given) == 2:
        (keys, vectors), evicted, last_seen, count, step = given, None, None, None, 0
    else:
        raise ValueError(
            f"{what}: a delta is a TableExport (export_pairs(state, since_step=t)) or (keys, "
            f"vectors), got {type(given).__name__}"
        )
    dims = np.shape(vectors)
    if len(dims) == 2 and dims[1] != rows.dim:
        raise ValueError(
            f"{what}: the delta's vectors are {dims[1]} wide, table {name!r} has dim {rows.dim} "
            "(a delta of another table?)"
        )
    if not rows.scored or last_seen is None or count is None:
        last_seen = count = None
    keys, vectors, last_seen, count = rows.check_pairs(
        keys, vectors, False, last_seen, count, what=what
    )
    evicted = checks.host_keys(
        np.zeros(0, np.int64) if evicted is None else evicted,
        rows.key_dtype,
        f"{what}: evicted keys",
        padding_ok=False,
    ).reshape(-1)
    if evicted.size and not rows.evicting:
        raise ValueError(
            f"{what}: the delta evicts {evicted.size} keys, but table {name!r} never evicts "
            "(a delta of another table?)"
        )
    if not rows.hashed:
        keys = rows._check_direct_keys(keys, rows.members[rows.member_index(name)])
    return _Delta(keys, vectors.astype(np.float32, copy=False), evicted, last_seen, count, step)


# Keys per device per program call: a delta is applied in calls of at most
# CHUNK_ROWS keys (of power-of-two sizes down to MIN_CALL_ROWS, see
# `_call_widths`), each reading its keys' vectors straight from the caller's
# arrays (no host copy but the last call's padding).
CHUNK_ROWS = 1 << 16
MIN_CALL_ROWS = 1 << 12


def _power_of_two(count: int) -> int:
    """`count` rounded up to a power of two (few sizes, few compiles)."""
    return 1 << max(count - 1, 0).bit_length()


def _call_widths(count: int) -> list:
    """The keys per device of each call, for devices receiving at most
    `count`: CHUNK_ROWS while that many remain, then the powers of two of
    the rest from the largest down to MIN_CALL_ROWS, and one call of
    MIN_CALL_ROWS for what is left (the only call that pads, and by less
    than MIN_CALL_ROWS). Every width is a power of two: few compiles."""
    low = min(MIN_CALL_ROWS, CHUNK_ROWS)
    widths = [CHUNK_ROWS] * (count // CHUNK_ROWS)
    rest = count % CHUNK_ROWS
    while rest > low:
        top = 1 << (rest.bit_length() - 1)
        widths.append(top)
        rest -= top
    if rest or not widths:
        widths.append(low)
    return widths


def _sharded_blocks(column, fill, starts, takes, width: int, sharding):
    """A global [n * width, ...] array whose block d holds
    column[starts[d] : starts[d] + takes[d]], then `fill`: each device's
    block made from a view of `column` (copied only to pad it)."""
    n = len(starts)

    def block(index):
        d = (index[0].start or 0) // width if n > 1 else 0
        part = column[starts[d] : starts[d] + takes[d]]
        if part.shape[0] == width:
            return part
        padded = np.full((width, *column.shape[1:]), fill, column.dtype)
        padded[: part.shape[0]] = part
        return padded

    return jax.make_array_from_callback((n * width, *column.shape[1:]), sharding, block)


def _device_calls(rows, name: str, delta: _Delta):
    """The delta as the program's inputs, one tuple per call: per device (one
    block for a replicated table), the values sent for its keys (a hash
    table: the keys; direct: their local rows), their vectors and scores;
    and the keys to free (all in the first call, none after)."""
    n = 1 if rows.replicated else rows.num_devices
    lead = None if rows.replicated else rows.axis_name
    vec, mat = NamedSharding(rows.mesh, P(lead)), NamedSharding(rows.mesh, P(lead, None))
    if rows.hashed:
        owner = rows.home_devices(delta.keys, name) if n > 1 else None
        values, fill = delta.keys.astype(rows.key_dtype), checks.padding_value(rows.key_dtype)
    else:  # row g of the physical [n * R, D] array is local row g % R of device g // R
        g = rows.global_rows(delta.keys, name)
        owner, values = divmod(g, rows.rows_per_device) if n > 1 else (None, g)
        values, fill = values.astype(np.int32), -1
    columns = [(values, fill), (delta.vectors, 0)]
    if rows.scored:
        zeros = np.zeros(len(delta.keys), np.int32)
        for x in (delta.last_seen, delta.count):
            columns.append((zeros if x is None else np.asarray(x, np.int32), 0))
    if n > 1 and not (owner[1:] >= owner[:-1]).all():  # each device's keys made contiguous
        order = np.argsort(owner, kind="stable")
        columns = [(c[order], f) for c, f in columns]
    counts = np.bincount(owner, minlength=n) if n > 1 else np.array([len(delta.keys)])
    gone = None
    if rows.evicting:
        where = rows.home_devices(delta.evicted, name)
        pad = checks.padding_value(rows.key_dtype)
        most = int(np.bincount(where, minlength=n).max(initial=0))
        (block,), _ = device_blocks(where, n, [(delta.evicted, pad)], _power_of_two(most))
        gone = from_host(block, vec)
        no_keys = from_host(np.full(block.shape, pad, block.dtype), vec)
    first = np.cumsum(counts) - counts
    done = 0
    for width in _call_widths(int(counts.max(initial=0))):
        starts = first + done
        takes = np.clip(counts - done, 0, width)
        done += width
        put = [
            _sharded_blocks(c, f, starts, takes, width, mat if c.ndim == 2 else vec)
            for c, f in columns
        ]
        last_seen, count = (put[2], put[3]) if rows.scored else (None, None)
        yield put[0], put[1], last_seen, count, gone
        gone = no_keys if rows.evicting else None


def _program(model, tables, unit, convert, fmt: str, donate: bool):
    """The jitted shard_map that applies one delta to one unit's shard:
    (table, hash_part, values, vectors, last_seen, count, gone, step) ->
    (table, hash_part, keys without a row per device). Cached on the model."""
    key = ("apply_delta", unit.name, fmt, donate)
    jits = eager_cache(model).jits
    if key in jits:
        return jits[key]
    rows, axis = unit.rows, tables.axis_name
    table_spec, hash_spec = tables._shard_specs()[unit.name]
    lead = None if rows.replicated else axis
    vec, mat = P(lead), P(lead, None)

    def body(table, hash_part, values, vectors, last_seen, count, gone, step):
        found, failed = values, jnp.zeros((), jnp.int32)
        if rows.hashed:
            if rows.evicting:
                hash_part = rows.remove_keys(hash_part, gone)
            hash_part, found, failed = rows.place_keys(hash_part, values, last_seen, count)
            if rows.scored:
                sc = hash_part.scores
                sc = dataclasses.replace(sc, step=jnp.maximum(sc.step, step))
                hash_part = dataclasses.replace(hash_part, scores=sc)
        first = jax.tree.leaves(table)[0]
        target = jnp.where(found >= 0, found, first.shape[0])
        new = convert(vectors)
        table = jax.tree.map(
            lambda t, v: t.at[target].set(v.astype(t.dtype), mode="drop"), table, new
        )
        return table, hash_part, failed.reshape(1)

    in_specs = (table_spec, hash_spec, vec, mat, vec, vec, vec, P())
    fn = shard_map(body, tables.mesh, in_specs, (table_spec, hash_spec, P(axis)))
    jits[key] = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
    return jits[key]


def _cannot_place(rows, name: str, failed: int) -> ValueError:
    where = "a bucket of 16 rows or a shard" if rows.evicting else "a hash shard"
    return ValueError(
        f"apply_delta: table {name!r}: {failed} of the delta's keys found no free row ({where} "
        "is full); the serving table must have the training table's rows per device and be "
        "made from the state at the step the delta starts from (export_pairs(since_step=t) "
        "lists the keys evicted after t only)"
    )


def _serving_form(model, state):
    """(ShardedTables whose units store the state's row format, the format's
    name, its row conversion) for `state`, checked against `model`."""
    if isinstance(state, quantized.QUANTIZED_STATES):
        quantized.check_quantized(model, state)
        tier = quantized.make_storage(state.dtype)
        return quantized.read_only_tables(model._tables, state.dtype), state.dtype, tier.convert
    model._check_state(state)
    for u in model._tables.units:
        if u.storage.kind != "hbm":
            raise ValueError(
                f"apply_delta: unit {u.name!r} stores its rows in host memory "
                f"(storage={u.storage.kind!r}); serving reads tables from HBM: apply deltas to "
                "sok_jax.serving.quantize(...) of the state, or import_pairs it into an HBM layer"
            )
    return model._tables, "float", lambda v: v


def _tables_of(model, delta) -> dict:
    """{table: (its unit, its delta)} of a layer's or collection's delta."""
    if isinstance(model, DistributedEmbedding):
        if isinstance(delta, dict):
            raise ValueError(
                "apply_delta: a DistributedEmbedding's delta is one TableExport (or (keys, "
                "vectors)), got a dict (a collection's?)"
            )
        name = quantized._only_unit(model)
        return {name: (name, delta)}
    if isinstance(model, EmbeddingCollection):
        if not isinstance(delta, dict):
            raise ValueError(
                "apply_delta: an EmbeddingCollection's delta is {table: TableExport or (keys, "
                "vectors)}, as export_pairs(state, since_step=t) returns it; got "
                f"{type(delta).__name__}"
            )
        for table in delta:
            model._strategy(table)  # raises, naming the collection's tables
        return {t: (model._unit_of[t], d) for t, d in delta.items()}
    raise ValueError(
        "apply_delta: model must be a DistributedEmbedding or an EmbeddingCollection, got "
        f"{type(model).__name__}"
    )


def _unit_shards(model, state) -> dict:
    """{unit: (table, hash part)} of a layer's or collection's state."""
    if isinstance(model, EmbeddingCollection):
        return {
            k: (v.table, join_hash_part(v.slot_keys, v.scores)) for k, v in state.shards.items()
        }
    return {
        quantized._only_unit(model): (state.table, join_hash_part(state.slot_keys, state.scores))
    }


def _with_shards(model, state, shards: dict):
    """`state` holding `shards` ({unit: (table, hash part)})."""
    if isinstance(model, EmbeddingCollection):
        new = {k: type(state.shards[k])(t, *split_hash_part(h)) for k, (t, h) in shards.items()}
        return dataclasses.replace(state, shards=new)
    ((table, hash_part),) = shards.values()
    slot_keys, scores = split_hash_part(hash_part)
    return dataclasses.replace(state, table=table, slot_keys=slot_keys, scores=scores)


def apply_delta(model, state, delta, *, donate: bool = False):
    """`state` of `model` (a `DistributedEmbedding` or `EmbeddingCollection`)
    with the rows of `delta` written into it: evicted keys freed, new keys
    inserted, every named row converted to the state's row format (module
    docstring). Runs eagerly, one compiled program per table.

    Args:
      model: the layer or collection the state belongs to.
      state: its float state or a quantized one (`sok_jax.serving.quantize`),
        any device count.
      delta: a layer's `TableExport` (`export_pairs(state, since_step=t)`)
        or `(keys, vectors)`; a collection's {table: either}.
      donate: update the state's tables in place (the given state is then
        consumed, also when the call raises); otherwise they are copied.

    Returns:
      The new state, of the given state's type; its counters unchanged.

    Raises:
      ValueError: a state that is not the model's; a delta of another table
        or dim, for a table the model lacks, of keys outside a direct table
        or repeated, with NaN or Inf, evicting keys of a table that never
        evicts; or keys that find no free row (a full hash shard or bucket).
    """
    per_table = _tables_of(model, delta)
    tables, fmt, convert = _serving_form(model, state)
    checked = {  # every table's delta checked before any is applied
        name: (tables.unit(unit), _check_delta(tables.unit(unit).rows, name, given))
        for name, (unit, given) in per_table.items()
    }
    shards = _unit_shards(model, state)
    for name, (unit, d) in checked.items():
        if not (d.keys.size or d.evicted.size):
            continue
        rows = unit.rows
        run = _program(model, tables, unit, convert, fmt, donate)
        step = from_host(np.int32(d.step), NamedSharding(tables.mesh, P()))
        table, hash_part = shards[unit.name]
        failures = []
        for inputs in _device_calls(rows, name, d):
            table, hash_part, failed = run(table, hash_part, *inputs, step)
            failures.append(failed)
        if rows.hashed:  # a replicated table's devices each count the same keys
            lost = sum(int(x.max() if rows.replicated else x.sum()) for x in map(to_host, failures))
            if lost:
                raise _cannot_place(rows, name, lost)
        shards[unit.name] = (table, hash_part)
    return _with_shards(model, state, shards)
