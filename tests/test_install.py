"""The development install: the checkout imports as the package (the
README's `pip install -e`), and a checkout without its compiled module says
so, and says what to run, instead of a misleading import error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import pytest

import sok_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(sok_jax.__file__))


def test_import_from_the_repo_root():
    if PACKAGE != os.path.join(ROOT, "sok_jax"):
        pytest.skip(f"sok_jax is imported from {PACKAGE}, not from this checkout (no -e install)")
    code = "import sok_jax, os; print(os.path.dirname(sok_jax.__file__)); print(sok_jax.has_cuda())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == PACKAGE


def test_missing_compiled_module_says_what_to_run(tmp_path):
    # The Python sources alone, as a fresh clone has them, and jax's own
    # site-packages; `-S` keeps any development-install finder out.
    shutil.copytree(PACKAGE, tmp_path / "sok_jax", ignore=shutil.ignore_patterns("*.so"))
    site = os.path.dirname(os.path.dirname(os.path.abspath(jax.__file__)))
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {site!r}]; import sok_jax"
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    err = proc.stderr.splitlines()[-1]
    assert "ImportError" in err and "_sok_cpu" in err, err
    assert "pip install -e ." in err and "SOK_CUDA=OFF" in err, err
    assert "circular import" not in proc.stderr
