"""COCO-format instance segmentation read from a local directory -> TFDS.

The builder `CocoInstances` turns ``<source_dir>/<annotation json>`` plus the
images under ``<source_dir>/<image dir>`` into TFDS array_record files (no
TensorFlow needed) read back with ``tfds.data_source``.  It serves COCO 2017,
LVIS v1 (same json format; LVIS ``file_name`` is missing but ``coco_url`` holds
``.../<split>/<name>.jpg``) and local subsets such as ``coco_tiny``.

One record per image::

  image_id   int64
  file_name  text
  image      the original encoded bytes (JPEG/PNG), never re-encoded
  height, width  int32 (from the json; checked against the decoded image)
  annotations    text: JSON list of {id, category_id, iscrowd, area, bbox,
                 segmentation} exactly as in the source json (polygons,
                 uncompressed or compressed RLE).  Crowd regions are kept; the
                 target code turns them into ignore regions.

Bad input policy (documented, tested):
  * missing / unreadable / malformed annotation json -> `DatasetError`
    naming the file and the problem (the build stops cleanly).
  * an annotation referring to an unknown image, or without a usable
    segmentation -> `DatasetError` (``on_bad_annotation='error'``) or the
    annotation is dropped with a warning (``'skip'``, default).
  * an image listed in the json but absent / undecodable on disk -> skipped
    with a warning (``on_missing_image='skip'``, default) or `DatasetError`
    (``'error'``).  Skipped ids are listed in the build log.
  * an image without instances is kept (its target is all background).

Pointing it at full COCO 2017::

  <root>/annotations/instances_train2017.json  <root>/train2017/*.jpg
  <root>/annotations/instances_val2017.json    <root>/val2017/*.jpg

  builder = CocoInstances(config=coco_config("coco2017", "<root>"),
                          data_dir="<tfds dir>")
  builder.download_and_prepare()   # once; ~19 GB of array_record

or set ``--config.data.sources.coco2017.dir=<root>`` with ``configs/coco2017_vit_h.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
}
LVIS_SPLITS = {
    "train": ("annotations/lvis_v1_train.json", "train2017"),
    "val": ("annotations/lvis_v1_val.json", "val2017"),
}


class DatasetError(ValueError):
  """Unusable dataset input; the message names the file and the problem."""


# --- annotation json ---------------------------------------------------------


def _valid_segmentation(seg) -> bool:
  if isinstance(seg, list):
    return len(seg) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)
  if isinstance(seg, dict):
    return "counts" in seg and "size" in seg
  return False


def load_annotations(path: str, on_bad_annotation: str = "skip"
                     ) -> Tuple[List[dict], Dict[int, List[dict]]]:
  """Read and validate a COCO instances json.

  Returns (images, anns_by_image_id).  `images` keeps the json order; each has
  id, file_name, height, width.  Raises `DatasetError` on a missing or
  malformed file.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"annotation file not found: {path}")
  try:
    with open(path, "rb") as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DatasetError(f"annotation file {path} is not valid JSON: {e}") from None
  if not isinstance(d, dict) or not isinstance(d.get("images"), list) \
      or not isinstance(d.get("annotations"), list):
    raise DatasetError(f"annotation file {path} is not COCO instances format "
                       "(needs top-level 'images' and 'annotations' lists)")
  images = []
  seen = set()
  for i, im in enumerate(d["images"]):
    try:
      iid, h, w = int(im["id"]), int(im["height"]), int(im["width"])
    except (KeyError, TypeError, ValueError):
      raise DatasetError(f"{path}: images[{i}] lacks an integer id/height/width: {im!r:.200}") from None
    name = im.get("file_name")
    if not name and im.get("coco_url"):  # LVIS
      name = im["coco_url"].rsplit("/", 1)[-1]
    if not name:
      raise DatasetError(f"{path}: images[{i}] (id {iid}) has no file_name")
    if iid in seen:
      raise DatasetError(f"{path}: duplicate image id {iid}")
    seen.add(iid)
    images.append({"id": iid, "file_name": os.path.basename(name), "height": h, "width": w})
  by_image: Dict[int, List[dict]] = {im["id"]: [] for im in images}
  for i, a in enumerate(d["annotations"]):
    problem = None
    if not isinstance(a, dict) or "image_id" not in a:
      problem = "no image_id"
    elif int(a["image_id"]) not in by_image:
      problem = f"unknown image_id {a['image_id']}"
    elif not _valid_segmentation(a.get("segmentation")):
      problem = "missing or malformed segmentation"
    if problem:
      msg = f"{path}: annotations[{i}]: {problem}"
      if on_bad_annotation == "error":
        raise DatasetError(msg)
      log.warning("%s (skipped)", msg)
      continue
    by_image[int(a["image_id"])].append({
        "id": int(a.get("id", i)), "category_id": int(a.get("category_id", 0)),
        "iscrowd": int(a.get("iscrowd", 0)), "area": float(a.get("area", 0.0)),
        "bbox": [float(v) for v in a.get("bbox", [0, 0, 0, 0])],
        "segmentation": a["segmentation"]})
  return images, by_image


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


