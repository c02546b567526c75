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
  drawn first so small ones stay visible.  Returns RGB uint8.

  Integer arithmetic on the masked pixels only (out = ((256 - a) * pixel +
  a * colour + 128) >> 8 with a = round(256 * alpha)): no float copy of the
  image, which for a 24 MP photo would be 288 MB per copy.
  """
  out = np.array(image, np.uint8, copy=True)
  masks = [np.asarray(m, bool) for m in masks]
  colors = mask_colors(len(masks), seed).astype(np.uint16)
  a = int(round(256 * alpha))
  for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
    m = masks[i]
    blended = (256 - a) * out[m].astype(np.uint16) + a * colors[i] + 128
    out[m] = (blended >> 8).astype(np.uint8)
  return out


def fit_scale(h: int, w: int, max_side: Optional[int]) -> float:
  """Scale factor (<= 1) that brings the longest side to at most `max_side`."""
  if not max_side or max(h, w) <= max_side:
    return 1.0
  return max_side / max(h, w)


def downscale(image: np.ndarray, masks: Sequence[np.ndarray], scale: float):
  """(image, masks) at `scale` <= 1: the image box-filtered by PIL (uint8), the
  masks by nearest-pixel sampling (no full-size temporary)."""
  if scale >= 1.0:
    return np.asarray(image, np.uint8), [np.asarray(m, bool) for m in masks]
  from PIL import Image
  h, w = image.shape[:2]
  h2, w2 = max(1, round(h * scale)), max(1, round(w * scale))
  small = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(
      (w2, h2), Image.BILINEAR, reducing_gap=2.0))
  ys = np.minimum(((np.arange(h2) + 0.5) * h / h2).astype(np.int64), h - 1)
  xs = np.minimum(((np.arange(w2) + 0.5) * w / w2).astype(np.int64), w - 1)
  return small, [np.asarray(m, bool)[ys][:, xs] for m in masks]


OVERLAY_MAX_SIDE = 2048


def save_overlay(path: str, image: np.ndarray, masks: Sequence[np.ndarray],
                 points: Optional[np.ndarray] = None, boxes: Optional[np.ndarray] = None,
                 title: Optional[str] = None, labels: Optional[np.ndarray] = None,
                 dpi: int = 100, max_side: Optional[int] = OVERLAY_MAX_SIDE) -> str:
  """Write a PNG: image, coloured masks, optional points (xy, original pixels;
  green = positive label 1, red = negative 0) and XYXY boxes, and a title.

  The picture is drawn with its longest side at most `max_side` pixels
  (default 2048; None = full size): drawing costs memory per pixel of the
  figure (a 6000x4000 photo needed 2.5 GB at full size), and a preview does
  not need more.  The JSON results keep the full resolution.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  scale = fit_scale(image.shape[0], image.shape[1], max_side)
  small, masks = downscale(image, masks, scale)
  img = overlay_masks(small, masks)
  del small, masks
  h, w = img.shape[:2]
  fig = plt.figure(figsize=(w / dpi, h / dpi + (0.4 if title else 0)), dpi=dpi)
  ax = fig.add_axes([0, 0, 1, h / (h + (0.4 * dpi if title else 0))])
  ax.imshow(img)
  ax.set_xlim(-0.5, w - 0.5)
  ax.set_ylim(h - 0.5, -0.5)
  ax.axis("off")
  if points is not None and len(points):
    points = np.asarray(points, np.float32).reshape(-1, 2) * scale
    lab = np.ones(len(points), int) if labels is None else np.asarray(labels).reshape(-1)
    for val, color in ((1, "lime"), (0, "red")):
      sel = lab == val
      if sel.any():
        ax.scatter(points[sel, 0], points[sel, 1], s=18, c=color, marker="*",
                   edgecolors="black", linewidths=0.5)
  if boxes is not None:
    for x0, y0, x1, y1 in np.asarray(boxes, np.float32).reshape(-1, 4) * scale:
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.5))
  if title:
    fig.suptitle(title, fontsize=10, y=0.995, va="top")
  fig.savefig(path, dpi=dpi, format="png")  # by content: `path` may be a temporary name
  plt.close(fig)
  return path
