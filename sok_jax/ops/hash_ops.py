"""Hash-table find-or-insert: the `sok_hash_find_or_insert` FFI target.

In hash mode each device's shard maps arbitrary integer keys to its
`capacity` rows through an open-addressing table held as functional state:
`slot_keys`, a [capacity] array of the key dtype whose slot i holds the key
stored in row i, or EMPTY. The row of a key is its slot index.

EMPTY is -1 for int32/int64 and 0xFFFFFFFF for uint32; it is also the padding
("no key") value of a query, so padding is never inserted nor found.

Probe rule (identical in xla_ffi/hash_math.h): a 32-bit hash word, murmur3's
fmix32 of the bits of a 32-bit key or the high half of splitmix64 of the bits
of an int64 key; start slot = word % capacity; then linear probing with
wrap-around, for at most `capacity` slots.

The CPU target and `sok_jax.ops.reference.find_or_insert` process keys in
position order and agree exactly. On GPU, new keys of one batch race for free slots, so the
row a new key gets may differ (each key still gets one row, and exactly one
position per new key reports is_new=1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sok_jax import _native  # noqa: F401  (registers the targets)
from sok_jax.ops.checks import MAX_ROWS, as_key_array, check_key_dtype, padding_value

_TARGET = "sok_hash_find_or_insert"


# The EMPTY slot of a key dtype is its padding value (`checks.padding_value`).
EMPTY = padding_value


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
    if not 1 <= int(capacity) <= MAX_ROWS:
        raise ValueError(f"capacity must lie in [1, 2^31), got {capacity}")
    return jnp.full((int(capacity),), EMPTY(dt), dtype=dt)


def _hash_word(xp, keys):
    """The 32-bit hash word of each key (numpy or jax.numpy arrays)."""
    dt = np.dtype(keys.dtype)
    if dt == np.int64:
        z = keys.view(np.uint64) if xp is np else lax.bitcast_convert_type(keys, jnp.uint64)
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return (z >> np.uint64(32)).astype(np.uint32)
    if dt == np.int32:
        h = keys.view(np.uint32) if xp is np else lax.bitcast_convert_type(keys, jnp.uint32)
    else:
        h = keys
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    h = h ^ (h >> np.uint32(16))
    return h


def hash_slot(keys, capacity: int):
    """The first slot probed for each key (its row if no collision).

    Computed with numpy for numpy input (no jax_enable_x64 needed) and with
    jax.numpy otherwise (traceable; int64 then needs jax_enable_x64).

    Args:
      keys: integer array of int32, uint32 or int64.
      capacity: table capacity, in [1, 2^31).

    Returns:
      int32 array of keys' shape with values in [0, capacity).
    """
    if not 1 <= int(capacity) <= MAX_ROWS:
        raise ValueError(f"capacity must lie in [1, 2^31), got {capacity}")
    if isinstance(keys, jax.Array):
        xp = jnp
        check_key_dtype(keys.dtype, "keys")
    else:
        xp = np
        keys = np.asarray(keys)
        check_key_dtype(keys.dtype, "keys", need_x64=False)
    with np.errstate(over="ignore"):
        h = _hash_word(xp, keys)
        return (h % np.uint32(capacity)).astype(np.int32)


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
    if not 1 <= slot_keys.shape[0] <= MAX_ROWS:
        raise ValueError(f"slot_keys: capacity must lie in [1, 2^31), got {slot_keys.shape[0]}")
    return slot_keys, keys, dt


def find_or_insert(slot_keys: jax.Array, keys: jax.Array, *, insert: bool):
    """Looks keys up in a hash table, inserting unseen ones in training mode.

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
        is_new: [N] int32, 1 at exactly one position per newly inserted key
          (initialize that row once), 0 elsewhere.
        num_failed: int32 scalar, the non-padding positions that got no row
          because the table is full (always 0 with insert=False).

    Raises:
      ValueError: for wrong ranks, mismatched or unsupported dtypes, or int64
        keys without jax_enable_x64.
    """
    slot_keys, keys, dt = check_find_or_insert(slot_keys, keys)
    n = keys.shape[0]
    if n == 0:
        return (
            slot_keys,
            jnp.zeros((0,), jnp.int32),
            jnp.zeros((0,), jnp.int32),
            jnp.zeros((), jnp.int32),
        )
    out_types = (
        jax.ShapeDtypeStruct(slot_keys.shape, dt),  # slot_keys_out
        jax.ShapeDtypeStruct((n,), jnp.int32),  # rows
        jax.ShapeDtypeStruct((n,), jnp.int32),  # is_new
        jax.ShapeDtypeStruct((1,), jnp.int32),  # num_failed
    )
    call = jax.ffi.ffi_call(
        _TARGET, out_types, vmap_method="sequential", input_output_aliases={0: 0}
    )
    new_slots, rows, is_new, failed = call(slot_keys, keys, insert=np.int32(bool(insert)))
    return new_slots, rows, is_new, failed[0]
