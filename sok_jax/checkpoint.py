"""Checkpoints of sok_jax states with orbax, and a restore that says in one
sentence what does not match.

The states (`EmbeddingState`, `CollectionState`, the sparse optimizer
states) are pytrees of sharded jax.Arrays, so orbax saves them as they are.
`restore` first compares the checkpoint's arrays with the target's (paths,
shapes, dtypes) and raises a `ValueError` naming the first that differs
(e.g. a layer of another D) instead of orbax's long report; then restores
into the target's shardings.

Importing this module imports orbax; `import sok_jax` alone never does.
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _target_arrays(target) -> dict:
    """{"a/b/c": (shape, dtype)} of the target's array leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    return {
        "/".join(_key(k) for k in path): (tuple(x.shape), np.dtype(x.dtype)) for path, x in leaves
    }


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


def save(path, tree, *, checkpointer=None) -> None:
    """Saves `tree` (a state, an optimizer state, or a dict of them) at `path`."""
    ckpt = checkpointer or ocp.StandardCheckpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()


def restore(path, target, *, checkpointer=None):
    """The tree saved at `path`, restored with `target`'s structure, shapes,
    dtypes and shardings (`target`: arrays or ShapeDtypeStructs, e.g. a
    fresh `layer.init(seed)`).

    Raises:
      ValueError: naming the first array of the checkpoint that is missing
        from, extra to, or shaped or typed differently from the target.
    """
    ckpt = checkpointer or ocp.StandardCheckpointer()
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
                f"is {w_dtype.name}{list(w_shape)} (a layer built with other sizes?)"
            )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target,
    )
    return ckpt.restore(path, abstract)
