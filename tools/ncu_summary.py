"""Summarizes an `ncu --csv --metrics gpu__time_duration.sum,...` log: one
line per kernel launch in order (time, DRAM bytes read/written, GB/s), a
total per profiled step, and the launches grouped by kernel name.

  python3 tools/ncu_summary.py ncu.log [--steps 2]

Lines of the log that are not ncu's CSV (the program's own output) are
shown first, so the memory plan and the step markers stay next to the
numbers. ncu serializes kernels and flushes caches between them, so the sum
of kernel times is above the step's wall time with overlap; use it for
where the time goes, not for the step time.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import re


def _short(name: str, width: int = 70) -> str:
    depth = 0
    for i, ch in enumerate(name):  # drop the argument list (outside <...>)
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    name = re.sub(r"^void ", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def parse(path):
    text = open(path, errors="replace").read().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith('"ID"')), None)
    if start is None:
        return text, []
    other = [line for line in text[:start] if not line.startswith("==PROF==")]
    rows = list(csv.DictReader(io.StringIO("\n".join(text[start:]))))
    launches = collections.OrderedDict()
    for r in rows:
        if not r.get("ID", "").isdigit():
            continue
        k = launches.setdefault(int(r["ID"]), {"name": r["Kernel Name"]})
        val = float(r["Metric Value"].replace(",", "")) if r["Metric Value"] else 0.0
        unit = r.get("Metric Unit", "")
        scale = {
            "nsecond": 1e-3,
            "ns": 1e-3,
            "usecond": 1.0,
            "us": 1.0,
            "msecond": 1e3,
            "ms": 1e3,
            "byte": 1.0,
            "Kbyte": 1e3,
            "Mbyte": 1e6,
            "Gbyte": 1e9,
        }.get(unit, 1.0)
        k[r["Metric Name"]] = val * scale
    return other, list(launches.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log")
    p.add_argument("--steps", type=int, default=2, help="steps per profiled group (default 2)")
    args = p.parse_args(argv)
    other, launches = parse(args.log)
    for line in other:
        if line.strip():
            print(line)
    if not launches:
        print("no ncu CSV rows found")
        return
    total_us = 0.0
    by_name = collections.defaultdict(lambda: [0, 0.0, 0.0])
    print(f"\n{'#':>4} {'kernel':70} {'us':>9} {'read MB':>9} {'write MB':>9} {'GB/s':>7}")
    for i, k in enumerate(launches):
        us = k.get("gpu__time_duration.sum", 0.0)
        rd = k.get("dram__bytes_read.sum", 0.0) / 1e6
        wr = k.get("dram__bytes_write.sum", 0.0) / 1e6
        gbs = (rd + wr) * 1e6 / (us * 1e-6) / 1e9 if us else 0.0
        total_us += us
        agg = by_name[_short(k["name"])]
        agg[0] += 1
        agg[1] += us
        agg[2] += rd + wr
        print(f"{i:4d} {_short(k['name']):70} {us:9.1f} {rd:9.1f} {wr:9.1f} {gbs:7.0f}")
    print(
        f"\n{len(launches)} launches, {total_us:.1f} us in all "
        f"({total_us / max(args.steps, 1):.1f} us per step if they are {args.steps} steps "
        f"of one program)"
    )
    print(f"\n{'kernel':70} {'calls':>5} {'us':>9} {'MB':>9} {'GB/s':>7}")
    for name, (c, us, mb) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(
            f"{name:70} {c:5d} {us:9.1f} {mb:9.1f} {mb * 1e6 / (us * 1e-6) / 1e9 if us else 0:7.0f}"
        )


if __name__ == "__main__":
    main()
