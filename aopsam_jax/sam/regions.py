"""Small-region clean-up of masks (official `min_mask_region_area`), host side.

The official generator uses OpenCV's `connectedComponentsWithStats` with
8-connectivity; here `scipy.ndimage.label` with a full 3x3 structuring
element gives the same components (both number labels in raster order of
their first pixel, which matters only for the "keep the largest" tie-break),
so there is no OpenCV dependency.  Tested against the official functions in
tests/test_amg.py where OpenCV is installed.
"""

from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from aopsam_jax.sam import mask_ops
from aopsam_jax.sam.records import mask_boxes

_EIGHT = np.ones((3, 3), bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
  """Official `remove_small_regions`: fill holes ("holes") or drop islands
  ("islands") smaller than `area_thresh` pixels -> (mask, changed)."""
  if mode not in ("holes", "islands"):
    raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
  holes = mode == "holes"
  working = np.asarray(mask, bool) ^ holes
  regions, n = ndimage.label(working, structure=_EIGHT)
  sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
  small = np.flatnonzero(sizes < area_thresh) + 1
  if len(small) == 0:
    return mask, False
  if holes:
    fill = np.concatenate([[0], small])
  else:
    fill = np.setdiff1d(np.arange(1, n + 1), small)
    if len(fill) == 0:  # every island is small: keep the largest
      fill = np.array([int(np.argmax(sizes)) + 1])
  return np.isin(regions, fill), True


def clean_masks(masks: np.ndarray, min_area: int) -> Tuple[np.ndarray, np.ndarray]:
  """Holes then islands on each mask -> (new masks (N, H, W), unchanged (N,) bool)."""
  out = np.empty_like(np.asarray(masks, bool))
  unchanged = np.ones(len(out), bool)
  for i, m in enumerate(masks):
    m, changed_h = remove_small_regions(m, min_area, "holes")
    m, changed_i = remove_small_regions(m, min_area, "islands")
    out[i] = m
    unchanged[i] = not (changed_h or changed_i)
  return out, unchanged


def postprocess_small_regions(masks: np.ndarray, min_area: int,
                              nms_thresh: float) -> Tuple[np.ndarray, np.ndarray]:
  """Official `SamAutomaticMaskGenerator.postprocess_small_regions` on masks.

  Cleans every mask, then box NMS over the new boxes with score 1 for
  unchanged and 0 for changed masks (so NMS prefers masks that needed no
  clean-up) -> (cleaned masks of the survivors, their indices into `masks`),
  both in the official output order.
  """
  if len(masks) == 0:
    return np.asarray(masks, bool), np.zeros((0,), np.int64)
  new, unchanged = clean_masks(masks, min_area)
  boxes = mask_boxes(new).astype(np.float32)
  order, keep = mask_ops.nms(jnp.asarray(boxes), jnp.asarray(unchanged.astype(np.float32)),
                             jnp.ones(len(boxes), bool), nms_thresh)
  idx = np.asarray(order)[np.asarray(keep)]
  return new[idx], idx
