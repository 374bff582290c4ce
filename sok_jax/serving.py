"""Serving: a trained model's inference function saved as an artifact that a
fresh process loads and runs, without the training code.

    sok_jax.serving.export(infer, state, example_batch, "model_dir")
    predict = sok_jax.serving.load("model_dir")   # in the serving process
    scores = predict(batch)

`export` saves `infer(state, batch)` with the state bound: the jitted
function as a `jax.export` artifact (StableHLO, the sok_jax custom calls
included, their targets named) and the state's arrays beside it, in one
directory:

  function.jax_export  the serialized `jax.export.Exported` of
                       `infer(state_leaves, batch)`;
  state.npz            the state's leaves (whole logical arrays, any
                       sharding gathered), in the order of the function's
                       first argument;
  artifact.json        the format, the sok_jax and jax versions that wrote
                       it, the platform, the device count and the mesh
                       (axis names, shape) it runs on.

What the serving side needs: `import sok_jax` (it registers the custom-call
targets the function calls; any sok_jax whose targets keep their names and
arguments), the platform the artifact was exported for ("cpu" or "cuda")
and exactly as many devices as it was exported on (the shardings inside
are for that many). `load` checks both and says which differs.

Inference tables (`sok_jax.distributed.quantized`): a trained layer's or
collection's state with its rows in int8 (a per-row scale and bias),
bfloat16 or float16, read-only, looked up by the same
`apply(..., training=False)`:

    qstate = sok_jax.serving.quantize(emb, state, "int8")
    out, _ = emb.apply(qstate, ids, training=False)

A quantized state exports and loads as any other.

Live deltas (`sok_jax.distributed.deltas`): a serving state, float or
quantized, follows training without being rebuilt: the rows changed since
step t (and, for a hash table that evicts, the keys evicted since) are
written into it, converted to its row format:

    delta = emb.export_pairs(train_state, since_step=t)
    qstate = sok_jax.serving.apply_delta(emb, qstate, delta)

The state may be any pytree of arrays (a layer's `EmbeddingState`, a
collection's, the dense parameters beside them); tables in host memory
(`storage="host"` / "host_cached") are not supported: serve from HBM.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

import sok_jax
from sok_jax import _native
from sok_jax.distributed.deltas import apply_delta  # noqa: F401  (the serving API)
from sok_jax.distributed.quantized import (  # noqa: F401  (the serving API)
    QUANTIZED_DTYPES,
    QuantizedCollectionState,
    QuantizedState,
    bytes_per_row,
    quantize,
)

FORMAT = 1
FUNCTION_FILE = "function.jax_export"
STATE_FILE = "state.npz"
META_FILE = "artifact.json"


def _platform() -> str:
    return "cuda" if jax.default_backend() == "gpu" else jax.default_backend()


def _sok_checks():
    """jax.export refuses custom calls it does not know as stable; ours are
    registered by `import sok_jax` on the serving side."""
    custom_call = jax.export.DisabledSafetyCheck.custom_call
    return [custom_call(name) for name in _native.target_names()]


def _to_npz(x: np.ndarray) -> np.ndarray:
    """`x` as npz stores it: dtypes numpy has no code for (bfloat16 and the
    other ml_dtypes) as their raw bytes, uint8 [*shape, itemsize]."""
    if x.dtype.kind != "V":
        return x
    return np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, x.dtype.itemsize)


def _from_npz(x: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of `_to_npz` for a leaf saved with dtype name `dtype`."""
    want = jax.numpy.dtype(dtype)
    if x.dtype == want:
        return x
    return np.ascontiguousarray(x).view(want).reshape(x.shape[:-1])


def export(fn: Callable, state: Any, example_batch: Any, path: str) -> None:
    """Saves `fn(state, batch)` with `state` bound, for batches shaped like
    `example_batch` (a pytree of arrays; its shapes and dtypes are the
    artifact's), into the directory `path` (created; it must not hold an
    artifact already).

    Raises:
      FileExistsError: `path` holds an artifact.
      ValueError: a state leaf lives in host memory.
    """
    leaves, treedef = jax.tree.flatten(state)
    for leaf in leaves:
        kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
        if kind not in (None, "device"):
            raise ValueError(
                f"sok_jax.serving.export: a state array lives in {kind!r} memory (a "
                'storage="host" or "host_cached" table); serving reads tables from HBM: '
                "export_pairs/import_pairs it into an HBM layer first"
            )

    def bound(state_leaves, batch):
        return fn(jax.tree.unflatten(treedef, state_leaves), batch)

    exported = jax.export.export(jax.jit(bound), disabled_checks=_sok_checks())(
        leaves, example_batch
    )
    if os.path.exists(os.path.join(path, META_FILE)):
        raise FileExistsError(f"{path} already holds a sok_jax serving artifact")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, FUNCTION_FILE), "wb") as f:
        f.write(exported.serialize())
    host = [np.asarray(jax.device_get(leaf)) for leaf in leaves]
    arrays = {f"leaf_{i}": _to_npz(x) for i, x in enumerate(host)}
    np.savez(os.path.join(path, STATE_FILE), **arrays)
    meshes = [
        leaf.sharding.mesh
        for leaf in leaves
        if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)
    ]
    meta = {
        "format": FORMAT,
        "mesh_axes": list(meshes[0].axis_names) if meshes else ["devices"],
        "mesh_shape": list(meshes[0].devices.shape) if meshes else [exported.nr_devices],
        "sok_jax_version": sok_jax.__version__,
        "jax_version": jax.__version__,
        "platform": _platform(),
        "num_devices": exported.nr_devices,
        "num_leaves": len(leaves),
        "leaf_dtypes": [x.dtype.name for x in host],
    }
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def load(path: str) -> Callable:
    """The saved function as `batch -> outputs`, its state placed on this
    process's devices as the artifact's shardings say.

    Raises:
      ValueError: the artifact is of another format, platform or device
        count than this process.
    """
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: artifact format {meta.get('format')}, this sok_jax reads {FORMAT}")
    if meta["platform"] != _platform():
        raise ValueError(
            f"{path} was exported for the {meta['platform']} platform; this process runs on "
            f"{_platform()}: export it again on the serving platform"
        )
    n = meta["num_devices"]
    if n > len(jax.devices()):
        raise ValueError(
            f"{path} was exported for {n} devices; this process has {len(jax.devices())}: "
            f"serve it on {n} devices or export it again for this count"
        )
    with open(os.path.join(path, FUNCTION_FILE), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(path, STATE_FILE)) as z:
        leaves = [
            _from_npz(z[f"leaf_{i}"], dtype) for i, dtype in enumerate(meta["leaf_dtypes"])
        ]
    # the export's mesh (its axis names and shape), over this process's first n devices
    devices = np.array(jax.devices()[:n]).reshape(meta["mesh_shape"])
    mesh = jax.sharding.Mesh(devices, tuple(meta["mesh_axes"]))
    shardings = exported.in_shardings_jax(mesh)[: len(leaves)]  # flat: the state's, then the batch's
    placed = [jax.device_put(x, s) for x, s in zip(leaves, shardings)]
    # Compiled once, on the first batch; each call then dispatches through
    # jit's fast path (the state passed as arguments, never re-traced).
    compiled = jax.jit(exported.call)

    def call(batch):
        return compiled(placed, batch)

    return call

