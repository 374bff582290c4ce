"""One process of tests/test_multiprocess.py (not a test module): joins a
2-process JAX runtime on 127.0.0.1 with 4 CPU devices each, runs the same
program as the test's one-process reference (`scenario`), and process 0
writes what it computed to an .npz file.

    python multiprocess_worker.py <process_id> <port> <out.npz>
"""

from __future__ import annotations

import os
import sys


def scenario(mesh, put, seed: int = 0) -> dict:
    """The program both runs compute: sparse Adagrad steps of a direct and a
    hash `DistributedEmbedding` (each in HBM and behind a host cache) and of
    a collection of mixed placements and storage,
    their exports, an import of those exports and a lookup after it.
    `put(global_numpy_array)` makes a batch-sharded global array."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sok_jax

    rng = np.random.default_rng(seed)
    axis = mesh.axis_names[0]
    opt = sok_jax.optim.adagrad(0.1)
    out = {}
    layers = {
        "direct": sok_jax.DistributedEmbedding(
            "mean", 16, 4, slot_num=2, max_nnz=3, mesh=mesh, axis_name=axis, use_hashtable=False
        ),
        "hash": sok_jax.DistributedEmbedding(
            "sum", 64, 4, slot_num=2, max_nnz=3, use_hashtable=True, mesh=mesh, axis_name=axis
        ),
        "cached": sok_jax.DistributedEmbedding(
            "mean", 128, 4, slot_num=2, max_nnz=3, mesh=mesh, axis_name=axis,
            use_hashtable=False, storage="host_cached", cache_rows=100,
        ),
        "cached_hash": sok_jax.DistributedEmbedding(
            "sum", 256, 4, slot_num=2, max_nnz=3, use_hashtable=True, mesh=mesh,
            axis_name=axis, storage="host_cached", cache_rows=100, cache_policy="lfu",
        ),
    }
    for name, emb in layers.items():
        high = {"direct": 128, "cached": 1024}.get(name, 10_000)
        batches = [rng.integers(-1, high, (16, 2, 3)).astype(np.int32) for _ in range(3)]
        state = emb.init(seed)
        slots = emb.init_optimizer(opt, state)

        @jax.jit
        def step(state, slots, ids, emb=emb):
            o, ctx, state = emb.lookup(state, ids)
            state, slots = emb.sparse_update(state, opt, slots, ctx, jnp.tanh(o))
            return o, state, slots

        for ids in batches:
            o, state, slots = step(state, slots, put(ids))
        sok_jax.check_stats(state)
        keys, vectors = emb.export_pairs(state)
        again = emb.import_pairs(keys, vectors, seed=seed)
        o2, _ = jax.jit(lambda s, ids, emb=emb: emb.apply(s, ids, training=False))(
            again, put(batches[0])
        )
        out[f"{name}_keys"], out[f"{name}_vectors"] = keys, vectors
        out[f"{name}_out"] = sok_jax.distributed.host.to_host(o2)
        out[f"{name}_last"] = sok_jax.distributed.host.to_host(o)
    coll = sok_jax.EmbeddingCollection(
        [
            sok_jax.TableSpec("r", 400, 4, placement="row"),
            sok_jax.TableSpec("t", 300, 4, combiner="mean", placement="table"),
            sok_jax.TableSpec("p", 10, 4, placement="replicated"),
            sok_jax.TableSpec("h", 300, 4, use_hashtable=True),
            sok_jax.TableSpec("c", 2000, 4, placement="row", storage="host_cached", cache_rows=40),
        ],
        [sok_jax.FeatureSpec(x, x, 2) for x in "rtphc"],
        mesh=mesh,
        axis_name=axis,
    )
    highs = {"r": 400, "t": 300, "p": 10, "h": 10_000, "c": 2000}
    state = coll.init(seed)
    slots = coll.init_optimizer(opt, state)

    @jax.jit
    def cstep(state, slots, batch):
        o, ctx, state = coll.lookup(state, batch)
        return coll.sparse_update(state, opt, slots, ctx, jax.tree.map(jnp.tanh, o))

    for _ in range(3):
        batch = {k: put(rng.integers(-1, v, (16, 2)).astype(np.int32)) for k, v in highs.items()}
        state, slots = cstep(state, slots, batch)
    for t in highs:
        out[f"coll_{t}_keys"], out[f"coll_{t}_vectors"] = coll.export_pairs(state, t)
    return out


def main():
    pid, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == pid]

    def put(x):
        """This process's rows of the global batch, as one global array."""
        rows = x.shape[0] // len(mesh.devices.flat)
        local = np.concatenate([x[i * rows : (i + 1) * rows] for i in mine])
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    out = scenario(mesh, put)
    if pid == 0:
        np.savez(path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
