"""What differs between the jax releases sok_jax supports (the CPU wheel
installed here and the GPU image's jax 0.11)."""

from __future__ import annotations

import jax


def shard_map(f, mesh, in_specs, out_specs):
    """`jax.shard_map` without replication checks, on old and new jax alike."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(
        f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False
    )
