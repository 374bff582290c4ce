"""Loads the native FFI modules and registers their targets with XLA, once.

`_sok_cpu` is always built; `_sok_cuda` only where a CUDA compiler was found,
so a CPU-only install imports and works. Every target exists under the same
name on both platforms.
"""

from __future__ import annotations

import importlib
import os
import warnings

import jax

_BUILD_HINT = (
    "sok_jax's compiled module {name} is not built or not importable from {where}. "
    "Install the package (in the checkout: `pip install -e .`, or `SOK_CUDA=OFF pip install -e .` "
    "to skip the CUDA kernels on a machine without nvcc), and rerun that install after "
    "changing C++ sources or renaming modules."
)

try:
    _sok_cpu = importlib.import_module("sok_jax._sok_cpu")
except ImportError as e:
    where = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(_BUILD_HINT.format(name="_sok_cpu", where=where)) from e

try:  # the CUDA module is optional: absent in a CPU-only build
    _sok_cuda = importlib.import_module("sok_jax._sok_cuda")
except ModuleNotFoundError:
    _sok_cuda = None
except ImportError as e:  # built, but it does not load here
    warnings.warn(
        f"sok_jax: the CUDA module was built but does not load ({e}); CPU only", stacklevel=2
    )
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
