"""JAX's multi-controller runtime: 2 processes x 4 CPU devices (gloo on
127.0.0.1) compute what 1 process x 8 devices does: sparse training steps of
a direct and a hash DistributedEmbedding and of a collection of every
placement, `check_stats`, `export_pairs` (every process reads the whole
table) and `import_pairs` with a lookup after it. Each process builds only
its share of the batch (`jax.make_array_from_process_local_data`)."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest
from devices import AXIS, mesh_of, require_devices
from subprocesses import child_env, free_port, run_together

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from multiprocess_worker import scenario  # noqa: E402  (a helper script, not a test module)


def test_two_processes_compute_what_one_does(tmp_path):
    require_devices(8)
    if not hasattr(jax.distributed, "initialize"):
        pytest.skip("no jax.distributed")
    port = free_port()
    out = tmp_path / "two.npz"
    worker = os.path.join(HERE, "multiprocess_worker.py")
    cmds = [[sys.executable, worker, str(i), str(port), str(out)] for i in range(2)]
    run_together(cmds, child_env())
    two = np.load(out)

    mesh = mesh_of(8)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    one = scenario(mesh, lambda x: jax.device_put(x, sharding))
    assert sorted(one) == sorted(two.files)
    for k in one:
        if k.endswith("_keys"):
            np.testing.assert_array_equal(two[k], one[k], err_msg=k)
        else:
            np.testing.assert_allclose(two[k], one[k], rtol=1e-6, atol=1e-7, err_msg=k)
