"""A library module as it was at an earlier git revision, for before / after benchmarks.

  from benchmarks.baseline import module_at, package_at
  old = module_at("63ac3f7", "aopsam_jax/sam/modeling.py")   # with that revision's norm.py
  tree = package_at("63ac3f7", tmpdir)   # the whole aopsam_jax package, for a child process

`module_at` imports one module apart (its own module name), so the old and the current code run in
one process on the same weights.  The revision's own `aopsam_jax.sam.norm` and
`aopsam_jax.sam.cpu_kernels` (with its own kernel source, built apart and
registered under its own FFI target names) are used in place of the current
ones (GELU, LayerNorm and the attention kernels are part of what a baseline
measures); the other imports (config, tiny_vit) are the current ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM = "aopsam_jax/sam/norm.py"
KERNELS = "aopsam_jax/sam/cpu_kernels.py"
KERNEL_DIR = "aopsam_jax/sam/kernels"


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


def _kernels_at(rev: str) -> types.ModuleType:
  """The revision's cpu_kernels, reading its own kernel sources (copied to a
  temporary folder) and registering FFI targets named apart from the current ones."""
  tag = "".join(ch for ch in rev if ch.isalnum())
  folder = tempfile.mkdtemp(prefix=f"aopsam-baseline-{tag}-")
  names = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", f"{rev}:{KERNEL_DIR}"],
                         capture_output=True, text=True).stdout.split()
  os.makedirs(os.path.join(folder, "kernels"))
  for name in names:
    with open(os.path.join(folder, "kernels", name), "w") as f:
      f.write(_source(rev, f"{KERNEL_DIR}/{name}"))
  src = _source(rev, KERNELS).replace("os.path.dirname(__file__)", repr(folder))
  src = re.sub(r'"(aopsam_\w+_attention)"', rf'"\1_{tag}"', src)
  return _load(rev, KERNELS, src)


def module_at(rev: str, path: str) -> types.ModuleType:
  """The module at `path` (relative to the repository) as of git revision `rev`."""
  if path == NORM:
    return _load(rev, path, _source(rev, path))
  norm = module_at(rev, NORM)
  src = _source(rev, path).replace("from aopsam_jax.sam.norm import", f"from {norm.__name__} import")
  if "from aopsam_jax.sam import cpu_kernels" in src:
    kernels = _kernels_at(rev)
    src = src.replace("from aopsam_jax.sam import cpu_kernels", f"import {kernels.__name__} as cpu_kernels")
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
