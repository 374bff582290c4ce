"""Every Python block of README.md runs, in order, as one session on 8 host
CPU devices (a fresh process, as a reader pasting them would have), and the
quickstart holds the two commands .ci/run runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced block of `language`."""
    text = open(README).read()
    blocks = []
    for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M):
        blocks.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return blocks


def test_readme_python_blocks_run(tmp_path):
    for module in ("flax", "haiku", "optax", "orbax.checkpoint"):  # the README's imports
        pytest.importorskip(module)
    blocks = code_blocks("python")
    assert len(blocks) >= 4
    runner = textwrap.dedent(
        """
        import json, sys
        blocks = json.load(open(sys.argv[1]))
        session = {"__name__": "__readme__"}
        for line, code in blocks:
            print(f"== README.md block at line {line}", flush=True)
            exec(compile(code, f"README.md:{line}", "exec"), session)
        print("== all blocks ran")
        """
    )
    import json

    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "run.py").write_text(runner)
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "blocks.json")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "== all blocks ran" in proc.stdout


def quickstart_commands() -> list[str]:
    """The quickstart's commands: the non-comment lines of the first bash
    block under "## Quickstart" (.ci/run reads them the same way)."""
    text = open(README).read()
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    return [c for c in block.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def test_quickstart_is_two_commands_that_ci_runs():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("python examples/train_dlrm.py")
    assert cmds[1].endswith("pytest -q")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert 'open("README.md")' in ci and "## Quickstart" in ci
