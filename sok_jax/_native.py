"""Loads the native FFI modules and registers their targets with XLA, once.

`_sok_cpu` is always built; `_sok_cuda` only where a CUDA compiler was found,
so a CPU-only install imports and works. Every target exists under the same
name on both platforms.
"""

from __future__ import annotations

import jax

from sok_jax import _sok_cpu

try:  # the CUDA module is optional
    from sok_jax import _sok_cuda  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _sok_cuda = None

_CPU_TARGETS = _sok_cpu.registrations()
for _name, _capsule in _CPU_TARGETS.items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

_CUDA_TARGETS = _sok_cuda.registrations() if _sok_cuda is not None else {}
for _name, _capsule in _CUDA_TARGETS.items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def has_cuda() -> bool:
    """Whether the CUDA FFI targets were built and registered."""
    return _sok_cuda is not None


def target_names() -> tuple[str, ...]:
    """Names of the FFI targets registered for the CPU platform."""
    return tuple(sorted(_CPU_TARGETS))
