"""JAX's persistent compilation cache for the command-line tools.

Compiling the AoP-SAM program takes 25-55 s on a 2-core CPU and 35-75 s for
vit_h on an H100; with the cache on, later runs (any process) load the compiled
program from disk instead.  The CLIs call `setup(disabled)` first thing:

  * cache directory: `$AOPSAM_COMPILE_CACHE` if set, else
    `$XDG_CACHE_HOME/aopsam_jax/jax_compile_cache` (`~/.cache/...` by default);
  * off with the CLI flag (`--no-compile-cache`; train: `--nocompile_cache`)
    or `AOPSAM_COMPILE_CACHE=off`.

Entries are keyed by JAX on the program, the jax/XLA version and the device,
so a stale entry is never used; deleting the directory is always safe.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

ENV = "AOPSAM_COMPILE_CACHE"
MIN_S_ENV = "AOPSAM_COMPILE_CACHE_MIN_S"  # programs compiling faster than this are not stored
OFF_VALUES = ("", "0", "off", "none", "false")

_state = {"dir": None}


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "aopsam_jax", "jax_compile_cache")


def cache_dir() -> Optional[str]:
  """Where compiled programs go, or None when the environment turns the cache off."""
  value = os.environ.get(ENV)
  if value is None:
    return default_dir()
  return None if value.strip().lower() in OFF_VALUES else os.path.expanduser(value)


def enable(directory: str, min_compile_s: Optional[float] = None) -> str:
  """Turn JAX's persistent cache on in `directory` for programs that take at
  least `min_compile_s` to compile (default 1 s, or `$AOPSAM_COMPILE_CACHE_MIN_S`):
  the quick ones are not worth a file."""
  import jax
  if min_compile_s is None:
    min_compile_s = float(os.environ.get(MIN_S_ENV, "1.0"))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _state["dir"] = directory
  return directory


def setup(disabled: bool = False) -> Optional[str]:
  """The CLIs' one call: enable the cache unless `disabled` (the flag) or the
  environment says off.  An unusable directory only costs the speed-up: one
  line on stderr, the run goes on uncached."""
  directory = None if disabled else cache_dir()
  if directory is None:
    _state["dir"] = None
    return None
  try:
    return enable(directory)
  except OSError as e:
    print(f"compile cache off: cannot use {directory} ({e.strerror or e}); set {ENV}=DIR "
          "to choose another directory", file=sys.stderr)
    _state["dir"] = None
    return None


def add_flag(parser) -> None:
  """`--no-compile-cache` on an argparse parser."""
  parser.add_argument("--no-compile-cache", action="store_true",
                      help=f"do not keep compiled programs on disk (default: kept in "
                      f"${ENV} or {default_dir()}, so later runs skip compilation)")


def notice(what: str) -> str:
  where = _state["dir"]
  tail = f"first run only; cached in {where}" if where else "compile cache off"
  return f"compiling {what} ({tail}) ..."


def announce(what: str) -> None:
  """One line saying that `what` is being compiled now (before a silent wait)."""
  _write(notice(what))


def announce_first_call(fn: Callable[..., Any], what: str,
                        write: Optional[Callable[[str], None]] = None) -> Callable[..., Any]:
  """`fn` that says, around its first call, that it is compiling `what` and
  how long that took, so a progress bar never sits silently at 0 %."""
  done = []
  write = write or _write

  def wrapped(*args, **kwargs):
    if done:
      return fn(*args, **kwargs)
    write(notice(what))
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    done.append(True)
    write(f"{what}: ready after {time.perf_counter() - t0:.1f} s (first call, compilation "
          "or cache load included)")
    return out
  return wrapped


def _write(line: str) -> None:
  try:
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)
  except ImportError:
    print(line, file=sys.stderr, flush=True)
