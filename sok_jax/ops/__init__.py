"""The per-device ops: raw FFI wrappers (`embed_ops`, `optim_ops`,
`hash_ops`, all gathered in `ffi`), their pure-JAX twins (`reference`), and
the rules they share (`checks`).

`resolve(implementation)` is the one place an `implementation` argument is
turned into ops: "ffi" (the custom calls) or "reference" (pure JAX, hash
table included). Both namespaces hold the op names in `ffi.OPS`.
"""

from __future__ import annotations

from types import ModuleType

from sok_jax.ops import ffi, reference

IMPLEMENTATIONS = {"ffi": ffi, "reference": reference}


def resolve(implementation: str) -> ModuleType:
    """The ops of `implementation` ("ffi" or "reference")."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {sorted(IMPLEMENTATIONS)}, got {implementation!r}"
        )
    return IMPLEMENTATIONS[implementation]
