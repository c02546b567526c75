"""LayerNorm as the official SAM and MobileSAM code computes it, and exact GELU.

Computed in float32 whatever the input dtype, with the two-pass variance
E[(x - mean)^2] (not E[x^2] - mean^2), over the last axis: the official
`nn.LayerNorm` and `LayerNorm2d` in NHWC layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def gelu(x: Array) -> Array:
  """The exact erf GELU (`nn.GELU()`), never the tanh approximation.

  Written x * (1 + erf(x / sqrt 2)) / 2 as PyTorch computes it, not with
  `jax.nn.gelu`'s erfc: XLA:CPU expands erfc into several fusions that each
  write a full-size intermediate, several times slower on large activations.
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * np.float32(np.sqrt(0.5)).astype(x.dtype)))


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """LayerNorm over the last axis, computed in float32 (two-pass variance)."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale + bias).astype(dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over channels (= official LayerNorm and LayerNorm2d in NHWC)."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)
