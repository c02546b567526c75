"""Prompt-quality metrics on a validation split (host side, exact masks).

For each image, the ground truth is the same instance set the targets use
(non-crowd, area >= min_area in the 1024 frame).  Points are taken to the
ORIGINAL image frame and tested against the full-resolution masks:

  recall      share of GT instances containing at least one valid point
  precision   share of valid points inside some annotated region (any
              instance, crowd or small ones included)
  prompts     valid points per image
  duplicates  per image, sum over GT instances of max(hits - 1, 0): points
              spent on an instance that already had one
The baseline is SAM's regular grid (`build_point_grid(n)`: cell centres,
n*n points over the original image), scored identically.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Sequence

import numpy as np

from aopsam_jax.data.targets import TargetConfig
from aopsam_jax.sam.rle import segmentation_to_mask
from aopsam_jax.sam.geometry import heatmap_to_original, input_hw
from aopsam_jax.sam.mask_ops import build_point_grid


def grid_points(n: int, h0: int, w0: int) -> np.ndarray:
  """SAM `build_point_grid(n)` scaled to an h0 x w0 image -> (n*n, 2) xy."""
  return build_point_grid(n) * np.array([w0, h0])


class ImageGT:
  """Decoded masks of one image: GT instances and all annotated regions."""

  def __init__(self, anns: List[dict], h0: int, w0: int, cfg: TargetConfig):
    ih, iw = input_hw(h0, w0, cfg.img_size)
    s = (ih / h0) * (iw / w0)
    self.h0, self.w0 = h0, w0
    gt, other = [], []
    for a in anns:
      m = segmentation_to_mask(a["segmentation"], h0, w0)
      if not a.get("iscrowd", 0) and m.sum() * s >= cfg.min_area:
        gt.append(m)
      else:
        other.append(m)
    self.gt = np.stack(gt) if gt else np.zeros((0, h0, w0), bool)
    self.any = np.zeros((h0, w0), bool)
    for m in gt + other:
      self.any |= m

  def _pixels(self, points: np.ndarray):
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    return (np.clip(np.floor(pts[:, 1]).astype(np.int64), 0, self.h0 - 1),
            np.clip(np.floor(pts[:, 0]).astype(np.int64), 0, self.w0 - 1))

  def inside(self, points: np.ndarray) -> np.ndarray:
    """points (K, 2) xy in the original frame -> (N, K) bool: point k in GT instance n."""
    py, px = self._pixels(points)
    return self.gt[:, py, px]

  def counts(self, points: np.ndarray, valid: np.ndarray) -> Dict[str, float]:
    """points (K, 2) xy in the original frame; valid (K,) bool."""
    pts = np.asarray(points)[np.asarray(valid, bool)]
    py, px = self._pixels(pts)
    hits = self.inside(pts).sum(1)
    return {"gt": float(len(self.gt)), "hit": float((hits > 0).sum()),
            "points": float(len(pts)), "points_in": float(self.any[py, px].sum()),
            "dups": float(np.maximum(hits - 1, 0).sum()), "images": 1.0}


def summarize(c: Dict[str, float]) -> Dict[str, float]:
  return {"recall": c["hit"] / max(c["gt"], 1.0),
          "precision": c["points_in"] / max(c["points"], 1.0),
          "prompts_per_image": c["points"] / max(c["images"], 1.0),
          "duplicates_per_image": c["dups"] / max(c["images"], 1.0),
          "gt_instances": c["gt"]}


class PromptEvaluator:
  """Accumulates counts over images; keys are metric-name prefixes (e.g. 'k32')."""

  def __init__(self, annotations: Dict[int, tuple], cfg: TargetConfig):
    self.annotations = annotations  # image_id -> (anns, h0, w0)
    self.cfg = cfg
    self._gt_cache: Dict[int, ImageGT] = {}

  def gt(self, iid: int) -> ImageGT:
    g = self._gt_cache.get(iid)
    if g is None:
      anns, h0, w0 = self.annotations[iid]
      g = ImageGT(anns, h0, w0, self.cfg)
      if len(self._gt_cache) < 256:  # bounded memory
        self._gt_cache[iid] = g
    return g

  def evaluate(self, image_ids: Sequence[int], peaks: Dict[str, tuple]) -> Dict[str, float]:
    """peaks: name -> (coords_hm (N,K,2), valid (N,K)) for the images in order."""
    tot = {name: collections.Counter() for name in peaks}
    for i, iid in enumerate(image_ids):
      g = self.gt(int(iid))
      for name, (coords, valid) in peaks.items():
        pts = heatmap_to_original(coords[i], g.h0, g.w0, self.cfg.img_size)
        tot[name].update(g.counts(pts, valid[i]))
    return {f"{name}/{k}": v for name, c in tot.items() for k, v in summarize(c).items()}

  def grid_baseline(self, image_ids: Sequence[int], n: int = 16) -> Dict[str, float]:
    c = collections.Counter()
    for iid in image_ids:
      g = self.gt(int(iid))
      pts = grid_points(n, g.h0, g.w0)
      c.update(g.counts(pts, np.ones(len(pts), bool)))
    return {f"grid{n * n}/{k}": v for k, v in summarize(c).items()}
