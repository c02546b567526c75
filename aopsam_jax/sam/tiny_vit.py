"""MobileSAM's TinyViT image encoder in Flax NNX (eval mode).

Structure and attribute names follow MobileSAM's `tiny_vit_sam.py`, so that
`params.py` maps checkpoint keys one to one (`patch_embed.seq.0` / `.seq.2`
become `patch_embed.conv1` / `.conv2`; a `Conv2d_BN` becomes one `ConvBN`
holding the convolution kernel and the BatchNorm's affine parameters and
running statistics).  Layout is NHWC throughout.

Details that matter for numerical parity (all read from the reference code):
  * BatchNorm runs in eval mode: running statistics, eps 1e-5.  It is folded
    into the convolution (kernel * s, bias = b - mean * s) at trace time.
  * The attention and MLP LayerNorms are PyTorch's default (eps 1e-5) and sit
    *inside* those modules, so windows are zero-padded *before* the norm: the
    padding tokens enter attention as keys with value qkv(norm bias), unmasked.
  * The fused qkv projection is laid out per head: (head, [q | k | v]).
  * Attention logits are (q k^T) * key_dim^-0.5 plus a learned per-head bias
    indexed by the absolute offset (|dy|, |dx|) inside the window.
  * The neck's LayerNorm2d uses eps 1e-6; GELU is the exact erf form.
  * The last patch merging keeps the resolution (stride 1), the others halve it.

Speed on CPU (BENCHMARKS.md §8.1): the large-map layers run in row stripes
(`row_stripes`, a lax.map) so that their wide intermediates stay in cache,
each step of a stripe is its own buffer (`own`), attention runs one row of
windows at a time.  What is computed is unchanged (up to float rounding order).
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aopsam_jax.sam.config import SamConfig, TinyViTConfig
from aopsam_jax.sam.norm import LayerNorm, gelu

Array = jax.Array
BN_EPS = 1e-5


class ConvBN(nnx.Module):
  """Conv2d (no bias) + BatchNorm2d in eval mode (reference `Conv2d_BN`).

  The BatchNorm affine parameters and running statistics are kept as loaded
  (`scale`, `bias`, `mean`, `var`) and folded into the kernel per call.
  """

  def __init__(self, din: int, dout: int, rngs: nnx.Rngs, ks: int = 1, stride: int = 1,
               groups: int = 1, dtype=None):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (ks, ks, din // groups, dout), jnp.float32))
    self.scale = nnx.Param(jnp.ones((dout,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))
    self.mean = nnx.Param(jnp.zeros((dout,), jnp.float32))
    self.var = nnx.Param(jnp.ones((dout,), jnp.float32))
    self.stride = stride
    self.groups = groups
    self.pad = ks // 2
    self.dtype = dtype

  def folded(self) -> Tuple[Array, Array]:
    """(kernel, bias) with the eval-mode BatchNorm folded in."""
    s = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    k = self.kernel[...] * s
    if self.dtype is not None:
      k = k.astype(self.dtype)
    return k, self.bias[...] - self.mean[...] * s

  def __call__(self, x: Array, pad=None) -> Array:
    """`pad` ((top, bottom), (left, right)) overrides the symmetric ks // 2."""
    k, b = self.folded()
    pad = ((self.pad, self.pad),) * 2 if pad is None else pad
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if k.shape[:2] == (1, 1) and self.groups == 1 and self.stride == 1:
      y = jnp.einsum("bhwi,io->bhwo", x, k[0, 0])  # a matmul, faster than conv on CPU
    elif self.groups > 1 and self.groups == x.shape[-1] == k.shape[-1]:
      y = depthwise_conv(x, k, self.stride, pad)
    else:
      y = jax.lax.conv_general_dilated(
          x, k, (self.stride, self.stride), pad,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
    return y + b.astype(y.dtype)


def own(x: Array) -> Array:
  """x as its own buffer: XLA does not fuse it into its consumers.

  XLA:CPU fuses the GELU, row mask and column padding into the nine-tap
  depthwise sum and recomputes them per tap, poorly vectorised: an MBConv
  block took 3.6x longer, a TinyViT block 1.2-1.5x, than with every step
  materialised (in cache, as a stripe).
  """
  return jax.lax.optimization_barrier(x)


def depthwise_conv(x: Array, k: Array, stride: int, pad) -> Array:
  """Depthwise conv (kernel (kh, kw, 1, C)) as kh*kw shifted multiply-adds.

  `pad` is ((top, bottom), (left, right)) zero padding.  XLA:CPU runs a
  grouped convolution with one channel per group several times slower than
  this fused elementwise form (BENCHMARKS.md §8).
  """
  kh, kw = k.shape[:2]
  h, w = x.shape[1:3]
  (pt, pb), (pl, pr) = pad
  ho, wo = (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1
  # padded as its own buffer: fused into the taps, the padding is slow (see `own`)
  xp = own(jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))) if pt + pb + pl + pr else x
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      y = tap * k[i, j, 0] if y is None else y + tap * k[i, j, 0]
  return y


