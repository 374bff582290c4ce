"""The rules every op and layer shares, written once: which dtypes keys and
tables may have, the "no key" value, which ids are valid rows, and the
trace-time checks built on them.

  * keys: int32, uint32 or int64 (int64 needs `jax_enable_x64`);
  * tables: float32, bfloat16 or float16 (all arithmetic in float32);
  * padding: -1 for the signed key dtypes, 0xFFFFFFFF for uint32. The same
    value marks an empty slot of a hash table, so padding is never inserted
    nor found;
  * an id is a valid row of a table of `num_rows` rows when it lies in
    [0, num_rows) (xla_ffi/embed_math.h `RowOf` is the kernels' twin);
  * bags: position j of the flat ids belongs to bag b when
    offsets[b] <= j < offsets[b + 1] (offsets non-decreasing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KEY_DTYPES = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.int64))
TABLE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Rows of one table (and of one shard) stay below this: rows are int32.
MAX_ROWS = 2**31 - 1


def positive_int(name: str, value) -> int:
    """`value` as an int if it is a positive integer (2.5, 0, True refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def padding_value(key_dtype) -> np.generic:
    """The "no key" value of a key dtype, as a numpy scalar of that dtype."""
    dt = check_key_dtype(key_dtype, "key_dtype", need_x64=False)
    return dt.type(np.iinfo(np.uint32).max if dt == np.uint32 else -1)


def is_padding(ids):
    """Where `ids` holds the "no key" value of its dtype."""
    return ids == jnp.asarray(padding_value(ids.dtype), ids.dtype)


def valid_rows(ids, num_rows: int):
    """(mask of the ids that are rows of a `num_rows`-row table, those rows
    as int32 with every other id mapped to 0)."""
    if not 0 <= num_rows <= MAX_ROWS:
        raise ValueError(f"num_rows must lie in [0, 2^31 - 1], got {num_rows}")
    if jnp.issubdtype(ids.dtype, jnp.unsignedinteger):
        valid = ids < jnp.asarray(num_rows, ids.dtype)
    else:
        valid = (ids >= 0) & (ids < num_rows)
    return valid, jnp.where(valid, ids, 0).astype(jnp.int32)


def bag_of_positions(offsets, n: int):
    """(bag index of each of `n` positions, whether the position is in some
    bag at all) under the bag rule."""
    pos = jnp.arange(n, dtype=jnp.int32)
    # Offsets are non-decreasing: the bag of j is the number of bag ends <= j,
    # a running count of the ends at each position (no search: on a GPU
    # jnp.searchsorted is a loop of log2(n) trips).
    ends = jnp.clip(offsets[1:], 0, n).astype(jnp.int32)
    bag = jnp.cumsum(jnp.zeros((n + 1,), jnp.int32).at[ends].add(1)[:n]).astype(jnp.int32)
    inside = (pos >= offsets[0]) & (pos < offsets[-1])
    return bag, inside


def x64_error(what: str) -> ValueError:
    """The error for int64 keys while `jax_enable_x64` is off."""
    return ValueError(
        f"{what} are int64, which needs jax_enable_x64 (without it JAX truncates them to 32 "
        "bits): call jax.config.update('jax_enable_x64', True) or set JAX_ENABLE_X64=1 before "
        "creating arrays, or use int32/uint32 keys"
    )


def check_key_dtype(dtype, what: str, *, need_x64: bool = True) -> np.dtype:
    """`dtype` as a numpy dtype if it is a key dtype; ValueError naming `what`
    otherwise (uint64, and int64 without x64 when `need_x64`)."""
    dt = np.dtype(dtype)
    if dt not in KEY_DTYPES:
        raise ValueError(f"{what}: unsupported dtype {dt.name}, expected int32, uint32 or int64")
    if need_x64 and dt == np.int64 and not jax.config.jax_enable_x64:
        raise x64_error(what)
    return dt


def as_key_array(x, what: str = "ids"):
    """`x` as a jax array of a key dtype, refusing the silent int64 -> int32
    truncation JAX does without x64 (checked before the conversion)."""
    dt = getattr(x, "dtype", None)
    if dt is not None:
        check_key_dtype(dt, what)
    x = jnp.asarray(x)
    check_key_dtype(x.dtype, what)
    return x


def check_table(table, name: str = "table") -> None:
    """A rank-2 [rows, D] table of a table dtype."""
    if table.ndim != 2:
        raise ValueError(f"{name} must be rank 2 [rows, D], got shape {tuple(table.shape)}")
    if jnp.dtype(table.dtype) not in TABLE_DTYPES:
        raise ValueError(
            f"{name} must be float32, bfloat16 or float16, got {jnp.dtype(table.dtype).name}"
        )


def host_keys(keys, key_dtype, what: str, *, padding_ok: bool) -> np.ndarray:
    """Host `keys` (any integer array-like) as a numpy array of `key_dtype`,
    refusing every value that conversion would change or that is no key:
    non-integer dtypes (1.7 is not truncated to 1), values outside the range
    of `key_dtype` (2^33 + 1 is not wrapped to 1), and unless `padding_ok`
    the padding value ("no key"). ValueError naming `what` and the value.
    Keys already of `key_dtype` come back as they are, not copied."""
    arr = np.asarray(keys)
    dt = check_key_dtype(key_dtype, "key_dtype", need_x64=False)
    if arr.size == 0:
        return arr.astype(dt)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype.name}")
    info = np.iinfo(dt)
    if not np.can_cast(arr.dtype, dt, "safe"):  # arr's dtype holds values dt lacks
        outside = (arr < info.min) | (arr > info.max)
        if outside.any():
            bad = arr[outside].reshape(-1)[0]
            hint = " (int64 keys need key_dtype=int64 and jax_enable_x64)" if dt != np.int64 else ""
            raise ValueError(
                f"{what}: {int(bad)} does not fit key_dtype {dt.name} "
                f"[{info.min}, {info.max}]{hint}; {int(outside.sum())} value(s) do not"
            )
    out = arr.astype(dt, copy=False)
    if not padding_ok and (out == padding_value(dt)).any():
        raise ValueError(
            f"{what}: {int(padding_value(dt))} is the padding value of {dt.name} (\"no key\"), "
            "which cannot be a key"
        )
    return out


