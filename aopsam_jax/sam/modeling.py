"""SAM (Segment Anything, v1) in Flax NNX.

Module structure and attribute names follow the official PyTorch code
(`segment_anything/modeling/*.py`) so that `params.py` can map checkpoint keys
one to one.  Layout is NHWC throughout; mask tensors are (B, M, H, W).

Details that matter for numerical parity (all read from the official code):
  * GELU is the exact erf form (`nn.GELU()`), never the tanh approximation.
  * ViT LayerNorms and every LayerNorm2d use eps 1e-6; the two-way
    transformer's `nn.LayerNorm`s use PyTorch's default 1e-5.
  * Variance is computed as E[(x - mean)^2] (not E[x^2] - mean^2).
  * In ViT attention the relative-position term uses the *unscaled* q.
  * The first two-way block has no residual around its self-attention.
  * ConvTranspose(k=2, s=2) has no overlapping taps, so it is written as an
    einsum with an explicit (kh, kw, in, out) kernel: no kernel-flip trap.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from aopsam_jax.sam import cpu_kernels
from aopsam_jax.sam.config import SamConfig
from aopsam_jax.sam.norm import LayerNorm, gelu
from aopsam_jax.sam.tiny_vit import TinyViT

Array = jax.Array


def _linear(din: int, dout: int, rngs: nnx.Rngs, dtype, use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, rngs=rngs)


class UpConv2x2(nnx.Module):
  """ConvTranspose2d(kernel=2, stride=2): every input pixel writes its own 2x2
  block; the decoder keeps the blocks un-interleaved (`subpixel`)."""

  def __init__(self, din: int, dout: int, rngs: nnx.Rngs, dtype=None):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (2, 2, din, dout), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))
    self.dtype = dtype

  def subpixel(self, x: Array) -> Array:
    """(..., din) -> (..., 2, 2, dout): the 2x2 block each pixel writes, not
    yet interleaved into image order (a plain matmul, no transpose)."""
    k = self.kernel[...]
    if self.dtype is not None:
      x, k = x.astype(self.dtype), k.astype(self.dtype)
    din, dout = k.shape[2:]
    y = x.reshape(-1, din) @ k.transpose(2, 0, 1, 3).reshape(din, 4 * dout)
    y = y.reshape(x.shape[:-1] + (2, 2, dout))
    return y + self.bias[...].astype(y.dtype)


# ----------------------------------------------------------------------------
# Image encoder
# ----------------------------------------------------------------------------


def get_rel_pos(q_size: int, k_size: int, rel_pos: Array) -> Array:
  """Relative position embeddings indexed by (query, key) position: (q, k, C)."""
  max_rel_dist = int(2 * max(q_size, k_size) - 1)
  if rel_pos.shape[0] != max_rel_dist:
    # Official: F.interpolate(mode="linear", align_corners=False); for an
    # upsampling factor that is jax.image.resize's half-pixel linear kernel.
    rel_pos = jax.image.resize(
        rel_pos, (max_rel_dist, rel_pos.shape[1]), method="linear", antialias=False)
  q_coords = jnp.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k_coords = jnp.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return rel_pos[rel.astype(jnp.int32)]


ATTENTION_IMPLS = ("auto", "chunked", "cpu_kernel", "xla", "cudnn")
# The implementations that walk heads / rows of windows in loops: "cpu_kernel"
# is "chunked" with the attention itself (global and windowed) in the native kernels.
CHUNKED_IMPLS = ("chunked", "cpu_kernel")


def rel_pos_terms(q: Array, rh: Array, rw: Array) -> Tuple[Array, Array]:
  """Decomposed relative-position terms of (Z, H, W, hd) queries: (Z, H, W, H), (Z, H, W, W).

  q·R_h[y_q, y_k] and q·R_w[x_q, x_k]; the logit of (query, key) gets
  rel_h[..., y_k] + rel_w[..., x_k].  Uses the unscaled q (official code)."""
  # As dots batched over the query row (column): (H, Z*W, hd) @ (H, hd, H),
  # 2-3x faster on CPU than the einsums with the batch dimension in the middle.
  z, h, w, hd = q.shape
  rel_h = jnp.einsum("yad,ykd->yak", q.transpose(1, 0, 2, 3).reshape(h, z * w, hd), rh)
  rel_w = jnp.einsum("xad,xkd->xak", q.transpose(2, 0, 1, 3).reshape(w, z * h, hd), rw)
  rel_h = rel_h.reshape(h, z, w, h).transpose(1, 0, 2, 3)
  rel_w = rel_w.reshape(w, z, h, w).transpose(1, 2, 0, 3)
  return rel_h, rel_w


# Token slice for the per-token matmuls (qkv, proj, MLP) on CPU: measured on
# a 2-core AMD EPYC (ViT-B, 4096 tokens), a 1024-token slice keeps the MLP's
# (1024, 3072) hidden and each matmul's output in cache, 20 % faster than one
# (4096, 3072) matmul that streams through memory.  0 = no slicing.
CPU_TOKEN_TILE = 1024


def resolve_token_tile(tile: Optional[int]) -> int:
  """None -> CPU_TOKEN_TILE on CPU, 0 (off) on accelerators, where a loop
  over slices would only cut parallelism; decided when traced."""
  if tile is not None:
    return tile
  return CPU_TOKEN_TILE if jax.default_backend() == "cpu" else 0


def token_map(fn, x: Array, tile: int) -> Array:
  """fn(x) for a per-token fn of x (..., C), computed `tile` tokens at a time
  in a `lax.map` (the same numbers: every token's row is computed by the same
  kernel).  Unsliced when tile is 0 or does not divide the token count."""
  lead = x.shape[:-1]
  t = math.prod(lead)
  if not tile or t <= tile or t % tile:
    return fn(x)
  y = jax.lax.map(fn, x.reshape(t // tile, tile, x.shape[-1]))
  return y.reshape(*lead, y.shape[-1])


class EncoderAttention(nnx.Module):
  """Multi-head attention with decomposed relative positions (MViTv2).

  `impl` picks how the attention itself is computed (same function, same
  parameters; parity-tested):
    * "chunked" (default on CPU): global attention one (image, head) at a
      time, windowed attention one row of windows at a time (`windowed`),
      each as head-major q/k/v (Z, N, hd) sliced in cache; the two small
      rel-pos terms ((Z, N, H) and (Z, N, W)) are expanded to a (Q, N) bias
      that is added to the q k^T product (XLA:CPU fuses a bias of the
      logits' own shape into the matmul, the 4-D broadcast it did not;
      measured on the 2-core AMD EPYC with two threads: 11 % less time for
      a row of windows' attention core, 4 % per global head).  The
      logits are never materialised whole (global attention at 1024 input:
      12 x 4096 x 4096 floats, 800 MB): a `lax.map` walks blocks of heads x
      query rows of about `logits_block` logits (4 MB: one head x 256
      queries), so each block's logits, softmax and probabilities stay in
      cache (exact: softmax is per query row).  A row of windows is one
      block already: its window-heads (60 x 196 x 196 for ViT-B) go at
      once, 74.6 vs 79.9 ms per windowed attention in 20-window-head steps
      (same numbers).
      Measured on that machine (ViT-B): one head x 128 queries per step
      took 26 % less time than all 12 heads x 64 queries, 256 queries 4 %
      less than 128 with two threads, and 12 (window, head) pairs per step
      2.5x less than all 300 at once.
    * "cpu_kernel": the same loops, with the attention itself in native
      AVX-512 kernels (`cpu_kernels`, XLA FFI custom calls): global attention
      one call per block, windowed one call per row of windows.  Shapes the
      kernels do not take fall back to "chunked" per layer.
    * "xla" / "cudnn": `jax.nn.dot_product_attention` with the rel-pos term
      materialised as an additive (B, nh, N, N) bias, so XLA (or cuDNN's fused
      flash attention, bfloat16/float16 only) sees one attention op.  Meant
      for accelerators.
    * "auto" (the default of `Sam`): "cpu_kernel" on a single-device CPU
      where the kernels build, else "chunked" on CPU, "xla" elsewhere,
      decided when the program is traced.  Measured on an H100 (vit_h, batch
      1, before the per-head / row-of-windows loops): float32 chunked 56.1 ms,
      xla 48.1 ms; bfloat16 chunked 42.8, xla 38.3, cudnn 31.5 ms (cudnn is
      opt-in: its bias is rounded to bfloat16).
  """

  def __init__(self, dim: int, num_heads: int, input_size: Tuple[int, int], rngs: nnx.Rngs,
               dtype=None, logits_block: int = 1 << 20, impl: str = "auto"):
    self.num_heads = num_heads
    head_dim = dim // num_heads
    self.scale = head_dim**-0.5
    self.qkv = _linear(dim, 3 * dim, rngs, dtype)
    self.proj = _linear(dim, dim, rngs, dtype)
    self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, head_dim), jnp.float32))
    self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, head_dim), jnp.float32))
    self.logits_block = logits_block
    self.impl = check_attention_impl(impl)
    self.token_tile = None  # see resolve_token_tile

  def __call__(self, x: Array) -> Array:
    if resolve_attention(self.impl) in CHUNKED_IMPLS:
      return self._chunked(x)
    return self._fused(x)

  def _fused(self, x: Array) -> Array:
    b, h, w, c = x.shape
    nh = self.num_heads
    hd = c // nh
    qkv = self.qkv(x).reshape(b, h * w, 3, nh, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, nh, hd)
    rh, rw = self.rel_tables(h, w, q.dtype)
    q4 = q.reshape(b, h, w, nh, hd).transpose(0, 3, 1, 2, 4).reshape(b * nh, h, w, hd)
    rel_h, rel_w = rel_pos_terms(q4, rh, rw)
    bias = (rel_h.astype(jnp.float32)[..., :, None] + rel_w.astype(jnp.float32)[..., None, :])
    bias = bias.reshape(b, nh, h * w, h * w)
    impl = resolve_attention(self.impl)
    if impl == "cudnn":
      bias = bias.astype(q.dtype)  # cuDNN takes the bias in the operands' dtype
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=self.scale,
                                       implementation=impl)
    return self.proj(out.reshape(b, h, w, c))

  def rel_tables(self, h: int, w: int, dtype) -> Tuple[Array, Array]:
    """The rel-pos tables R_h (H, H, hd) and R_w (W, W, hd) of an h x w grid."""
    return (get_rel_pos(h, h, self.rel_pos_h[...]).astype(dtype),
            get_rel_pos(w, w, self.rel_pos_w[...]).astype(dtype))

  def _tokenwise(self, layer: nnx.Linear, x: Array) -> Array:
    return token_map(layer, x, resolve_token_tile(self.token_tile))

  def _chunked(self, x: Array) -> Array:
    """Global attention between the token-wise qkv and proj: the native
    kernel (`cpu_kernels`) when this is "cpu_kernel" and it takes the
    shapes, else `_global_xla`."""
    b, h, w, c = x.shape
    qkv = self._tokenwise(self.qkv, x)
    rel = self.rel_tables(h, w, jnp.float32)  # once, not per head
    if (resolve_attention(self.impl) == "cpu_kernel"
        and cpu_kernels.supports(h, w, c // self.num_heads, qkv.dtype)):
      out = cpu_kernels.global_attention(qkv, *rel, self.num_heads, self.scale, self._global_xla)
    else:
      out = self._global_xla(qkv, *rel)
    return self._tokenwise(self.proj, out)

  def _global_xla(self, qkv: Array, rh: Array, rw: Array) -> Array:
    """(B, H, W, 3C) qkv -> (B, H, W, C) attention output, one (image, head)
    per `fori_loop` step, sliced out of the token-major qkv and written back
    in place: no head-major transposes of the whole qkv / output arrays (8 %
    less time for a ViT-B global attention on CPU)."""
    b, h, w, c3 = qkv.shape
    nh, hd, n = self.num_heads, c3 // (3 * self.num_heads), h * w
    qkv = qkv.reshape(b, n, 3, nh, hd)
    rel = (rh, rw)

    def head(i, out):
      bi, hi = i // nh, i % nh
      t = jax.lax.dynamic_slice(qkv, (bi, 0, 0, hi, 0), (1, n, 3, 1, hd)).reshape(n, 3, hd)
      o = self._attend(t[None, :, 0], t[None, :, 1], t[None, :, 2], *rel)  # (1, N, hd)
      return jax.lax.dynamic_update_slice(out, o.reshape(1, n, 1, hd), (bi, 0, hi, 0))

    out = jax.lax.fori_loop(0, b * nh, head, jnp.zeros((b, n, nh, hd), qkv.dtype))
    return out.reshape(b, h, w, nh * hd)

  def windowed(self, x: Array, window: int) -> Array:
    """Attention inside `window` x `window` tiles of x (B, H, W, C): equal to
    window_partition (zero padding) -> self -> window_unpartition, as the
    official block computes it.

    The chunked path walks the image one row of windows at a time in a
    `lax.map` (`_window_row`), so that moving the row's tokens into
    head-major windows and back happens in cache instead of as transposes
    of the whole (H, W, 3C) qkv array (25 % less time for a ViT-B windowed
    attention on CPU).  The padding rows of the last row of windows are the
    official zero inputs (one loop body for every row: a separate call for
    the partial row cost 0.3 s of compile and saved no measurable time)."""
    if resolve_attention(self.impl) not in CHUNKED_IMPLS:
      h, w = x.shape[1], x.shape[2]
      windows, pad_hw = window_partition(x, window)
      return window_unpartition(self(windows), window, pad_hw, (h, w))
    b, h, w, c = x.shape
    hp = -(-h // window) * window
    rows = jnp.pad(x, ((0, 0), (0, hp - h), (0, 0), (0, 0)))
    rel = self.rel_tables(window, window, jnp.float32)  # once, not per row
    out = jax.lax.map(lambda r: self._window_row(r, window, rel),
                      rows.reshape(b * (hp // window), window, w, c))
    return out.reshape(b, hp, w, c)[:, :h]

  def _window_row(self, x: Array, window: int, rel: Tuple[Array, Array]) -> Array:
    """Attention of one row of windows x (window, W, C) -> (window, W, C)."""
    c = x.shape[-1]
    qkv = self.qkv(x)
    bias = (self.qkv.bias[...].astype(qkv.dtype) if self.qkv.bias is not None
            else jnp.zeros((3 * c,), qkv.dtype))
    if (resolve_attention(self.impl) == "cpu_kernel"
        and cpu_kernels.supports_windows(window, c // self.num_heads, qkv.dtype)):
      out = cpu_kernels.window_attention(qkv[None], *rel, bias, self.num_heads, self.scale,
                                         self._window_core_xla)
    else:
      out = self._window_core_xla(qkv[None], *rel, bias)
    return self.proj(out[0])

  def _window_core_xla(self, qkv: Array, rh: Array, rw: Array, bias: Array) -> Array:
    """(N, ws, W, 3C) rows of windows -> (N, ws, W, C) attention output.

    The padding columns (W..) are zero inputs in the official code, whose
    qkv is exactly the qkv bias (0 @ W + b = b): they are filled in with the
    bias instead of going through the matmul.  Each row's window-heads are
    moved head-major and go through `_attend` at once."""
    n, window, w, c3 = qkv.shape
    nh, hd = self.num_heads, c3 // (3 * self.num_heads)
    wp = -(-w // window) * window
    nw = wp // window
    if wp != w:
      padded = jnp.broadcast_to(bias, (n, window, wp, c3))
      qkv = jax.lax.dynamic_update_slice(padded, qkv, (0, 0, 0, 0))
    qkv = qkv.reshape(n, window, nw, window, 3, nh, hd)
    q, k, v = qkv.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, n * nw * nh, window * window, hd)
    out = self._attend(q, k, v, rh, rw, block=nw * nh * window**4)  # a row at once
    out = out.reshape(n, nw, nh, window, window, hd).transpose(0, 3, 1, 4, 2, 5)
    return out.reshape(n, window, wp, nh * hd)[:, :, :w]

  def _attend(self, q: Array, k: Array, v: Array, rh: Array, rw: Array,
              block: Optional[int] = None) -> Array:
    """softmax(scale q k^T + rel-pos) v for head-major (Z, N = h*w, hd) q, k, v
    and the grid's `rel_tables` rh (h, h, hd), rw (w, w, hd), in steps of
    about `block` logits (default `logits_block`).

    The softmax normalisation is applied to the (Q, hd) output rather than
    the (Q, N) probabilities: one pass over the logits fewer."""
    z, n, hd = q.shape
    h, w = rh.shape[0], rw.shape[0]
    rh, rw = rh.astype(q.dtype), rw.astype(q.dtype)
    rel_h, rel_w = rel_pos_terms(q.reshape(z, h, w, hd), rh, rw)
    rel_h, rel_w = rel_h.reshape(z, n, h), rel_w.reshape(z, n, w)
    q = q * jnp.asarray(self.scale, q.dtype)

    def attend(qb, kb, vb, rhb, rwb):  # (..., Q, hd), (..., N, hd) x 2, (..., Q, H), (..., Q, W)
      lead, nq = qb.shape[:-2], qb.shape[-2]
      bias = (rhb[..., :, None] + rwb[..., None, :]).reshape(*lead, nq, n)
      logits = (jnp.einsum("...qd,...kd->...qk", qb, kb) + bias).astype(jnp.float32)
      e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
      out = jnp.einsum("...qk,...kd->...qd", e.astype(vb.dtype), vb,
                       preferred_element_type=jnp.float32)
      return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(vb.dtype)

    zg, qc = attention_blocks(z, n, block or self.logits_block)
    args = (q, k, v, rel_h, rel_w)
    if qc < n:  # one head per step, in steps of qc queries: plain 2-D matmuls
      def head(a):
        qz, kz, vz, rhz, rwz = a
        split = lambda t: t.reshape(n // qc, qc, t.shape[-1])
        out = jax.lax.map(lambda b: attend(b[0], kz, vz, b[1], b[2]),
                          (split(qz), split(rhz), split(rwz)))
        return out.reshape(n, hd)

      return jax.lax.map(head, args)
    if zg == z:
      return attend(*args)
    out = jax.lax.map(lambda a: attend(*a), tuple(t.reshape(z // zg, zg, *t.shape[1:]) for t in args))
    return out.reshape(z, n, hd)


def attention_blocks(z: int, n: int, block: int) -> Tuple[int, int]:
  """(heads, queries) per step for Z heads of N queries x N keys: about
  `block` logits at most, whole heads when one head's N x N fits, else
  the largest divisor of N that fits (at least 1 query row; all N rows when
  N has no divisor that fits, which only odd input sizes give)."""
  if n * n <= block:
    return max(d for d in range(1, z + 1) if z % d == 0 and d * n * n <= block), n
  fits = [d for d in range(1, n) if n % d == 0 and d * n <= block]
  return 1, (max(fits) if fits else n)


def resolve_attention(impl: str) -> str:
  """"auto" -> the measured best default of the backend being traced for:
  "cpu_kernel" on a single-device CPU where the kernel builds, else "chunked"
  on CPU, "xla" on accelerators.  An explicit "cpu_kernel" that cannot be
  used is an error that says why."""
  if impl == "cpu_kernel" and not cpu_kernels.enabled():
    raise RuntimeError(f"attention 'cpu_kernel' is unavailable: {cpu_kernels.unavailable_reason()}"
                       "; use 'auto' or 'chunked'")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  return "cpu_kernel" if cpu_kernels.enabled() else "chunked"


def check_attention_impl(impl: str) -> str:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of "
                     f"{list(ATTENTION_IMPLS)}")
  return impl


def set_attention(model: nnx.Module, impl: str) -> nnx.Module:
  """Switch every encoder attention of `model` (a Sam, or anything holding one)
  to `impl` in place; parameters are untouched.  Returns `model`."""
  check_attention_impl(impl)
  for _, m in nnx.iter_graph(model):
    if isinstance(m, EncoderAttention):
      m.impl = impl
  return model


@contextlib.contextmanager
def portable_attention(model: nnx.Module) -> Iterator[nnx.Module]:
  """Inside, encoder attentions of `model` that would use the native CPU
  kernel use XLA's "chunked" instead (restored on exit): for programs that
  must run without this library, e.g. `jax.export` artefacts (which refuse
  custom calls anyway).  The implementation is part of the model's graphdef,
  so programs traced inside are never mixed up with ones traced outside."""
  changed = [(m, m.impl) for _, m in nnx.iter_graph(model) if isinstance(m, EncoderAttention)
             and m.impl in ("auto", "cpu_kernel") and resolve_attention(m.impl) == "cpu_kernel"]
  for m, _ in changed:
    m.impl = "chunked"
  try:
    yield model
  finally:
    for m, impl in changed:
      m.impl = impl


def set_scan_blocks(model: nnx.Module, on: bool) -> nnx.Module:
  """Turn the scanned ViT blocks (`ImageEncoderViT.scan_blocks`) of `model`
  on or off in place; parameters are untouched.  Returns `model`."""
  for _, m in nnx.iter_graph(model):
    if isinstance(m, ImageEncoderViT):
      m.scan_blocks = bool(on)
  return model


def set_token_tile(model: nnx.Module, tile: Optional[int]) -> nnx.Module:
  """Set the token slice of every ViT block of `model` in place (None: the
  backend's default, 0: off; see `resolve_token_tile`).  Returns `model`."""
  for _, m in nnx.iter_graph(model):
    if isinstance(m, EncoderAttention):
      m.token_tile = tile
  return model


def attention_impl(model: nnx.Module) -> str:
  """The encoder attention implementation of `model` ("auto" if it has none)."""
  for _, m in nnx.iter_graph(model):
    if isinstance(m, EncoderAttention):
      return m.impl
  return "auto"


def window_partition(x: Array, window: int) -> Tuple[Array, Tuple[int, int]]:
  b, h, w, c = x.shape
  pad_h = (window - h % window) % window
  pad_w = (window - w % window) % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: Array, window: int, pad_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> Array:
  hp, wp = pad_hw
  h, w = hw
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
  return x[:, :h, :w, :]


class EncoderMLP(nnx.Module):

  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=None):
    self.lin1 = _linear(dim, hidden, rngs, dtype)
    self.lin2 = _linear(hidden, dim, rngs, dtype)

  def __call__(self, x: Array) -> Array:
    return self.lin2(gelu(self.lin1(x)))


class EncoderBlock(nnx.Module):

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int,
               input_size: Tuple[int, int], rngs: nnx.Rngs, dtype=None):
    self.norm1 = LayerNorm(dim, 1e-6)
    attn_size = input_size if window_size == 0 else (window_size, window_size)
    self.attn = EncoderAttention(dim, num_heads, attn_size, rngs, dtype)
    self.norm2 = LayerNorm(dim, 1e-6)
    self.mlp = EncoderMLP(dim, int(dim * mlp_ratio), rngs, dtype)
    self.window_size = window_size

  def __call__(self, x: Array) -> Array:
    shortcut = x
    x = self.norm1(x)
    if self.window_size > 0:
      x = self.attn.windowed(x, self.window_size)
    else:
      x = self.attn(x)
    x = shortcut + x
    tile = resolve_token_tile(self.attn.token_tile)
    return token_map(lambda t: t + self.mlp(self.norm2(t)), x, tile)


