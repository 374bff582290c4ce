"""Which device of a row-sharded table owns a key: the one rule that the
exchange (`rows.RowHashRows.bucket_keys`), the import of pairs and every
host-side owner computation use.

* "mod" (SOK's, the default): key k on device k % n. Cheap, and what SOK
  checkpoints assume, but keys with a common stride (ids that are all
  multiples of n, a field id in the low bits) pile onto one device, whose
  shard then fills while the others stay empty.
* "hashed" (as NVIDIA dynamicemb's `hash_roundrobin`): key k on device
  mix(k) % n, mix a full-avalanche finalizer of the key's bits
  (`hash_ops.salted_word`, salt 0: independent of the word that picks the
  key's bucket inside its shard). Any set of distinct keys spreads evenly.
  For hash tables only: in direct mode key k is row k, every shard holds
  exactly its ceil(V / n) keys whatever they are, so no shard can fill.

`key_owner` is plain array code: numpy in, numpy out (the host, no
jax_enable_x64 needed for int64 keys); a jax array in (traced or not), a jax
array out. Both compute the same owners from the key's bits in its dtype, so
the owner of a key may differ between an int32 and an int64 table. The
logical table (key -> vector) never depends on the rule: pairs exported
under one import under the other.
"""

from __future__ import annotations

import numpy as np

from sok_jax.ops import hash_ops

KEY_PLACEMENTS = ("mod", "hashed")
_OWNER_SALT = 0  # hash_ops.salted_word: the sketch's rows take salts 1..8


def check_key_placement(key_placement, use_hashtable: bool, where: str = "") -> str:
    """`key_placement`, checked: one of KEY_PLACEMENTS, "hashed" only for a
    hash table.

    Raises:
      ValueError: naming the argument (prefixed by `where`) and the fix.
    """
    if key_placement not in KEY_PLACEMENTS:
        raise ValueError(
            f"{where}key_placement must be one of {KEY_PLACEMENTS}, got {key_placement!r}"
        )
    if key_placement == "hashed" and not use_hashtable:
        raise ValueError(
            f"{where}key_placement='hashed' needs use_hashtable=True: in direct mode key k is "
            "row k, at device k % n, and every device holds exactly its share of the rows, "
            "so no device can fill"
        )
    return key_placement


def key_owner(keys, num_devices: int, key_placement: str = "mod"):
    """int32: the device in [0, num_devices) that owns each key.

    Args:
      keys: int32, uint32 or int64 keys, numpy or jax (padding included: its
        owner is meaningless, mask it).
      num_devices: n, the devices of the table's axis.
      key_placement: "mod" (k % n) or "hashed" (mix(k) % n).
    """
    n = int(num_devices)
    if key_placement == "hashed":
        word = hash_ops.salted_word(hash_ops.order_word(keys), _OWNER_SALT)
        return (word % np.uint32(n)).astype(np.int32)
    if key_placement != "mod":
        raise ValueError(f"key_placement must be one of {KEY_PLACEMENTS}, got {key_placement!r}")
    return (keys % n).astype(np.int32)
