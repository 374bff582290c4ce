"""Helpers shared by the sok_jax benchmarks.

How every benchmark times a function (`time_samples`): warm-up calls first,
so compilation and module load stay out of the numbers; the host clock is
read only after `jax.block_until_ready`; many samples, of which the median
is reported (with the spread (p90 - p10) / median beside it); the calls
rotate among several input sets, so repeated calls do not measure a cache
that real inputs would miss; and a call too short for the host clock and
the dispatch overhead is timed as several back-to-back calls per sample,
blocked once at the end (one stream: when the last is done, all are).
A physical limit is measured in the same run: `copy_bandwidth` (a plain
jitted copy, bytes read + written) is what bytes-that-must-move are
divided by.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------- timing


def time_samples(
    fn: Callable,
    *args,
    warmup: int = 3,
    iters: int = 20,
    arg_sets: Sequence[Sequence[Any]] | None = None,
    min_sample_s: float = 1e-3,
    max_inner: int = 64,
) -> list[float]:
    """Per-call seconds of `fn`, one value per sample (`iters` samples).

    `arg_sets`: a list of argument tuples to rotate among (call k uses
    `arg_sets[k % len(arg_sets)]`); without it every call uses `args`.
    A sample runs `inner` calls back to back and blocks once on the last
    result (one stream: when the last is done, all are), so short calls are
    not dominated by host dispatch; `inner` is chosen after warm-up so that a
    sample lasts at least `min_sample_s` (1 for calls already that long).
    Only the latest result is kept alive, so large outputs do not pile up.
    """
    sets = [tuple(a) for a in arg_sets] if arg_sets else [tuple(args)]
    k = 0

    def call():
        nonlocal k
        a = sets[k % len(sets)]
        k += 1
        return fn(*a)

    out = None
    for _ in range(max(warmup, 1)):
        out = call()
        jax.block_until_ready(out)
    del out

    # Calibrate: one synchronised call.
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    one = time.perf_counter() - t0
    inner = 1
    if min_sample_s and one < min_sample_s:
        inner = int(min(max_inner, max(1, math.ceil(min_sample_s / max(one, 1e-7)))))

    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = call()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
        del out
    return samples


def timeit(fn: Callable, *args, warmup: int = 3, iters: int = 20, **kw) -> float:
    """Median seconds per call of `fn(*args)` (see `time_samples` for options)."""
    return statistics.median(time_samples(fn, *args, warmup=warmup, iters=iters, **kw))


def summarize(samples: Sequence[float]) -> dict:
    """Median, min, max and the relative spread (p90-p10)/median of samples."""
    s = sorted(samples)
    med = statistics.median(s)
    p10 = s[int(0.1 * (len(s) - 1))]
    p90 = s[int(math.ceil(0.9 * (len(s) - 1)))]
    return {
        "median_s": med,
        "min_s": s[0],
        "max_s": s[-1],
        "spread": (p90 - p10) / med if med > 0 else float("nan"),
        "n": len(s),
    }


GB = 1e9
GIB = 2**30


def copy_bandwidth(nbytes: int = 2**31, warmup: int = 3, iters: int = 20) -> float:
    """Bytes/s of a plain jitted copy, counting bytes read + bytes written.

    The copy is `x + 1.0` on a float32 array of `nbytes` (the result differs
    from the input, so XLA cannot elide it); two input arrays are rotated.
    """
    n = max(1, nbytes // 4)
    make = jax.jit(lambda key: jax.random.normal(key, (n,), jnp.float32))
    xs = [make(jax.random.key(i)) for i in range(2)]
    copy = jax.jit(lambda x: x + 1.0)
    t = timeit(copy, warmup=warmup, iters=iters, arg_sets=[(x,) for x in xs])
    del xs
    return 2 * n * 4 / t


def measure_copy_bandwidth(args) -> float:
    """`copy_bandwidth` on `args.copy_gb` GiB with the run's warm-up and
    iterations, printed; the ceiling every bytes-over-time figure is divided by."""
    nbytes = int(args.copy_gb * GIB)
    bw = copy_bandwidth(nbytes, warmup=args.warmup, iters=args.iters)
    print(
        f"copy bandwidth (x + 1.0 on {nbytes / 2**20:.0f} MiB, read + write): {bw / GB:.1f} GB/s",
        flush=True,
    )
    return bw


# --------------------------------------------------------------------------- data


def _coprime_multiplier(rng: np.random.Generator, m: int) -> int:
    if m <= 2:
        return 1
    while True:
        a = int(rng.integers(m // 3 + 1, m))
        if math.gcd(a, m) == 1:
            return a


def permute_keys(rng: np.random.Generator, keys: np.ndarray, vocab: int) -> np.ndarray:
    """Applies a random bijection of [0, vocab) to `keys`.

    An affine map k -> (a*k + b) mod vocab with gcd(a, vocab) = 1 and random
    a, b: a permutation of the key space that costs O(len(keys)) instead of
    materialising a vocab-sized permutation (seconds and GBs at 4 GB tables).
    Consecutive ranks land `a` rows apart, so hot keys are scattered.
    """
    a = _coprime_multiplier(rng, vocab)
    b = int(rng.integers(0, vocab))
    return ((keys.astype(np.int64) * a + b) % vocab).astype(keys.dtype)


def zipf_keys(
    rng: np.random.Generator,
    n: int,
    vocab: int,
    a: float = 1.1,
    dtype=np.int32,
    scatter: bool = True,
) -> np.ndarray:
    """`n` keys from a Zipf(a) law bounded to [0, vocab), hot keys scattered.

    Ranks come from numpy's (unbounded) Zipf with rejection of ranks above
    `vocab`, which gives exactly the truncated law P(rank r) ~ r**-a on
    1..vocab; rank r becomes key r-1, then a random permutation of the key
    space (`permute_keys`) moves the hot keys away from row 0.
    """
    if a <= 1.0:
        raise ValueError(f"numpy's Zipf needs a > 1, got {a}")
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        need = n - filled
        r = rng.zipf(a, size=int(need * 1.25) + 64)
        r = r[(r >= 1) & (r <= vocab)][:need]
        out[filled : filled + r.size] = r - 1
        filled += r.size
    keys = out.astype(dtype)
    return permute_keys(rng, keys, vocab) if scatter else keys


def uniform_keys(rng: np.random.Generator, n: int, vocab: int, dtype=np.int32) -> np.ndarray:
    """`n` keys uniform over [0, vocab)."""
    return rng.integers(0, vocab, size=n, dtype=np.int64).astype(dtype)


DISTS = ("uniform", "zipf")


def draw_keys(
    rng: np.random.Generator,
    dist: str,
    n: int,
    vocab: int,
    zipf_a: float = 1.1,
    dtype=np.int32,
    scatter: bool = True,
    hot_seed: int | None = None,
) -> np.ndarray:
    """`n` keys of [0, vocab) from `dist` ("uniform" or "zipf", see `zipf_keys`).

    Zipf keys are scattered by a random bijection drawn from `rng` on each
    call, so two calls share no hot keys; with `hot_seed` the bijection is
    the one that seed draws, the same on every call (a stable hot set over
    steps, as a cache needs to see)."""
    if dist == "uniform":
        return uniform_keys(rng, n, vocab, dtype=dtype)
    if dist == "zipf" and hot_seed is not None:
        keys = zipf_keys(rng, n, vocab, a=zipf_a, dtype=dtype, scatter=False)
        return permute_keys(np.random.default_rng(hot_seed), keys, vocab) if scatter else keys
    if dist == "zipf":
        return zipf_keys(rng, n, vocab, a=zipf_a, dtype=dtype, scatter=scatter)
    raise ValueError(f"unknown key distribution {dist!r} (known: {DISTS})")


# --------------------------------------------------------------------------- command line


def int_list(s: str) -> list[int]:
    """argparse type: "1,4,32" -> [1, 4, 32]."""
    return [int(x) for x in s.split(",") if x.strip()]


def float_list(s: str) -> list[float]:
    """argparse type: "1,0.5" -> [1.0, 0.5]."""
    return [float(x) for x in s.split(",") if x.strip()]


def str_list(s: str) -> list[str]:
    """argparse type: "uniform, zipf" -> ["uniform", "zipf"]."""
    return [x.strip() for x in s.split(",") if x.strip()]


def add_dists_arg(p: argparse.ArgumentParser, flag: str = "--dists", what: str = "") -> None:
    """A comma-separated list of key distributions (default: all of DISTS)."""
    p.add_argument(
        flag,
        type=str_list,
        default=list(DISTS),
        help=f"{what}key distributions: {', '.join(DISTS)} (default all)",
    )


def add_zipf_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zipf-a", type=float, default=1.1, help="Zipf exponent (default 1.1)")


def add_run_args(p: argparse.ArgumentParser, small_help: str) -> None:
    """The flags of every one-device-count benchmark: timing, the copy
    bandwidth measurement, seed, JSON output and `--small`."""
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per measurement")
    p.add_argument("--iters", type=int, default=20, help="timed samples per measurement")
    p.add_argument(
        "--input-sets", type=int, default=2, help="input sets rotated while timing (default 2)"
    )
    p.add_argument(
        "--copy-gb",
        type=float,
        default=2.0,
        help="GiB of the array copied to measure the copy bandwidth (default 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    p.add_argument("--small", action="store_true", help=small_help)


def shrink_run_args(args) -> None:
    """`--small`'s timing: one warm-up, three samples, a 16 MiB copy."""
    args.warmup, args.iters, args.copy_gb = 1, 3, 2.0**-6


