"""Every benchmark runs end to end at tiny sizes on host CPU devices, and its
own correctness checks pass (each timed point is checked against numpy or
the pure-JAX way inside the benchmark). Timings are not asserted: the
figures come from GPUs (`benchmarks/RESULTS.md`); this keeps the scripts
from rotting between GPU sessions."""

from __future__ import annotations

import json
import os
import sys

import pytest
from subprocesses import child_env, run_checked

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _run(tmp_path, script, args, devices):
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, script), *args, "--out", str(out)]
    proc = run_checked(cmd, child_env(devices), cwd=tmp_path, timeout=600)
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.parametrize(
    "script,args,devices",
    [
        ("bench_lookup.py", ["--small"], 1),
        ("bench_train_step.py", ["--small", "--devices", "1,4"], 4),
        ("bench_hash.py", ["--small"], 4),
        ("bench_collection.py", ["--small", "--bytes", "--step", "--devices", "2"], 2),
    ],
    ids=["lookup", "train_step", "hash", "collection"],
)
def test_benchmark_points_pass_their_checks(tmp_path, script, args, devices):
    """These close with `common.finish`: exit status 0 only if no point
    failed its check."""
    _, stdout = _run(tmp_path, script, args, devices)
    assert " 0 failed" in stdout, stdout[-3000:]


def test_bench_distributed_points_pass_their_checks(tmp_path):
    result, _ = _run(tmp_path, "bench_distributed.py", ["--small", "--devices", "1,2"], 2)
    rows = result["lookup"]
    assert {r["n"] for r in rows} == {1, 2}
    bad = [(r["n"], r["impl"], r["mode"], r.get("error")) for r in rows if not r.get("ok")]
    assert not bad, bad
    assert not [r for r in result["a2a"] if r.get("error")]


def test_bench_dlrm_every_step_runs(tmp_path):
    pytest.importorskip("optax")
    args = ["--scale", "1e-5", "--batch", "256", "--steps", "2", "--warmup", "1"]
    args += ["--min-sample-ms", "1", "--baseline-scales", "1.0"]
    result, _ = _run(tmp_path, "bench_dlrm.py", args, 1)
    statuses = {r["name"]: r["status"] for r in result["results"]}
    assert "sok one-hot whole step" in statuses and "sok multi-hot whole step" in statuses
    assert all(s == "ok" for s in statuses.values()), statuses
