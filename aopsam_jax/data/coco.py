"""COCO-format instance annotations: streaming parse, validation, fingerprint.

Serves COCO 2017, LVIS v1 (same json format; LVIS ``file_name`` is missing
but ``coco_url`` holds ``.../<split>/<name>.jpg``) and local subsets such as
``coco_tiny``.  `records.prepare` turns a parsed split plus its images into
array_record files; this module only reads the json.

Memory.  `parse_annotations` streams the json (`json_stream.JsonStream`) and
keeps every annotation as its JSON text grouped by image (as written in the
source when it has all of id, category_id, iscrowd, area, bbox and a valid
segmentation; otherwise normalised to those fields), images as four flat
lists: about the size of the annotation text itself (~0.5 GB for COCO 2017
train, whose `json.load` takes ~4 GB).  `load_annotations` returns parsed
dicts, for small sets (evaluation).

Bad input policy (documented, tested):
  * missing / unreadable / malformed annotation json -> `DatasetError`
    naming the file and the problem (nothing is written).
  * an annotation referring to an unknown image, or without a usable
    segmentation -> `DatasetError` (``on_bad_annotation='error'``) or the
    annotation is dropped with a warning (``'skip'``, default).
  * an image listed in the json but absent / undecodable on disk -> skipped
    with a warning (``on_missing_image='skip'``, default) or `DatasetError`
    (``'error'``); see `records`.
  * an image without instances is kept (its target is all background).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from etils import epath

from aopsam_jax.data.json_stream import JsonStream

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
}
_MAX_WARNINGS = 20  # individual bad-annotation warnings before a summary


class DatasetError(ValueError):
  """Unusable dataset input; the message names the file and the problem."""


def _valid_segmentation(seg) -> bool:
  if isinstance(seg, list):
    return len(seg) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)
  if isinstance(seg, dict):
    return "counts" in seg and "size" in seg
  return False


def _complete(a: dict) -> bool:
  """Has every field the targets and the evaluation read, with usable types."""
  return (type(a.get("id")) is int and type(a.get("category_id")) is int
          and type(a.get("iscrowd")) is int and isinstance(a.get("area"), (int, float))
          and isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4)


@dataclasses.dataclass
class CompactAnnotations:
  """One split's annotations in json image order; see module doc."""
  path: str
  ids: List[int] = dataclasses.field(default_factory=list)
  file_names: List[str] = dataclasses.field(default_factory=list)
  heights: List[int] = dataclasses.field(default_factory=list)
  widths: List[int] = dataclasses.field(default_factory=list)
  anns: Dict[int, List[str]] = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.ids)

  def annotations_json(self, image_id: int) -> str:
    return "[" + ",".join(self.anns.get(image_id, ())) + "]"

  def image(self, i: int) -> dict:
    return {"id": self.ids[i], "file_name": self.file_names[i], "height": self.heights[i],
            "width": self.widths[i]}


class _Parser:
  """Fills a `CompactAnnotations` item by item (see `parse_annotations`)."""

  def __init__(self, path: str, on_bad_annotation: str):
    self.out = CompactAnnotations(path)
    self.policy = on_bad_annotation
    self.bad = 0
    self.images_seen = False
    self.pending: Dict[int, List[str]] = {}  # annotations read before the images

  def image(self, i: int, im) -> None:
    path = self.out.path
    try:
      iid, h, w = int(im["id"]), int(im["height"]), int(im["width"])
    except (KeyError, TypeError, ValueError):
      raise DatasetError(f"{path}: images[{i}] lacks an integer id/height/width: {im!r:.200}") from None
    name = im.get("file_name")
    if not name and im.get("coco_url"):  # LVIS
      name = im["coco_url"].rsplit("/", 1)[-1]
    if not name:
      raise DatasetError(f"{path}: images[{i}] (id {iid}) has no file_name")
    if iid in self.out.anns:
      raise DatasetError(f"{path}: duplicate image id {iid}")
    o = self.out
    o.ids.append(iid); o.file_names.append(os.path.basename(name))
    o.heights.append(h); o.widths.append(w)
    o.anns[iid] = []

  def problem(self, msg: str) -> None:
    if self.policy == "error":
      raise DatasetError(msg)
    self.bad += 1
    if self.bad <= _MAX_WARNINGS:
      log.warning("%s (skipped)", msg)

  def annotation(self, i: int, a, text: str) -> None:
    path = self.out.path
    if not isinstance(a, dict) or "image_id" not in a:
      return self.problem(f"{path}: annotations[{i}]: no image_id")
    try:
      iid = int(a["image_id"])
    except (TypeError, ValueError):
      return self.problem(f"{path}: annotations[{i}]: image_id {a['image_id']!r} is not an integer")
    if self.images_seen and iid not in self.out.anns:
      return self.problem(f"{path}: annotations[{i}]: unknown image_id {iid}")
    if not _valid_segmentation(a.get("segmentation")):
      return self.problem(f"{path}: annotations[{i}]: missing or malformed segmentation")
    if not _complete(a):  # normalised; complete ones are kept as written (fast)
      text = json.dumps({
          "id": int(a.get("id", i)), "category_id": int(a.get("category_id", 0)),
          "iscrowd": int(a.get("iscrowd", 0)), "area": float(a.get("area", 0.0)),
          "bbox": [float(v) for v in a.get("bbox", [0, 0, 0, 0])],
          "segmentation": a["segmentation"]}, separators=(",", ":"))
    (self.out.anns if self.images_seen else self.pending).setdefault(iid, []).append(text)

  def finish(self) -> CompactAnnotations:
    for iid, texts in self.pending.items():
      if iid in self.out.anns:
        self.out.anns[iid].extend(texts)
      else:
        for _ in texts:
          self.problem(f"{self.out.path}: an annotation has unknown image_id {iid}")
    self.pending = {}
    if self.bad > _MAX_WARNINGS:
      log.warning("%s: %d bad annotations skipped in all", self.out.path, self.bad)
    return self.out