def block_period(window_sizes: Sequence[int]) -> int:
  """Smallest p dividing the depth with window_sizes[i] == window_sizes[i % p]:
  3 for ViT-B (4 x [window, window, global]), 6 / 8 for ViT-L / ViT-H."""
  n = len(window_sizes)
  for p in range(1, n + 1):
    if n % p == 0 and all(window_sizes[i] == window_sizes[i % p] for i in range(n)):
      return p
  return n


def run_blocks_scanned(blocks: Sequence[nnx.Module], x: Array, period: int) -> Array:
  """blocks[0](...) ... blocks[-1](x) as a `lax.scan` over groups of `period`
  blocks: XLA compiles one group instead of depth / period copies of it.

  The parameters stay one module per block (the checkpoint layout); the
  group's per-position states are stacked here, inside the traced call (one
  copy of the encoder weights per call, ~0.3 GB for ViT-B: milliseconds).
  The caller checks that blocks i and i % period share a graph definition."""
  defs, states = zip(*(nnx.split(b) for b in blocks))
  stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *states[j::period]) for j in range(period)]

  def group(h, group_states):
    for graphdef, state in zip(defs[:period], group_states):
      h = nnx.merge(graphdef, state)(h)
    return h, None

  return jax.lax.scan(group, x, stacked)[0]