class PatchEmbed(nnx.Module):
  """Two stride-2 3x3 ConvBNs with a GELU between: the input / 4."""

  def __init__(self, dim: int, rngs: nnx.Rngs, dtype=None):
    self.conv1 = ConvBN(3, dim // 2, rngs, ks=3, stride=2, dtype=dtype)
    self.conv2 = ConvBN(dim // 2, dim, rngs, ks=3, stride=2, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    h = x.shape[1]
    rows = stripe_rows(x, self.conv1.kernel.shape[-1], 4)
    if not rows:
      return self.rows(jnp.pad(x, ((0, 0), (3, 3), (0, 0), (0, 0))), -3, h)
    return row_stripes(lambda xs, r0: self.rows(xs, r0, h), x, rows, stride=4, halo=3)

  def rows(self, xs: Array, row0, h: int) -> Array:
    """Output rows of the input rows xs (3 halo rows each side; image rows [0, h)).

    xs row 2t + (0..2) feeds conv1 row (row0 + 3) / 2 - 1 + t; conv2 pads
    conv1's output (ceil(h / 2) rows) with zeros.
    """
    y = own(gelu(self.conv1(xs, pad=((0, 0), (1, 1)))))
    y = own(zero_outside(y, (row0 + 3) // 2 - 1, -(-h // 2)))
    return self.conv2(y, pad=((0, 0), (1, 1)))


# Output rows per stripe in `row_stripes`: a stripe of the MBConv stage's
# 4x-wide hidden activation (1024 input: 10 x 256 x 256 floats) stays in cache.
STRIPE_ROWS = 8
STRIPE_MIN_SIZE = 2**22  # elements of the widest intermediate below which whole is faster


def row_stripes(fn, x: Array, rows: int, stride: int = 1, halo: int = 1) -> Array:
  """`fn` over horizontal stripes of x (B, H, W, C), one stripe at a time (lax.map).

  Stripe i gets the input rows [i*rows*stride - halo, (i+1)*rows*stride + halo),
  zero outside the image, and the index of its first row; `fn` returns its
  `rows` output rows.  XLA:CPU writes every full-size intermediate of a
  whole-image op to memory freshly allocated, and page-faulted, on every
  call; stripe by stripe the wide intermediates stay small and in cache.
  """
  b, h, _, _ = x.shape
  n = h // (rows * stride)
  xp = jnp.pad(x, ((0, 0), (halo, halo), (0, 0), (0, 0)))

  def one(i):
    r0 = i * rows * stride
    return fn(jax.lax.dynamic_slice_in_dim(xp, r0, rows * stride + 2 * halo, axis=1), r0 - halo)

  out = jax.lax.map(one, jnp.arange(n))  # (n, B, rows, W', C')
  return jnp.moveaxis(out, 0, 1).reshape(b, n * rows, *out.shape[3:])


def stripe_rows(x: Array, width: int, stride: int) -> int:
  """Rows per stripe for `row_stripes` (a divisor of the output height), 0 for whole.

  Whole when the widest intermediate (x's rows x `width` channels) is small
  enough to stay cheap (the loop then costs more than it saves) or the
  stride does not divide the height.
  """
  b, h_in, w, _ = x.shape
  h_out = h_in // stride
  if h_in != h_out * stride or h_out <= STRIPE_ROWS or b * h_in * w * width < STRIPE_MIN_SIZE:
    return 0
  return max(d for d in range(1, STRIPE_ROWS + 1) if h_out % d == 0)


def zero_outside(y: Array, row0, h: int) -> Array:
  """y's rows (axis 1, the first one image row `row0`) that lie outside [0, h) set to 0."""
  r = row0 + jnp.arange(y.shape[1])
  return jnp.where(((r >= 0) & (r < h))[None, :, None, None], y, jnp.zeros((), y.dtype))


class MBConv(nnx.Module):
  """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the sum."""

  def __init__(self, dim: int, expand_ratio: float, rngs: nnx.Rngs, dtype=None):
    hidden = int(dim * expand_ratio)
    self.conv1 = ConvBN(dim, hidden, rngs, dtype=dtype)
    self.conv2 = ConvBN(hidden, hidden, rngs, ks=3, groups=hidden, dtype=dtype)
    self.conv3 = ConvBN(hidden, dim, rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    h, p = x.shape[1], self.conv2.pad
    rows = stripe_rows(x, self.conv2.kernel.shape[-1], 1)
    if not rows:
      return self.rows(jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0))), -p, h)
    return row_stripes(lambda xs, r0: self.rows(xs, r0, h), x, rows, halo=p)

  def rows(self, xs: Array, row0, h: int) -> Array:
    """Output rows of the input rows xs (with `pad` halo rows; image rows [0, h))."""
    p = self.conv2.pad
    y = own(gelu(self.conv1(xs)))
    y = own(zero_outside(y, row0, h))  # the depthwise conv pads with zeros
    y = own(gelu(own(self.conv2(y, pad=((0, 0), (p, p))))))
    return gelu(self.conv3(y) + xs[:, p:xs.shape[1] - p])


class PatchMerging(nnx.Module):
  """1x1 ConvBN, GELU, strided 3x3 depthwise ConvBN, GELU, 1x1 ConvBN."""

  def __init__(self, dim: int, out_dim: int, stride: int, rngs: nnx.Rngs, dtype=None):
    self.conv1 = ConvBN(dim, out_dim, rngs, dtype=dtype)
    self.conv2 = ConvBN(out_dim, out_dim, rngs, ks=3, stride=stride, groups=out_dim, dtype=dtype)
    self.conv3 = ConvBN(out_dim, out_dim, rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    h, p, s = x.shape[1], self.conv2.pad, self.conv2.stride
    rows = stripe_rows(x, self.conv2.kernel.shape[-1], s)
    if not rows:
      return self.rows(jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0))), -p, h)
    return row_stripes(lambda xs, r0: self.rows(xs, r0, h), x, rows, stride=s, halo=p)

  def rows(self, xs: Array, row0, h: int) -> Array:
    """Output rows of the input rows xs (with `pad` halo rows; image rows [0, h))."""
    p = self.conv2.pad
    y = own(gelu(self.conv1(xs)))
    y = own(zero_outside(y, row0, h))
    return self.conv3(own(gelu(own(self.conv2(y, pad=((0, 0), (p, p)))))))


