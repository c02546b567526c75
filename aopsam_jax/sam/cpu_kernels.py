"""Native CPU kernels, built on first use with the machine's C++ compiler.

One kernel so far: the image encoder's global attention on x86-64 CPUs with
AVX-512 (`kernels/global_attention.cc`, an XLA FFI custom call).  XLA:CPU runs
that attention's matmuls (head dim 64) at 40-45 % of its dense matmul rate;
the kernel runs them at the core's FMA rate and splits (image, head) pairs
over XLA's threads (BENCHMARKS.md §0.2).

It is optional.  Without a compiler, on a CPU without AVX-512, with several
JAX devices (sharded programs: XLA cannot partition a custom call), with
`AOPSAM_CPU_KERNELS=off`, or when building fails (said once, as a warning),
the encoder uses its pure-XLA attention ("chunked"): same function.

The shared library goes to `$AOPSAM_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/aopsam_jax/kernels` (`~/.cache/...`), named by a hash of the
source, the flags, the compiler and JAX's FFI header, written to a temporary
name and renamed, so concurrent first runs and stale builds are harmless.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ENV = "AOPSAM_CPU_KERNELS"
CACHE_ENV = "AOPSAM_KERNEL_CACHE"
TARGET = "aopsam_global_attention"
SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "global_attention.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mfma", "-fno-math-errno")

_state = {"status": None, "reason": ""}


def cache_dir() -> str:
  value = os.environ.get(CACHE_ENV)
  if value:
    return os.path.expanduser(value)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "aopsam_jax", "kernels")


def _cpu_has_avx512() -> bool:
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  try:
    from numpy._core._multiarray_umath import __cpu_features__ as features
  except ImportError:  # numpy < 2
    from numpy.core._multiarray_umath import __cpu_features__ as features
  return bool(features.get("AVX512F")) and bool(features.get("FMA3"))


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _library_path(compiler: str) -> str:
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           timeout=60).stdout
  digest = hashlib.sha256()
  for part in (open(SOURCE, "rb").read(), " ".join(FLAGS).encode(), version.encode(),
               open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h"), "rb").read()):
    digest.update(part)
  return os.path.join(cache_dir(), f"global_attention-{digest.hexdigest()[:16]}.so")


def build(compiler: str) -> str:
  """Compile the kernel library unless the cache has it; -> its path."""
  path = _library_path(compiler)
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _load() -> tuple[bool, str]:
  setting = os.environ.get(ENV, "").strip().lower()
  if setting in ("0", "off", "false", "no"):
    return False, f"{ENV}={setting}"
  if not _cpu_has_avx512():
    return False, "this CPU has no AVX-512"
  compiler = _compiler()
  if compiler is None:
    return False, "no C++ compiler found (set CXX)"
  try:
    lib = ctypes.cdll.LoadLibrary(build(compiler))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.AopsamGlobalAttention), platform="cpu")
  except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
    return False, f"building the kernel failed ({type(e).__name__}: {str(e).strip()[:500]})"
  return True, ""


def kernel_status() -> tuple[bool, str]:
  """(usable on this machine, why not), building the library the first time."""
  if _state["status"] is None:
    ok, reason = _load()
    _state["status"], _state["reason"] = ok, reason
    if not ok and not reason.startswith(ENV) and "AVX-512" not in reason:
      warnings.warn(f"aopsam_jax: native CPU attention unavailable, using XLA's: {reason}",
                    RuntimeWarning, stacklevel=3)
  return _state["status"], _state["reason"]


def enabled() -> bool:
  """Whether the global-attention kernel is used for programs traced now:
  a CPU backend with a single device and a library that built."""
  return not unavailable_reason()


def unavailable_reason() -> str:
  """Why programs traced now cannot use the kernel ("" when they can)."""
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return "it needs a CPU backend with a single device"
  return kernel_status()[1]



def supports(h: int, w: int, head_dim: int, dtype) -> bool:
  """Shapes and dtype the kernel handles (ViT-B/L/H at 1024: 64 x 64, hd 64/80)."""
  return (jnp.dtype(dtype) == jnp.float32 and head_dim % 16 == 0 and head_dim <= 80
          and h % 16 == 0 and w % 16 == 0)


def _call(qkv, rht, rwt, num_heads: int, scale: float):
  b, h, w, c3 = qkv.shape
  out = jax.ShapeDtypeStruct((b, h, w, c3 // 3), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
      qkv, rht, rwt, num_heads=np.int64(num_heads), scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def global_attention(qkv, rh, rw, num_heads: int, scale: float, reference):
  """Attention of (B, H, W, 3C) token-major qkv with rel-pos tables rh (H, H, hd),
  rw (W, W, hd) -> (B, H, W, C).  `reference(qkv, rh, rw)` is the same function
  in XLA, used for gradients."""
  return _call(qkv, rh.transpose(0, 2, 1), rw.transpose(0, 2, 1), num_heads, scale)


def _fwd(qkv, rh, rw, num_heads, scale, reference):
  return global_attention(qkv, rh, rw, num_heads, scale, reference), (qkv, rh, rw)


def _bwd(num_heads, scale, reference, saved, g):
  return jax.vjp(reference, *saved)[1](g)


global_attention.defvjp(_fwd, _bwd)


def describe() -> str:
  """One line for system reports."""
  ok, reason = kernel_status()
  return "native global attention (AVX-512)" if ok else f"XLA attention ({reason})"


if __name__ == "__main__":  # python -m aopsam_jax.sam.cpu_kernels: build now, say what happened
  print(describe())
  sys.exit(0 if kernel_status()[0] else 1)
