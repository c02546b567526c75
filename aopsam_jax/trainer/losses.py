"""Heatmap losses (global normalisation, so the value does not depend on
how the batch is sharded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POS_EPS = 1e-4


def focal_loss(logits, target, weight, alpha: float = 2.0, beta: float = 4.0):
  """CenterNet penalty-reduced pixel-wise focal loss.

  Positives are pixels with target == 1 (the rendered instance peaks);
  negatives are down-weighted by (1 - target)^beta near peaks.  Pixels with
  weight 0 (padding, crowd) are ignored.  Sum over the whole (global) batch
  divided by the number of positives (>= 1).  Returns (loss, num_pos).
  """
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  pos = (target >= 1.0 - POS_EPS) & (weight > 0)
  posf = pos.astype(jnp.float32)
  pos_loss = -jnp.square(1.0 - p) ** (alpha / 2) * jax.nn.log_sigmoid(logits) * posf
  neg_loss = (-(1.0 - target) ** beta * p ** alpha * jax.nn.log_sigmoid(-logits)
              * (1.0 - posf) * weight)
  num_pos = posf.sum()
  return (pos_loss.sum() + neg_loss.sum()) / jnp.maximum(num_pos, 1.0), num_pos


def bce_loss(logits, target, weight, pos_weight: float = 100.0):
  """Weighted BCE against the Gaussian target (the alternative we measured)."""
  logits = logits.astype(jnp.float32)
  w = weight * (1.0 + (pos_weight - 1.0) * target)
  l = -(target * jax.nn.log_sigmoid(logits) + (1 - target) * jax.nn.log_sigmoid(-logits))
  return (l * w).sum() / jnp.maximum(w.sum(), 1.0), (target >= 1.0 - POS_EPS).sum().astype(jnp.float32)


LOSSES = {"focal": focal_loss, "bce": bce_loss}