def iter_examples(source_dir: str, ann_file: str, image_dir: str,
                  on_missing_image: str = "skip", on_bad_annotation: str = "skip"
                  ) -> Iterator[Tuple[int, dict]]:
  """(key, example) pairs of one split, in json order; see module doc for policy."""
  images, by_image = load_annotations(os.path.join(source_dir, ann_file), on_bad_annotation)
  skipped = []
  for im in images:
    path = os.path.join(source_dir, image_dir, im["file_name"])
    reason = None
    if not os.path.isfile(path):
      reason = "file missing"
    else:
      with open(path, "rb") as f:
        data = f.read()
      reason = check_image(data, im["height"], im["width"])
    if reason:
      msg = f"image id {im['id']} ({path}): {reason}"
      if on_missing_image == "error":
        raise DatasetError(msg)
      log.warning("%s (skipped)", msg)
      skipped.append(im["id"])
      continue
    yield im["id"], {
        "image_id": im["id"], "file_name": im["file_name"], "image": data,
        "height": im["height"], "width": im["width"],
        "annotations": json.dumps(by_image[im["id"]], separators=(",", ":")),
    }
  if skipped:
    log.warning("%s: skipped %d image(s): %s", ann_file, len(skipped), skipped[:20])


# --- TFDS builder ---------------------------------------------------------------

import tensorflow_datasets as tfds  # noqa: E402  (heavy import kept below the pure helpers)


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
  """One local COCO-format dataset.  `splits`: split -> (ann json, image dir),
  both relative to `source_dir`."""
  source_dir: str = ""
  splits: Mapping[str, Tuple[str, str]] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_SPLITS))
  on_missing_image: str = "skip"
  on_bad_annotation: str = "skip"


def coco_config(name: str, source_dir: str, splits: Optional[Mapping[str, Tuple[str, str]]] = None,
                **kw) -> CocoInstancesConfig:
  return CocoInstancesConfig(name=name, source_dir=os.path.abspath(os.path.expanduser(source_dir)),
                             splits=dict(splits or DEFAULT_SPLITS), **kw)


class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation from a local directory (array_record).

  Pass ``config=coco_config(name, source_dir, splits)``; records land in
  ``<data_dir>/coco_instances/<name>/1.0.0``.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [CocoInstancesConfig(name="default")]

  # TFDS's default `code_path` probes `importlib_resources` (not a TFDS
  # install requirement); the file path is all it needs.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    from etils import epath
    return epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="COCO-format instance segmentation (images + instances json)",
        features=tfds.features.FeaturesDict({
            "image_id": tfds.features.Scalar(np.int64),
            "file_name": tfds.features.Text(),
            "image": tfds.features.Scalar(np.object_),
            "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
            "annotations": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg.source_dir:
      raise DatasetError("CocoInstances needs config=coco_config(name, source_dir, ...)")
    return {split: self._generate_examples(ann, img) for split, (ann, img) in cfg.splits.items()}

  def _generate_examples(self, ann_file, image_dir):
    cfg = self.builder_config
    yield from iter_examples(cfg.source_dir, ann_file, image_dir,
                             cfg.on_missing_image, cfg.on_bad_annotation)


def prepare(name: str, source_dir: str, data_dir: str,
            splits: Optional[Mapping[str, Tuple[str, str]]] = None, **kw) -> str:
  """Build (once) and return the TFDS data_dir holding `coco_instances/<name>`.

  Checks every split's annotation json *before* TFDS starts writing so a bad
  file stops the run with a `DatasetError` and no half-written dataset.
  """
  cfg = coco_config(name, source_dir, splits, **kw)
  for ann, _ in cfg.splits.values():
    p = os.path.join(cfg.source_dir, ann)
    if not os.path.isfile(p):
      raise DatasetError(f"annotation file not found: {p}")
  builder = CocoInstances(config=cfg, data_dir=data_dir)
  if not builder.is_prepared():
    for ann, _ in cfg.splits.values():
      load_annotations(os.path.join(cfg.source_dir, ann), cfg.on_bad_annotation)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        verify_ssl=False))
  return data_dir


def data_source(name: str, data_dir: str, split: str):
  """Random-access source (``tfds.data_source``) of a prepared dataset."""
  return tfds.data_source(f"coco_instances/{name}", data_dir=data_dir, split=split)


def decode_record(rec: Mapping) -> dict:
  """TFDS record -> python dict with the RGB uint8 image and parsed annotations."""
  from PIL import Image
  with Image.open(io.BytesIO(rec["image"])) as im:
    rgb = np.asarray(im.convert("RGB"))
  anns = rec["annotations"]
  if isinstance(anns, bytes):
    anns = anns.decode()
  return {"image_id": int(rec["image_id"]), "image": rgb, "annotations": json.loads(anns),
          "height": int(rec["height"]), "width": int(rec["width"])}
