"""Python children of the tests: the environment they run in, a free local
port, and runs that assert success and leave no child behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax


def child_env(devices: int | None = None, same_platform: bool = False) -> dict:
    """os.environ with PYTHONPATH set to this process's sys.path, so the child
    imports sok_jax exactly as this process does (installed package or
    checkout). With `devices`: the CPU platform with that many forced host
    devices; without: no XLA_FLAGS (the child picks its own devices).
    `same_platform`: forces the CPU only where this process runs on it (a
    child that loads what this process built on a GPU runs on the GPU)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    if same_platform and jax.default_backend() != "cpu":
        devices = None
    if devices is None:
        env.pop("XLA_FLAGS", None)
    else:
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checked(cmd, env, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Runs cmd to the end; asserts exit status 0 (the output's tails as the
    message)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_together(cmds, env, cwd=None, timeout=300) -> list[str]:
    """Starts every command at once (the processes of one multi-controller
    job) and waits for all; every child is ended whatever happens. Asserts
    each exited 0; returns their outputs (stdout and stderr together)."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in cmds
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    return logs