def check_dists(p: argparse.ArgumentParser, *dist_lists) -> None:
    """argparse error for a key distribution that `draw_keys` does not know."""
    bad = set().union(*map(set, dist_lists)) - set(DISTS)
    if bad:
        p.error(f"unknown key distributions {sorted(bad)} (known: {', '.join(DISTS)})")


# --------------------------------------------------------------------------- points


def is_oom(e) -> bool:
    """Whether an exception (or its message) is the device running out of memory."""
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


def guarded(res: dict, fn: Callable, *args, **kw) -> bool:
    """Runs `fn(*args, **kw)`, which fills `res` as it goes; an exception is
    recorded in `res` ("error", "traceback") and printed, and the run goes
    on with the next point (what was learnt before it stays in `res`).
    Returns whether `fn` finished."""
    try:
        fn(*args, **kw)
        return True
    except Exception as e:  # noqa: BLE001 - report the point, go on
        res["error"] = f"{type(e).__name__}: {e}"[:4000]
        res["traceback"] = traceback.format_exc()[-4000:]
        print(f"  FAILED: {res['error'][:1000]}", flush=True)
        return False


def status(res: dict, width: int = 60) -> str:
    """A point's status column: ok, OOM, or the first line of its error."""
    if "error" not in res:
        return "ok"
    return "OOM" if is_oom(res["error"]) else res["error"].splitlines()[0][:width]