class ImageEncoderViT(nnx.Module):
  """SAM's ViT image encoder.

  `scan_blocks`: the blocks' repeating window/global group is compiled once
  and run with `lax.scan` (`run_blocks_scanned`); same parameters and
  numbers as the unrolled loop, which is used when off or when the pattern
  does not repeat at least twice.  Off by default: on CPU it did not cut
  compile time (XLA already compiles identical blocks' kernels once; ViT-B
  encoder 1.4-1.5 s unrolled vs 1.8-2.0 s scanned, CPU seconds) and run
  time is the same within noise.  `set_scan_blocks` switches a model.
  """

  def __init__(self, cfg: SamConfig, rngs: nnx.Rngs, dtype=None, scan_blocks: bool = False):
    dim = cfg.encoder_embed_dim
    grid = cfg.embed_size
    self.dtype = dtype
    self.patch_embed = nnx.Conv(3, dim, (cfg.patch_size, cfg.patch_size),
                                strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                                dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, dim), jnp.float32))
    self.blocks = nnx.List([
        EncoderBlock(dim, cfg.encoder_num_heads, cfg.mlp_ratio,
                     0 if i in cfg.encoder_global_attn_indexes else cfg.window_size,
                     (grid, grid), rngs, dtype)
        for i in range(cfg.encoder_depth)
    ])
    out = cfg.prompt_embed_dim
    self.neck_conv1 = nnx.Conv(dim, out, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
    self.neck_ln1 = LayerNorm(out, 1e-6)
    self.neck_conv2 = nnx.Conv(out, out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                               dtype=dtype, rngs=rngs)
    self.neck_ln2 = LayerNorm(out, 1e-6)
    self.scan_blocks = scan_blocks

  def _scan_period(self) -> int:
    """The scanned group's length, or 0 to run the blocks unrolled."""
    blocks = list(self.blocks)
    period = block_period([b.window_size for b in blocks])
    if not self.scan_blocks or len(blocks) // period < 2:
      return 0
    defs = [nnx.graphdef(b) for b in blocks]
    same = all(defs[i] == defs[i % period] for i in range(len(blocks)))
    return period if same else 0

  def __call__(self, x: Array) -> Array:
    """(B, S, S, 3) normalised, padded image -> (B, S/16, S/16, 256) float32."""
    x = self.patch_embed(x)
    x = x + self.pos_embed[...].astype(x.dtype)
    period = self._scan_period()
    if period:
      x = run_blocks_scanned(list(self.blocks), x, period)
    else:
      for blk in self.blocks:
        x = blk(x)
    x = self.neck_ln1(self.neck_conv1(x))
    x = self.neck_ln2(self.neck_conv2(x))
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Prompt encoder
# ----------------------------------------------------------------------------


class PromptEncoder(nnx.Module):
  """Static-shape prompt encoder.

  Points and box corners arrive as one (B, N, 2) coordinate array with labels:
  -1 = padding ("not a point"), 0 = negative, 1 = positive, 2 = box top-left,
  3 = box bottom-right (the formulation of the official `SamOnnxModel`).
  The caller is responsible for the official token order: points, then the
  (0, 0)/-1 padding point when there is no box, then box corners
  (`aopsam_jax.sam.prompts.build_sparse_prompts` does that).
  """

  def __init__(self, cfg: SamConfig, rngs: nnx.Rngs, dtype=None):
    d = cfg.prompt_embed_dim
    self.embed_dim = d
    self.input_size = cfg.img_size
    self.embed_size = cfg.embed_size
    normal = nnx.initializers.normal(1.0)
    # Random Fourier features; a buffer in PyTorch, but saved in the checkpoint.
    self.pe_gaussian = nnx.Param(normal(rngs.params(), (2, d // 2), jnp.float32))
    self.point_embeddings = nnx.Param(normal(rngs.params(), (4, d), jnp.float32))
    self.not_a_point_embed = nnx.Param(normal(rngs.params(), (1, d), jnp.float32))
    self.no_mask_embed = nnx.Param(normal(rngs.params(), (1, d), jnp.float32))
    c = cfg.mask_in_chans
    self.mask_conv1 = nnx.Conv(1, c // 4, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                               rngs=rngs)
    self.mask_ln1 = LayerNorm(c // 4, 1e-6)
    self.mask_conv2 = nnx.Conv(c // 4, c, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                               rngs=rngs)
    self.mask_ln2 = LayerNorm(c, 1e-6)
    self.mask_conv3 = nnx.Conv(c, d, (1, 1), dtype=dtype, rngs=rngs)

  def _pe_encoding(self, coords01: Array) -> Array:
    coords = 2.0 * coords01 - 1.0
    coords = coords @ self.pe_gaussian[...]
    coords = 2.0 * math.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def get_dense_pe(self) -> Array:
    """(S/16, S/16, 256) positional encoding of the embedding grid."""
    n = self.embed_size
    centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    yy, xx = jnp.meshgrid(centres, centres, indexing="ij")
    return self._pe_encoding(jnp.stack([xx, yy], axis=-1))

  def embed_sparse(self, coords: Array, labels: Array) -> Array:
    """(B, N, 2) xy in the padded input frame, (B, N) int labels -> (B, N, 256)."""
    coords = (coords.astype(jnp.float32) + 0.5) / self.input_size
    pe = self._pe_encoding(coords)
    labels = labels.astype(jnp.int32)[..., None]
    pe = jnp.where(labels == -1, 0.0, pe)
    table = self.point_embeddings[...]
    pe = pe + jnp.where(labels == -1, self.not_a_point_embed[...][0], 0.0)
    for i in range(4):
      pe = pe + jnp.where(labels == i, table[i], 0.0)
    return pe

  def embed_mask(self, masks: Array) -> Array:
    """(B, 4S/16, 4S/16) low-res mask logits -> (B, S/16, S/16, 256)."""
    x = masks[..., None].astype(jnp.float32)
    x = gelu(self.mask_ln1(self.mask_conv1(x)))
    x = gelu(self.mask_ln2(self.mask_conv2(x)))
    return self.mask_conv3(x).astype(jnp.float32)

  def no_mask_dense(self, batch: int) -> Array:
    n = self.embed_size
    return jnp.broadcast_to(self.no_mask_embed[...][0], (batch, n, n, self.embed_dim))


# ----------------------------------------------------------------------------
# Mask decoder
# ----------------------------------------------------------------------------


class DecoderAttention(nnx.Module):
  """Attention with optional down-projection of q/k/v (official `transformer.Attention`).

  `__call__` is the official computation.  The decoder's cross attentions
  pair a handful of prompt tokens (T ~ 7) with every image position
  (HW = 4096), once per prompt; `tokens_to_image` / `image_to_tokens`
  compute the same attention with the image-side projections folded into
  the tokens' side (associativity; softmax rows sum to one), so the
  per-prompt work on the image grows with heads x tokens instead of the
  internal width, and with an image shared by all prompts (batch 1) its
  projections are computed once.  Results equal `__call__` up to rounding.
  """

  def __init__(self, dim: int, num_heads: int, downsample_rate: int, rngs: nnx.Rngs, dtype=None):
    internal = dim // downsample_rate
    assert internal % num_heads == 0, "num_heads must divide the internal dim"
    self.num_heads = num_heads
    self.q_proj = _linear(dim, internal, rngs, dtype)
    self.k_proj = _linear(dim, internal, rngs, dtype)
    self.v_proj = _linear(dim, internal, rngs, dtype)
    self.out_proj = _linear(internal, dim, rngs, dtype)

  def __call__(self, q: Array, k: Array, v: Array) -> Array:
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
    b, nq, c = q.shape
    nh = self.num_heads
    q = q.reshape(b, nq, nh, c // nh)
    k = k.reshape(b, k.shape[1], nh, c // nh)
    v = v.reshape(b, v.shape[1], nh, c // nh)
    attn = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.asarray(math.sqrt(c // nh), q.dtype)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(b, nq, c)
    return self.out_proj(out)

  def _folds(self, n_tokens: int) -> bool:
    """Folding pays when heads x tokens is below the internal width."""
    return self.num_heads * n_tokens < self.q_proj.out_features

  def _heads(self, lin: nnx.Linear, x: Array) -> Array:
    """(..., dim) -> (..., heads, head_dim) projection."""
    y = lin(x)
    return y.reshape(y.shape[:-1] + (self.num_heads, -1))

  def _weights(self, lin: nnx.Linear, split_in: bool) -> Tuple[Array, Array]:
    """Kernel split per head ((heads, d, out) or (in, heads, d)) and bias, in compute dtype."""
    k, b = lin.kernel[...], lin.bias[...]
    if lin.dtype is not None:
      k, b = k.astype(lin.dtype), b.astype(lin.dtype)
    nh = self.num_heads
    if split_in:
      return k.reshape(nh, -1, k.shape[-1]), b
    return k.reshape(k.shape[0], nh, -1), b.reshape(nh, -1)

  def project(self, lin: nnx.Linear, x: Array) -> Array:
    """One image's (1, HW, dim) projection by `lin`, split per head: (HW, heads, d)."""
    return self._heads(lin, x[0])

  def tokens_to_image(self, q_tok: Array, k_img: Array, v_img: Array,
                      kv: Optional[Tuple[Array, Array]] = None) -> Array:
    """`self(q_tok, k_img, v_img)`: tokens (B, T, dim) attend to image
    positions (B or 1, HW, dim); `kv` = the image's k / v `project`ions when
    already computed (one image shared by every prompt)."""
    b, nt, _ = q_tok.shape
    if kv is None and k_img.shape[0] == 1 and b > 1:
      kv = self.project(self.k_proj, k_img), self.project(self.v_proj, v_img)
    if kv is None and not self._folds(nt):
      return self(q_tok, k_img, v_img)
    q = self._heads(self.q_proj, q_tok)
    q = q / jnp.asarray(math.sqrt(q.shape[-1]), q.dtype)
    if kv is not None:
      attn = jnp.einsum("btnd,knd->bntk", q, kv[0])
      attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(kv[1].dtype)
      out = jnp.einsum("bntk,knd->btnd", attn, kv[1])
    else:  # fold the image's k / v projections into the tokens
      wk, bk = self._weights(self.k_proj, split_in=False)
      wv, bv = self._weights(self.v_proj, split_in=False)
      k_img, v_img = k_img.astype(wk.dtype), v_img.astype(wk.dtype)
      attn = (jnp.einsum("bkc,btnc->bntk", k_img, jnp.einsum("btnd,cnd->btnc", q, wk))
              + jnp.einsum("btnd,nd->bnt", q, bk)[..., None])
      attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(wv.dtype)
      ctx = jnp.einsum("bntk,bkc->bntc", attn, v_img)
      out = jnp.einsum("bntc,cnd->btnd", ctx, wv) + bv
    return self.out_proj(out.reshape(b, nt, -1))

  def image_to_tokens(self, q_img: Array, k_tok: Array, v_tok: Array,
                      q: Optional[Array] = None) -> Array:
    """`self(q_img, k_tok, v_tok)`: image positions (B or 1, HW, dim) attend
    to tokens (B, T, dim); returns (B, HW, dim).  `q` = the image's q
    `project`ion when already computed."""
    b, nt, _ = k_tok.shape
    if q is None and q_img.shape[0] == 1 and b > 1:
      q = self.project(self.q_proj, q_img)
    if q is None and not self._folds(nt):
      return self(q_img, k_tok, v_tok)
    k, v = self._heads(self.k_proj, k_tok), self._heads(self.v_proj, v_tok)
    k = k / jnp.asarray(math.sqrt(k.shape[-1]), k.dtype)
    if q is not None:
      attn = jnp.einsum("ind,btnd->bint", q, k)
    else:  # fold the image's q projection into the tokens
      wq, bq = self._weights(self.q_proj, split_in=False)
      attn = (jnp.einsum("bic,bcnt->bint", q_img.astype(wq.dtype),
                         jnp.einsum("btnd,cnd->bcnt", k, wq))
              + jnp.einsum("btnd,nd->bnt", k, bq)[:, None])
    if not self._folds(nt):  # many tokens: the official value path
      attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
      return self.out_proj(jnp.einsum("bint,btnd->bind", attn, v).reshape(b, q_img.shape[1], -1))
    wo, bo = self._weights(self.out_proj, split_in=True)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(wo.dtype)
    # out_proj folded into the tokens' values: (B, heads, T, dim)
    return jnp.einsum("bint,bntc->bic", attn, jnp.einsum("btnd,ndc->bntc", v, wo)) + bo


class DecoderMLPBlock(nnx.Module):

  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=None):
    self.lin1 = _linear(dim, hidden, rngs, dtype)
    self.lin2 = _linear(hidden, dim, rngs, dtype)

  def __call__(self, x: Array) -> Array:
    return self.lin2(jax.nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(nnx.Module):

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int,
               skip_first_layer_pe: bool, rngs: nnx.Rngs, dtype=None):
    self.self_attn = DecoderAttention(dim, num_heads, 1, rngs, dtype)
    self.norm1 = LayerNorm(dim, 1e-5)
    self.cross_attn_token_to_image = DecoderAttention(dim, num_heads, downsample, rngs, dtype)
    self.norm2 = LayerNorm(dim, 1e-5)
    self.mlp = DecoderMLPBlock(dim, mlp_dim, rngs, dtype)
    self.norm3 = LayerNorm(dim, 1e-5)
    self.norm4 = LayerNorm(dim, 1e-5)
    self.cross_attn_image_to_token = DecoderAttention(dim, num_heads, downsample, rngs, dtype)
    self.skip_first_layer_pe = skip_first_layer_pe

  def project_image(self, keys: Array, key_pe: Array) -> Dict[str, Array]:
    """The image-side projections of this block for one image (batch 1): the
    same for every prompt, so computed once (only valid for the first block,
    whose keys are the image embedding itself)."""
    k = keys + key_pe
    t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
    return dict(kv=(t2i.project(t2i.k_proj, k), t2i.project(t2i.v_proj, keys)),
                q=i2t.project(i2t.q_proj, k))

  def __call__(self, queries, keys, query_pe, key_pe, image_proj=None):
    image_proj = image_proj or {}
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)
    q = queries + query_pe
    k = keys + key_pe
    queries = self.norm2(queries + self.cross_attn_token_to_image.tokens_to_image(
        q, k, keys, image_proj.get("kv")))
    queries = self.norm3(queries + self.mlp(queries))
    q = queries + query_pe
    k = keys + key_pe
    keys = self.norm4(keys + self.cross_attn_image_to_token.image_to_tokens(
        k, q, queries, image_proj.get("q")))
    return queries, keys


class TwoWayTransformer(nnx.Module):

  def __init__(self, cfg: SamConfig, rngs: nnx.Rngs, dtype=None):
    d = cfg.prompt_embed_dim
    self.layers = nnx.List([
        TwoWayAttentionBlock(d, cfg.decoder_num_heads, cfg.decoder_mlp_dim, 2, i == 0, rngs, dtype)
        for i in range(cfg.decoder_depth)
    ])
    self.final_attn_token_to_image = DecoderAttention(d, cfg.decoder_num_heads, 2, rngs, dtype)
    self.norm_final_attn = LayerNorm(d, 1e-5)

  def __call__(self, image_embedding: Array, image_pe: Array, point_embedding: Array,
               image_proj: Optional[Dict[str, Array]] = None):
    """`image_proj`: the first block's `project_image` of this (one) image
    embedding, when the caller computed it once for several prompt batches."""
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
    queries = point_embedding
    for i, layer in enumerate(self.layers):
      queries, keys = layer(queries, keys, point_embedding, key_pe, image_proj if i == 0 else None)
    q = queries + point_embedding
    k = keys + key_pe
    queries = self.norm_final_attn(queries + self.final_attn_token_to_image.tokens_to_image(
        q, k, keys))
    return queries, keys


class MLP(nnx.Module):
  """ReLU MLP of the decoder heads (official `mask_decoder.MLP`)."""

  def __init__(self, din: int, hidden: int, dout: int, num_layers: int, rngs: nnx.Rngs,
               dtype=None):
    dims = [din] + [hidden] * (num_layers - 1) + [dout]
    self.layers = nnx.List([_linear(a, b, rngs, dtype) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: Array) -> Array:
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < n - 1:
        x = jax.nn.relu(x)
    return x


def resolve_prompt_chunk(chunk) -> Optional[int]:
  """Prompts decoded at a time: "auto" = two on a CPU (a small batch's wide
  intermediates stay in cache: measured 1.4x faster than all 24-32 prompts at
  once), all at once on accelerators; an int; None = all at once."""
  if chunk == "auto":
    return 2 if jax.default_backend() == "cpu" else None
  if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
    raise ValueError(f"prompt_chunk must be 'auto', None or a positive int, got {chunk!r}")
  return chunk


def map_chunks(fn, xs, chunk: int, num_valid=None):
  """`fn` over the leading axis of `xs` (a pytree), `chunk` rows per call
  (`lax.map`, the last chunk padded with repeats of the last row).  With
  `num_valid` (traced), chunks holding only rows >= num_valid are skipped
  and give zeros: padding a batch up to a size bucket then costs nothing."""
  n = jax.tree.leaves(xs)[0].shape[0]
  steps = -(-n // chunk)
  idx = jnp.minimum(jnp.arange(steps * chunk), n - 1)
  xs = jax.tree.map(lambda x: x[idx].reshape((steps, chunk) + x.shape[1:]), xs)
  if num_valid is None:
    ys = jax.lax.map(fn, xs)
  else:
    ys = jax.lax.map(lambda a: run_if(a[0] * chunk < num_valid, fn, a[1]), (jnp.arange(steps), xs))
  return jax.tree.map(lambda y: y.reshape((steps * chunk,) + y.shape[2:])[:n], ys)


def run_if(pred, fn, *args):
  """fn(*args) when the traced `pred` holds, else zeros of fn's output
  shapes (`lax.cond`: the skipped branch does no work)."""
  out = jax.eval_shape(fn, *args)
  zeros = lambda *_: jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out)  # noqa: E731
  return jax.lax.cond(pred, fn, zeros, *args)


class MaskDecoder(nnx.Module):

  def __init__(self, cfg: SamConfig, rngs: nnx.Rngs, dtype=None):
    d = cfg.prompt_embed_dim
    self.num_mask_tokens = cfg.num_multimask_outputs + 1
    normal = nnx.initializers.normal(1.0)
    self.transformer = TwoWayTransformer(cfg, rngs, dtype)
    self.iou_token = nnx.Param(normal(rngs.params(), (1, d), jnp.float32))
    self.mask_tokens = nnx.Param(normal(rngs.params(), (self.num_mask_tokens, d), jnp.float32))
    self.upscale_conv1 = UpConv2x2(d, d // 4, rngs, dtype)
    self.upscale_ln = LayerNorm(d // 4, 1e-6)
    self.upscale_conv2 = UpConv2x2(d // 4, d // 8, rngs, dtype)
    self.output_hypernetworks_mlps = nnx.List(
        [MLP(d, d, d // 8, 3, rngs, dtype) for _ in range(self.num_mask_tokens)])
    self.iou_prediction_head = MLP(d, cfg.iou_head_hidden_dim, self.num_mask_tokens,
                                   cfg.iou_head_depth, rngs, dtype)
    self.prompt_chunk = "auto"

  def predict_masks(self, image_embeddings: Array, image_pe: Array, sparse: Array,
                    dense: Array, num_valid: Optional[Array] = None) -> Tuple[Array, Array]:
    """All mask tokens: (B, 4, 4h, 4w) logits and (B, 4) IoU predictions.

    One image embedding per prompt is the official repeat_interleave; here a
    single embedding with a prompt-independent dense term stays batch 1, its
    first-block projections are computed once, and the prompts run
    `prompt_chunk` at a time (`lax.map`, see `resolve_prompt_chunk`).
    `num_valid` (optional, traced): prompts past it are padding; in chunks
    they are not decoded (their outputs are zeros).
    """
    b = sparse.shape[0]
    out_tokens = jnp.concatenate([self.iou_token[...], self.mask_tokens[...]], axis=0)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(out_tokens, (b,) + out_tokens.shape), sparse.astype(jnp.float32)], axis=1)
    src = image_embeddings + dense
    pos = image_pe[None] if image_pe.ndim == 3 else image_pe
    shared = src.shape[0] == 1
    proj = None
    if shared and b > 1:
      _, h, w, c = src.shape
      proj = self.transformer.layers[0].project_image(src.reshape(1, h * w, c),
                                                      pos.reshape(1, h * w, c))
    chunk = resolve_prompt_chunk(self.prompt_chunk)
    if chunk is None or b <= chunk:
      return self._predict_chunk(src, pos, tokens, proj)
    if shared:
      return map_chunks(lambda t: self._predict_chunk(src, pos, t, proj), tokens, chunk,
                        num_valid)
    return map_chunks(lambda a: self._predict_chunk(a[0], pos, a[1], None), (src, tokens), chunk,
                      num_valid)

  def _predict_chunk(self, src: Array, pos: Array, tokens: Array, proj) -> Tuple[Array, Array]:
    """`predict_masks` for one batch of prompt tokens (B, T, C) on src (1 or B, h, w, C)."""
    b = tokens.shape[0]
    _, h, w, c = src.shape
    hs, src = self.transformer(src, pos, tokens, proj)
    src = jnp.broadcast_to(src, (b,) + src.shape[1:])
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]
    hyper_in = jnp.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
        axis=1)
    masks = self._upscaled_masks(src.reshape(b, h, w, c), hyper_in)
    iou_pred = self.iou_prediction_head(iou_token_out)
    return masks.astype(jnp.float32), iou_pred.astype(jnp.float32)

  def _upscaled_masks(self, src: Array, hyper_in: Array) -> Array:
    """(B, h, w, C) image tokens, (B, M, C/8) -> (B, M, 4h, 4w) mask logits.

    Both transposed convolutions write disjoint 2x2 blocks and LayerNorm,
    GELU and the hypernetwork product act per pixel, so everything runs in
    the sub-pixel layout (B, h, w, i, j, k, l, C/8) and only the M mask
    channels are interleaved into image order: row 4h + 2i + k, column
    4w + 2j + l (the official output, without moving the wide tensors).
    """
    b, h, w, _ = src.shape
    up = gelu(self.upscale_ln(self.upscale_conv1.subpixel(src)))
    up = gelu(self.upscale_conv2.subpixel(up))
    masks = jnp.einsum("bmc,bhwijklc->bmhikwjl", hyper_in.astype(up.dtype), up)
    return masks.reshape(b, hyper_in.shape[1], 4 * h, 4 * w)

  def __call__(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool,
               num_valid: Optional[Array] = None):
    masks, iou = self.predict_masks(image_embeddings, image_pe, sparse, dense, num_valid)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou[:, sl]


# ----------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------


class Sam(nnx.Module):
  """Image encoder + prompt encoder + mask decoder.

  `dtype` is the compute dtype of matmuls and convolutions (None = float32);
  parameters stay float32, LayerNorm and softmax run in float32.
  `attention` is the encoder attention implementation (`ATTENTION_IMPLS`,
  see `EncoderAttention`; `set_attention` switches an existing model).
  """

  def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs, dtype=None, attention: str = "auto"):
    self.config = cfg
    encoder = TinyViT if cfg.encoder_kind == "tiny_vit" else ImageEncoderViT
    self.image_encoder = encoder(cfg, rngs, dtype)
    self.prompt_encoder = PromptEncoder(cfg, rngs, dtype)
    self.mask_decoder = MaskDecoder(cfg, rngs, dtype)
    set_attention(self.image_encoder, attention)

  def encode_image(self, pixels: Array) -> Array:
    return self.image_encoder(pixels)

  def decode(self, image_embeddings: Array, coords: Array, labels: Array,
             mask_input: Optional[Array] = None, multimask_output: bool = True,
             num_valid: Optional[Array] = None) -> Tuple[Array, Array]:
    """Prompts on one image embedding (or one per prompt) -> low-res logits, IoU.

    image_embeddings: (1 or B, h, w, 256); coords (B, N, 2) in the padded
    input frame; labels (B, N); mask_input (B, 4h, 4w) logits or None;
    num_valid: the first num_valid prompts are real, the rest padding that
    need not be decoded (their outputs are then zeros).
    """
    pe = self.prompt_encoder
    sparse = pe.embed_sparse(coords, labels)
    if mask_input is None:
      dense = pe.no_mask_dense(1)
    else:
      dense = pe.embed_mask(mask_input)
    return self.mask_decoder(image_embeddings, pe.get_dense_pe(), sparse, dense,
                             multimask_output, num_valid)



