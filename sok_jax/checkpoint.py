"""Checkpoints of sok_jax states with orbax: `save`, and a `restore` that
says in one sentence what does not match, or moves a layer's or a
collection's tables onto another device count through their logical
(key, vector) pairs.

The states (`EmbeddingState`, `CollectionState`, the sparse optimizer
states) are pytrees of sharded jax.Arrays, so orbax saves them as they are.
Their meaning depends on the layout they were laid out for (key k sits on
device k % n), so `save` writes beside the arrays, in `LAYOUT_FILE`, the
layout of every state in the tree: its device count, rows per device and
mode, and a collection's plan when `save` is given the collection.
`restore` compares it with the target's:

* the same layout: the checkpoint's arrays are compared with the target's
  (paths, shapes, dtypes), a `ValueError` names the first that differs
  (instead of orbax's long report), and the arrays are restored into the
  target's shardings;
* another device count or rows per device (D and mode the same): with
  `layer=` (and `optimizer=` where the tree holds the optimizer state), the
  saved arrays are read on the host, each table's pairs exported in the
  saved layout (the row strategies rebuilt over an abstract mesh of the
  saved device count) and imported into `layer`: the logical tables, the
  optimizer slots and the scores move; the counters start at zero;
* any layout that cannot move so raises, naming what to pass or
  `export_pairs`/`import_pairs`.

Importing this module imports orbax; `import sok_jax` alone never does.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import AbstractMesh

from sok_jax.distributed.collection import CollectionState, EmbeddingCollection
from sok_jax.distributed.layer import DistributedEmbedding
from sok_jax.distributed.online import export_table, join_hash_part
from sok_jax.distributed.planner import UnitPlan
from sok_jax.distributed.rows import STRATEGIES, Member
from sok_jax.distributed.scores import HashOptions, HashScores
from sok_jax.distributed.state import EmbeddingState
from sok_jax.distributed.storage import settle
from sok_jax.optim import SparseOptState

# The file beside the arrays that records the layout of every state saved.
LAYOUT_FILE = "sok_layout.json"
_STATES = (EmbeddingState, CollectionState, SparseOptState)


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path(path) -> str:
    return "/".join(_key(k) for k in path)


def _target_arrays(target) -> dict:
    """{"a/b/c": (shape, dtype)} of the target's array leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    return {_path(path): (tuple(x.shape), np.dtype(x.dtype)) for path, x in leaves}


def _saved_arrays(tree, prefix="") -> dict:
    """{"a/b/c": (shape, dtype)} of a checkpoint's metadata tree."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_saved_arrays(v, f"{prefix}{k}/"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_saved_arrays(v, f"{prefix}{i}/"))
    elif tree is not None and hasattr(tree, "shape"):
        out[prefix[:-1]] = (tuple(tree.shape), np.dtype(tree.dtype))
    return out


def _states(tree) -> list:
    """[(path, node)] of the sok_jax states in `tree` (layer, collection and
    sparse optimizer states), in tree order."""
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, _STATES))[0]
    return [(_path(p), x) for p, x in nodes if isinstance(x, _STATES)]


def _device_count(node) -> int | None:
    """The size of the mesh axis a state's arrays are sharded over; None
    where no leaf says (ShapeDtypeStructs without shardings)."""
    for x in jax.tree.leaves(node):
        s = getattr(x, "sharding", None)
        spec = getattr(s, "spec", None)
        if spec and spec[0] is not None:
            return int(s.mesh.shape[spec[0]])
    return None


def _layout(node, layer=None) -> dict | None:
    """What a layer's or a collection's state means depends on (None for an
    optimizer state, laid out like its table). A collection's plan (its
    units' placements, members and rows) is known from `layer` only."""
    n = _device_count(node)
    if isinstance(node, EmbeddingState):
        rows = node.table.shape[0]
        return {
            "kind": "DistributedEmbedding",
            "num_devices": n,
            "rows_per_device": None if n is None else rows // n,
            "dim": int(node.table.shape[1]),
            "hashed": node.slot_keys is not None,
            "scored": node.scores is not None,
        }
    if isinstance(node, CollectionState):
        plan = None
        if isinstance(layer, EmbeddingCollection):
            plan = [dataclasses.asdict(u) for u in layer.plan.units]
        return {
            "kind": "EmbeddingCollection",
            "num_devices": n,
            "tables": {u: list(s.table.shape) for u, s in sorted(node.shards.items())},
            "plan": plan,
        }
    return None


def _layouts(tree, layer=None) -> dict:
    return {p: lay for p, x in _states(tree) if (lay := _layout(x, layer)) is not None}


