"""Pure, jittable mask utilities with static shapes.

Shared by grid AMG (`amg.py`) and the AoP-SAM filtering stage.  Everything
here works on fixed-size arrays plus boolean validity flags, so a whole
image -> candidates -> NMS -> top-N pipeline can live in one `jax.jit`.

Semantics follow `segment_anything/utils/amg.py` and torchvision:
  * stability score = |logits > t + offset| / |logits > t - offset|
    (official `calculate_stability_score`); an empty union gives 0 here
    (official: 0/0 = nan, which no `>=` filter lets through).
  * boxes are XYXY with an *inclusive* max index, empty masks -> zeros
    (official `batched_mask_to_box`).
  * box IoU uses area (x1 - x0) * (y1 - y0) (torchvision `box_iou`).
  * greedy NMS visits boxes by descending score and drops every later box
    whose IoU with a kept box is strictly > the threshold (torchvision `nms`).
"""

from __future__ import annotations

import math
from itertools import product
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from aopsam_jax.sam.geometry import low_res_valid_region  # noqa: F401  (grid AMG's name for it)

Array = jax.Array


# --- scores ------------------------------------------------------------------


def stability_score(logits: Array, threshold: float = 0.0, offset: float = 1.0,
                    valid: Array | None = None, empty: float = 0.0) -> Array:
  """(..., H, W) logits -> (...,) stability score in [0, 1].

  `valid` (broadcastable to (..., H, W), bool) restricts the count to a
  region, e.g. the part of a low-res mask that covers the real image.
  `empty` is the score of an empty union (the official 0/0 gives nan).
  """
  hi = logits > (threshold + offset)
  lo = logits > (threshold - offset)
  if valid is not None:
    hi = hi & valid
    lo = lo & valid
  inter = jnp.sum(hi, axis=(-2, -1), dtype=jnp.int32)
  union = jnp.sum(lo, axis=(-2, -1), dtype=jnp.int32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), empty).astype(jnp.float32)


def _upsample_phases(x: Array, factor: int, axis: int):
  """Bilinear (align_corners=False, edge-clamped) upsampling of `x` by an
  integer factor along `axis`, returned as `factor` phase arrays: phase k
  holds output samples factor * i + k."""
  n = x.shape[axis]
  take = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)
  prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
  nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
  out = []
  for k in range(factor):
    d = (k + 0.5) / factor - 0.5
    out.append((1 + d) * x - d * prev if d < 0 else (1 - d) * x + d * nxt)
  return out


def stability_score_upsampled(logits: Array, input_hw: Array, img_size: int,
                              threshold: float = 0.0, offset: float = 1.0) -> Array:
  """Stability score of low-res logits (..., l, l) upsampled bilinearly to the
  padded input resolution `img_size` and cropped to `input_hw` -- the
  official `postprocess_masks` first stage -- without materialising the
  upsampled masks: the img_size / l phases are counted one at a time.
  """
  l = logits.shape[-1]
  f = img_size // l
  if f * l != img_size:
    raise ValueError(f"img_size {img_size} is not a multiple of the low-res size {l}")
  i = jnp.arange(l)
  inter = jnp.zeros(logits.shape[:-2], jnp.int32)
  union = jnp.zeros(logits.shape[:-2], jnp.int32)
  for kr, rows in enumerate(_upsample_phases(logits, f, logits.ndim - 2)):
    row_ok = (f * i + kr) < input_hw[0]
    for kc, ph in enumerate(_upsample_phases(rows, f, logits.ndim - 1)):
      ok = row_ok[:, None] & ((f * i + kc) < input_hw[1])[None, :]
      inter += jnp.sum((ph > threshold + offset) & ok, axis=(-2, -1), dtype=jnp.int32)
      union += jnp.sum((ph > threshold - offset) & ok, axis=(-2, -1), dtype=jnp.int32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0).astype(jnp.float32)


# --- boxes -------------------------------------------------------------------


def masks_to_boxes(masks: Array) -> Array:
  """(..., H, W) bool -> (..., 4) int32 XYXY, inclusive max; empty -> zeros."""
  h, w = masks.shape[-2:]
  rows = jnp.any(masks, axis=-1)  # (..., H)
  cols = jnp.any(masks, axis=-2)  # (..., W)
  return _edges_to_boxes(rows, cols)


def _edges_to_boxes(rows: Array, cols: Array) -> Array:
  h, w = rows.shape[-1], cols.shape[-1]
  ys = jnp.arange(h, dtype=jnp.int32)
  xs = jnp.arange(w, dtype=jnp.int32)
  y1 = jnp.max(jnp.where(rows, ys, -1), axis=-1)
  y0 = jnp.min(jnp.where(rows, ys, h), axis=-1)
  x1 = jnp.max(jnp.where(cols, xs, -1), axis=-1)
  x0 = jnp.min(jnp.where(cols, xs, w), axis=-1)
  empty = (x1 < x0) | (y1 < y0)
  box = jnp.stack([x0, y0, x1, y1], axis=-1)
  return jnp.where(empty[..., None], 0, box).astype(jnp.int32)


