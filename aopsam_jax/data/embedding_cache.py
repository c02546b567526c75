"""Reading the on-disk cache of frozen SAM image embeddings (CPU training).

The cache is built by `aopsam_jax.trainer.embed_cache` (it runs the encoder);
this module only reads it.  Layout, one directory per encoder and prepared
split::

  <cache_dir>/<encoder fingerprint[:16]>/<name>_<split>-<records fingerprint[:16]>/
      shard-00000.embedding.npy    (n, 64, 64, 256) bfloat16 bits (uint16)
      shard-00000.image_small.npy  (n, 256, 256, 3) bfloat16 bits (uint16)
      shard-00000.json             image ids of the rows, written after the arrays
      ...
      meta.json                    written last: fingerprints, shards, dtype

Shard s holds the records of the prepared split's shard s, so the processes
of a pod build their shares in parallel like the records themselves.
bfloat16 halves the float32 cache (2.4 MiB per image instead of 4.75 MiB);
`lookup` returns float32 (exactly the stored bfloat16 values).  Keyed by
the encoder weights AND the prepared records, a cache never serves
embeddings of other images.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import ml_dtypes
import numpy as np
from etils import epath

from aopsam_jax.data.coco import DatasetError

STORED = np.uint16           # bfloat16 bit patterns (.npy has no bfloat16 type)
BFLOAT16 = ml_dtypes.bfloat16


def cache_dir(root: str, encoder_fingerprint: str, namespace: str, records_fingerprint: str) -> str:
  return os.fspath(epath.Path(os.path.expanduser(root)) / encoder_fingerprint[:16]
                   / f"{namespace}-{records_fingerprint[:16]}")


def bytes_per_image(embed_shape, small_shape) -> int:
  return (int(np.prod(embed_shape)) + int(np.prod(small_shape))) * np.dtype(STORED).itemsize


def shard_files(s: int) -> Tuple[str, str, str]:
  return (f"shard-{s:05d}.embedding.npy", f"shard-{s:05d}.image_small.npy", f"shard-{s:05d}.json")


def to_stored(x) -> np.ndarray:
  """float / bfloat16 array -> bfloat16 bit patterns (round to nearest even)."""
  x = np.asarray(x)
  return (x if x.dtype == BFLOAT16 else x.astype(np.float32).astype(BFLOAT16)).view(STORED)


def from_stored(x: np.ndarray) -> np.ndarray:
  return np.asarray(x).view(BFLOAT16).astype(np.float32)


class EmbeddingCache:
  """Read side: ``lookup(image_id)`` -> (embedding, image_small) float32."""

  def __init__(self, directory: str, encoder_fingerprint: str, records_fingerprint: str):
    self.dir = directory
    self.encoder_fingerprint = encoder_fingerprint
    self.records_fingerprint = records_fingerprint
    self._rows = None
    self._arrays: List[Tuple[np.ndarray, np.ndarray]] = []

  @property
  def complete(self) -> bool:
    meta = self._meta()
    return meta is not None and meta.get("records") == self.records_fingerprint \
        and meta.get("encoder") == self.encoder_fingerprint

  def _meta(self):
    try:
      with open(os.path.join(self.dir, "meta.json")) as f:
        return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  def _open(self):
    # Called from several grain reader threads: fill everything, then
    # publish `_rows` last (a second concurrent open is harmless).
    if self._rows is not None:
      return
    if not self.complete:
      raise DatasetError(f"embedding cache {self.dir} is missing or belongs to other encoder "
                         "weights / records; it is rebuilt when training starts")
    meta = self._meta()
    rows: Dict[int, Tuple[int, int]] = {}
    arrays = []
    for k, s in enumerate(meta["shards"]):
      emb_f, small_f, ids_f = shard_files(s)
      with open(os.path.join(self.dir, ids_f)) as f:
        for r, iid in enumerate(json.load(f)["image_ids"]):
          rows[int(iid)] = (k, r)
      arrays.append((np.load(os.path.join(self.dir, emb_f), mmap_mode="r"),
                     np.load(os.path.join(self.dir, small_f), mmap_mode="r")))
    self._arrays = arrays
    self._rows = rows

  def lookup(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
    self._open()
    try:
      k, r = self._rows[int(image_id)]
    except KeyError:
      raise DatasetError(f"image id {image_id} is not in the embedding cache {self.dir}; "
                         "delete that directory to rebuild it") from None
    emb, small = self._arrays[k]
    return from_stored(emb[r]), from_stored(small[r])

  def lookup_rec(self, rec) -> Tuple[np.ndarray, np.ndarray]:
    return self.lookup(int(rec["image_id"]))

  def __getstate__(self):  # picklable for grain workers: reopen lazily
    d = dict(self.__dict__)
    d["_rows"], d["_arrays"] = None, []
    return d


class MultiCache:
  """Routes `lookup_rec` to the per-source cache via the record's ``_source``."""

  def __init__(self, caches):
    self.caches = list(caches)

  def lookup_rec(self, rec):
    return self.caches[rec.get("_source", 0)].lookup(int(rec["image_id"]))
