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

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
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


def print_table(rows: Sequence[dict], columns: Sequence, file=None) -> str:
    """Prints `rows` (dicts) as an aligned text table and returns it.

    `columns`: keys, or tuples (key, header) / (key, header, format_spec).
    Missing values print as '-'; numbers are right-aligned.
    """
    cols = []
    for c in columns:
        if isinstance(c, str):
            cols.append((c, c, None))
        else:
            key, header, *rest = c
            cols.append((key, header, rest[0] if rest else None))
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