def save(path, tree, *, layer=None, checkpointer=None) -> None:
    """Saves `tree` (a state, an optimizer state, or a dict of them) at
    `path`, with the layout of each state in it (`LAYOUT_FILE`). For an
    `EmbeddingCollection`'s state pass the collection as `layer`: its plan
    is recorded, so that `restore` can move it to another device count."""
    ckpt = checkpointer or ocp.StandardCheckpointer()
    settle(tree)  # a prefetch's moves into a cache finished before orbax reads it
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    if jax.process_index() == 0:
        (epath.Path(path) / LAYOUT_FILE).write_text(json.dumps(_layouts(tree, layer), indent=1))


def _saved_layouts(path) -> dict:
    """The layouts `save` recorded; {} for a checkpoint saved without them."""
    f = epath.Path(path) / LAYOUT_FILE
    return json.loads(f.read_text()) if f.exists() else {}


# What a move through the pairs changes; the rest (D, mode) must match.
_MOVABLE = ("num_devices", "rows_per_device", "tables")
_RECORDED = ("plan",)  # recorded where known, compared never


def _moved(saved: dict, want: dict) -> dict:
    """{path: (saved layout, target layout)} of the states laid out for
    another device count or rows per device (a target without shardings is
    taken to match; another D or mode is left to the arrays' comparison)."""
    out = {}

    def rest(lay):
        return {k: v for k, v in lay.items() if k not in _MOVABLE + _RECORDED}

    for p, lay in want.items():
        was = saved.get(p)
        if was is None or lay["num_devices"] is None:
            continue
        if any(was.get(k) != lay.get(k) for k in _MOVABLE) and rest(was) == rest(lay):
            out[p] = (was, lay)
    return out


def _how(lay: dict) -> str:
    if lay["kind"] == "EmbeddingCollection":
        return f"{lay['num_devices']} devices"
    return f"{lay['num_devices']} devices x {lay['rows_per_device']} rows"


def restore(path, target, *, layer=None, optimizer=None, checkpointer=None):
    """The tree saved at `path`, restored with `target`'s structure, shapes,
    dtypes and shardings (`target`: arrays or ShapeDtypeStructs, e.g. a
    fresh `layer.init(seed)`, or a dict of a state and its optimizer state).

    A state saved in another layout (another device count, more rows per
    device) moves through its logical pairs when `layer` (the target's
    `DistributedEmbedding` or `EmbeddingCollection`; a collection's plan
    must have been saved, `save(..., layer=)`) is given, and `optimizer`
    (the sparse optimizer) where the tree holds its optimizer state.

    Raises:
      ValueError: naming the first array of the checkpoint that is missing
        from, extra to, or shaped or typed differently from the target; or
        a state saved in another layout that cannot move here (no `layer`,
        a collection saved without its plan, an optimizer state without
        `optimizer`).
    """
    ckpt = checkpointer or ocp.StandardCheckpointer()
    moved = _moved(_saved_layouts(path), _layouts(target))
    if moved:
        return _restore_moved(ckpt, path, target, moved, layer, optimizer)
    meta = ckpt.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    saved = _saved_arrays(getattr(meta, "tree", meta))
    want = _target_arrays(target)
    for name in sorted(set(saved) | set(want)):
        if name not in want:
            raise ValueError(f"the checkpoint at {path} holds {name!r}, which the target has not")
        if name not in saved:
            raise ValueError(f"the checkpoint at {path} has no {name!r}, which the target needs")
        if saved[name] != want[name]:
            (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], want[name]
            raise ValueError(
                f"the checkpoint's {name!r} is {s_dtype.name}{list(s_shape)} but the target's "
                f"is {w_dtype.name}{list(w_shape)} (a layer built with other sizes? a table "
                "moves between layouts through export_pairs / import_pairs)"
            )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target,
    )
    return ckpt.restore(path, abstract)


def _host_tree(ckpt, path):
    """The whole checkpoint as nested dicts of numpy arrays (no device)."""
    meta = ckpt.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    tree = getattr(meta, "tree", meta)
    return ckpt.restore(path, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))


def _at(tree, path: str):
    for k in path.split("/") if path else ():
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k]
    return tree


def _saved_rows(layer: DistributedEmbedding, lay: dict):
    """The layer's row strategy as it was in the saved layout, over an
    abstract mesh: enough for its host export (`export_table`)."""
    now = layer._rows
    fields = {f.name: getattr(now, f.name) for f in dataclasses.fields(now)}
    n, r = lay["num_devices"], lay["rows_per_device"]
    online = (layer.online or HashOptions(track_scores=True)) if lay["scored"] else None
    fields.update(
        mesh=AbstractMesh((n,), (layer.axis_name,)),
        rows_per_device=r,
        members=(Member(now.members[0].name, n * r),),
        online=online,
    )
    return STRATEGIES[("row", lay["hashed"])](**fields)


_LAYERS = {"DistributedEmbedding": DistributedEmbedding, "EmbeddingCollection": EmbeddingCollection}


