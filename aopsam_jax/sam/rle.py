"""COCO run-length encoding and annotation decoding on the host.

COCO RLE flattens a mask in column-major (Fortran) order and stores run
lengths alternately for 0s and 1s, always starting with a run of zeros
(possibly of length 0).  The compressed form (string "counts") is
pycocotools' own: compression, decoding and areas go through pycocotools
(C; measured 25x faster than a pure-Python compressor on 64 masks of
480 x 640).  `encode_uncompressed` stays numpy: it is the official
`mask_to_rle_pytorch` (the "uncompressed_rle" output mode), vectorised over
the batch, and pycocotools has no uncompressed encoder.

`segmentation_to_mask` is the one decoder of COCO annotation segmentations
(polygons, uncompressed or compressed RLE), used by the training targets and
by evaluation.
"""

from __future__ import annotations

from typing import Dict, List, Union

import numpy as np
from pycocotools import mask as mask_utils

Rle = Dict[str, object]


def encode_uncompressed(masks: np.ndarray) -> List[Rle]:
  """(N, H, W) or (H, W) bool masks -> list of {"size": [h, w], "counts": [int, ...]}.

  Vectorised over the batch: one diff and one nonzero for all masks.
  """
  masks = np.asarray(masks)
  single = masks.ndim == 2
  if single:
    masks = masks[None]
  n, h, w = masks.shape
  flat = masks.astype(bool).transpose(0, 2, 1).reshape(n, h * w)
  if h * w == 0:
    return [{"size": [h, w], "counts": [0]} for _ in range(n)]
  # Change points: position p where flat[p] != flat[p - 1]; a leading 1 is a
  # change from an implicit 0 at p = 0 (giving the zero-length first run).
  padded = np.zeros((n, h * w + 1), bool)
  padded[:, 1:] = flat
  change = padded[:, 1:] != padded[:, :-1]
  rows, pos = np.nonzero(change)
  splits = np.searchsorted(rows, np.arange(1, n))
  out = []
  for p in np.split(pos, splits):
    edges = np.concatenate([[0], p, [h * w]])
    out.append({"size": [h, w], "counts": np.diff(edges).astype(np.int64).tolist()})
  return out


def _json_ready(rle: Rle) -> Rle:
  counts = rle["counts"]
  return {"size": [int(v) for v in rle["size"]],
          "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _pycoco(rle: Rle) -> Rle:
  """Any RLE dict -> the compressed form pycocotools' C functions take."""
  h, w = (int(v) for v in rle["size"])
  counts = rle["counts"]
  if isinstance(counts, str):
    return {"size": [h, w], "counts": counts.encode("ascii")}
  if isinstance(counts, bytes):
    return {"size": [h, w], "counts": counts}
  if int(np.sum(counts)) != h * w:
    raise ValueError(f"RLE counts sum to {int(np.sum(counts))}, expected {h * w}")
  return mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)


def compress(rle: Rle) -> Rle:
  """Uncompressed RLE -> COCO compressed RLE ({"size", "counts": str}); JSON-ready
  (the official `coco_encode_rle`)."""
  return _json_ready(_pycoco(rle))


def encode(masks: np.ndarray) -> Union[Rle, List[Rle]]:
  """Bool masks -> COCO compressed RLE (pycocotools `mask.encode`, str counts).
  (H, W) -> one dict, (N, H, W) -> a list."""
  masks = np.asarray(masks, bool)
  stack = masks[None] if masks.ndim == 2 else masks
  rles = [_json_ready(r) for r in mask_utils.encode(
      np.asfortranarray(stack.transpose(1, 2, 0).astype(np.uint8)))]
  return rles[0] if masks.ndim == 2 else rles


def decode(rle: Rle) -> np.ndarray:
  """Compressed or uncompressed RLE -> (H, W) bool mask."""
  return mask_utils.decode(_pycoco(rle)).astype(bool)


def area(rle: Rle) -> int:
  return int(mask_utils.area(_pycoco(rle)))


def segmentation_to_mask(segmentation, h: int, w: int) -> np.ndarray:
  """COCO annotation segmentation (polygons, uncompressed or compressed RLE)
  of an h x w image -> (h, w) bool."""
  if isinstance(segmentation, list):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
                             ).astype(bool)
  return decode(segmentation)