@functools.lru_cache(maxsize=None)
def attention_bias_idxs(window: int) -> np.ndarray:
  """(N, N) index of each (query, key) pair's offset (|dy|, |dx|), N = window^2.

  Offsets are numbered in order of first appearance, as the reference does.
  """
  points = list(itertools.product(range(window), range(window)))
  offsets, idxs = {}, []
  for p1 in points:
    for p2 in points:
      off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
      idxs.append(offsets.setdefault(off, len(offsets)))
  n = len(points)
  return np.asarray(idxs, np.int32).reshape(n, n)


class Attention(nnx.Module):
  """Multi-head self-attention over (B, N, C) window tokens with learned offset biases."""

  def __init__(self, dim: int, num_heads: int, window: int, rngs: nnx.Rngs, dtype=None):
    self.num_heads = num_heads
    self.key_dim = dim // num_heads
    self.scale = self.key_dim**-0.5
    self.norm = LayerNorm(dim, 1e-5)
    self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.attention_biases = nnx.Param(jnp.zeros((num_heads, window * window), jnp.float32))
    self.window = window

  def __call__(self, x: Array) -> Array:
    """(B, N, C) window tokens -> (B, N, C)."""
    return self.proj(self.mix(self.qkv(self.norm(x)), self.bias()))

  def bias(self) -> Array:
    """(heads, N, N) attention bias of every (query, key) pair's offset."""
    return self.attention_biases[...][:, attention_bias_idxs(self.window)]

  def pad_qkv(self) -> Array:
    """qkv of a zero padding token: LayerNorm(0) is the norm's bias."""
    return self.qkv(self.norm.bias[...][None])[0]

  def mix(self, qkv: Array, bias: Array) -> Array:
    """(B, N, 3C) fused qkv of window tokens, `bias()` -> (B, N, C) output before `proj`."""
    b, n, c3 = qkv.shape
    nh, kd = self.num_heads, self.key_dim
    # heads first once: batched dots over a leading (b, h) run 1.5-4x faster
    # on XLA:CPU than ones that transpose (b, n, h, d) operands themselves
    qkv = qkv.reshape(b, n, nh, 3 * kd).transpose(0, 2, 1, 3)
    q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * self.scale + bias
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3).reshape(b, n, c3 // 3)


class Mlp(nnx.Module):
  """LayerNorm (eps 1e-5), fc1, GELU, fc2."""

  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=None):
    self.norm = LayerNorm(dim, 1e-5)
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(gelu(self.fc1(self.norm(x))))


