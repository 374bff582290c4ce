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
        ("bench_serving.py", ["--small"], 1),
        # each cached point's losses equal the HBM run's bits, with and
        # without the side-stream write-back
        ("bench_host_cache.py", ["--small", "--optimizers", "adagrad", "--dists", "zipf",
                                 "--overlap-moves", "both"], 1),
    ],
    ids=["lookup", "train_step", "hash", "collection", "serving", "host_cache"],
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
    # the mlperf preset's run is multi-hot: the row-wise multi-hot run is left out
    args += ["--min-sample-ms", "1", "--baseline-scales", "1.0", "--no-multi-hot"]
    result, _ = _run(tmp_path, "bench_dlrm.py", args, 1)
    statuses = {r["name"]: r["status"] for r in result["results"]}
    assert "sok one-hot whole step" in statuses and "flax nn.Embed whole step" in statuses
    assert "sok mlperf whole step" in statuses and "sok mlperf embedding only" in statuses
    assert all(s == "ok" for s in statuses.values()), statuses


# Run in a child: each script that edits sys.path, as `python script --help`
# runs it (its own folder first on sys.path), must leave the installed
# sok_jax (the first on PYTHONPATH) as the one imported: never the checkout.
_PATH_PROBE = r"""
import json, os, runpy, sys
site, scripts = sys.argv[1], sys.argv[2:]
bad = {}
for script in scripts:
    saved = list(sys.path)
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    first = next(p for p in sys.path if os.path.isdir(os.path.join(p or ".", "sok_jax")))
    loaded = os.path.dirname(os.path.dirname(sys.modules["sok_jax"].__file__))
    # An editable install's import hook answers `import sok_jax` before any
    # sys.path entry: there only the order of sys.path can be checked.
    editable = any("editable" in type(f).__module__ for f in sys.meta_path)
    if first != site or (loaded != site and not editable):
        bad[script] = [first, loaded]
    sys.path[:] = saved
print(json.dumps(bad))
"""


def test_scripts_import_the_installed_sok_jax(tmp_path):
    """The scripts put only their own (or a sibling) folder on sys.path: from
    a build installed elsewhere, they import that build, not the checkout's
    uncompiled sources."""
    import sok_jax

    repo = os.path.dirname(BENCHMARKS)
    scripts = [
        os.path.join(repo, folder, name)
        for folder in ("benchmarks", "examples", "tools")
        for name in sorted(os.listdir(os.path.join(repo, folder)))
        if name.endswith(".py")
        and "sys.path" in open(os.path.join(repo, folder, name)).read()
    ]
    assert len(scripts) >= 5, scripts
    site = tmp_path / "site"
    site.mkdir()
    (site / "sok_jax").symlink_to(os.path.dirname(os.path.abspath(sok_jax.__file__)))
    env = child_env(1)
    env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, "-c", _PATH_PROBE, str(site), *scripts]
    proc = run_checked(cmd, env, cwd=tmp_path, timeout=300)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}
