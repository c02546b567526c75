"""From `config.data` to prepared record sources, embedding caches and transforms.

`config.data.sources` names datasets: ``{name: {format: 'coco'|'yolo', dir,
splits: {split: [ann json, image dir]}}}`` (paths relative to `dir`; for
'yolo', ``[labels dir, image dir]``).  `config.data.train` / `.val` select
``"name:split[,name:split...]"``.  Prepared records go to `config.data.dir`
(any `etils.epath` path; on a pod, storage every host sees), keyed by a
fingerprint of each split's source (`data.records`).

Every process calls `make_split` with its index, the process count and a
barrier: the records (and the embedding cache) are written in parallel,
each process its share of the shards.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Dict, List, Optional, Tuple

import grain
import numpy as np
from etils import epath

from aopsam_jax.data import coco, records, yolo
from aopsam_jax.data.coco import DatasetError
from aopsam_jax.data.embedding_cache import MultiCache
from aopsam_jax.data.pipeline import ExampleTransform


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


def data_dir(data_cfg) -> str:
  """`config.data.dir`, ~ expanded for local paths."""
  d = data_cfg.get("dir", None)
  if not d:
    raise ValueError("config.data.dir is not set (where prepared records go)")
  return d if not records.is_local(d) else os.path.abspath(os.path.expanduser(d))


def _yolo_json(out_dir: epath.Path, split: str, root: str, labels: str, images: str) -> str:
  """Convert once per labels/images listing; every process may do it (atomic, identical)."""
  key = coco.listing_fingerprint(os.path.join(root, labels), os.path.join(root, images))[:16]
  out = out_dir / f"{split}-{key}.json"
  if not out.exists():
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    yolo.yolo_to_coco(os.path.join(root, images), os.path.join(root, labels), os.fspath(tmp))
    tmp.rename(out)
  return os.fspath(out)


def prepare_source(data_cfg, name: str, split: str, *, process_index: int = 0,
                   process_count: int = 1, barrier=None, progress: bool = False) -> str:
  """Prepare one `name:split` (once per source fingerprint); returns its directory."""
  if name not in data_cfg.sources:
    raise ValueError(f"unknown dataset {name!r}; config.data.sources has {sorted(data_cfg.sources)}")
  src = data_cfg.sources[name]
  splits = dict(src["splits"])
  if split not in splits:
    raise ValueError(f"dataset {name!r} has no split {split!r} (it has {sorted(splits)})")
  root = os.path.abspath(os.path.expanduser(src["dir"])) if records.is_local(src["dir"]) else src["dir"]
  ann, images = splits[split]
  out = data_dir(data_cfg)
  if src.get("format", "coco") == "yolo":
    ann = _yolo_json(epath.Path(out) / name / "_converted", split, root, ann, images)
  return records.prepare_split(
      name, split, root, ann, images, out,
      on_missing_image=src.get("on_missing_image", "skip"),
      on_bad_annotation=src.get("on_bad_annotation", "skip"),
      process_index=process_index, process_count=process_count, barrier=barrier,
      progress=progress)


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


def make_split(data_cfg, selection: str, mode: str, target_cfg, *, sam=None, fingerprint=None,
               process_index: int = 0, process_count: int = 1, barrier=None,
               progress: bool = False, augment=None):
  """-> (random-access source, transform) for a selection of name:split.

  All processes call it (see module doc).  `augment`: an `AugmentConfig` for
  the training split (None: no augmentation), seeded with ``data_cfg.seed``.
  """
  sources, caches = [], []
  encode = None
  par = dict(process_index=process_index, process_count=process_count, barrier=barrier)
  for name, split in parse_selection(selection):
    src = records.RecordSource(prepare_source(data_cfg, name, split, progress=progress, **par))
    if len(src) == 0:
      raise DatasetError(f"dataset {name}:{split} has no usable images (see the warnings above)")
    sources.append(src)
    if mode == "cache":
      from aopsam_jax.trainer.embed_cache import build_cache, make_encode_fn
      if encode is None:
        encode = make_encode_fn(sam)
      caches.append(build_cache(data_cfg.cache_dir, fingerprint, f"{name}_{split}", src, encode,
                                sam.config, progress=progress, **par))
  source = sources[0] if len(sources) == 1 and mode != "cache" else Concat(sources)
  tr = ExampleTransform(target_cfg, mode=mode, cache=MultiCache(caches) if mode == "cache" else None,
                        memo_targets=data_cfg.memo_targets, augment=augment,
                        augment_seed=data_cfg.seed)
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


def barrier_fn(process_count: int) -> Optional[records.Barrier]:
  """A barrier over all JAX processes (None for one process)."""
  if process_count <= 1:
    return None
  from jax.experimental import multihost_utils
  return lambda name: multihost_utils.sync_global_devices(name)
