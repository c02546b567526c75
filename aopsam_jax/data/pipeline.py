"""grain input pipeline over prepared array_record sources (`records`).

Global batch order is independent of the number of processes: one global
stream of record indices (shuffled per epoch with `seed`, repeated) is cut
into global batches of `global_batch`; process p reads (only) positions
[p*L, (p+1)*L) of every global batch, L = global_batch / process_count.  So
1 process x 8 devices, 2 processes x 4 devices, ... all see the same global
batches, and each host reads only its own examples (per-host sharding).

The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` (or
`grain.checkpoint.CheckpointSave/Restore` in an Orbax CheckpointManager)
resume exactly, with no example skipped or repeated.

Per-example transform (`ExampleTransform`): SAM-exact resize (PIL bilinear
longest side -> 1024) and zero padding, the prompt target and loss weight
(`targets.make_target`), and either
  * online mode: ``image`` (1024,1024,3) uint8 + ``input_hw`` for the
    in-step SAM encoder, or
  * cache mode: ``embedding`` (64,64,256) + ``image_small`` (256,256,3) from
    an `embedding_cache.EmbeddingCache` (the image is not even decoded), or
  * image mode (image-only predictors, `use_embedding=False`): ``image_small``
    + ``input_hw`` computed here from the image, with no SAM encoder anywhere.

Targets (and image mode's small images) can be kept in bounded LRUs
(`TargetMemo`, ``memo_targets``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from typing import Any, Optional

import grain
import numpy as np

from aopsam_jax.sam import geometry, transforms
from aopsam_jax.data import augment as augment_lib
from aopsam_jax.data import coco
from aopsam_jax.data.targets import TargetConfig, make_target


class ProcessShard(grain.MapDataset):
  """Positions of process `index` within every global batch of `parent`."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
    super().__init__(parent)
    if global_batch % count:
      raise ValueError(f"global batch {global_batch} not divisible by {count} processes")
    self._g, self._l, self._p = global_batch, global_batch // count, index

  def __len__(self):
    return (len(self._parent) // self._g) * self._l

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    b, r = divmod(index, self._l)
    return self._parent[b * self._g + self._p * self._l + r]

  def __str__(self):
    return f"ProcessShard(global_batch={self._g}, process={self._p})"


class TargetMemo:
  """Thread-safe LRU of computed targets, at most `capacity` images.

  A target (heatmap + weight, 256 x 256 float32) is 0.5 MiB: the default
  512 images hold ~256 MiB.  Worth it only when the same images come back
  often (small datasets, many epochs); off (0) at COCO scale, where an epoch
  is longer than any affordable memo.
  """

  def __init__(self, capacity: int):
    self.capacity = int(capacity)
    self._d: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key, compute):
    if self.capacity <= 0:
      return compute()
    with self._lock:
      if key in self._d:
        self._d.move_to_end(key)
        return self._d[key]
    v = compute()
    with self._lock:
      self._d[key] = v
      while len(self._d) > self.capacity:
        self._d.popitem(last=False)
    return v

  def __len__(self):
    return len(self._d)

  def __getstate__(self):  # grain workers start empty
    return {"capacity": self.capacity}

  def __setstate__(self, d):
    self.__init__(d["capacity"])


DEFAULT_MEMO = 512


def memo_capacity(memo_targets) -> int:
  """Config value -> LRU size: True -> DEFAULT_MEMO, False / 0 -> off, n -> n images."""
  if memo_targets is True:
    return DEFAULT_MEMO
  return max(0, int(memo_targets or 0))


