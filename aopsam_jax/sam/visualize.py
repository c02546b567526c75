"""Overlay PNGs: coloured masks (+ optional points / boxes) over an image."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def mask_colors(n: int, seed: int = 0) -> np.ndarray:
  """(n, 3) uint8 distinct-ish colours (golden-ratio hues, fixed seed)."""
  import colorsys
  rng = np.random.default_rng(seed)
  hues = (rng.uniform() + np.arange(n) * 0.618033988749895) % 1.0
  return np.array([colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues]).reshape(n, 3).__mul__(
      255).astype(np.uint8)


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.45,
                  seed: int = 0) -> np.ndarray:
  """Blend masks (each (H, W) bool) over an RGB uint8 image; larger masks are
  drawn first so small ones stay visible.  Returns RGB uint8."""
  out = np.asarray(image, np.float32).copy()
  masks = [np.asarray(m, bool) for m in masks]
  colors = mask_colors(len(masks), seed).astype(np.float32)
  for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
    m = masks[i]
    out[m] = (1 - alpha) * out[m] + alpha * colors[i]
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_overlay(path: str, image: np.ndarray, masks: Sequence[np.ndarray],
                 points: Optional[np.ndarray] = None, boxes: Optional[np.ndarray] = None,
                 title: Optional[str] = None, labels: Optional[np.ndarray] = None,
                 dpi: int = 100) -> str:
  """Write a PNG: image, coloured masks, optional points (xy; green = positive
  label 1, red = negative 0) and XYXY boxes, and a title."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  img = overlay_masks(image, masks)
  h, w = img.shape[:2]
  fig = plt.figure(figsize=(w / dpi, h / dpi + (0.4 if title else 0)), dpi=dpi)
  ax = fig.add_axes([0, 0, 1, h / (h + (0.4 * dpi if title else 0))])
  ax.imshow(img)
  ax.set_xlim(-0.5, w - 0.5)
  ax.set_ylim(h - 0.5, -0.5)
  ax.axis("off")
  if points is not None and len(points):
    points = np.asarray(points, np.float32).reshape(-1, 2)
    lab = np.ones(len(points), int) if labels is None else np.asarray(labels).reshape(-1)
    for val, color in ((1, "lime"), (0, "red")):
      sel = lab == val
      if sel.any():
        ax.scatter(points[sel, 0], points[sel, 1], s=18, c=color, marker="*",
                   edgecolors="black", linewidths=0.5)
  if boxes is not None:
    for x0, y0, x1, y1 in np.asarray(boxes, np.float32).reshape(-1, 4):
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.5))
  if title:
    fig.suptitle(title, fontsize=10, y=0.995, va="top")
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path
