"""Turning user prompts into the decoder's static (coords, labels) form."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

# Label codes of the static prompt formulation (official SamOnnxModel).
PAD, NEGATIVE, POSITIVE, BOX_TL, BOX_BR = -1, 0, 1, 2, 3


def build_sparse_prompts(points: Optional[np.ndarray], labels: Optional[np.ndarray],
                         boxes: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  """Official token order for a batch of B prompts.

  points (B, N, 2) xy and labels (B, N) in {0, 1} (or -1 for padding), boxes
  (B, 4) XYXY, all already in the resized-input frame.  Returns coords
  (B, T, 2) float32 and labels (B, T) int32 with T = N + 1 (points only: the
  official (0, 0)/-1 padding point), N + 2 (points + box) or 2 (box only).
  """
  if points is None and boxes is None:
    raise ValueError("a prompt needs points, a box, or both")
  parts_c, parts_l = [], []
  if points is not None:
    points = np.asarray(points, np.float32)
    if labels is None:
      raise ValueError("point prompts need labels (1 = foreground, 0 = background)")
    labels = np.asarray(labels)
    if points.ndim != 3 or points.shape[-1] != 2 or labels.shape != points.shape[:2]:
      raise ValueError(f"points must be (B, N, 2) with labels (B, N); got {points.shape} and "
                       f"{labels.shape}")
    if not np.isin(labels, (PAD, NEGATIVE, POSITIVE)).all():
      raise ValueError("point labels must be 1 (foreground), 0 (background) or -1 (padding)")
    parts_c.append(points)
    parts_l.append(labels.astype(np.int32))
    b = points.shape[0]
    if boxes is None:
      parts_c.append(np.zeros((b, 1, 2), np.float32))
      parts_l.append(np.full((b, 1), PAD, np.int32))
  if boxes is not None:
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim == 1:
      boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
      raise ValueError(f"boxes must be (B, 4) XYXY; got {boxes.shape}")
    if points is not None and boxes.shape[0] != points.shape[0]:
      raise ValueError(f"{points.shape[0]} point prompts but {boxes.shape[0]} boxes")
    parts_c.append(boxes.reshape(-1, 2, 2))
    parts_l.append(np.tile(np.array([[BOX_TL, BOX_BR]], np.int32), (boxes.shape[0], 1)))
  return np.concatenate(parts_c, 1), np.concatenate(parts_l, 1)


def single_point_prompts(points_in):
  """(B, 2) positive points in the input frame -> the decoder's (coords (B, 2, 2),
  labels (B, 2)): each point followed by the official (0, 0) padding point.

  Traceable (jax.numpy); used by grid AMG and AoP-SAM alike.
  """
  import jax.numpy as jnp
  b = points_in.shape[0]
  coords = jnp.stack([points_in, jnp.zeros_like(points_in)], axis=1)
  labels = jnp.broadcast_to(jnp.array([[POSITIVE, PAD]], jnp.int32), (b, 2))
  return coords, labels