def window_attention(attn: Attention, x: Array, window: int) -> Array:
  """Attention inside non-overlapping windows of (B, H, W, C), zero padding bottom / right.

  One row of windows at a time (lax.map), which keeps the qkv and logits in
  cache.  The per-token norm, qkv and output projections run on the image
  tokens only: a zero padding token's qkv is one constant vector
  (`pad_qkv`) and padding outputs are cropped, so this equals padding
  first, as the reference does, with 8-20% fewer tokens through them.
  """
  b, h, w, c = x.shape
  ph, pw = -h % window, -w % window
  nh, nw = (h + ph) // window, (w + pw) // window
  pad, bias = attn.pad_qkv(), attn.bias()  # once, not per row
  xr = jnp.pad(x, ((0, 0), (0, ph), (0, 0), (0, 0))).reshape(b, nh, window, w, c)

  def one_row(i):
    qkv = attn.qkv(attn.norm(xr[:, i]))  # (b, window, w, 3c)
    qkv = jnp.where((i * window + jnp.arange(window) < h)[None, :, None, None], qkv,
                    pad.astype(qkv.dtype))
    qkv = jnp.concatenate([qkv, jnp.broadcast_to(pad.astype(qkv.dtype), (b, window, pw, 3 * c))],
                          axis=2)
    qkv = qkv.reshape(b, window, nw, window, 3 * c).transpose(0, 2, 1, 3, 4)
    y = attn.mix(qkv.reshape(b * nw, window * window, 3 * c), bias)
    y = y.reshape(b, nw, window, window, c).transpose(0, 2, 1, 3, 4)
    return attn.proj(y.reshape(b, window, nw * window, c)[:, :, :w])

  y = jax.lax.map(one_row, jnp.arange(nh))  # (nh, b, window, w, c)
  return jnp.moveaxis(y, 0, 1).reshape(b, nh * window, w, c)[:, :h]


