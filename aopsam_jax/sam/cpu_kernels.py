"""Native CPU kernels, built on first use with the machine's C++ compiler.

The image encoder's attention, global and windowed, on x86-64 CPUs with
AVX-512 (`kernels/encoder_attention.cc`, XLA FFI custom calls).  XLA:CPU runs
those matmuls (head dim 64; 196-token windows) at 25-45 % of its dense matmul
rate; the kernels run them at the core's FMA rate and split (image, head) or
(window, head) pairs over XLA's threads (BENCHMARKS.md §0.2).  Selected by the
encoder attention "cpu_kernel", which "auto" picks where it is usable.

It is optional.  Without a compiler, on a CPU without AVX-512, with several
JAX devices (sharded programs: XLA cannot partition a custom call), with
`AOPSAM_CPU_KERNELS=off`, or when building fails (said once, in one line on stderr),
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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ENV = "AOPSAM_CPU_KERNELS"
CACHE_ENV = "AOPSAM_KERNEL_CACHE"
TARGET = "aopsam_global_attention"
WINDOW_TARGET = "aopsam_window_attention"
SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "encoder_attention.cc")
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
  return os.path.join(cache_dir(), f"encoder_attention-{digest.hexdigest()[:16]}.so")


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
      log = path[:-3] + ".log"
      with open(log, "w") as f:
        f.write(f"{' '.join(cmd)}\nexit status {done.returncode}\n{done.stdout}{done.stderr}")
      raise RuntimeError(f"{os.path.basename(compiler)} exited with status {done.returncode}; "
                         f"its output is in {log}")
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
    jax.ffi.register_ffi_target(WINDOW_TARGET, jax.ffi.pycapsule(lib.AopsamWindowAttention),
                                platform="cpu")
  except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    return False, f"building the kernel failed ({type(e).__name__}: {first_line})"
  return True, ""


def kernel_status() -> tuple[bool, str]:
  """(usable on this machine, why not), building the library the first time."""
  if _state["status"] is None:
    ok, reason = _load()
    _state["status"], _state["reason"] = ok, reason
    if not ok and not reason.startswith(ENV) and "AVX-512" not in reason:
      # One line, once per process: the results are the same, only slower.
      print(f"aopsam_jax: native CPU attention unavailable, using XLA's: {reason} "
            f"({ENV}=off silences this)", file=sys.stderr, flush=True)
  return _state["status"], _state["reason"]


def enabled() -> bool:
  """Whether the attention kernels are used for programs traced now:
  a CPU backend with a single device and a library that built."""
  return not unavailable_reason()


def unavailable_reason() -> str:
  """Why programs traced now cannot use the kernel ("" when they can)."""
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return "it needs a CPU backend with a single device"
  return kernel_status()[1]


def _head_dim_ok(head_dim: int, dtype) -> bool:
  return jnp.dtype(dtype) == jnp.float32 and head_dim % 16 == 0 and head_dim <= 80


def supports(h: int, w: int, head_dim: int, dtype) -> bool:
  """Shapes and dtype of global attention the kernel handles (ViT-B/L/H at
  1024: a 64 x 64 grid, head dim 64 / 80)."""
  return _head_dim_ok(head_dim, dtype) and h % 16 == 0 and w % 16 == 0


def supports_windows(window: int, head_dim: int, dtype) -> bool:
  """Windowed attention the kernel handles (SAM: 14 x 14 windows)."""
  return _head_dim_ok(head_dim, dtype) and window % 2 == 0 and window <= 16


def _call(target, *arrays, num_heads: int, scale: float):
  qkv = arrays[0]
  out = jax.ShapeDtypeStruct(qkv.shape[:-1] + (qkv.shape[-1] // 3,), jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      *arrays, num_heads=np.int64(num_heads), scale=np.float32(scale))


def _with_xla_gradient(forward, n_arrays: int):
  """forward(*arrays, num_heads, scale) as a custom_vjp (arrays first, then
  num_heads, scale, reference) whose backward pass differentiates
  `reference(*arrays)`, the same function in XLA."""
  static = tuple(range(n_arrays, n_arrays + 3))

  @functools.partial(jax.custom_vjp, nondiff_argnums=static)
  def f(*args):
    return forward(*args[:n_arrays + 2])

  def fwd(*args):
    return forward(*args[:n_arrays + 2]), args[:n_arrays]

  def bwd(num_heads, scale, reference, saved, g):
    return jax.vjp(reference, *saved)[1](g)

  f.defvjp(fwd, bwd)
  return f


def _transposed(table):  # (a, a', hd) -> (a, hd, a')
  return table.transpose(0, 2, 1)


def _transposed16(table):  # (ws, ws, hd) -> (ws, hd, 16), zeros beyond ws
  return jnp.pad(_transposed(table), ((0, 0), (0, 0), (0, 16 - table.shape[1])))


global_attention = _with_xla_gradient(
    lambda qkv, rh, rw, heads, scale: _call(TARGET, qkv, _transposed(rh), _transposed(rw),
                                            num_heads=heads, scale=scale), 3)
global_attention.__doc__ = """global_attention(qkv, rh, rw, num_heads, scale, reference):
(B, H, W, 3C) token-major qkv, rel-pos tables rh (H, H, hd), rw (W, W, hd)
-> (B, H, W, C).  `reference(qkv, rh, rw)`: the same in XLA, for gradients."""

window_attention = _with_xla_gradient(
    lambda qkv, rh, rw, bias, heads, scale: _call(
        WINDOW_TARGET, qkv, bias, _transposed16(rh), _transposed16(rw), num_heads=heads,
        scale=scale), 4)
window_attention.__doc__ = """window_attention(qkv, rh, rw, bias, num_heads, scale, reference):
(N, ws, w, 3C) rows of ws x ws windows without their padding columns, whose
tokens' q, k, v are `bias` (3C,); tables (ws, ws, hd) -> (N, ws, w, C).
`reference(qkv, rh, rw, bias)`: the same in XLA, for gradients."""


def describe() -> str:
  """One line for system reports."""
  reason = unavailable_reason()
  return f"XLA attention ({reason})" if reason else "native encoder attention (AVX-512)"


if __name__ == "__main__":  # python -m aopsam_jax.sam.cpu_kernels: build now, say what happened
  if sys.argv[1:]:
    print(f"python -m aopsam_jax.sam.cpu_kernels takes no arguments (got {sys.argv[1]!r}); it "
          "builds the native attention kernels if needed and says whether they are used",
          file=sys.stderr)
    sys.exit(2)
  print(describe())
  sys.exit(0 if enabled() else 1)
