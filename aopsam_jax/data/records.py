"""Prepared datasets: array_record files written directly (no TensorFlow).

`prepare_split` turns one COCO-format split (annotation json + image
directory) into array_record files read back at random with `RecordSource`
(array_record's data source; grain shuffles at read time, so nothing is
shuffled or buffered at write time and memory does not grow with the
dataset).  Layout under ``data_dir`` (any `etils.epath` path: local, NFS,
``gs://`` where the installed filesystem backends support it)::

  <data_dir>/<name>/<split>-<fingerprint[:16]>/
      records-00000-of-00116.array_record   images [0, 1024) of the json
      records-00000-of-00116.array_record.json   its count / skipped ids
      ...
      index.json       written last: fingerprint, shards, counts

The fingerprint (`coco.source_fingerprint`) covers the annotation file's
bytes, the image directory's names and sizes and the options, so a changed
source is prepared again into a new directory (the old one is named in the
log) instead of training on stale records.

Pods.  Every process calls `prepare_split` with its index and a `barrier`:
shard s is written by process ``s % process_count`` (the split into shards
depends only on the json, not on the process count), then process 0 checks
every shard and writes ``index.json``.  ``data_dir`` must be storage shared
by all processes.  A killed preparation resumes: finished shards are kept.

One record per image (`encode_record`): image_id, file_name, height, width
(from the json; checked against the decoded image), the original encoded
image bytes (never re-encoded) and the annotations as compact JSON text.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import struct
import tempfile
import uuid
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from etils import epath

from aopsam_jax.data import coco
from aopsam_jax.data.coco import DatasetError

log = logging.getLogger(__name__)

FORMAT = 1
IMAGES_PER_SHARD = 1024
_MAGIC = b"AOPR"
_HEAD = struct.Struct("<4sII")

Barrier = Callable[[str], None]


# --- one record ------------------------------------------------------------------

def encode_record(image_id: int, file_name: str, height: int, width: int, annotations: str,
                  image: bytes) -> bytes:
  head = json.dumps({"image_id": image_id, "file_name": file_name, "height": height,
                     "width": width}, separators=(",", ":")).encode()
  ann = annotations.encode()
  return _HEAD.pack(_MAGIC, len(head), len(ann)) + head + ann + image


def parse_record(data: bytes) -> dict:
  """-> {image_id, file_name, height, width, annotations (JSON text), image (bytes)}."""
  magic, nh, na = _HEAD.unpack_from(data)
  if magic != _MAGIC:
    raise DatasetError("not an aopsam_jax record (bad magic); prepare the dataset again")
  o = _HEAD.size
  rec = json.loads(data[o:o + nh])
  rec["annotations"] = data[o + nh:o + nh + na].decode()
  rec["image"] = data[o + nh + na:]
  return rec


# --- small file helpers ----------------------------------------------------------

def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def atomic_write_text(path: epath.Path, text: str) -> None:
  """Write to a hidden temporary name, then rename: readers never see half a file."""
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_text(text)
  tmp.rename(path)


def read_json(path: epath.Path) -> Optional[dict]:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def run_shards(n_shards: int, write_shard: Callable[[int], None], process_index: int,
               process_count: int, barrier: Optional[Barrier], name: str) -> None:
  """Process p writes shards p, p + count, ...; then all meet at a barrier."""
  if process_count > 1 and barrier is None:
    raise ValueError("several processes need a barrier")
  for s in range(process_index, n_shards, process_count):
    write_shard(s)
  if process_count > 1:
    barrier(f"{name}: shards written")


# --- writing a split -------------------------------------------------------------

def _shard_name(s: int, n: int) -> str:
  return f"records-{s:05d}-of-{n:05d}.array_record"


def _load_image(image_dir: str, ca: coco.CompactAnnotations, j: int, on_missing_image: str
                ) -> Tuple[int, Optional[bytes]]:
  im = ca.image(j)
  path = epath.Path(image_dir) / im["file_name"]
  try:
    data = path.read_bytes()
    reason = coco.check_image(data, im["height"], im["width"])
  except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
    data, reason = None, f"file missing or unreadable ({type(e).__name__})"
  if reason:
    msg = f"image id {im['id']} ({path}): {reason}"
    if on_missing_image == "error":
      raise DatasetError(msg)
    log.warning("%s (skipped)", msg)
    return im["id"], None
  return im["id"], data


@dataclasses.dataclass
class _SplitWriter:
  out: epath.Path
  fingerprint: str
  ca: coco.CompactAnnotations
  image_dir: str
  on_missing_image: str
  images_per_shard: int
  process_index: int = 0
  threads: int = 4
  bar: object = None

  @property
  def n_shards(self) -> int:
    return max(1, math.ceil(len(self.ca) / self.images_per_shard))

  def __call__(self, s: int) -> None:
    name = _shard_name(s, self.n_shards)
    marker = self.out / (name + ".json")
    done = read_json(marker)
    lo = s * self.images_per_shard
    hi = min(len(self.ca), lo + self.images_per_shard)
    if done and done.get("fingerprint") == self.fingerprint:
      if self.bar is not None:
        self.bar.update(hi - lo)
      return
    for old in self.out.glob(f".{name}.*.tmp"):  # left by a killed run
      old.unlink()
    if is_local(self.out):
      tmp = str(self.out / f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    else:
      fd, tmp = tempfile.mkstemp(suffix=".array_record")
      os.close(fd)
    count, skipped = self._write(tmp, lo, hi)
    if is_local(self.out):
      os.replace(tmp, str(self.out / name))
    else:
      epath.Path(tmp).copy(self.out / name, overwrite=True)
      os.remove(tmp)
    atomic_write_text(marker, json.dumps({"fingerprint": self.fingerprint, "count": count,
                                          "images": [lo, hi], "skipped": skipped,
                                          "process": self.process_index}))

  def _write(self, path: str, lo: int, hi: int) -> Tuple[int, List[int]]:
    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(path, "group_size:1")
    count, skipped = 0, []
    load = lambda j: _load_image(self.image_dir, self.ca, j, self.on_missing_image)
    try:
      with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
        for start in range(lo, hi, 64):  # bounded: 64 images in flight
          for j, (iid, data) in zip(range(start, hi), pool.map(load, range(start, min(hi, start + 64)))):
            if data is None:
              skipped.append(iid)
            else:
              c = self.ca
              w.write(encode_record(iid, c.file_names[j], c.heights[j], c.widths[j],
                                    c.annotations_json(iid), data))
              count += 1
            if self.bar is not None:
              self.bar.update(1)
    finally:
      w.close()
    return count, skipped


def _write_index(out: epath.Path, fingerprint: str, n_shards: int, meta: Mapping) -> None:
  shards, skipped = [], []
  for s in range(n_shards):
    name = _shard_name(s, n_shards)
    m = read_json(out / (name + ".json"))
    if not m or m.get("fingerprint") != fingerprint:
      raise DatasetError(f"{out / name}: shard missing after preparation (did the process "
                         "that writes it fail?); run again to finish it")
    shards.append({"file": name, "count": m["count"]})
    skipped += m["skipped"]
  if skipped:
    log.warning("%s: skipped %d image(s): %s", out, len(skipped), skipped[:20])
  atomic_write_text(out / "index.json", json.dumps({
      "format": FORMAT, "fingerprint": fingerprint, **meta,
      "num_records": sum(s["count"] for s in shards), "skipped_image_ids": skipped,
      "shards": shards}, indent=1))


def _note_stale(base: epath.Path, split: str, out: epath.Path) -> None:
  if not base.is_dir():
    return
  old = [p for p in base.glob(f"{split}-*") if p != out and (p / "index.json").exists()]
  if old:
    log.warning("the source of %s changed since it was prepared: preparing it again into %s "
                "(delete %s to free its disk space)", split, out, ", ".join(map(str, old)))


def prepare_split(name: str, split: str, source_dir: str, ann_file: str, image_dir: str,
                  data_dir: str, *, on_missing_image: str = "skip", on_bad_annotation: str = "skip",
                  process_index: int = 0, process_count: int = 1,
                  barrier: Optional[Barrier] = None, images_per_shard: int = IMAGES_PER_SHARD,
                  progress: bool = False) -> str:
  """Prepare (once per source fingerprint) and return the split's directory.

  `ann_file` / `image_dir` are relative to `source_dir` (or absolute).  All
  processes call this with the same arguments (see module doc).
  """
  ann_path = os.path.join(source_dir, ann_file)
  img_dir = os.path.join(source_dir, image_dir)
  opts = {"format": FORMAT, "on_missing_image": on_missing_image,
          "on_bad_annotation": on_bad_annotation, "images_per_shard": images_per_shard}
  fp = coco.source_fingerprint(ann_path, img_dir, opts)
  base = epath.Path(data_dir) / name
  out = base / f"{split}-{fp[:16]}"
  done = _index_of(out, fp) is not None
  n_shards = 0
  if not done:
    _note_stale(base, split, out)
    ca = coco.parse_annotations(ann_path, on_bad_annotation)
    out.mkdir(parents=True, exist_ok=True)
    writer = _SplitWriter(out, fp, ca, img_dir, on_missing_image, images_per_shard, process_index)
    n_shards = writer.n_shards
    if progress:  # this process's share
      from tqdm import tqdm
      mine = sum(min(len(ca), (s + 1) * images_per_shard) - s * images_per_shard
                 for s in range(process_index, n_shards, process_count))
      writer.bar = tqdm(total=mine, desc=f"preparing {name}:{split}", leave=False)
    run_shards(n_shards, writer, process_index, process_count, barrier, f"{name}:{split}")
    if writer.bar is not None:
      writer.bar.close()
  elif process_count > 1:
    barrier(f"{name}:{split}: shards written")
  if process_index == 0 and not done:
    _write_index(out, fp, n_shards, {"name": name, "split": split, "annotations": ann_path,
                                     "images": img_dir, "options": opts})
  if process_count > 1:
    barrier(f"{name}:{split}: indexed")
  if _index_of(out, fp) is None:
    raise DatasetError(f"{out}/index.json not found after preparation: data.dir must be storage "
                       f"that every process sees (process {process_index} does not see "
                       "process 0's files)")
  return os.fspath(out)


def _index_of(out: epath.Path, fingerprint: str) -> Optional[dict]:
  idx = read_json(out / "index.json")
  return idx if idx and idx.get("fingerprint") == fingerprint else None


def prepare(name: str, source_dir: str, data_dir: str,
            splits: Optional[Mapping[str, Tuple[str, str]]] = None, **kw) -> Dict[str, str]:
  """`prepare_split` for every split -> {split: prepared directory}."""
  return {split: prepare_split(name, split, source_dir, ann, img, data_dir, **kw)
          for split, (ann, img) in dict(splits or coco.DEFAULT_SPLITS).items()}


# --- reading --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _FileInstruction:  # array_record's FileInstruction protocol: no file opened to count
  filename: str
  skip: int
  take: int
  examples_in_shard: int


class RecordSource:
  """Random access to a prepared split: ``len()``, ``src[i]`` -> record dict."""

  def __init__(self, split_dir: str):
    self.dir = epath.Path(split_dir)
    self.index = read_json(self.dir / "index.json")
    if self.index is None:
      raise DatasetError(f"{split_dir} is not a prepared split (no index.json); prepare it first")
    self._files = [_FileInstruction(os.fspath(self.dir / s["file"]), 0, s["count"], s["count"])
                   for s in self.index["shards"] if s["count"]]
    self._n = int(self.index["num_records"])
    self._src = None

  @property
  def fingerprint(self) -> str:
    return self.index["fingerprint"]

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._n:
      raise IndexError(f"record {i} of {self._n}")
    if self._src is None:
      from array_record.python.array_record_data_source import ArrayRecordDataSource
      self._src = ArrayRecordDataSource(self._files)
    return parse_record(self._src[i])

  def __getstate__(self):  # picklable for grain workers: reopen lazily
    d = dict(self.__dict__)
    d["_src"] = None
    return d

  def __repr__(self):
    return f"RecordSource({os.fspath(self.dir)!r}, {self._n} records)"
