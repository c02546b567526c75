"""Mask records in the official `SamAutomaticMaskGenerator.generate` format.

One formatter for every automatic method (grid AMG, AoP-SAM): binary masks at
the original image size plus per-mask scores -> a list of dicts

  segmentation     bool (H, W) array ("binary_mask"), an uncompressed RLE
                   {"size", "counts": [int]} ("uncompressed_rle") or a COCO
                   compressed RLE {"size", "counts": str} ("coco_rle")
  area             int, pixels in the mask
  bbox             [x, y, w, h] ints, the mask's box (inclusive max, as the
                   official `batched_mask_to_box`; empty mask -> zeros)
  predicted_iou    float
  point_coords     [[x, y]] floats, the prompt in the original image
  stability_score  float
  crop_box         [x, y, w, h] ints, the crop the mask came from (the whole
                   image for methods without crops)

with the official Python types, so code written against the official
generator (json.dump, pycocotools) works unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from aopsam_jax.sam import rle as rle_lib

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def check_output_mode(output_mode: str) -> str:
  if output_mode not in OUTPUT_MODES:
    raise ValueError(f"unknown output_mode {output_mode!r}; use one of {', '.join(OUTPUT_MODES)}")
  return output_mode


def mask_boxes(masks: np.ndarray) -> np.ndarray:
  """(N, H, W) bool -> (N, 4) int64 XYXY, inclusive max, empty -> zeros
  (official `batched_mask_to_box`)."""
  masks = np.asarray(masks, bool)
  rows, cols = masks.any(2), masks.any(1)
  out = np.zeros((masks.shape[0], 4), np.int64)
  for i in range(masks.shape[0]):
    ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
    if len(ys) and len(xs):
      out[i] = [xs[0], ys[0], xs[-1], ys[-1]]
  return out


def _xywh(box_xyxy) -> List[int]:
  x0, y0, x1, y1 = (int(v) for v in box_xyxy)
  return [x0, y0, x1 - x0, y1 - y0]


def masks_to_records(masks: np.ndarray, predicted_iou, stability, points,
                     crop_boxes: Optional[np.ndarray] = None,
                     output_mode: str = "binary_mask") -> List[Dict[str, Any]]:
  """(N, H, W) bool masks at the original size + (N,) scores, (N, 2) points xy
  and optional (N, 4) XYXY crop boxes (default: the whole image) -> records."""
  check_output_mode(output_mode)
  masks = np.asarray(masks, bool)
  n, h, w = masks.shape
  if crop_boxes is None:
    crop_boxes = np.tile(np.array([[0, 0, w, h]]), (n, 1))
  boxes = mask_boxes(masks)
  rles = rle_lib.encode_uncompressed(masks) if output_mode != "binary_mask" else None
  predicted_iou, stability = np.asarray(predicted_iou), np.asarray(stability)
  points, crop_boxes = np.asarray(points, np.float64), np.asarray(crop_boxes)
  records = []
  for i in range(n):
    if output_mode == "binary_mask":
      seg = masks[i]
    elif output_mode == "coco_rle":
      seg = rle_lib.compress(rles[i])
    else:
      seg = rles[i]
    records.append({
        "segmentation": seg,
        "area": int(masks[i].sum()),
        "bbox": _xywh(boxes[i]),
        "predicted_iou": float(predicted_iou[i]),
        "point_coords": [[float(v) for v in points[i]]],
        "stability_score": float(stability[i]),
        "crop_box": _xywh(crop_boxes[i]),
    })
  return records


def coco_results(records: List[Dict[str, Any]], image_id: int, **extra: Any) -> List[Dict[str, Any]]:
  """Mask records -> COCO results entries (class-agnostic `category_id` 1, compressed RLE,
  `score` = predicted IoU), each carrying the record's scores and prompt plus `extra`
  fields (e.g. `file_name`, the weights used)."""
  out = []
  for r in records:
    seg = r["segmentation"]
    if not (isinstance(seg, dict) and isinstance(seg.get("counts"), str)):
      seg = rle_lib.encode(np.asarray(seg, bool))
    out.append({"image_id": image_id, "category_id": 1, "segmentation": seg,
                "score": r["predicted_iou"], "bbox": r["bbox"], "area": r["area"],
                "predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
                "point_coords": r["point_coords"], **extra})
  return out
