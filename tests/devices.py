"""The multi-device helpers of the tests: a mesh of n (forced host CPU)
devices, and a skip, or under SOK_REQUIRE_MULTIDEVICE=1 a failure, when
fewer exist. conftest.py forces 8 host devices before jax starts."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

AXIS = "x"  # the mesh axis of the multi-device tests


def require_devices(n: int) -> None:
    """Skip unless n devices exist (fail instead under SOK_REQUIRE_MULTIDEVICE=1)."""
    have = len(jax.devices())
    if have >= n:
        return
    msg = (
        f"needs {n} devices, have {have} (set XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 before jax starts)"
    )
    if os.environ.get("SOK_REQUIRE_MULTIDEVICE") == "1":
        pytest.fail(msg + "; SOK_REQUIRE_MULTIDEVICE=1 forbids skipping")
    pytest.skip(msg)


@functools.lru_cache(maxsize=None)
def mesh_of(n: int) -> Mesh:
    """A 1-D mesh over the first n devices, axis AXIS."""
    return Mesh(np.array(jax.devices()[:n]), (AXIS,))