class TinyViTBlock(nnx.Module):
  """Windowed attention, depthwise local ConvBN, MLP (reference `TinyViTBlock`)."""

  def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float,
               local_conv_size: int, rngs: nnx.Rngs, dtype=None):
    self.window = window
    self.attn = Attention(dim, num_heads, window, rngs, dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs, dtype)
    self.local_conv = ConvBN(dim, dim, rngs, ks=local_conv_size, groups=dim, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    x = x + window_attention(self.attn, x, self.window)
    p = self.local_conv.pad
    rows = stripe_rows(x, self.mlp.fc1.out_features, 1)
    if not rows:
      return self.conv_mlp(jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0))))
    return row_stripes(lambda xs, _: self.conv_mlp(xs), x, rows, halo=p)

  def conv_mlp(self, xs: Array) -> Array:
    """Local conv then MLP residual of rows xs (with `pad` zero halo rows)."""
    p = self.local_conv.pad
    y = own(self.local_conv(xs, pad=((0, 0), (p, p))))
    return y + self.mlp(y)


class Stage(nnx.Module):
  """One reference `ConvLayer` / `BasicLayer`: blocks, then an optional patch merging."""

  def __init__(self, blocks: Sequence[nnx.Module], downsample=None):
    self.blocks = nnx.List(list(blocks))
    self.downsample = downsample

  def __call__(self, x: Array) -> Array:
    for blk in self.blocks:
      x = blk(x)
    return x if self.downsample is None else self.downsample(x)


def _stages(t: TinyViTConfig, rngs: nnx.Rngs, dtype) -> Tuple[Stage, ...]:
  dims, n = t.embed_dims, len(t.embed_dims)
  stages = []
  for i in range(n):
    if i == 0:
      blocks = [MBConv(dims[0], t.mbconv_expand_ratio, rngs, dtype) for _ in range(t.depths[0])]
    else:
      blocks = [TinyViTBlock(dims[i], t.num_heads[i], t.window_sizes[i], t.mlp_ratio,
                             t.local_conv_size, rngs, dtype) for _ in range(t.depths[i])]
    down = None
    if i < n - 1:
      stride = 1 if i == n - 2 else 2
      down = PatchMerging(dims[i], dims[i + 1], stride, rngs, dtype)
    stages.append(Stage(blocks, down))
  return tuple(stages)


class TinyViT(nnx.Module):
  """(B, S, S, 3) normalised, padded image -> (B, S/16, S/16, 256) float32.

  The reference's classifier head (`norm_head`, `head`) is never called by
  MobileSAM and is not built here.
  """

  def __init__(self, cfg: SamConfig, rngs: nnx.Rngs, dtype=None):
    t = cfg.tiny_vit
    if t is None:
      raise ValueError("TinyViT needs a SamConfig with tiny_vit set")
    self.patch_embed = PatchEmbed(t.embed_dims[0], rngs, dtype)
    self.layers = nnx.List(list(_stages(t, rngs, dtype)))
    dim, out = t.embed_dims[-1], cfg.prompt_embed_dim
    self.neck_conv1 = nnx.Conv(dim, out, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
    self.neck_ln1 = LayerNorm(out, 1e-6)
    self.neck_conv2 = nnx.Conv(out, out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                               dtype=dtype, rngs=rngs)
    self.neck_ln2 = LayerNorm(out, 1e-6)

  def __call__(self, x: Array) -> Array:
    x = self.patch_embed(x)
    for layer in self.layers:
      x = layer(x)
    x = self.neck_ln1(self.neck_conv1(x))
    x = self.neck_ln2(self.neck_conv2(x))
    return x.astype(jnp.float32)
