"""Building the on-disk cache of frozen SAM image embeddings (for CPU training).

The layout and the reader are in `aopsam_jax.data.embedding_cache`; this
module runs the encoder.  Before writing anything the builder estimates the
cache's size and refuses (`CacheTooLarge`) when the disk cannot hold it.
Every shard is written to temporary names and renamed, its id list last, and
``meta.json`` after all shards: a killed build leaves no half cache and
resumes at the first unfinished shard.  The processes of a pod build their
shards in parallel (shard s by process ``s % count``), process 0 writes
``meta.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from aopsam_jax.aop.prompt_predictor import predictor_inputs
from aopsam_jax.data import coco, records
from aopsam_jax.data import embedding_cache as ec
from aopsam_jax.data.coco import DatasetError
from aopsam_jax.sam import transforms
from aopsam_jax.sam.compile_options import jit
from aopsam_jax.sam.params import encoder_fingerprint  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
_HEADROOM = 1 << 30  # keep 1 GiB free beside the cache


class CacheTooLarge(DatasetError):
  """The embedding cache would not fit on its disk."""


def make_encode_fn(sam) -> Callable:
  """jitted (padded uint8 (B,S,S,3), input_hw (B,2)) -> (embedding, image_small), bfloat16."""
  graphdef, state = nnx.split(sam.image_encoder)

  @jit
  def f(state, padded, input_hw):
    emb, small = predictor_inputs(nnx.merge(graphdef, state), padded, input_hw)
    return emb.astype(jnp.bfloat16), small.astype(jnp.bfloat16)

  return lambda padded, hw: f(state, padded, hw)


def _free_bytes(path: str) -> int:
  p = os.path.abspath(path)
  while not os.path.exists(p):
    p = os.path.dirname(p)
  return shutil.disk_usage(p).free


def check_disk(directory: str, count: int, per_image: int, what: str) -> int:
  """Logs the estimate; raises `CacheTooLarge` when the free space is short."""
  need = count * per_image
  free = _free_bytes(directory)
  log.info("embedding cache %s: %d images x %.2f MiB = %.2f GiB at %s (%.1f GiB free)",
           what, count, per_image / 2**20, need / 2**30, directory, free / 2**30)
  if need + _HEADROOM > free:
    raise CacheTooLarge(
        f"embedding cache for {what} needs {need / 2**30:.1f} GiB at {directory} but only "
        f"{free / 2**30:.1f} GiB is free: set config.embeddings='online' (accelerators), point "
        "config.data.cache_dir at a larger disk, or train on fewer images")
  return need


def _write_shard(directory, s, lo, n, source, encode, img_size, shapes, fingerprint):
  emb_f, small_f, ids_f = ec.shard_files(s)
  tag = uuid.uuid4().hex[:8]
  tmp = [os.path.join(directory, f".{f}.{tag}.tmp.npy") for f in (emb_f, small_f)]
  arrs = [np.lib.format.open_memmap(t, "w+", ec.STORED, (n, *shape)) for t, shape in zip(tmp, shapes)]
  ids = []
  for row in range(n):
    d = coco.decode_record(source[lo + row])
    padded, hw, _ = transforms.prepare_image(d["image"], img_size)
    e, sm = encode(padded[None], np.asarray(hw, np.int32)[None])
    arrs[0][row], arrs[1][row] = ec.to_stored(e[0]), ec.to_stored(sm[0])
    ids.append(d["image_id"])
  for a in arrs:
    a.flush()
  del arrs
  for t, f in zip(tmp, (emb_f, small_f)):
    os.replace(t, os.path.join(directory, f))
  records.atomic_write_text(records.epath.Path(directory) / ids_f, json.dumps(
      {"records": fingerprint, "image_ids": ids}))


def build_cache(cache_root: str, encoder_fp: str, namespace: str, source: records.RecordSource,
                encode: Callable, sam_cfg, *, process_index: int = 0, process_count: int = 1,
                barrier: Optional[records.Barrier] = None, progress: bool = False
                ) -> ec.EmbeddingCache:
  """Build (once) the cache of `source` and return its reader."""
  directory = ec.cache_dir(cache_root, encoder_fp, namespace, source.fingerprint)
  cache = ec.EmbeddingCache(directory, encoder_fp, source.fingerprint)
  e = sam_cfg.embed_size
  shapes = ((e, e, sam_cfg.prompt_embed_dim), (4 * e, 4 * e, 3))
  done = cache.complete
  shards = [sh["count"] for sh in source.index["shards"]]
  offsets = np.concatenate([[0], np.cumsum(shards)]).astype(int)
  if not done:
    check_disk(directory, len(source), ec.bytes_per_image(*shapes), namespace)
    os.makedirs(directory, exist_ok=True)
    bar = None
    if progress and process_index == 0:
      from tqdm import tqdm
      bar = tqdm(total=len(source), desc=f"embedding cache {namespace}", leave=False)

    def write(s):
      ids_file = os.path.join(directory, ec.shard_files(s)[2])
      if shards[s] and records.read_json(records.epath.Path(ids_file)) is None:
        _write_shard(directory, s, int(offsets[s]), shards[s], source, encode,
                     sam_cfg.img_size, shapes, source.fingerprint)
      if bar is not None:
        bar.update(shards[s])

    records.run_shards(len(shards), write, process_index, process_count, barrier,
                       f"cache {namespace}")
    if bar is not None:
      bar.close()
  elif process_count > 1:
    barrier(f"cache {namespace}: shards written")
  if process_index == 0 and not done:
    records.atomic_write_text(records.epath.Path(directory) / "meta.json", json.dumps({
        "encoder": encoder_fp, "records": source.fingerprint, "dtype": "bfloat16",
        "shapes": shapes, "shards": [s for s, c in enumerate(shards) if c]}))
  if process_count > 1:
    barrier(f"cache {namespace}: meta written")
  return cache
