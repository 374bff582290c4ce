"""Host-side pieces of online hash tables shared by `DistributedEmbedding`
and `EmbeddingCollection`: the hash part of a shard as the engine carries
it, the export with optimizer slots, scores and deltas (`TableExport`), the
import that continues a run on another device count, and the maintenance
call that evicts stale rows (`scores.py` has the per-device parts)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from sok_jax._compat import shard_map
from sok_jax.distributed import exchange, scores
from sok_jax.distributed.host import from_host, gather_shares, to_host
from sok_jax.ops import checks


class TableExport(NamedTuple):
    """One table's rows on the host, keys ascending, with what continuing
    its training needs (`export_pairs(state, opt_state=...)`).

    keys [K], vectors [K, D]: the pairs.
    slots: the optimizer's slots of those keys, one array per slot
      ([K, D] or [K]), or None (no `opt_state` given).
    opt_count: the optimizer's update count, or None.
    last_seen, count: int32 [K] scores (online hash tables), else None.
    step: the table's step (0 without scores).
    sketch: int32 [shards, depth * width] admission sketches, or None.
    evicted: with `since_step`, the keys evicted since then that hold no
      row now; else None.
    seed: uint32[2] key data of the state's seed (new keys' initial vectors
      derive from it; `import_pairs` takes it unless given another).
    key_placement: the exporting table's ("mod" or "hashed"): which shard
      of `sketch` counted which keys.
    table: the exporting table's name (a collection's `TableSpec.name`;
      "table" for a `DistributedEmbedding`), checked by
      `sok_jax.serving.apply_delta`; None where unknown.
    """

    keys: np.ndarray
    vectors: np.ndarray
    slots: Any = None
    opt_count: Any = None
    last_seen: Any = None
    count: Any = None
    step: int = 0
    sketch: Any = None
    evicted: Any = None
    seed: Any = None
    key_placement: str = "mod"
    table: str | None = None


def resolve_seed(keys, seed):
    """The seed of an import: as given, else the export's, else 0."""
    if seed is not None:
        return seed
    if isinstance(keys, TableExport) and keys.seed is not None:
        return np.asarray(keys.seed, np.uint32)
    return 0


def join_hash_part(slot_keys, sc):
    """The engine's hash part of a shard: slot_keys, or keys and scores."""
    return slot_keys if sc is None else scores.HashShard(slot_keys, sc)


def split_hash_part(hash_part):
    """(slot_keys, scores or None) of the engine's hash part."""
    if isinstance(hash_part, scores.HashShard):
        return hash_part.slot_keys, hash_part.scores
    return hash_part, None


def host_step(sc) -> int:
    """The step of a table's scores (0 without)."""
    return 0 if sc is None else int(to_host(sc.step).max())


def _member_device(rows, name):
    return rows.member_index(name) if rows.placement == "table" else None


def _no_scores(what):
    return ValueError(
        f"{what} needs the table's scores: build it with eviction, admit_after or "
        "HashOptions(track_scores=True)"
    )


def export_table(rows, name, table, hash_part, opt_state, since_step, key_dtype, seed=None):
    """(keys, vectors), or a `TableExport` with `opt_state` or `since_step`."""
    stored = rows.export_rows(table, hash_part, name)
    keys = stored.keys.astype(key_dtype)
    order = np.argsort(keys, kind="stable")
    if opt_state is None and since_step is None:
        return keys[order], stored.vectors[order]
    state = rows.shard_state(hash_part, _member_device(rows, name)) if rows.scored else None
    evicted = None
    if since_step is not None:
        if stored.last_seen is None:
            raise _no_scores("export_pairs(since_step=...)")
        t = int(since_step)
        if rows.evicting:
            if state["log_keys"] is None:
                raise ValueError(
                    "export_pairs(since_step=...) of a table that evicts needs its eviction log "
                    "(HashOptions.eviction_log > 0)"
                )
            if t < state["log_floor"]:
                raise ValueError(
                    f"export_pairs: the eviction log no longer holds every key evicted after step "
                    f"{t} (it covers the steps after {state['log_floor']}); export deltas more "
                    "often or raise HashOptions.eviction_log"
                )
            lk, ls = state["log_keys"].reshape(-1), state["log_steps"].reshape(-1)
            gone = lk[(ls > t) & (lk != checks.padding_value(rows.key_dtype))]
            evicted = np.setdiff1d(np.unique(gone), stored.keys).astype(key_dtype)
        else:
            evicted = np.zeros((0,), key_dtype)
        order = order[stored.last_seen[order] > t]
    slots = opt_count = None
    if opt_state is not None:
        slots = tuple(to_host(s)[stored.rows[order]] for s in opt_state.slots)
        opt_count = int(to_host(opt_state.count))
    pick = (lambda x: None) if stored.last_seen is None else (lambda x: x[order])
    return TableExport(
        keys[order],
        stored.vectors[order],
        slots,
        opt_count,
        pick(stored.last_seen),
        pick(stored.count),
        0 if state is None else state["step"],
        None if state is None else state["sketch"],
        evicted,
        None if seed is None else to_host(seed),
        rows.key_placement,
        name,
    )


