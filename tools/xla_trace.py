"""Where a jitted program's device time goes, from XLA's own profiler: the
program runs `steps` times under `jax.profiler.trace`, and the events that
name an HLO op (GPU kernels on a GPU, thunks on the CPU) are summed per op
and labelled with the JAX operation and source line that made it (from the
compiled HLO's metadata).

    rows = xla_trace.top_ops(step_fn, args, steps=5, compiled=jitted.lower(*args).compile())
    xla_trace.print_top(rows, limit=30)

`step_fn(*args)` must return the next call's args (a training step that
donates its state returns the new state), so the traced calls are the real
steady-state steps.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time
from collections import defaultdict

import jax

_META = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}')
_FIELD = re.compile(r'(\w+)="?([^" ]*)"?')


def op_sources(hlo_text: str) -> dict:
    """{HLO instruction name: (its full op_name, "scope/scope/jax op
    file:line")} from the metadata of a compiled module's text (fusions
    carry their root's; the file appears where XLA prints it)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _META.match(line)
        if not m:
            continue
        fields = dict(_FIELD.findall(m.group(2)))
        op = "/".join(fields.get("op_name", "").split("/")[-3:])  # innermost scopes
        where = os.path.basename(fields.get("source_file", ""))
        if where:
            where = f"{where}:{fields.get('source_line', '?')}"
        out[m.group(1)] = (fields.get("op_name", ""), f"{op}  {where}".strip())
    return out


def _events(path: str):
    """(plane name, hlo_op, event name, ns) of every event naming an HLO op."""
    from jax._src.lib import _profile_data

    data = _profile_data.ProfileData.from_file(path)
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                stats = dict((s[0], s[1]) for s in e.stats)
                op = stats.get("hlo_op")
                if op:
                    yield plane.name, str(op), e.name, float(e.duration_ns)


def top_ops(step_fn, args, steps: int = 5, compiled=None) -> list[dict]:
    """[{op, ms (per step), calls (per step), share, op_name, source, parts:
    [(event name, ms per step)]}] by time, the device planes' events where
    there are any, else the host's."""
    args = step_fn(*args)  # warm: compiled, caches filled
    jax.block_until_ready(args)
    where = tempfile.mkdtemp(prefix="xla_trace_")
    with jax.profiler.trace(where):
        for _ in range(steps):
            args = step_fn(*args)
        jax.block_until_ready(args)
    paths = glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        return []
    events = list(_events(paths[0]))
    device = [e for e in events if e[0].startswith("/device:")]
    events = device or events
    total_ns, calls = defaultdict(float), defaultdict(int)
    parts = defaultdict(lambda: defaultdict(float))  # op -> event (kernel, memcpy) -> ns
    for _, op, name, ns in events:
        total_ns[op] += ns
        calls[op] += 1
        parts[op][name] += ns
    sources = op_sources(compiled.as_text()) if compiled is not None else {}
    whole = sum(total_ns.values()) or 1.0
    rows = [
        {
            "op": op,
            "ms": ns / steps / 1e6,
            "calls": calls[op] / steps,
            "share": ns / whole,
            "op_name": sources.get(op, ("", ""))[0],
            "source": sources.get(op, ("", ""))[1],
            "parts": sorted(((n, v / steps / 1e6) for n, v in parts[op].items()), key=lambda x: -x[1]),
        }
        for op, ns in total_ns.items()
    ]
    return sorted(rows, key=lambda r: -r["ms"])


def print_top(rows: list[dict], limit: int = 30, title: str = "", scopes=()) -> None:
    """The top `limit` ops; first, the time per named scope of `scopes`
    (each op counted under the first scope its op_name holds, in order)."""
    total = sum(r["ms"] for r in rows)
    print(f"{title}: {total:.3f} ms of device time per step in {len(rows)} ops")
    if scopes:
        by = defaultdict(float)
        for r in rows:
            hit = next((sc for sc in scopes if f"{sc}/" in r["op_name"] + "/"), "(other)")
            by[hit] += r["ms"]
        for sc in list(scopes) + ["(other)"]:
            print(f"  scope {sc:32} {by[sc]:8.3f} ms {100 * by[sc] / (total or 1):5.1f}%")
    for r in rows[:limit]:
        print(
            f"  {r['ms']:8.3f} ms {100 * r['share']:5.1f}% x{r['calls']:<5g} "
            f"{r['op'][:40]:40} {r['source'][:90]}"
        )
        if len(r["parts"]) > 1 or r["ms"] > 0.2 * total:  # what ran inside: kernels, copies
            for name, ms in r["parts"][:4]:
                print(f"      {ms:8.3f} ms  {name[:110]}")


def wall_then_top(step_fn, args, steps: int, title: str, limit: int = 30, compiled=None) -> None:
    """Prints the wall ms per step of `step_fn(*args) -> args` (`steps`
    dispatched back to back, waited for once, after one warm step), then
    `print_top` of XLA's profile of as many more steps. Steps that donate
    consume `args`."""
    args = jax.block_until_ready(step_fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        args = step_fn(*args)
    jax.block_until_ready(args)
    print(f"{title}: {1e3 * (time.perf_counter() - start) / steps:.3f} ms per step (wall)")
    print_top(top_ops(step_fn, args, steps=steps, compiled=compiled), limit, title)
