"""Hash-table find-or-insert: the `sok_hash_find_or_insert` FFI target.

In hash mode each device's shard maps arbitrary integer keys to its
`capacity` rows through an open-addressing table held as functional state:
`slot_keys`, a [capacity] array of the key dtype whose slot i holds the key
stored in row i, or EMPTY. The row of a key is its slot index. Optional
per-row scores (`last_seen`: the step that last saw the row's key, `count`:
in how many steps it was seen) drive eviction, and an optional count-min
sketch drives admission.

EMPTY is -1 for int32/int64 and 0xFFFFFFFF for uint32; it is also the padding
("no key") value of a query, so padding is never inserted nor found.

Layout and rule (identical in xla_ffi/hash_math.h, where the rule is spelled
out step by step): the slots are cut into `num_buckets(capacity)` buckets of
at most `BUCKET_SLOTS` consecutive slots; a key's home bucket is its 32-bit
hash word (murmur3's fmix32 of a 32-bit key, the high half of splitmix64's
finalizer of an int64 key) scaled to [0, buckets). The new keys of one call
are placed in *claim order*, ascending `order_word` (that finalizer's whole
word, a bijection of the key, so distinct keys never tie): per home bucket
they take its EMPTY slots in ascending slot order; with eviction ("lru" /
"lfu") the next ones take the bucket's rows not seen in this call, lowest
(score, key) first; without eviction they go on, one after another, to the
first later bucket with an EMPTY slot. The result does not depend on the
position of keys in the batch (except which position reports is_new: the
first), nor on the platform: the CPU target, the CUDA target and
`sok_jax.ops.reference.find_or_insert` / `hash_lookup` agree bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sok_jax import _native  # noqa: F401  (registers the targets)
from sok_jax.ops.checks import MAX_ROWS, as_key_array, check_key_dtype, padding_value

_TARGET = "sok_hash_find_or_insert"

# The EMPTY slot of a key dtype is its padding value (`checks.padding_value`).
EMPTY = padding_value

BUCKET_SLOTS = 16  # xla_ffi/hash_math.h kBucketSlots
MAX_SKETCH_DEPTH = 8
POLICIES = {None: 0, "none": 0, "lru": 1, "lfu": 2}

# Per-position outcome (the `status` result; xla_ffi/hash_math.h HashStatus).
FOUND, INSERTED, MISSING, FULL, NOT_ADMITTED, PADDING = range(6)


class HashLookup(NamedTuple):
    """The results of `hash_lookup`.

    slot_keys, last_seen, count, sketch: the table, its scores and the sketch
      after the call (None where not given).
    rows: int32 [N]: each position's row, -1 where it has none.
    is_new: int32 [N]: 1 at the first position of each key placed by this
      call (initialize that row, and reset its optimizer slots).
    evicted: [N] of the key dtype: at such a position, the key whose row it
      took (EMPTY elsewhere).
    status: int32 [N]: FOUND, INSERTED, MISSING (find only), FULL (no row
      free or evictable), NOT_ADMITTED or PADDING.
    """

    slot_keys: jax.Array
    last_seen: Any
    count: Any
    sketch: Any
    rows: jax.Array
    is_new: jax.Array
    evicted: jax.Array
    status: jax.Array


def empty_slot_keys(capacity: int, key_dtype) -> jax.Array:
    """A table of `capacity` EMPTY slots.

    Args:
      capacity: number of slots (rows), in [1, 2^31).
      key_dtype: int32, uint32 or int64 (int64 needs jax_enable_x64).

    Returns:
      A [capacity] array of `key_dtype` filled with EMPTY.

    Raises:
      ValueError: for a bad capacity or key dtype.
    """
    dt = check_key_dtype(key_dtype, "key_dtype")
    _check_capacity(capacity)
    return jnp.full((int(capacity),), EMPTY(dt), dtype=dt)


def _check_capacity(capacity, what="capacity"):
    if not 1 <= int(capacity) <= MAX_ROWS:
        raise ValueError(f"{what} must lie in [1, 2^31), got {capacity}")


# --------------------------------------------------------------------------
# The hash words and the bucket layout, in numpy (for numpy input: no
# jax_enable_x64 needed) or jax.numpy (traceable).


def _xp(keys):
    if isinstance(keys, jax.Array):
        check_key_dtype(keys.dtype, "keys")
        return jnp, keys
    keys = np.asarray(keys)
    check_key_dtype(keys.dtype, "keys", need_x64=False)
    return np, keys


def _u(xp, x, dt):
    return x.view(dt) if xp is np else lax.bitcast_convert_type(x, dt)


def _fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _mix64(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def order_word(keys):
    """The claim order of each key: uint32 (32-bit keys) or uint64 (int64
    keys), a bijection of the key's bits (hash_math.h OrderWord)."""
    xp, keys = _xp(keys)
    with np.errstate(over="ignore"):
        if np.dtype(keys.dtype) == np.int64:
            return _mix64(_u(xp, keys, np.uint64))
        return _fmix32(_u(xp, keys, np.uint32) if keys.dtype == np.int32 else keys)


