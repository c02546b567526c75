"""XLA compiler options for the library's jitted programs, and `jit`, the
`jax.jit` that applies them on the backend a program is compiled for.

On CPU, XLA's default (concurrency-optimised, breadth-first) schedule starts
every loop's buffers early, so no two `lax.map` / `fori_loop`s share memory:
the ViT-B encoder's scratch buffer is 546 MB, allocated and page-faulted
afresh on every call (140k minor faults).  The memory-optimised (depth-first)
schedule lets the loops share it: 142 MB, 37k faults, and the encoder,
AoP-SAM, grid AMG and the 64-prompt decoder all run faster (measured on a
2-core AMD EPYC; BENCHMARKS.md §0.2).  Other backends get no options (their
compilers do not read the CPU ones, and an older TPU runtime might refuse an
option it does not know).

In your own `jax.jit` around library code on CPU, pass
`compiler_options=compiler_options("cpu")` (or use `aopsam_jax.jit`).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import jax

try:  # not public API; `_tracing` falls back to looking for tracers
  from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover
  _trace_state_clean = None

CPU_COMPILER_OPTIONS: Dict[str, Any] = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def compiler_options(backend: Optional[str] = None) -> Optional[Dict[str, Any]]:
  """The options for `backend` (default: JAX's default backend), or None."""
  backend = backend or jax.default_backend()
  return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else None


class jit:  # noqa: N801  (used like jax.jit)
  """`jax.jit(fun, **kwargs)` with `compiler_options(backend)` added, decided
  at the first call for each default backend (not at import, which would
  start JAX's backends before a user's flags are set).  Called inside another
  trace (the user's own `jax.jit`, `vmap`, ...) it is a plain `jax.jit`: the
  outer program is compiled with the outer options.  Attributes of the
  jitted function (`lower`, `trace`, ...) are forwarded."""

  def __init__(self, fun, **jit_kwargs):
    functools.update_wrapper(self, fun)
    self._fun, self._kwargs = fun, jit_kwargs
    self._by_backend: Dict[str, Any] = {}

  def jitted(self, nested: bool = False):
    key = "nested" if nested else jax.default_backend()
    f = self._by_backend.get(key)
    if f is None:
      opts = None if nested else compiler_options(key)
      f = self._by_backend[key] = jax.jit(self._fun, compiler_options=opts, **self._kwargs)
    return f

  def __call__(self, *args, **kwargs):
    return self.jitted(_tracing(args, kwargs))(*args, **kwargs)

  def __getattr__(self, name: str):
    if name.startswith("__") or name in ("_fun", "_kwargs", "_by_backend"):
      raise AttributeError(name)
    return getattr(self.jitted(), name)


def _tracing(args, kwargs) -> bool:
  """Whether a call happens inside another trace, where `jax.jit` refuses
  compiler options.  JAX's own trace state where it has one, else whether
  any argument is a tracer."""
  if _trace_state_clean is not None:
    return not _trace_state_clean()
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