@dataclasses.dataclass
class ExampleTransform:
  target_cfg: TargetConfig
  mode: str = "online"          # "online" | "cache" | "image"
  cache: Any = None             # cache mode: has lookup_rec(rec) -> (embedding, image_small)
  memo_targets: Any = False     # LRU of targets: False/0 off, True (DEFAULT_MEMO) or n images
  augment: Optional[augment_lib.AugmentConfig] = None  # training only (see augment.py)
  augment_seed: int = 0

  def __post_init__(self):
    self._memo = TargetMemo(memo_capacity(self.memo_targets))
    self._small_memo = TargetMemo(memo_capacity(self.memo_targets))

  @property
  def augments(self) -> bool:
    return self.augment is not None and self.augment.enabled

  def maybe_augment(self, rec, out: dict) -> dict:
    """Augment when the record carries its global stream position (training).
    `out` is the prepared example; its ``input_hw`` locates the padding."""
    if not self.augments or augment_lib.STREAM_INDEX not in rec:
      return out
    rng = augment_lib.example_rng(self.augment_seed, rec[augment_lib.STREAM_INDEX])
    return augment_lib.augment_example(out, self.augment, rng, out["input_hw"],
                                       self.target_cfg.img_size)

  def target(self, rec, h, w):
    def compute():
      anns = rec["annotations"]
      anns = json.loads(anns.decode() if isinstance(anns, bytes) else anns)
      return make_target(anns, h, w, self.target_cfg)
    return self._memo.get((rec.get("_source", 0), int(rec["image_id"])), compute)

  def small_image(self, rec):
    """(image_small, input_hw) of a record: the image-only predictor's input."""
    def compute():
      d = coco.decode_record(rec)
      padded, input_hw, _ = transforms.prepare_image(d["image"], self.target_cfg.img_size)
      return transforms.image_small_np(padded, input_hw), np.asarray(input_hw, np.int32)
    return self._small_memo.get((rec.get("_source", 0), int(rec["image_id"])), compute)

  def __call__(self, rec) -> dict:
    iid = int(rec["image_id"])
    h, w = int(rec["height"]), int(rec["width"])
    heat, weight = self.target(rec, h, w)
    out = {"image_id": np.int64(iid), "target": heat, "weight": weight}
    if self.mode == "cache":  # the image is not even decoded
      out["embedding"], out["image_small"] = self.cache.lookup_rec(rec)
      out["input_hw"] = np.asarray(geometry.input_hw(h, w, self.target_cfg.img_size), np.int32)
    elif self.mode == "image":  # no SAM encoder: the predictor reads only the image
      out["image_small"], out["input_hw"] = self.small_image(rec)
    else:
      d = coco.decode_record(rec)
      padded, input_hw, _ = transforms.prepare_image(d["image"], self.target_cfg.img_size)
      out["image"], out["input_hw"] = padded, input_hw
    return self.maybe_augment(rec, out)


def as_map_dataset(source) -> grain.MapDataset:
  return source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)


def train_dataset(source, transform, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  num_epochs: Optional[int] = None, worker_count: int = 0,
                  read_threads: int = 2, prefetch: int = 2) -> grain.IterDataset:
  """Infinite (num_epochs None) per-process batches of `global_batch / count`.

  `read_threads` / `prefetch` (in examples: prefetch * local batch) bound the
  reader threads and the memory of grain's prefetch buffer (its default, 16
  threads x 500 examples, is ~2.5 GB of cached embeddings).
  """
  ds = as_map_dataset(source).shuffle(seed=seed).repeat(num_epochs)
  if getattr(transform, "augments", False):
    # the position in the GLOBAL stream seeds each example's augmentation, so
    # it does not depend on the process count (tagged before sharding)
    ds = ds.map_with_index(lambda i, rec: {**rec, augment_lib.STREAM_INDEX: i})
  ds = ProcessShard(ds, global_batch, process_index, process_count)
  local = global_batch // process_count
  ds = ds.map(transform).batch(local, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(1, prefetch * local)))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


class _Padded(grain.MapDataset):
  """Source padded to `length` by repeating record 0, with a `valid` flag."""

  def __init__(self, parent, length):
    super().__init__(parent)
    self._n, self._len = len(parent), length

  def __len__(self):
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    index = index % self._len
    rec = self._parent[index if index < self._n else 0]
    return rec, index < self._n

  def __str__(self):
    return "Padded"


def eval_dataset(source, transform, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """One pass in record order, padded to whole global batches; adds `valid`."""
  n = len(source)
  n_pad = -(-n // global_batch) * global_batch
  ds = ProcessShard(_Padded(as_map_dataset(source), n_pad), global_batch,
                    process_index, process_count)

  def f(rv):
    rec, valid = rv
    out = transform(rec)
    out["valid"] = np.bool_(valid)
    return out

  local = global_batch // process_count
  return ds.map(f).batch(local, drop_remainder=True).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * local))