def _restore_scores(rows, name, hash_part, exp: TableExport):
    """The imported table's step and sketch (its log restarts here)."""
    sc = hash_part.scores

    def like(x, value):
        return from_host(np.asarray(value, x.dtype).reshape(x.shape), x.sharding)

    step = max(int(exp.step), host_step(sc))
    new = {"step": like(sc.step, np.full(sc.step.shape, step))}
    if sc.log_floor is not None:
        new["log_floor"] = like(sc.log_floor, np.full(sc.log_floor.shape, step))
    if sc.sketch is not None and exp.sketch is not None:
        src = np.asarray(exp.sketch, np.int32)
        shards = 1 if rows.replicated else rows.num_devices
        have = to_host(sc.sketch).reshape(shards, -1)
        if src.shape[1] != have.shape[1]:
            raise ValueError(
                f"import_pairs: the exported sketch has {src.shape[1]} counters per shard, this "
                f"table {have.shape[1]} (HashOptions.sketch_depth * sketch_width must match)"
            )
        device = _member_device(rows, name)
        if device is None:
            same = exp.key_placement == rows.key_placement
            have = scores.merge_sketches(src, shards, same_placement=same)
        else:
            have[device] = src.sum(axis=0)
        new["sketch"] = like(sc.sketch, have)
    return scores.HashShard(hash_part.slot_keys, dataclasses.replace(sc, **new))


def import_table(rows, name, table, hash_part, keys, vectors, share, optimizer, init_opt):
    """(table, hash_part, opt_state or None) holding the pairs `keys,
    vectors` or the `TableExport` `keys`; `init_opt(table)` makes the
    optimizer state that the export's slots are written into."""
    exp = keys if isinstance(keys, TableExport) else None
    if exp is not None:
        keys, vectors = exp.keys, exp.vectors
        if exp.slots is not None and optimizer is None:
            raise ValueError(
                "import_pairs: the export carries optimizer slots; pass optimizer= to restore "
                "them (the result is then (state, opt_state))"
            )
    elif vectors is None:
        raise ValueError("import_pairs needs the vectors (or a TableExport as keys)")
    last_seen = count = None
    if exp is not None and exp.last_seen is not None and rows.scored:
        last_seen, count = exp.last_seen, exp.count
    table, hash_part, where = rows.import_rows(
        table, hash_part, name, keys, vectors, share, last_seen=last_seen, count=count
    )
    if exp is not None and rows.scored:
        hash_part = _restore_scores(rows, name, hash_part, exp)
    if optimizer is None:
        return table, hash_part, None
    opt_state = init_opt(table)
    if exp is not None and exp.slots is not None:
        slots = list(exp.slots)
        if share:
            slots = list(gather_shares(*slots))
        new = []
        for s, values in zip(opt_state.slots, slots):
            host = to_host(s).copy()
            host[where] = np.asarray(values).reshape((len(where),) + host.shape[1:])
            new.append(from_host(host, s.sharding))
        count = opt_state.count
        if exp.opt_count is not None:
            count = from_host(np.asarray(exp.opt_count, np.int32), count.sharding)
        opt_state = type(opt_state)(tuple(new), count)
    return table, hash_part, opt_state


def evict_stale_shards(tables, unit_name, hash_part, max_age):
    """The maintenance call on one unit: (hash_part, {table: stats})."""
    unit = tables.unit(unit_name)
    rows = unit.rows
    if not getattr(rows, "evicting", False):
        raise ValueError("evict_stale needs a hash table with eviction ('lru' or 'lfu')")
    if isinstance(max_age, bool) or int(max_age) != max_age or max_age < 1:
        raise ValueError(f"max_age must be a positive integer, got {max_age!r}")
    axis = tables.axis_name
    names = exchange.member_tables(unit)

    def body(hp):
        hp, freed = rows.evict_stale(hp, int(max_age))
        load = scores.load_of(hp.scores, hp.slot_keys.shape[0])
        counters = exchange._Counters(names, names)
        counters.add_online(unit, {"evicted": freed, "load": load})
        return hp, counters.stats()

    spec = tables._shard_specs()[unit_name][1]
    out = jax.jit(shard_map(body, tables.mesh, (spec,), (spec, P(axis))))(hash_part)
    return out
