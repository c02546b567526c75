"""Inputs and on-disk state of `python -m aopsam_jax.label`.

Inputs: image files, folders (searched recursively, sorted), or COCO json
files whose `images` are looked up in the folders given beside them.  Every
image gets a stable id: its COCO id, else its 1-based position in the
sorted input list, so every process derives the same list on its own.

State: each process appends shards `shards/p<process>_<seq>.json` (written
to a dot-temp file, fsynced, renamed: a shard is either complete or absent),
each holding finished images with their results or errors and the run's
signature.  A restart reads every shard, skips the images they hold, and
process 0 finally merges them, sorted by image id, into results.json,
images.json and errors.json.  So a run killed at any point and restarted
ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence

from aopsam_jax.cli import UsageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
SHARD_RE = re.compile(r"p(\d{5})_(\d{6})\.json")
CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object"}]


@dataclasses.dataclass(frozen=True)
class Item:
  image_id: int
  path: str        # where to read it
  file_name: str   # as written in images.json / results.json


# --- inputs --------------------------------------------------------------------


def _walk(root: str, skip: Optional[str] = None) -> List[str]:
  """Image files under root, sorted; the folder `skip` (the run's --out, whose
  overlays must not become inputs of the next run) is not entered."""
  out = []
  skip = os.path.realpath(skip) if skip else None
  for d, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(x for x in dirs
                     if skip is None or os.path.realpath(os.path.join(d, x)) != skip)
    out.extend(os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS))
  return out


def _coco_items(json_path: str, roots: Sequence[str]) -> List[Item]:
  try:
    with open(json_path) as f:
      images = json.load(f)["images"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f"{json_path}: not a COCO json with an 'images' list ({e})") from None
  base = os.path.dirname(os.path.abspath(json_path))
  roots = list(roots) or [base, os.path.join(base, "images")]
  items = []
  for im in images:
    name = im["file_name"]
    cands = [os.path.join(r, name) for r in roots]
    path = next((c for c in cands if os.path.exists(c)), cands[0])
    items.append(Item(int(im["id"]), os.path.abspath(path), name))
  return items


def collect_items(inputs: Sequence[str], out: Optional[str] = None) -> List[Item]:
  """INPUT arguments -> items sorted by image id (UsageError on bad inputs);
  folders are walked without entering `out`."""
  for p in inputs:
    if not os.path.exists(p):
      raise UsageError(f"no such image, folder or COCO json: {p}")
  jsons = [p for p in inputs if p.lower().endswith(".json") and os.path.isfile(p)]
  if jsons:
    others = [p for p in inputs if p not in jsons]
    if any(not os.path.isdir(p) for p in others):
      raise UsageError("with a COCO json, the other inputs must be its image folders")
    items = [it for j in jsons for it in _coco_items(j, others)]
  else:
    seen, items = set(), []
    for p in inputs:
      found = [(f, os.path.relpath(f, p)) for f in _walk(p, out)] if os.path.isdir(p) \
          else [(p, os.path.basename(p))]
      for path, name in found:
        path = os.path.abspath(path)
        if path not in seen:
          seen.add(path)
          items.append(Item(len(items) + 1, path, name.replace(os.sep, "/")))
  if not items:
    raise UsageError(f"no images found in {' '.join(inputs)} (extensions: {' '.join(IMAGE_EXTS)})")
  ids = [it.image_id for it in items]
  if len(set(ids)) != len(ids):
    raise UsageError("duplicate image ids in the COCO json inputs")
  return sorted(items, key=lambda it: it.image_id)


def assigned(items: Sequence[Item], process_index: int, process_count: int) -> List[Item]:
  """This process' share: every process_count-th item, deterministic."""
  return [it for i, it in enumerate(items) if i % process_count == process_index]


def signature(items: Sequence[Item], settings: Dict[str, Any]) -> str:
  """Hash of everything that defines the results: the inputs and the settings."""
  blob = json.dumps({"items": [dataclasses.astuple(it) for it in items], "settings": settings},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


# --- files -------------------------------------------------------------------


def write_json_atomic(path: str, obj: Any) -> None:
  """Write to a dot-temp file in the same folder, fsync, rename over `path`."""
  d, name = os.path.split(path)
  tmp = os.path.join(d, f".{name}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class ShardStore:
  """The shards of one output folder; `sig` guards against mixing runs."""

  def __init__(self, out_dir: str, sig: str):
    self.dir = os.path.join(out_dir, "shards")
    self.sig = sig
    os.makedirs(self.dir, exist_ok=True)

  def read(self) -> Dict[int, Dict[str, Any]]:
    """image id -> entry, over every complete shard of every process."""
    done: Dict[int, Dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(self.dir, "p*_*.json"))):
      if not SHARD_RE.fullmatch(os.path.basename(path)):
        continue
      with open(path) as f:
        shard = json.load(f)
      if shard.get("signature") != self.sig:
        raise UsageError(f"{os.path.dirname(self.dir)} holds a run with other inputs or settings "
                         f"({path}); use another --out")
      for e in shard["entries"]:
        done.setdefault(int(e["id"]), e)
    return done

  def next_seq(self, process_index: int) -> int:
    mine = [SHARD_RE.fullmatch(os.path.basename(p))
            for p in glob.glob(os.path.join(self.dir, f"p{process_index:05d}_*.json"))]
    return 1 + max((int(m.group(2)) for m in mine if m), default=-1)

  def write(self, process_index: int, seq: int, entries: Iterable[Dict[str, Any]]) -> None:
    write_json_atomic(os.path.join(self.dir, f"p{process_index:05d}_{seq:06d}.json"),
                      {"signature": self.sig, "entries": list(entries)})

  def merge(self, out_dir: str, items: Sequence[Item], info: Dict[str, Any]) -> Dict[str, int]:
    """Write results.json, images.json, errors.json from the shards; -> counts."""
    done = self.read()
    missing = [it.image_id for it in items if it.image_id not in done]
    if missing:
      raise RuntimeError(f"{len(missing)} images have no results in {self.dir} "
                         f"(first ids {missing[:5]}); rerun the same command to finish them")
    entries = [done[it.image_id] for it in items]
    ok = [e for e in entries if e.get("error") is None]
    results = [r for e in ok for r in e["results"]]
    images = [{"id": e["id"], "file_name": e["file_name"], "width": e["width"],
               "height": e["height"]} for e in ok]
    errors = [{"id": e["id"], "file_name": e["file_name"], "path": e["path"],
               "error": e["error"]} for e in entries if e.get("error") is not None]
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    write_json_atomic(os.path.join(out_dir, "images.json"),
                      {"info": info, "images": images, "annotations": [],
                       "categories": CATEGORIES})
    write_json_atomic(os.path.join(out_dir, "errors.json"), errors)
    return {"images": len(ok), "masks": len(results), "errors": len(errors)}