def _open_checked(path: str):
  p = epath.Path(path)
  if not p.is_file():
    raise DatasetError(f"annotation file not found: {path}")
  return p.open("rb")


def parse_annotations(path: str, on_bad_annotation: str = "skip") -> CompactAnnotations:
  """Stream-parse and validate a COCO instances json (see module doc).

  Raises `DatasetError` on a missing or malformed file.
  """
  parser = _Parser(path, on_bad_annotation)
  found = set()
  fmt = (f"annotation file {path} is not COCO instances format "
         "(needs top-level 'images' and 'annotations' lists)")
  try:
    with _open_checked(path) as f:
      s = JsonStream(f)
      if not s.is_next("{"):
        s.value()  # a JSON error if it is not JSON at all
        raise DatasetError(fmt)
      for key in s.members():
        if key in ("images", "annotations"):
          if not s.is_next("["):
            raise DatasetError(fmt)
          found.add(key)
          if key == "images":
            for i, item in enumerate(s.items()):
              parser.image(i, item)
          else:
            for i, (item, text) in enumerate(s.items(text=True)):
              parser.annotation(i, item, text)
          parser.images_seen |= key == "images"
        else:
          s.value()
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DatasetError(f"annotation file {path} is not valid JSON: {e}") from None
  if found != {"images", "annotations"}:
    raise DatasetError(fmt)
  return parser.finish()


def load_annotations(path: str, on_bad_annotation: str = "skip"
                     ) -> Tuple[List[dict], Dict[int, List[dict]]]:
  """(images, anns_by_image_id) as Python dicts, for small sets (evaluation).

  `images` keeps the json order; each has id, file_name, height, width.
  """
  c = parse_annotations(path, on_bad_annotation)
  images = [c.image(i) for i in range(len(c))]
  return images, {iid: [json.loads(t) for t in c.anns[iid]] for iid in c.ids}


# --- fingerprint of a split's source ----------------------------------------------

def _listing(image_dir: str) -> List[Tuple[str, int]]:
  """(name, size) of the files in `image_dir`, sorted; names only (size -1)
  where the filesystem is not local (a stat per object is slow there)."""
  if "://" in image_dir:
    p = epath.Path(image_dir)
    return sorted((c.name, -1) for c in p.iterdir()) if p.is_dir() else []
  if not os.path.isdir(image_dir):
    return []
  with os.scandir(image_dir) as it:
    return sorted((e.name, e.stat().st_size) for e in it if e.is_file())


def listing_fingerprint(*dirs: str) -> str:
  """SHA-256 over the file names and sizes of `dirs` (see `source_fingerprint`)."""
  return hashlib.sha256(json.dumps([_listing(d) for d in dirs]).encode()).hexdigest()


def source_fingerprint(ann_path: str, image_dir: str, options: Mapping) -> str:
  """SHA-256 over the annotation file's bytes, the image directory's file
  names and sizes, and the preparation options.

  Modification times are left out on purpose: copies of one dataset on
  several hosts of a pod must agree.  An edited image almost always changes
  size; an edit that keeps it exactly is not seen.
  """
  h = hashlib.sha256()
  h.update(json.dumps({k: options[k] for k in sorted(options)}, sort_keys=True).encode())
  with _open_checked(ann_path) as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  h.update(json.dumps(_listing(image_dir)).encode())
  return h.hexdigest()


# --- images ------------------------------------------------------------------------

def check_image(data: bytes, h: int, w: int) -> Optional[str]:
  """None if `data` decodes to an h x w image, else the reason."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.size != (w, h):
        return f"size {im.size[1]}x{im.size[0]} != json {h}x{w}"
  except Exception as e:  # PIL raises many types
    return f"undecodable ({type(e).__name__}: {e})"
  return None


def decode_record(rec: Mapping) -> dict:
  """Prepared record -> python dict with the RGB uint8 image and parsed annotations."""
  from PIL import Image
  with Image.open(io.BytesIO(rec["image"])) as im:
    rgb = np.asarray(im.convert("RGB"))
  anns = rec["annotations"]
  if isinstance(anns, bytes):
    anns = anns.decode()
  return {"image_id": int(rec["image_id"]), "image": rgb, "annotations": json.loads(anns),
          "height": int(rec["height"]), "width": int(rec["width"])}
