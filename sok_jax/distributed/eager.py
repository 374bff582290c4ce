"""Eager calls of the sharded layers, compiled once.

A layer's public method run outside `jax.jit` would execute its `shard_map`
op by op (seconds per call on 8 devices). `compiled_when_eager` makes such a
call run a `jax.jit` of the method instead, built once per layer instance
(and, inside jit's own cache, once per input shapes, dtypes and static
arguments). What holds:

  * inside a trace (any argument a `jax.core.Tracer`) the method runs as
    written, so an outer `jit`, `grad` or `vmap` sees exactly what it saw;
  * nothing is donated: the caller keeps the arguments it passed;
  * the cache lives on the instance and dies with it (a copy of a layer
    starts with an empty one);
  * the method's own host checks see what they saw eagerly: an argument
    that `jit` would convert silently (int64 arrays without
    `jax_enable_x64`) or a static argument that cannot be hashed makes the
    call run as written;
  * `check=True`: the eager call raises `EmbeddingError` (its `.state` the
    valid new state) after the compiled program ran; the in-program warning
    a traced call carries is left out of the compiled eager program
    (`compiling()` is true while it is traced).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import weakref

import jax
import numpy as np

from sok_jax.distributed.state import check_call, check_stats

_COMPILING = contextvars.ContextVar("sok_jax_eager_compiling", default=False)


def compiling() -> bool:
    """True while a layer method is traced for an eager call (not for the
    user's own jit)."""
    return _COMPILING.get()


@contextlib.contextmanager
def _compiling():
    token = _COMPILING.set(True)
    try:
        yield
    finally:
        _COMPILING.reset(token)


class EagerCache:
    """{method name: its jit} of one layer instance (`owner`, weakly). A copy
    or a pickle of the layer starts with an empty one (a jit is bound to the
    instance it was built for)."""

    def __init__(self, owner):
        self.owner = weakref.ref(owner)
        self.jits = {}

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


def eager_cache(layer) -> EagerCache:
    """The layer's cache of compiled methods (created on first use, and anew
    for a copy of a layer that carried its original's)."""
    cache = layer.__dict__.get("_eager_cache")
    if cache is None or cache.owner() is not layer:
        cache = layer.__dict__["_eager_cache"] = EagerCache(layer)
    return cache


def _converted_silently(leaf) -> bool:
    """An array argument whose dtype `jit` would narrow without a word
    (int64/uint64 without x64), which the method's own checks refuse."""
    dt = getattr(leaf, "dtype", None)
    if dt is None or not isinstance(leaf, (np.ndarray, np.generic)):
        return False
    dt = np.dtype(dt)
    return dt.kind in "iu" and jax.dtypes.canonicalize_dtype(dt) != dt


def _hashable(values) -> bool:
    try:
        hash(tuple(values))
    except TypeError:
        return False
    return True


def compiled_when_eager(static_argnames=(), checked_state=None):
    """Decorates a layer method that takes arrays and runs a `shard_map`:
    called outside a trace, it runs the method's `jax.jit` (cached on the
    instance) instead of executing it op by op.

    Args:
      static_argnames: the method's non-array arguments (Python values the
        program depends on, e.g. `training` or the optimizer).
      checked_state: picks the new state out of the method's result; with
        the layer's `check=True`, an eager call raises `EmbeddingError` on
        its counters (None: the method is not checked).
    """

    def wrap(method):
        name = method.__name__
        signature = inspect.signature(method)
        # The jitted function's own signature: the method's without `self`,
        # so that jit maps static_argnames onto positional uses too.
        unbound = signature.replace(parameters=list(signature.parameters.values())[1:])

        def bind(args, kwargs):
            """The arguments with the defaults filled in (so that one program
            serves `f(x)` and `f(x, None)`), or None where they do not fit
            the method (it reports that itself)."""
            try:
                bound = signature.bind(None, *args, **kwargs)
            except TypeError:
                return None
            bound.apply_defaults()
            return bound

        def compiled(self):
            jits = eager_cache(self).jits
            if name not in jits:

                def traced(*args, **kwargs):
                    with _compiling():
                        return method(self, *args, **kwargs)

                traced.__name__ = traced.__qualname__ = name
                traced.__signature__ = unbound
                jits[name] = jax.jit(traced, static_argnames=static_argnames)
            return jits[name]

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            bound = bind(args, kwargs)
            direct = bound is None or not _hashable(bound.arguments[a] for a in static_argnames)
            if not direct:
                args, kwargs = bound.args[1:], bound.kwargs
                direct = any(
                    isinstance(x, jax.core.Tracer) or _converted_silently(x)
                    for x in jax.tree.leaves((args, kwargs))
                )
            if direct:
                result = method(self, *args, **kwargs)
            else:
                result = compiled(self)(*args, **kwargs)
            if checked_state is not None and getattr(self, "check", False):
                state = checked_state(result)
                given = None if bound is None else bound.arguments.get("state")
                if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
                    # An eager call raises on what it added, the state intact.
                    if given is None:
                        check_stats(state)
                    else:
                        check_call(given.stats, state)
            return result

        return call

    return wrap
