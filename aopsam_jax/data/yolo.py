"""YOLO-segmentation labels (coco128-seg style) -> COCO instances json.

Each ``labels/<stem>.txt`` line is ``cls x1 y1 ... xn yn`` with vertices
normalised by width/height.  The converter writes one COCO json whose
``file_name`` is the image's name in `images_dir`, polygons in pixels,
``category_id = cls + 1`` and ``iscrowd = 0`` (YOLO has no crowd regions).
Images without a label file become images without instances.  Malformed
lines raise `DatasetError` naming file and line.
"""

from __future__ import annotations

import json
import os

import numpy as np
from etils import epath

from aopsam_jax.data.coco import DatasetError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def yolo_to_coco(images_dir: str, labels_dir: str, out_json: str) -> dict:
  from PIL import Image
  images, anns = [], []
  names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith(IMAGE_EXTS))
  if not names:
    raise DatasetError(f"no images in {images_dir}")
  for name in names:
    stem = os.path.splitext(name)[0]
    iid = int(stem) if stem.isdigit() else len(images) + 1
    with Image.open(os.path.join(images_dir, name)) as im:
      w, h = im.size
    images.append({"id": iid, "file_name": name, "height": h, "width": w})
    lp = os.path.join(labels_dir, stem + ".txt")
    if not os.path.isfile(lp):
      continue
    with open(lp) as f:
      for ln, line in enumerate(f, 1):
        parts = line.split()
        if not parts:
          continue
        try:
          cls = int(parts[0])
          xy = np.asarray([float(v) for v in parts[1:]], np.float64)
        except ValueError:
          raise DatasetError(f"{lp}:{ln}: not numbers") from None
        if xy.size < 6 or xy.size % 2:
          raise DatasetError(f"{lp}:{ln}: polygon needs >= 3 (x, y) pairs, got {xy.size} values")
        xy = xy.reshape(-1, 2) * np.array([w, h])
        x0, y0 = xy.min(0)
        x1, y1 = xy.max(0)
        area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
        anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cls + 1, "iscrowd": 0,
                     "area": float(area), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     "segmentation": [[round(float(v), 2) for v in xy.reshape(-1)]]})
  d = {"images": images, "annotations": anns,
       "categories": [{"id": i + 1, "name": f"class_{i}"} for i in range(80)]}
  out = epath.Path(out_json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(d))
  return d