def box_area(boxes: Array) -> Array:
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: Array, b: Array) -> Array:
  """(N, 4), (M, 4) XYXY -> (N, M) IoU (torchvision semantics; 0 for 0/0)."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def box_xyxy_to_xywh(boxes):
  """XYXY -> XYWH (jax or numpy arrays)."""
  lib = jnp if isinstance(boxes, jax.Array) else np
  boxes = lib.asarray(boxes)
  return lib.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def uncrop_boxes(boxes: Array, crop_box: Array) -> Array:
  """Shift XYXY boxes from a crop's frame to the image frame (crop_box XYXY)."""
  off = jnp.stack([crop_box[..., 0], crop_box[..., 1], crop_box[..., 0], crop_box[..., 1]], -1)
  return boxes + off.astype(boxes.dtype)


def uncrop_points(points: Array, crop_box: Array) -> Array:
  return points + crop_box[..., :2].astype(points.dtype)


def is_box_near_crop_edge(boxes: Array, crop_box: Array, orig_box: Array,
                          atol: float = 20.0) -> Array:
  """Official `is_box_near_crop_edge`; `boxes` already in the image frame."""
  boxes = boxes.astype(jnp.float32)
  near_crop = jnp.abs(boxes - crop_box.astype(jnp.float32)) <= atol
  near_image = jnp.abs(boxes - orig_box.astype(jnp.float32)) <= atol
  return jnp.any(near_crop & ~near_image, axis=-1)


# --- selection ---------------------------------------------------------------


def sort_valid_first(scores: Array, valid: Array) -> Array:
  """Permutation putting valid entries first, each group by descending score
  (stable: equal scores keep their index order)."""
  key = jnp.where(valid, -scores.astype(jnp.float32), jnp.inf)
  return jnp.argsort(key, stable=True)


def top_k_valid(scores: Array, valid: Array, k: int) -> Tuple[Array, Array]:
  """Indices of the k best valid entries (descending score) and their flags.

  Returns (idx (k,), ok (k,)); slots past the number of valid entries have
  ok False (their idx points at arbitrary entries).  Needs k <= len(scores).
  """
  order = sort_valid_first(scores, valid)[:k]
  return order, valid[order]


