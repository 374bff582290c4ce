"""The A/B table of `gpu_session.sh AB=...`: per point and timing, new/base.

  python3 tools/ab_table.py DIR [--out table.txt]

DIR holds one benchmark JSON (`--out` of a bench_*.py) per run, named
`<bench>.<build>.<round>.json` with build `new` or `base`. For every point
of every bench (a point is named by its identity fields: D, nnz, dist, n,
table_gb, opt, ...) and every timing of it (the point's `*_ms` fields; else
its `timings`' medians), it prints the mean over rounds of each build, the
ratio new/base (< 1: the new build is faster), and the noise: the spread
(max - min) / mean between the runs of one build, the larger of the two
builds'. The verdict calls a ratio a change only when it is further from 1
than that noise. Timings of the pure-JAX programs ("jax_*") do not depend on
the build: their ratios show the drift of the machine between runs (marked control).
Standard library only, so it runs where the JSON lands.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys

# Fields that name a point (in this order), across the bench_*.py JSONs.
# (Not C: bench_distributed fits it to each run's data.)
ID_KEYS = ("n", "D", "nnz", "ragged", "dist", "load", "table_gb", "opt", "impl", "mode")
NAME = re.compile(r"^(?P<bench>.+)\.(?P<build>new|base)\.(?P<round>\d+)\.json$")


def point_lists(doc: dict):
    """(section, list of point dicts) for every list of dicts in a bench JSON."""
    for key, val in doc.items():
        if isinstance(val, list) and val and all(isinstance(p, dict) for p in val):
            yield key, val


def point_id(section: str, p: dict) -> str:
    parts = [] if section == "points" else [section]
    for k in ID_KEYS:
        if k in p and isinstance(p[k], (str, int, float, bool)):
            v = p[k]
            if k == "ragged":
                if v:
                    parts.append("ragged")
                continue
            parts.append(str(v) if k in ("dist", "opt", "impl", "mode") else f"{k}={v:g}")
    return " ".join(parts)


def timings(p: dict) -> dict[str, float]:
    """Milliseconds by name: the point's `*_ms` fields, else its `timings`."""
    out = {
        k: float(v)
        for k, v in p.items()
        if (k == "ms" or k.endswith("_ms"))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and "overhead" not in k  # derived: differences and floors, not timings
        and "floor" not in k
    }
    if not out and isinstance(p.get("timings"), dict):
        for k, t in p["timings"].items():
            if isinstance(t, dict) and isinstance(t.get("median_s"), (int, float)):
                out[k] = 1e3 * t["median_s"]
    return out


def load(directory: str):
    """runs[bench][build] = list of (round, doc), in round order."""
    runs: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        m = NAME.match(os.path.basename(path))
        if not m:
            continue
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            doc = {"error": f"unreadable: {e}"}
        runs[m["bench"]][m["build"]].append((int(m["round"]), doc))
    for b in runs.values():
        for lst in b.values():
            lst.sort(key=lambda rd: rd[0])
    return runs


def spread(vals: list[float]) -> float | None:
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    return (max(vals) - min(vals)) / mean if mean > 0 else None


def rows_of(bench: str, by_build: dict) -> list[dict]:
    # values[(point, timing)][build] = [ms per round]; errors[point][build] = first error
    values: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    errors: dict = collections.defaultdict(dict)
    order: list = []
    for build in ("new", "base"):
        for _, doc in by_build.get(build, []):
            for section, pts in point_lists(doc):
                for p in pts:
                    pid = point_id(section, p)
                    if "error" in p:
                        errors[pid].setdefault(build, str(p["error"]).splitlines()[0][:50])
                    for name, ms in timings(p).items():
                        key = (pid, name)
                        if key not in values:
                            order.append(key)
                        values[key][build].append(ms)
    rows = []
    for pid, name in order:
        v = values[(pid, name)]
        new, base = v.get("new", []), v.get("base", [])
        r = {"bench": bench, "point": pid, "timing": name}
        if new:
            r["new_ms"] = sum(new) / len(new)
        if base:
            r["base_ms"] = sum(base) / len(base)
        r["runs"] = f"{len(new)}/{len(base)}"
        sn, sb = spread(new), spread(base)
        r["noise_new"], r["noise_base"] = sn, sb
        if new and base and r["base_ms"] > 0:
            r["ratio"] = r["new_ms"] / r["base_ms"]
            noise = max(x for x in (sn, sb, 0.0) if x is not None)
            if sn is None or sb is None:
                r["verdict"] = "no noise estimate (one run of a build)"
            elif abs(r["ratio"] - 1.0) <= noise:
                r["verdict"] = "within noise"
            else:
                r["verdict"] = "new faster" if r["ratio"] < 1.0 else "new slower"
            if name.startswith("jax_") or " jax " in f" {pid} ":
                r["verdict"] += " (control)"
        else:
            r["verdict"] = "; ".join(f"{b}: {e}" for b, e in errors.get(pid, {}).items()) or "-"
        rows.append(r)
    for pid, errs in errors.items():
        if not any(r["point"] == pid for r in rows):
            rows.append({"bench": bench, "point": pid, "timing": "-", "verdict": str(errs)})
    return rows


def fmt(v, spec):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) and spec else str(v)


COLS = [
    ("point", "point", ""),
    ("timing", "timing", ""),
    ("new_ms", "new ms", ".3f"),
    ("base_ms", "base ms", ".3f"),
    ("ratio", "new/base", ".3f"),
    ("noise_new", "noise new", ".3f"),
    ("noise_base", "noise base", ".3f"),
    ("runs", "runs n/b", ""),
    ("verdict", "verdict", ""),
]


def table(rows: list[dict]) -> str:
    cells = [[fmt(r.get(k), s) for k, _, s in COLS] for r in rows]
    w = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(COLS)]
    num = [bool(s) for _, _, s in COLS]

    def line(vals):
        return "  ".join(v.rjust(x) if n else v.ljust(x) for v, x, n in zip(vals, w, num)).rstrip()

    return "\n".join(
        [line([h for _, h, _ in COLS]), line(["-" * x for x in w])] + list(map(line, cells))
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder of <bench>.<new|base>.<round>.json files")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    runs = load(args.dir)
    if not runs:
        print(f"no <bench>.<new|base>.<round>.json files in {args.dir}")
        return 1
    text = []
    for bench, by_build in sorted(runs.items()):
        bw = {
            b: [d.get("copy_bandwidth_Bps") for _, d in lst if d.get("copy_bandwidth_Bps")]
            for b, lst in by_build.items()
        }
        bws = ", ".join(
            f"{b} {' '.join(f'{x / 1e9:.0f}' for x in v)}" for b, v in sorted(bw.items()) if v
        )
        text.append(
            f"\n== A/B {bench}: new/base < 1 means the new build is faster; noise = "
            f"(max-min)/mean over one build's runs" + (f"; copy GB/s per run: {bws}" if bws else "")
        )
        text.append(table(rows_of(bench, by_build)))
    out = "\n".join(text)
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out.lstrip("\n") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