def _restore_moved(ckpt, path, target, moved, layer, optimizer):
    """`restore` of a tree whose layer or collection state was saved in
    another layout: its pairs, exported from the saved layout on the host,
    imported into `layer`."""
    (p, (was, now)), *_ = moved.items()
    where = f"the checkpoint at {path} was saved on {_how(was)}, the target is on {_how(now)}"
    kind = was["kind"]
    states = _states(target)
    opts = [q for q, x in states if isinstance(x, SparseOptState)]
    if len(states) - len(opts) != 1:
        raise ValueError(
            f"{where}: a move through the pairs takes one layer or collection state (and its "
            "optimizer state); move the others with export_pairs and import_pairs"
        )
    if not isinstance(layer, _LAYERS[kind]):
        raise ValueError(
            f"{where}: pass layer= (the target's {kind}) to restore through the logical "
            "(key, vector) pairs, or move it with export_pairs and import_pairs"
        )
    if opts and optimizer is None:
        raise ValueError(
            f"{where}: the tree holds a sparse optimizer state; pass optimizer= (the sparse "
            "optimizer it belongs to) so that its slots move with the rows"
        )
    if kind == "EmbeddingCollection" and was.get("plan") is None:
        raise ValueError(
            f"{where}: the checkpoint has no plan of the collection; save it with "
            "checkpoint.save(path, tree, layer=collection), or move its tables with "
            "export_pairs and import_pairs"
        )
    if kind == "DistributedEmbedding" and len(opts) > 1:
        raise ValueError(f"{where}: the tree holds {len(opts)} optimizer states, not one")
    host = _host_tree(ckpt, path)
    saved = _at(host, p)
    pairs = {}
    for rows, shard, opt_path, members in _saved_units(layer, was, saved, opts):
        sc = shard.get("scores")
        hash_part = join_hash_part(shard.get("slot_keys"), None if sc is None else HashScores(**sc))
        if opt_path is None:  # no slots: an export of the table and its scores only
            opt = SparseOptState((), 0)
        else:
            o = _at(host, opt_path)
            opt = SparseOptState(tuple(o["slots"]), o["count"])
        for table in members:
            exp = export_table(
                rows, table, shard["table"], hash_part, opt, None, rows.key_dtype, saved["seed"]
            )
            pairs[table] = exp if opts else exp._replace(slots=None, opt_count=None)
    given = next(iter(pairs.values())) if kind == "DistributedEmbedding" else pairs
    got = layer.import_pairs(given, optimizer=optimizer if opts else None)
    if not opts:
        return _rebuild(target, host, {p: got})
    state, opt_state = got
    if kind == "DistributedEmbedding":
        return _rebuild(target, host, {p: state, opts[0]: opt_state})
    return _rebuild(target, host, {p: state, **{q: opt_state[q.rpartition("/")[2]] for q in opts}})


def _saved_units(layer, was: dict, saved, opts: list) -> list:
    """[(row strategy of the saved layout, the unit's saved arrays, the path
    of its saved optimizer state or None, its tables)] of a saved state."""
    if isinstance(layer, DistributedEmbedding):
        name = layer._rows.members[0].name
        return [(_saved_rows(layer, was), saved, opts[0] if opts else None, (name,))]
    parents = {q.rpartition("/")[0] for q in opts}
    if len(parents) > 1:
        raise ValueError("restore: the collection's optimizer states are not in one dict")
    parent = next(iter(parents), "")
    mesh = AbstractMesh((was["num_devices"],), (layer.axis_name,))
    out = []
    for u in was["plan"]:
        plan = UnitPlan(u["name"], u["placement"], tuple(u["members"]), u["rows_per_device"])
        opt_path = None
        if opts:
            opt_path = f"{parent}/{plan.name}" if parent else plan.name
        members = tuple(m for m in plan.members if m is not None)
        out.append((layer.unit_rows(plan, mesh), saved["shards"][plan.name], opt_path, members))
    return out


def _rebuild(target, host, new: dict):
    """`target`'s tree: the states in `new` by path, every other leaf the
    saved value at its path on the target leaf's sharding."""
    nodes, treedef = jax.tree_util.tree_flatten_with_path(
        target, is_leaf=lambda x: isinstance(x, _STATES)
    )
    out = []
    for path, x in nodes:
        p = _path(path)
        if p in new:
            out.append(new[p])
            continue
        value = np.asarray(_at(host, p))
        if value.shape != tuple(x.shape):
            raise ValueError(
                f"the checkpoint's {p!r} is {list(value.shape)} but the target's is {list(x.shape)}"
            )
        out.append(jax.device_put(value.astype(x.dtype), getattr(x, "sharding", None)))
    return jax.tree_util.tree_unflatten(treedef, out)