# --------------------------------------------------------------------------- output


def _fmt(v, fmt: str | None) -> str:
    if v is None:
        return "-"
    if fmt:
        try:
            return format(v, fmt)
        except (TypeError, ValueError):
            return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.3f}"
    return str(v)


def _columns(columns: Sequence) -> list:
    """(key, header, format_spec or None) for each column of `print_table`."""
    cols = []
    for c in columns:
        if isinstance(c, str):
            cols.append((c, c, None))
        else:
            key, header, *rest = c
            cols.append((key, header, rest[0] if rest else None))
    return cols


def point_line(res: dict, columns: Sequence) -> str:
    """One point as "header value, ..." in `print_table`'s columns: printed as
    each point ends, so a run cut short still shows what it measured."""
    return ", ".join(f"{h} {_fmt(res.get(k), f)}" for k, h, f in _columns(columns))


def print_table(rows: Sequence[dict], columns: Sequence, file=None) -> str:
    """Prints `rows` (dicts) as an aligned text table and returns it.

    `columns`: keys, or tuples (key, header) / (key, header, format_spec).
    Missing values print as '-'; numbers are right-aligned.
    """
    cols = _columns(columns)
    cells = [[_fmt(r.get(k), f) for k, _, f in cols] for r in rows]
    numeric = [
        all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)
        for k, _, _ in cols
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h, _) in enumerate(cols)]

    def line(vals):
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)
        ).rstrip()

    out = [line([h for _, h, _ in cols]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    text = "\n".join(out)
    print(text, file=file, flush=True)
    return text


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except Exception:  # noqa: BLE001 - git is optional
        return None


def print_env() -> dict:
    """`env_info()`, printed on one line first thing in a run; returns it."""
    env = env_info()
    print("env:", ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    return env


def env_info() -> dict:
    """Where and with what the numbers were taken."""
    devs = jax.devices()
    info = {
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "backend": jax.default_backend(),
        "device_kind": devs[0].device_kind,
        "num_devices": len(devs),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import sok_jax

        info["sok_jax"] = sok_jax.__version__
        info["sok_jax_has_cuda"] = sok_jax.has_cuda()
    except Exception:  # noqa: BLE001
        pass
    return info


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_json(path: str | None, obj) -> None:
    """Writes `obj` as indented JSON to `path` (no-op when path is None/empty)."""
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    print(f"wrote {path}", flush=True)


def new_result(benchmark: str, env: dict, args, copy_bw: float | None, **lists) -> dict:
    """The JSON every benchmark writes: its name, `env`, the parsed flags,
    the copy bandwidth of the run and one list per table (`lists`)."""
    out = {"benchmark": benchmark, "env": env, "config": vars(args)}
    if copy_bw is not None:
        out["copy_bandwidth_Bps"] = copy_bw
    out.update(lists)
    return out


def start_run(benchmark: str, args, config: str, **lists) -> dict:
    """Opens a run: prints the environment and the `config` line, measures
    the copy bandwidth (`measure_copy_bandwidth`); returns `new_result`'s dict."""
    env = print_env()
    print(f"config: {config}", flush=True)
    copy_bw = measure_copy_bandwidth(args)
    gc.collect()
    return new_result(benchmark, env, args, copy_bw, **lists)


def finish(result: dict, out: str | None, n_points: int, n_fail: int, t_start: float) -> int:
    """Closes a run: total time, the ok/failed count, the JSON; the exit status."""
    result["total_s"] = time.perf_counter() - t_start
    print(
        f"{n_points - n_fail} points ok, {n_fail} failed, {result['total_s']:.1f} s",
        flush=True,
    )
    write_json(out, result)
    return 0 if n_fail == 0 else 1
