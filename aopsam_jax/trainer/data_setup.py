"""From `config.data` to prepared TFDS sources, embedding caches and transforms.

`config.data.sources` names datasets: ``{name: {format: 'coco'|'yolo', dir,
splits: {split: [ann json, image dir]}}}`` (paths relative to `dir`; for
'yolo', ``[labels dir, image dir]``).  `config.data.train` / `.val` select
``"name:split[,name:split...]"``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import grain
import numpy as np

from aopsam_jax.data import coco, yolo
from aopsam_jax.data.pipeline import ExampleTransform
from aopsam_jax.sam.transforms import get_preprocess_shape


def parse_selection(sel: str) -> List[Tuple[str, str]]:
  out = []
  for part in sel.split(","):
    part = part.strip()
    if part:
      name, _, split = part.partition(":")
      out.append((name, split or "train"))
  if not out:
    raise ValueError(f"empty dataset selection {sel!r}")
  return out


def prepare_source(data_cfg, name: str, is_writer: bool = True) -> str:
  """Build `coco_instances/<name>` once (process 0); returns the TFDS dir."""
  tfds_dir = os.path.abspath(os.path.expanduser(data_cfg.tfds_dir))
  if name not in data_cfg.sources:
    raise ValueError(f"unknown dataset {name!r}; config.data.sources has {sorted(data_cfg.sources)}")
  src = data_cfg.sources[name]
  root = os.path.abspath(os.path.expanduser(src["dir"]))
  splits = {k: tuple(v) for k, v in dict(src["splits"]).items()}
  if not is_writer:
    return tfds_dir
  if src.get("format", "coco") == "yolo":
    conv = {}
    for split, (labels, images) in splits.items():
      out = os.path.join(tfds_dir, "_converted", name, f"{split}.json")
      if not os.path.exists(out):
        tmp = out + ".tmp"
        yolo.yolo_to_coco(os.path.join(root, images), os.path.join(root, labels), tmp)
        os.replace(tmp, out)
      conv[split] = (out, os.path.join(root, images))
    splits = conv
  coco.prepare(name, root, tfds_dir, splits,
               on_missing_image=src.get("on_missing_image", "skip"),
               on_bad_annotation=src.get("on_bad_annotation", "skip"))
  return tfds_dir


class Concat(grain.MapDataset):
  """Concatenation of random-access sources; records get ``_source`` = index."""

  def __init__(self, sources):
    super().__init__([])
    self._sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self):
    return int(self._offsets[-1])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    index = index % len(self)  # grain passes indices past the end for repeats
    s = int(np.searchsorted(self._offsets, index, side="right") - 1)
    rec = dict(self._sources[s][index - int(self._offsets[s])])
    rec["_source"] = s
    return rec

  def __str__(self):
    return f"Concat({len(self._sources)})"


class MultiCache:
  """Routes `lookup` to the per-source `EmbeddingCache` via ``_source``."""

  def __init__(self, caches):
    self.caches = caches

  def lookup_rec(self, rec):
    return self.caches[rec.get("_source", 0)].lookup(int(rec["image_id"]))


class CacheTransform(ExampleTransform):

  def __call__(self, rec):
    iid = int(rec["image_id"])
    anns = rec["annotations"]
    anns = json.loads(anns.decode() if isinstance(anns, bytes) else anns)
    h, w = int(rec["height"]), int(rec["width"])
    heat, weight = self.target(iid, anns, h, w)
    emb, small = self.cache.lookup_rec(rec)
    hw = np.asarray(get_preprocess_shape(h, w, self.target_cfg.img_size), np.int32)
    return self.maybe_augment(rec, {"image_id": np.int64(iid), "target": heat, "weight": weight,
                                    "embedding": emb, "image_small": small, "input_hw": hw})


def build_cache(cache_root, fingerprint, name, split, source, encode, sam_cfg, progress):
  from aopsam_jax.sam import transforms
  from aopsam_jax.trainer.embed_cache import EmbeddingCache
  cache = EmbeddingCache(cache_root, fingerprint, f"{name}_{split}")
  if not cache.complete:
    def gen():
      for i in range(len(source)):
        d = coco.decode_record(source[i])
        padded, hw, _ = transforms.prepare_image(d["image"], sam_cfg.img_size)
        yield d["image_id"], padded, hw
    e = sam_cfg.embed_size
    cache.build(gen(), len(source), encode, (e, e, sam_cfg.prompt_embed_dim),
                (4 * e, 4 * e, 3), progress=progress)
  return cache


def make_split(data_cfg, selection: str, mode: str, target_cfg, *, sam=None, fingerprint=None,
               is_writer=True, progress=False, augment=None):
  """-> (random-access source, transform) for a selection of name:split.

  `augment`: an `AugmentConfig` for the training split (None: no augmentation),
  seeded with ``data_cfg.seed``.
  """
  sources, caches = [], []
  encode = None
  for name, split in parse_selection(selection):
    tfds_dir = prepare_source(data_cfg, name, is_writer)
    src = coco.data_source(name, tfds_dir, split)
    sources.append(src)
    if mode == "cache":
      if encode is None:
        from aopsam_jax.trainer.embed_cache import make_encode_fn
        encode = make_encode_fn(sam)
      caches.append(build_cache(data_cfg.cache_dir, fingerprint, name, split, src, encode,
                                sam.config, progress))
  source = sources[0] if len(sources) == 1 and mode != "cache" else Concat(sources)
  if mode == "cache":
    tr = CacheTransform(target_cfg, mode="cache", cache=MultiCache(caches),
                        memo_targets=data_cfg.memo_targets, augment=augment,
                        augment_seed=data_cfg.seed)
  else:
    tr = ExampleTransform(target_cfg, mode="online", memo_targets=data_cfg.memo_targets,
                          augment=augment, augment_seed=data_cfg.seed)
  return source, tr


def annotations_of(source) -> Dict[int, tuple]:
  """image_id -> (anns, h, w) for evaluation."""
  out = {}
  for i in range(len(source)):
    r = source[i]
    a = r["annotations"]
    out[int(r["image_id"])] = (json.loads(a.decode() if isinstance(a, bytes) else a),
                               int(r["height"]), int(r["width"]))
  return out
