"""Prompt-heatmap targets aligned with SAM's input frame.

Geometry (`aopsam_jax.sam.geometry`).  An original H0 x W0 image is resized
(longest side -> 1024) to h x w and zero-padded to 1024 x 1024.  A point
(x, y) of the original image maps to ``(x * w / W0, y * h / H0)`` in the
input frame and to that / 4 in the 256 x 256 heatmap, whose pixel (i, j)
covers input pixels [4i, 4i+4) x [4j, 4j+4).

Target.  For every non-crowd instance whose mask area, measured in the
1024 input frame, is >= `min_area`: its most interior point (argmax of the
Euclidean distance transform of the mask, the image border counting as
outside; ties -> first in row-major order) is rendered as an unnormalised
Gaussian with peak exactly 1.0 on the heatmap pixel containing the point and
sigma = clip(sigma_scale * sqrt(area in heatmap pixels), min_sigma,
max_sigma).  The map is the pixel-wise maximum over instances.

Weight (loss mask).  1 inside the resized image, 0 on the padding, 0 on
heatmap pixels whose centre falls in a crowd region (unless it is an
instance peak).
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from aopsam_jax.sam import geometry
from aopsam_jax.sam.rle import segmentation_to_mask


@dataclasses.dataclass(frozen=True)
class TargetConfig:
  img_size: int = 1024
  min_area: float = 64.0      # instance area in input-frame (1024) pixels
  sigma_scale: float = 0.08   # sigma per sqrt(area) in heatmap pixels
  min_sigma: float = 1.0
  max_sigma: float = 8.0

  @property
  def heatmap_size(self) -> int:
    return geometry.low_res_size(self.img_size)


def interior_point(mask: np.ndarray) -> Tuple[float, float, float]:
  """(x, y, dist): centre of the most interior pixel of a non-empty mask.

  x, y are in the mask's pixel frame with pixel centres at +0.5.  Computed on
  the bounding-box crop padded by one background pixel, so pixels outside
  the image count as background; ties go to the first pixel in row-major
  order.
  """
  ys, xs = np.nonzero(mask)
  if ys.size == 0:
    raise ValueError("empty mask")
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  crop = np.pad(mask[y0:y1, x0:x1], 1)
  dist = ndimage.distance_transform_edt(crop)
  k = int(np.argmax(dist))
  cy, cx = divmod(k, crop.shape[1])
  return float(cx - 1 + x0) + 0.5, float(cy - 1 + y0) + 0.5, float(dist.flat[k])


def gaussian_sigma(area_hm: float, cfg: TargetConfig) -> float:
  return float(np.clip(cfg.sigma_scale * np.sqrt(area_hm), cfg.min_sigma, cfg.max_sigma))


def draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, sigma: float) -> None:
  """In place: heatmap = max(heatmap, exp(-d^2 / 2 sigma^2)) around pixel (cx, cy)."""
  hh, ww = heatmap.shape
  r = int(np.ceil(3 * sigma))
  ya, yb = max(0, cy - r), min(hh, cy + r + 1)
  xa, xb = max(0, cx - r), min(ww, cx + r + 1)
  yy = np.arange(ya, yb, dtype=np.float32)[:, None] - cy
  xx = np.arange(xa, xb, dtype=np.float32)[None, :] - cx
  g = np.exp(-(xx * xx + yy * yy) / np.float32(2 * sigma * sigma))
  np.maximum(heatmap[ya:yb, xa:xb], g, out=heatmap[ya:yb, xa:xb])


def sample_to_heatmap(mask: np.ndarray, input_hw: Sequence[int], size: int) -> np.ndarray:
  """(H0, W0) bool -> (size, size) bool: value of the original pixel under
  each heatmap pixel's centre (nearest); False on the padding."""
  h0, w0 = mask.shape
  ih, iw = int(input_hw[0]), int(input_hw[1])
  c = geometry.low_res_centres(size)
  rows = np.minimum((c * h0 / ih).astype(np.int64), h0 - 1)
  cols = np.minimum((c * w0 / iw).astype(np.int64), w0 - 1)
  out = mask[rows[:, None], cols[None, :]]
  out &= (c < ih)[:, None] & (c < iw)[None, :]
  return out


def instance_points(annotations: List[dict], h0: int, w0: int, cfg: TargetConfig):
  """Kept instances -> list of (x_hm, y_hm, area_hm, ann index) and the crowd masks."""
  ih, iw = geometry.input_hw(h0, w0, cfg.img_size)
  sx, sy = iw / w0, ih / h0
  points, crowd = [], []
  for n, a in enumerate(annotations):
    m = segmentation_to_mask(a["segmentation"], h0, w0)
    if a.get("iscrowd", 0):
      crowd.append(m)
      continue
    area_in = float(m.sum()) * sx * sy
    if area_in < cfg.min_area or not m.any():
      continue
    x, y, _ = interior_point(m)
    stride = geometry.LOW_RES_STRIDE
    points.append((x * sx / stride, y * sy / stride, area_in / stride**2, n))
  return points, crowd, (ih, iw)


def make_target(annotations: List[dict], h0: int, w0: int, cfg: TargetConfig = TargetConfig()
                ) -> Tuple[np.ndarray, np.ndarray]:
  """-> heatmap (S, S) float32 in [0, 1], weight (S, S) float32 in {0, 1}."""
  s = cfg.heatmap_size
  points, crowd, (ih, iw) = instance_points(annotations, h0, w0, cfg)
  heat = np.zeros((s, s), np.float32)
  for x, y, area_hm, _ in points:
    cx, cy = min(int(x), s - 1), min(int(y), s - 1)
    draw_gaussian(heat, cx, cy, gaussian_sigma(area_hm, cfg))
  c = geometry.low_res_centres(s)
  weight = ((c < ih)[:, None] & (c < iw)[None, :])
  for m in crowd:
    weight &= ~sample_to_heatmap(m, (ih, iw), s) | (heat >= 1.0)
  return heat, weight.astype(np.float32)