def all_distinct(keys: np.ndarray) -> bool:
    """Whether the host keys [K] hold no value twice. Strictly increasing
    keys (as an export of a direct table gives them) take one pass; others
    are sorted first (numpy's hashing `unique` is several times slower)."""
    if keys.size < 2 or (keys[1:] > keys[:-1]).all():
        return True
    ordered = np.sort(keys)
    return not (ordered[1:] == ordered[:-1]).any()


def _sums_finite(arr: np.ndarray) -> bool:
    """Whether the sums along the last axis of a float32 or float64 `arr`
    are all finite, which holds only if every entry is finite: a NaN or an
    Inf entry makes its sum NaN or Inf. (A sum that overflows from finite
    entries is not finite either: then the caller checks each entry.) One
    matrix-vector product: a single pass over the data, no [arr.shape] mask."""
    if arr.dtype not in (np.float32, np.float64) or arr.ndim == 0 or arr.size == 0:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        sums = arr.reshape(-1, arr.shape[-1]) @ np.ones(arr.shape[-1], arr.dtype)
    return bool(np.isfinite(sums).all())


def host_vectors(vectors, what: str) -> np.ndarray:
    """Host `vectors` as a numpy array, refusing non-numbers and NaN or Inf
    (ValueError naming `what`, how many and the first bad entry's index)."""
    arr = np.asarray(vectors)
    if arr.dtype.kind not in "iuf" and arr.dtype != jnp.bfloat16:
        raise ValueError(f"{what} must be numbers, got dtype {arr.dtype.name}")
    if arr.dtype.kind in "iu" or _sums_finite(arr):
        return arr
    bad = ~np.isfinite(arr if arr.dtype.kind == "f" else arr.astype(np.float32))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}: {int(bad.sum())} value(s) are NaN or Inf, the first at {first}")
    return arr
