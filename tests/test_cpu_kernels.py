"""The native CPU attention kernels (`aopsam_jax/sam/cpu_kernels.py`): global and windowed.

Reference: the official formula written out in float64 NumPy (decomposed
rel-pos with the unscaled q, softmax over keys); the library's XLA path
("chunked") on the same module; and, for the switch-off cases, child
processes.  Skipped where the kernel cannot be built (no AVX-512 or no C++
compiler): there the encoder uses the XLA path, which test_attention covers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aopsam_jax.sam import cpu_kernels, modeling
from tests.reference import rel_err

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(),
                                reason=f"no native kernel here: {cpu_kernels.unavailable_reason()}")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(h, w, heads, hd, seed, rel_scale=1.0):
  att = modeling.EncoderAttention(heads * hd, heads, (h, w), rngs=nnx.Rngs(seed))
  r = np.random.default_rng(seed)
  att.rel_pos_h[...] = jnp.asarray(rel_scale * r.normal(size=att.rel_pos_h.shape), jnp.float32)
  att.rel_pos_w[...] = jnp.asarray(rel_scale * r.normal(size=att.rel_pos_w.shape), jnp.float32)
  return att


def _reference_core(qkv, rh, rw, heads, scale):
  """float64 official formula: (B, H, W, 3C) -> (B, H, W, C)."""
  qkv = np.asarray(qkv, np.float64)
  rh, rw = np.asarray(rh, np.float64), np.asarray(rw, np.float64)
  b, h, w, c3 = qkv.shape
  hd = c3 // (3 * heads)
  t = qkv.reshape(b, h * w, 3, heads, hd)
  q, k, v = (t[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, nh, N, hd)
  q4 = q.reshape(b, heads, h, w, hd)
  rel_h = np.einsum("bnyxd,ykd->bnyxk", q4, rh)
  rel_w = np.einsum("bnyxd,xkd->bnyxk", q4, rw)
  bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)
  logits = scale * q @ k.transpose(0, 1, 3, 2) + bias
  p = np.exp(logits - logits.max(-1, keepdims=True))
  out = (p / p.sum(-1, keepdims=True)) @ v
  return out.transpose(0, 2, 1, 3).reshape(b, h, w, heads * hd)


@pytest.mark.parametrize("b,h,w,heads,hd,rel_scale", [
    (1, 16, 32, 2, 64, 1.0),   # ViT-B/L head dim
    (2, 32, 16, 3, 80, 1.0),   # ViT-H head dim, two images
    (1, 32, 32, 1, 32, 1.0),   # one (image, head): split into bands of rows over threads
    (1, 16, 48, 2, 16, 8.0),   # peaked softmax: most exps underflow
    (1, 16, 128, 1, 16, 1.0),  # a grid wider than a 64-query block: one grid row per block
])
def test_kernel_matches_float64_formula(b, h, w, heads, hd, rel_scale):
  att = _module(h, w, heads, hd, seed=h + w + hd, rel_scale=rel_scale)
  r = np.random.default_rng(1)
  qkv = jnp.asarray(r.normal(size=(b, h, w, 3 * heads * hd)), jnp.float32)
  rh, rw = att.rel_tables(h, w, jnp.float32)
  ours = jax.jit(lambda a, x, y: cpu_kernels.global_attention(a, x, y, heads, att.scale,
                                                              att._global_xla))(qkv, rh, rw)
  ref = _reference_core(qkv, rh, rw, heads, att.scale)
  xla = jax.jit(att._global_xla)(qkv, rh, rw)
  print("rel. error vs float64: kernel", rel_err(ours, ref), "XLA", rel_err(xla, ref))
  # float32 rounding of logits of magnitude ~10-40 (rel-pos terms of hd-wide dots)
  assert rel_err(ours, ref) < 1e-5 and rel_err(xla, ref) < 1e-5
  assert rel_err(ours, ref) < 2 * rel_err(xla, ref)  # no less accurate than XLA's path


def test_attention_module_kernel_equals_chunked():
  """The whole global attention (qkv .. proj) of a module, both paths."""
  att = _module(32, 32, 4, 64, seed=0)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 256)), jnp.float32)
  outs = {}
  for impl in ("chunked", "cpu_kernel"):
    att.impl = impl
    outs[impl] = nnx.jit(lambda m, x: m(x))(att, x)
  assert rel_err(outs["cpu_kernel"], outs["chunked"]) < 2e-6
  assert float(jnp.std(outs["chunked"])) > 1e-3


def test_gradient_and_vmap_follow_the_xla_path():
  # The backward pass is XLA's by construction (an FFI call has none): this checks the
  # custom_vjp wiring (argument order, saved inputs, the bias of the window form).
  att = _module(16, 16, 2, 32, seed=4)
  qkv = jnp.asarray(np.random.default_rng(3).normal(size=(1, 16, 16, 192)), jnp.float32)
  rh, rw = att.rel_tables(16, 16, jnp.float32)
  kernel = lambda a, x, y: cpu_kernels.global_attention(a, x, y, 2, att.scale, att._global_xla)
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
  g_kernel = jax.grad(loss(kernel), argnums=(0, 1, 2))(qkv, rh, rw)
  g_xla = jax.grad(loss(att._global_xla), argnums=(0, 1, 2))(qkv, rh, rw)
  for a, b in zip(g_kernel, g_xla):
    assert rel_err(a, b) < 1e-5
  stacked = jnp.stack([qkv, 2 * qkv])
  batched = jax.vmap(kernel, in_axes=(0, None, None))(stacked, rh, rw)
  assert rel_err(batched[1], kernel(2 * qkv, rh, rw)) < 1e-6
  # windows: 2 windows of 8 x 8 in one row, the second with 5 real columns
  watt = _module(8, 8, 2, 16, seed=7)
  r = np.random.default_rng(8)
  wqkv = jnp.asarray(r.normal(size=(1, 8, 13, 96)), jnp.float32)
  wbias = jnp.asarray(r.normal(size=(96,)), jnp.float32)
  wrh, wrw = watt.rel_tables(8, 8, jnp.float32)
  wk = lambda *a: cpu_kernels.window_attention(*a, 2, watt.scale, watt._window_core_xla)
  args = (wqkv, wrh, wrw, wbias)
  g_kernel = jax.grad(loss(wk), argnums=(0, 1, 2, 3))(*args)
  g_xla = jax.grad(loss(watt._window_core_xla), argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(g_kernel, g_xla):
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("n,ws,w,heads,hd", [
    (1, 14, 64, 12, 64),  # ViT-B at 1024: a row of 5 windows of 14 x 14, the last 8 columns wide
    (2, 14, 28, 3, 80),   # ViT-H head dim, two rows, no padding columns
    (1, 8, 19, 2, 16),    # 64 keys per window (no padding keys); 3 real columns in the last
    (1, 14, 15, 1, 32),   # 1 real column in the last window: 14 queries, 2 of them tile filler
])
def test_window_kernel_matches_xla_and_formula(n, ws, w, heads, hd):
  att = _module(ws, ws, heads, hd, seed=ws + hd)
  r = np.random.default_rng(6)
  c3 = 3 * heads * hd
  qkv = jnp.asarray(r.normal(size=(n, ws, w, c3)), jnp.float32)
  bias = jnp.asarray(r.normal(size=(c3,)), jnp.float32)
  rh, rw = att.rel_tables(ws, ws, jnp.float32)
  ours = jax.jit(lambda *a: cpu_kernels.window_attention(*a, heads, att.scale,
                                                         att._window_core_xla))(qkv, rh, rw, bias)
  xla = jax.jit(att._window_core_xla)(qkv, rh, rw, bias)
  # the official form: pad the columns with the bias (the qkv of a zero input), then each
  # window on its own is global attention over a ws x ws grid; crop the padding away
  nw = -(-w // ws)
  full = np.broadcast_to(np.asarray(bias), (n, ws, nw * ws, c3)).copy()
  full[:, :, :w] = np.asarray(qkv)
  win = full.reshape(n, ws, nw, ws, c3).transpose(0, 2, 1, 3, 4).reshape(n * nw, ws, ws, c3)
  ref = _reference_core(win, rh, rw, heads, att.scale)
  ref = ref.reshape(n, nw, ws, ws, -1).transpose(0, 2, 1, 3, 4).reshape(n, ws, nw * ws, -1)
  ref = ref[:, :, :w]
  assert ours.shape == xla.shape == ref.shape
  assert rel_err(xla, ref) < 1e-5 and rel_err(ours, ref) < 1e-5
  assert rel_err(ours, ref) < 2 * rel_err(xla, ref)


def test_auto_picks_the_kernel_on_a_single_cpu_device():
  assert modeling.resolve_attention("auto") == "cpu_kernel"
  assert cpu_kernels.describe() == "native encoder attention (AVX-512)"
  bad = subprocess.run([sys.executable, "-m", "aopsam_jax.sam.cpu_kernels", "--force"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
  assert "'--force'" in bad.stderr


CHILD = """
import jax, warnings
warnings.simplefilter("error", RuntimeWarning) if {strict} else None
from aopsam_jax.sam import cpu_kernels, modeling
print(modeling.resolve_attention("auto"), "|", cpu_kernels.unavailable_reason())
try:
  modeling.resolve_attention("cpu_kernel")
