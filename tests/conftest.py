"""pytest set-up shared by every test: 8 forced host CPU devices for the
multi-device tests (set before jax initializes its backends; it only
affects the CPU platform), and a guard that no test leaks jax_enable_x64.
The oracles live in oracles.py, the mesh helpers in devices.py."""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_x64_leak():
    """Every test starts and ends with x64 disabled."""
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64
