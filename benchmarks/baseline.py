"""A library module as it was at an earlier git revision, for before / after benchmarks.

  from benchmarks.baseline import module_at, package_at
  old = module_at("63ac3f7", "aopsam_jax/sam/modeling.py")   # with that revision's norm.py
  tree = package_at("63ac3f7", tmpdir)   # the whole aopsam_jax package, for a child process

`module_at` imports one module apart (its own module name), so the old and the current code run in
one process on the same weights.  The revision's own `aopsam_jax.sam.norm` is
used in place of the current one (GELU and LayerNorm are part of what a
baseline measures); the other imports (config, tiny_vit) are the current ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM = "aopsam_jax/sam/norm.py"


def _source(rev: str, path: str) -> str:
  src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], capture_output=True,
                       text=True)
  if src.returncode != 0:
    raise SystemExit(f"--baseline {rev}: {src.stderr.strip()}")
  return src.stdout


def _load(rev: str, path: str, src: str) -> types.ModuleType:
  tag = "".join(ch for ch in rev if ch.isalnum())
  name = f"_baseline_{tag}_{os.path.splitext(os.path.basename(path))[0]}"
  mod = types.ModuleType(name)
  mod.__file__ = f"{rev}:{path}"
  sys.modules[name] = mod
  exec(compile(src, mod.__file__, "exec"), mod.__dict__)
  return mod


def module_at(rev: str, path: str) -> types.ModuleType:
  """The module at `path` (relative to the repository) as of git revision `rev`."""
  if path == NORM:
    return _load(rev, path, _source(rev, path))
  norm = module_at(rev, NORM)
  src = _source(rev, path).replace("from aopsam_jax.sam.norm import", f"from {norm.__name__} import")
  return _load(rev, path, src)


def package_at(rev: str, into: str) -> str:
  """The aopsam_jax package at git revision `rev`, unpacked under `into`
  (put `into` first on a child process's sys.path); returns `into`."""
  os.makedirs(into, exist_ok=True)
  tar = os.path.join(into, "src.tar")
  out = subprocess.run(["git", "-C", ROOT, "archive", "-o", tar, rev, "aopsam_jax"],
                       capture_output=True, text=True)
  if out.returncode != 0:
    raise SystemExit(f"--baseline {rev}: {out.stderr.strip()}")
  with tarfile.open(tar) as t:
    t.extractall(into, filter="data")
  return into