def _hash_of_order(order):
    if np.dtype(order.dtype) == np.uint64:
        return (order >> np.uint64(32)).astype(np.uint32)
    return order


def hash_word(keys):
    """The 32-bit hash word of each key: the leading 32 bits of its order word."""
    return _hash_of_order(order_word(keys))


def _mulhi32(a, b: int):
    """(a * b) >> 32 for uint32 `a` and 0 <= b < 2^32, in 32-bit arithmetic."""
    m = np.uint32(0xFFFF)
    b = np.uint32(b)
    a_lo, a_hi = a & m, a >> np.uint32(16)
    b_lo, b_hi = b & m, b >> np.uint32(16)
    p0, p1, p2, p3 = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
    mid = (p0 >> np.uint32(16)) + (p1 & m) + (p2 & m)
    return p3 + (p1 >> np.uint32(16)) + (p2 >> np.uint32(16)) + (mid >> np.uint32(16))


def scale_word(word, n: int):
    """A uint32 word scaled to [0, n): (word * n) >> 32 (hash_math.h
    BucketOfWord), int32."""
    with np.errstate(over="ignore"):
        return _mulhi32(word, int(n)).astype(np.int32)


def num_buckets(capacity: int) -> int:
    """Buckets of a table of `capacity` slots."""
    _check_capacity(capacity)
    return -(-int(capacity) // BUCKET_SLOTS)


def bucket_starts(capacity: int) -> np.ndarray:
    """int64 [buckets + 1]: bucket b holds slots [starts[b], starts[b + 1])."""
    nb = num_buckets(capacity)
    return np.arange(nb + 1, dtype=np.int64) * int(capacity) // nb


def home_bucket(keys, capacity: int):
    """The home bucket of each key of a table of `capacity` slots, int32."""
    return scale_word(hash_word(keys), num_buckets(capacity))


def salted_word(order, salt: int):
    """uint32: a key's `order_word` remixed with `salt`, its finalizer of
    order + salt * the golden ratio (for an int64 key the leading 32 bits).
    Distinct salts give independent words: salt h + 1 is row h of the
    admission sketch (hash_math.h SketchCell), salt 0 the owner of a key
    under hashed placement (`sok_jax.distributed.key_owner`)."""
    with np.errstate(over="ignore"):
        if np.dtype(order.dtype) == np.uint64:
            z = _mix64(order + np.uint64((salt * 0x9E3779B97F4A7C15) % 2**64))
            return (z >> np.uint64(32)).astype(np.uint32)
        return _fmix32(order + np.uint32((salt * 0x9E3779B9) % 2**32))


def sketch_cells(keys, depth: int, width: int):
    """int32 [..., depth]: the count-min sketch counters of each key
    (hash_math.h SketchCell)."""
    xp, keys = _xp(keys)
    order = order_word(keys)
    cells = [
        scale_word(salted_word(order, h + 1), width) + np.int32(h * width) for h in range(depth)
    ]
    return xp.stack(cells, axis=-1)


def workspace_bytes(n: int, key_dtype) -> int:
    """Bytes of device workspace the CUDA insertion needs for n keys (the
    kernel checks it): three int32 and two order-word arrays of n, cub's
    partition / sort temporaries (bounded by 16 n + 4 MiB) and alignment
    slack. The CPU handler ignores it."""
    order = 8 if np.dtype(key_dtype) == np.int64 else 4
    return n * (12 + 2 * order) + (16 * n + (4 << 20)) + 8192


# --------------------------------------------------------------------------
# Checks and the FFI wrappers.


def check_find_or_insert(slot_keys, keys):
    """(slot_keys, keys, key dtype) as jax arrays, checked: both rank 1, one
    key dtype, a capacity in [1, 2^31). int64 is checked before the
    conversion, which would truncate it without jax_enable_x64."""
    slot_keys = as_key_array(slot_keys, "slot_keys")
    keys = as_key_array(keys, "keys")
    if slot_keys.ndim != 1:
        raise ValueError(f"slot_keys must be rank 1 [capacity], got shape {slot_keys.shape}")
    if keys.ndim != 1:
        raise ValueError(f"keys must be rank 1 [N], got shape {keys.shape}")
    dt = np.dtype(slot_keys.dtype)
    if np.dtype(keys.dtype) != dt:
        raise ValueError(f"keys dtype {keys.dtype} must equal slot_keys dtype {dt}")
    _check_capacity(slot_keys.shape[0], "slot_keys: capacity")
    return slot_keys, keys, dt


class LookupArgs(NamedTuple):
    """`hash_lookup`'s arguments, checked (see `check_hash_lookup`)."""

    slot_keys: jax.Array
    keys: jax.Array
    dtype: np.dtype
    last_seen: Any
    count: Any
    sketch: Any
    step: jax.Array  # int32 [1]
    policy: int
    admit_after: int
    sketch_depth: int


def check_hash_lookup(
    slot_keys, keys, last_seen, count, sketch, step, policy, admit_after, sketch_depth
) -> LookupArgs:
    """Checks `hash_lookup`'s arguments, raising ValueError naming the bad
    one: scores both given or both absent, [capacity] int32; a known policy,
    which needs scores; admit_after >= 0, which needs a sketch of
    sketch_depth rows; a step scalar."""
    slot_keys, keys, dt = check_find_or_insert(slot_keys, keys)
    cap = slot_keys.shape[0]
    if (last_seen is None) != (count is None):
        raise ValueError("last_seen and count must be given together")
    for name, x in (("last_seen", last_seen), ("count", count)):
        if x is not None and (x.shape != (cap,) or x.dtype != jnp.int32):
            raise ValueError(
                f"{name} must be int32 [{cap}] like slot_keys, got {x.dtype} {x.shape}"
            )
    if policy not in POLICIES:
        raise ValueError(f"policy must be None, 'lru' or 'lfu', got {policy!r}")
    code = POLICIES[policy]
    if code and last_seen is None:
        raise ValueError(f"policy {policy!r} needs the scores last_seen and count")
    admit_after = 0 if admit_after is None else admit_after
    if isinstance(admit_after, bool) or int(admit_after) != admit_after or admit_after < 0:
        raise ValueError(f"admit_after must be a non-negative integer, got {admit_after!r}")
    admit_after = int(admit_after)
    depth = int(sketch_depth)
    if sketch is not None:
        if not 1 <= depth <= MAX_SKETCH_DEPTH:
            raise ValueError(f"sketch_depth must lie in [1, {MAX_SKETCH_DEPTH}], got {depth}")
        if (
            sketch.ndim != 1
            or sketch.dtype != jnp.int32
            or sketch.shape[0] % depth
            or not sketch.size
        ):
            raise ValueError(
                f"sketch must be int32 [sketch_depth * width] with sketch_depth={depth}, got "
                f"{sketch.dtype} {sketch.shape}"
            )
    elif admit_after:
        raise ValueError("admit_after > 0 needs a sketch")
    step = jnp.zeros((1,), jnp.int32) if step is None else jnp.asarray(step, jnp.int32)
    if step.size != 1:
        raise ValueError(f"step must be a scalar, got shape {step.shape}")
    return LookupArgs(
        slot_keys, keys, dt, last_seen, count, sketch, step.reshape(1), code, admit_after, depth
    )


def hash_lookup(
    slot_keys,
    keys,
    *,
    insert: bool,
    last_seen=None,
    count=None,
    sketch=None,
    step=None,
    policy=None,
    admit_after=None,
    sketch_depth: int = 1,
) -> HashLookup:
    """Looks keys up in a hash table; with `insert`, places the new ones
    (xla_ffi/hash_math.h has the rule), evicting or admitting as asked.

    Args:
      slot_keys: [capacity] int32/uint32/int64 table (see `empty_slot_keys`).
        Aliased to the returned table (as are the scores and the sketch):
        donate them under jit to update in place.
      keys: [N] keys of the same dtype; EMPTY entries are padding.
      insert: True (training) places new keys and stamps found rows; False
        (evaluation) only finds, changing nothing.
      last_seen, count: int32 [capacity] per-row scores, or None (no
        scores). With insert, every row this call sees gets last_seen = step
        and count + 1 (once, however often its key repeats); a placed key
        gets last_seen = step and count 1 (its sketch estimate under
        admission).
      sketch: int32 [sketch_depth * width] count-min sketch, or None.
      step: int32 scalar, the step this call stamps rows with (traced).
      policy: None (no eviction: a new key fails only when every slot of
        the table is taken), "lru" or "lfu" (needs scores).
      admit_after: with insert, a new key is placed only once the sketch has
        counted it in that many calls (this one included); None or 0: always.
      sketch_depth: the sketch's rows.

    Returns:
      A `HashLookup`.

    Raises:
      ValueError: for wrong ranks, shapes, mismatched or unsupported dtypes,
        int64 keys without jax_enable_x64, or bad policy / admission args.
    """
    a = check_hash_lookup(
        slot_keys, keys, last_seen, count, sketch, step, policy, admit_after, sketch_depth
    )
    n, cap = a.keys.shape[0], a.slot_keys.shape[0]
    if n == 0:
        zeros = jnp.zeros((0,), jnp.int32)
        return HashLookup(
            a.slot_keys,
            a.last_seen,
            a.count,
            a.sketch,
            zeros,
            zeros,
            jnp.zeros((0,), a.dtype),
            zeros,
        )
    none = jnp.zeros((0,), jnp.int32)
    ls = none if a.last_seen is None else a.last_seen
    ct = none if a.count is None else a.count
    sk = none if a.sketch is None else a.sketch
    ws = workspace_bytes(n, a.dtype) if insert else 1
    out_types = (
        jax.ShapeDtypeStruct((cap,), a.dtype),  # slot_keys_out
        jax.ShapeDtypeStruct(ls.shape, jnp.int32),  # last_seen_out
        jax.ShapeDtypeStruct(ct.shape, jnp.int32),  # count_out
        jax.ShapeDtypeStruct(sk.shape, jnp.int32),  # sketch_out
        jax.ShapeDtypeStruct((n,), jnp.int32),  # rows
        jax.ShapeDtypeStruct((n,), jnp.int32),  # is_new
        jax.ShapeDtypeStruct((n,), a.dtype),  # evicted
        jax.ShapeDtypeStruct((n,), jnp.int32),  # status
        jax.ShapeDtypeStruct((ws,), jnp.uint8),  # workspace
    )
    call = jax.ffi.ffi_call(
        _TARGET,
        out_types,
        vmap_method="sequential",
        input_output_aliases={0: 0, 1: 1, 2: 2, 3: 3},
    )
    out = call(
        a.slot_keys,
        ls,
        ct,
        sk,
        a.keys,
        a.step,
        insert=np.int32(bool(insert)),
        policy=np.int32(a.policy),
        admit_after=np.int32(a.admit_after),
        sketch_depth=np.int32(a.sketch_depth if a.sketch is not None else 1),
    )
    new_slots, new_ls, new_ct, new_sk, rows, is_new, evicted, status, _ = out
    return HashLookup(
        new_slots,
        None if a.last_seen is None else new_ls,
        None if a.count is None else new_ct,
        None if a.sketch is None else new_sk,
        rows,
        is_new,
        evicted,
        status,
    )


def find_or_insert(slot_keys: jax.Array, keys: jax.Array, *, insert: bool):
    """Looks keys up in a hash table without scores, inserting unseen ones in
    training mode (`hash_lookup` with no eviction and no admission).

    Args:
      slot_keys: [capacity] int32/uint32/int64 table (see `empty_slot_keys`).
        Aliased to the returned table: donate it under jit to update in place.
      keys: [N] keys of the same dtype; EMPTY entries are padding.
      insert: True (training) inserts unseen keys; False (evaluation) only
        finds, and leaves the table as is.

    Returns:
      (slot_keys, rows, is_new, num_failed):
        slot_keys: the updated [capacity] table.
        rows: [N] int32 row of each key; -1 for padding, for a key not found
          in find mode, and for a key that found no free slot (full table).
        is_new: [N] int32, 1 at the first position of each newly inserted
          key (initialize that row once), 0 elsewhere.
        num_failed: int32 scalar, the non-padding positions that got no row
          because the table is full (always 0 with insert=False).

    Raises:
      ValueError: for wrong ranks, mismatched or unsupported dtypes, or int64
        keys without jax_enable_x64.
    """
    r = hash_lookup(slot_keys, keys, insert=insert)
    return r.slot_keys, r.rows, r.is_new, failures(r.status)


def failures(status):
    """int32 scalar: the positions that got no row because the table is full."""
    return jnp.sum(status == FULL).astype(jnp.int32)