except RuntimeError as e:
  print("refused:", e)
"""


def _child(env_extra, strict=False):
  env = dict(os.environ, **env_extra)
  done = subprocess.run([sys.executable, "-c", CHILD.format(strict=strict)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("env_extra,why", [
    ({"AOPSAM_CPU_KERNELS": "off"}, "AOPSAM_CPU_KERNELS=off"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, "single device"),
])
def test_switched_off_falls_back_to_xla(env_extra, why):
  rc, out, err = _child(env_extra)
  assert rc == 0, err
  first, refused = out.splitlines()[0], out.splitlines()[1]
  assert first.startswith("chunked |") and why in first
  assert refused.startswith("refused: attention 'cpu_kernel' is unavailable") and why in refused
  # the module's own report: one line, exit status 1
  done = subprocess.run([sys.executable, "-m", "aopsam_jax.sam.cpu_kernels"], cwd=REPO,
                        env=dict(os.environ, **env_extra), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 1 and done.stdout.startswith("XLA attention (") and why in done.stdout


def test_failed_build_warns_once_and_falls_back(tmp_path):
  """A compiler that fails: one warning naming the failure, XLA attention."""
  rc, out, err = _child({"CXX": "/bin/false", "AOPSAM_KERNEL_CACHE": str(tmp_path)})
  assert rc == 0, err
  assert out.startswith("chunked |") and "building the kernel failed" in out
  assert "false exited with status 1; its output is in" in out
  warning = [line for line in err.splitlines() if "native CPU attention unavailable" in line]
  assert len(warning) == 1 and "building the kernel failed" in warning[0]
  files = os.listdir(tmp_path)
  assert not [f for f in files if f.endswith(".so") or ".tmp" in f]
  assert [f for f in files if f.endswith(".log")]  # the compiler's output, kept for the user


def test_portable_attention_keeps_exported_programs_free_of_the_kernel():
  att = _module(16, 16, 2, 16, seed=5)
  spec = jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32)

  def program():
    g, st = nnx.split(att)
    return jax.jit(lambda s, x: nnx.merge(g, s)(x)), st

  f, st = program()
  assert cpu_kernels.TARGET in f.lower(st, spec).as_text()
  with pytest.raises(ValueError, match="custom calls"):  # what export says to the kernel
    jax.export.export(f)(st, spec)
  with modeling.portable_attention(att):
    assert att.impl == "chunked"
    f, st = program()
    text = jax.export.export(f)(st, spec).mlir_module()
  assert att.impl == "auto"
  assert cpu_kernels.TARGET not in text and "stablehlo.dot_general" in text
