"""On-disk cache of frozen SAM image embeddings (for CPU training).

Keyed by a fingerprint of the image-encoder weights (SHA-256 over the SAM
config and every encoder parameter) and a namespace (dataset/split).  Layout::

  <root>/<fingerprint[:16]>/<namespace>/
      embeddings.npy   (N, 64, 64, 256) float32   `predictor_inputs(...)[0]`
      image_small.npy  (N, 256, 256, 3) float32   `predictor_inputs(...)[1]`
      ids.json         {"fingerprint": ..., "image_ids": [...]}  (row order)

Arrays are written to temporary names and renamed, ids.json last, so a killed
build leaves no half cache and concurrent builders (several processes on one
machine) are safe.  Reads are memory-mapped.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Callable, Iterable, Sequence, Tuple

import jax
import numpy as np
from flax import nnx

from aopsam_jax.sam.params import encoder_fingerprint  # noqa: F401  (re-exported)
from aopsam_jax.aop.prompt_predictor import predictor_inputs


def make_encode_fn(sam) -> Callable:
  """jitted (padded uint8 (B,S,S,3), input_hw (B,2)) -> (embedding, image_small)."""
  graphdef, state = nnx.split(sam.image_encoder)

  @jax.jit
  def f(state, padded, input_hw):
    return predictor_inputs(nnx.merge(graphdef, state), padded, input_hw)

  return lambda padded, hw: f(state, padded, hw)


class EmbeddingCache:

  def __init__(self, root: str, fingerprint: str, namespace: str):
    self.dir = os.path.join(os.path.expanduser(root), fingerprint[:16], namespace)
    self.fingerprint = fingerprint
    self._rows = None
    self._emb = None
    self._small = None

  @property
  def complete(self) -> bool:
    return os.path.isfile(os.path.join(self.dir, "ids.json"))

  def build(self, examples: Iterable[Tuple[int, np.ndarray, np.ndarray]], count: int,
            encode: Callable, embed_shape: Sequence[int], small_shape: Sequence[int],
            progress: bool = False) -> None:
    """examples: (image_id, padded uint8 (S,S,3), input_hw (2,)) in row order."""
    if self.complete:
      return
    os.makedirs(self.dir, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_e = os.path.join(self.dir, f".embeddings.{tag}.npy")
    tmp_s = os.path.join(self.dir, f".image_small.{tag}.npy")
    emb = np.lib.format.open_memmap(tmp_e, "w+", np.float32, (count, *embed_shape))
    small = np.lib.format.open_memmap(tmp_s, "w+", np.float32, (count, *small_shape))
    ids = []
    it = examples
    if progress:
      from tqdm import tqdm
      it = tqdm(it, total=count, desc="embedding cache", leave=False)
    for row, (iid, padded, hw) in enumerate(it):
      e, s = encode(padded[None], np.asarray(hw, np.int32)[None])
      emb[row] = np.asarray(e[0])
      small[row] = np.asarray(s[0])
      ids.append(int(iid))
    if len(ids) != count:
      raise ValueError(f"cache build got {len(ids)} examples, expected {count}")
    emb.flush(); small.flush()
    del emb, small
    os.replace(tmp_e, os.path.join(self.dir, "embeddings.npy"))
    os.replace(tmp_s, os.path.join(self.dir, "image_small.npy"))
    tmp_j = os.path.join(self.dir, f".ids.{tag}.json")
    with open(tmp_j, "w") as f:
      json.dump({"fingerprint": self.fingerprint, "image_ids": ids}, f)
    os.replace(tmp_j, os.path.join(self.dir, "ids.json"))

  def _open(self):
    # Called from several grain reader threads: fill everything, then
    # publish `_rows` last (a second concurrent open is harmless).
    if self._rows is None:
      with open(os.path.join(self.dir, "ids.json")) as f:
        meta = json.load(f)
      if meta["fingerprint"] != self.fingerprint:
        raise ValueError(f"embedding cache {self.dir} belongs to other encoder weights")
      rows = {iid: r for r, iid in enumerate(meta["image_ids"])}
      self._emb = np.load(os.path.join(self.dir, "embeddings.npy"), mmap_mode="r")
      self._small = np.load(os.path.join(self.dir, "image_small.npy"), mmap_mode="r")
      self._rows = rows

  def lookup(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
    self._open()
    r = self._rows[int(image_id)]
    return np.array(self._emb[r]), np.array(self._small[r])

  def __getstate__(self):  # picklable for grain workers: reopen lazily
    d = dict(self.__dict__)
    d["_rows"] = d["_emb"] = d["_small"] = None
    return d