def nms(boxes: Array, scores: Array, valid: Array, iou_threshold: float) -> Tuple[Array, Array]:
  """Static-shape greedy box NMS.

  boxes (N, 4) XYXY, scores (N,), valid (N,) bool.  Returns (order (N,),
  keep (N,)): `order` is the visiting order (valid boxes by descending score,
  then the invalid ones) and `keep[r]` says whether box `order[r]` survives.
  So `order[keep]` (host side) is exactly torchvision's `nms` output.  The
  loop runs only over the valid boxes, O(N) work per step, O(N) memory.
  """
  n = boxes.shape[0]
  order = sort_valid_first(scores, valid)
  b = boxes[order].astype(jnp.float32)
  n_valid = jnp.sum(valid.astype(jnp.int32))
  area = box_area(b)
  idx = jnp.arange(n)

  def body(state):
    i, suppressed = state
    bi = b[i]
    lt = jnp.maximum(bi[:2], b[:, :2])
    rb = jnp.minimum(bi[2:], b[:, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[:, 0] * wh[:, 1]
    union = area[i] + area - inter
    iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
    kill = (iou > iou_threshold) & (idx > i) & ~suppressed[i]
    return i + 1, suppressed | kill

  _, suppressed = jax.lax.while_loop(lambda s: s[0] < n_valid, body,
                                     (jnp.int32(0), jnp.zeros((n,), bool)))
  keep = (idx < n_valid) & ~suppressed
  return order, keep


def nms_top_k(boxes: Array, scores: Array, valid: Array, iou_threshold: float,
              k: int) -> Tuple[Array, Array, Array]:
  """NMS, then the first k survivors in NMS (descending score) order.

  Returns (idx (k,), ok (k,), n_kept): indices into the inputs, validity of
  each slot, and the total number of survivors (may exceed k: overflow).
  """
  order, keep = nms(boxes, scores, valid, iou_threshold)
  rank = jnp.argsort(~keep, stable=True)[:k]  # survivors first, in visiting order
  return order[rank], keep[rank], jnp.sum(keep.astype(jnp.int32))


# --- masks -------------------------------------------------------------------


def mask_iou(a: Array, b: Array) -> Array:
  """(N, H, W), (M, H, W) bool -> (N, M) mask IoU (0 where both are empty)."""
  fa = a.reshape(a.shape[0], -1).astype(jnp.float32)
  fb = b.reshape(b.shape[0], -1).astype(jnp.float32)
  inter = jnp.dot(fa, fb.T, precision=jax.lax.Precision.HIGHEST)
  union = fa.sum(-1)[:, None] + fb.sum(-1)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def boxes_from_low_res(logits: Array, input_hw: Array, original_hw: Array, img_size: int,
                       threshold: float = 0.0) -> Array:
  """Approximate full-resolution XYXY boxes of `logits > threshold` from low-res logits.

  logits (..., l, l) low-res decoder output for an input of `img_size`.  The
  official box is that of the mask upsampled to the original size.  Here
  the row/column maxima of the low-res logits over the valid region are
  upsampled in 1-D to the padded-input resolution (the official first
  bilinear stage), the first/last positive input pixels found, and mapped
  to original pixel indices (pixel centres, half-pixel convention).  Exact up
  to sub-pixel effects of the 2-D interpolation (a thin protrusion may
  enlarge a box by a pixel or two).  Empty -> zeros.  Returns float32.
  """
  from aopsam_jax.sam.transforms import interp_matrix  # local: keeps import graph small
  l = logits.shape[-1]
  ratio = img_size / l
  lr_rows = jnp.arange(l) * ratio < input_hw[0]
  lr_cols = jnp.arange(l) * ratio < input_hw[1]
  neg = jnp.float32(-1e9)
  col_prof = jnp.max(jnp.where(lr_rows[:, None], logits, neg), axis=-2)  # (..., l)
  row_prof = jnp.max(jnp.where(lr_cols[None, :], logits, neg), axis=-1)  # (..., l)
  up = interp_matrix(img_size, img_size, l, l)  # (S, l)
  hp = jax.lax.Precision.HIGHEST
  col_up = jnp.einsum("sl,...l->...s", up, col_prof, precision=hp)
  row_up = jnp.einsum("sl,...l->...s", up, row_prof, precision=hp)
  s = jnp.arange(img_size)
  cols = (col_up > threshold) & (s < input_hw[1])
  rows = (row_up > threshold) & (s < input_hw[0])
  box_in = _edges_to_boxes(rows, cols).astype(jnp.float32)  # input-frame pixel indices
  empty = ~jnp.any(cols, axis=-1) | ~jnp.any(rows, axis=-1)
  # Input pixel range [a, b] covers [a - .5, b + .5] in continuous centre
  # coordinates; original pixel i has centre (i + .5) * in / orig - .5.
  r = (original_hw.astype(jnp.float32) / input_hw.astype(jnp.float32))  # (h, w)
  rx, ry = r[1], r[0]
  x0 = jnp.ceil(box_in[..., 0] * rx - 0.5)
  y0 = jnp.ceil(box_in[..., 1] * ry - 0.5)
  x1 = jnp.floor((box_in[..., 2] + 1.0) * rx - 0.5)
  y1 = jnp.floor((box_in[..., 3] + 1.0) * ry - 0.5)
  x0 = jnp.clip(x0, 0, original_hw[1] - 1)
  y0 = jnp.clip(y0, 0, original_hw[0] - 1)
  x1 = jnp.clip(jnp.maximum(x1, x0), 0, original_hw[1] - 1)
  y1 = jnp.clip(jnp.maximum(y1, y0), 0, original_hw[0] - 1)
  box = jnp.stack([x0, y0, x1, y1], axis=-1)
  return jnp.where(empty[..., None], 0.0, box)


# --- host-side geometry (numpy; official formulas) ---------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
  """Official `build_point_grid`: (n*n, 2) xy in [0, 1], x fastest."""
  offset = 1 / (2 * n_per_side)
  one = np.linspace(offset, 1 - offset, n_per_side)
  xs = np.tile(one[None, :], (n_per_side, 1))
  ys = np.tile(one[:, None], (1, n_per_side))
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def generate_crop_boxes(im_hw: Tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
  """Official `generate_crop_boxes`: XYXY crop boxes and their layer index."""
  crop_boxes, layer_idxs = [], []
  im_h, im_w = int(im_hw[0]), int(im_hw[1])
  short_side = min(im_h, im_w)
  crop_boxes.append([0, 0, im_w, im_h])
  layer_idxs.append(0)

  def crop_len(orig_len, n_crops, overlap):
    return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

  for i_layer in range(n_layers):
    n_side = 2 ** (i_layer + 1)
    overlap = int(overlap_ratio * short_side * (2 / n_side))
    crop_w = crop_len(im_w, n_side, overlap)
    crop_h = crop_len(im_h, n_side, overlap)
    x0s = [int((crop_w - overlap) * i) for i in range(n_side)]
    y0s = [int((crop_h - overlap) * i) for i in range(n_side)]
    for x0, y0 in product(x0s, y0s):
      crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
      layer_idxs.append(i_layer + 1)
  return crop_boxes, layer_idxs
