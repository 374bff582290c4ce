"""examples/train_dlrm.py end to end, on a tiny setting: it runs, and its
loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_dlrm.py")


@pytest.mark.parametrize(
    "extra",
    [[], ["--optimizer", "adagrad", "--check"], ["--dense-path", "--optimizer", "sgd"]],
    ids=["default", "adagrad-check", "dense-path"],
)
def test_train_dlrm_learns(tmp_path, extra):
    pytest.importorskip("optax")
    pytest.importorskip("flax")
    pytest.importorskip("tqdm")
    out = tmp_path / "metrics.json"
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        # The child imports sok_jax exactly as this process does (installed
        # package or checkout), without assuming the checkout is on the path.
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    cmd = [
        sys.executable,
        SCRIPT,
        "--steps",
        "30",
        "--epochs",
        "2",
        "--batch-size",
        "256",
        "--table-rows",
        "20000",
        "--json",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["devices"] == 8
    assert m["final_loss"] < 0.85 * m["first_loss"], m
    assert 0.5 < m["auc"] <= 1.0
    assert m["samples_per_s"] > 0
    assert "epoch 2:" in proc.stdout
