"""Minimal stand-ins for the three torchvision functions `segment_anything` imports.

There is no CPU build of torchvision on this platform.  segment-anything 1.0
uses only `transforms.functional.{resize, to_pil_image}` (for uint8 HWC
images, i.e. PIL bilinear resizing) and `ops.boxes.{batched_nms, box_area}`.
These re-implementations follow torchvision's documented semantics and are
installed into `sys.modules` only when the real package is missing.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np


def to_pil_image(image):
  from PIL import Image
  return Image.fromarray(np.asarray(image))


def resize(img, size):
  # torchvision's PIL path: a (h, w) size, bilinear interpolation (antialiased).
  from PIL import Image
  h, w = size
  return img.resize((w, h), Image.BILINEAR)


def box_area(boxes):
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_iou(a, b):
  import torch
  area_a, area_b = box_area(a), box_area(b)
  lt = torch.max(a[:, None, :2], b[None, :, :2])
  rb = torch.min(a[:, None, 2:], b[None, :, 2:])
  wh = (rb - lt).clamp(min=0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes, scores, iou_threshold):
  """Greedy NMS: keep the highest score, drop boxes with IoU > threshold."""
  import torch
  order = torch.argsort(scores, descending=True, stable=True)
  boxes = boxes[order].double()
  iou = _box_iou(boxes, boxes)
  suppressed = torch.zeros(len(order), dtype=torch.bool)
  keep = []
  for i in range(len(order)):
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= iou[i] > iou_threshold
  return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(boxes, scores, idxs, iou_threshold):
  """NMS per category by offsetting boxes (torchvision's coordinate trick)."""
  import torch
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64)
  offsets = idxs.to(boxes) * (boxes.max() + 1)
  return nms(boxes + offsets[:, None], scores, iou_threshold)


def install() -> None:
  try:
    import torchvision  # noqa: F401
    return
  except ImportError:
    pass
  tv = types.ModuleType("torchvision")
  transforms = types.ModuleType("torchvision.transforms")
  functional = types.ModuleType("torchvision.transforms.functional")
  functional.resize = resize
  functional.to_pil_image = to_pil_image
  ops = types.ModuleType("torchvision.ops")
  boxes = types.ModuleType("torchvision.ops.boxes")
  boxes.batched_nms = batched_nms
  boxes.box_area = box_area
  boxes.nms = nms
  tv.transforms, transforms.functional = transforms, functional
  tv.ops, ops.boxes = ops, boxes
  for mod in (tv, transforms, functional, ops, boxes):
    # A spec lets importlib.util.find_spec("torchvision") (used by transformers) work.
    mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
  sys.modules.update({
      "torchvision": tv, "torchvision.transforms": transforms,
      "torchvision.transforms.functional": functional,
      "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
  })
