"""Data preparation at scale: time, peak RSS and disk vs dataset size.

  python benchmarks/bench_data.py prep --sizes 1000,5000,20000
  python benchmarks/bench_data.py parse --sizes 118000 [--baseline]
  python benchmarks/bench_data.py train --sizes 1000,5000,20000 [--steps 12]

prep   COCO-format sources of N images made of the real coco_tiny train
       images and annotations, cycled (symlinked files, remapped ids), prepared
       into array_record files (`data.records`) in a fresh process each.
parse  a synthetic COCO json shaped like instances_train2017.json (N images,
       9.5 polygon annotations of ~50 vertices per image on average, ~3.8 KB of
       json per image) parsed with `coco.parse_annotations` in a fresh process.
train  short `train_and_evaluate` runs (online embeddings, vit_tiny_test) on
       the prepared N-image sources: images/s after the first logged step.
Prints markdown rows with the machine; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
COCO_TINY = os.path.join(os.environ.get("AOPSAM_DATA", os.path.join(REPO, "..", "shared", "data")),
                         "coco_tiny")


def machine() -> str:
  from aopsam_jax.sysinfo import cpu_model
  return (f"{platform.node()} | {os.cpu_count()} CPU threads ({cpu_model()}) | "
          f"load avg {os.getloadavg()[0]:.1f}")


def make_cycled_source(root: str, n: int, coco_tiny: str) -> str:
  """N images cycling coco_tiny's train images (symlinks) with their annotations."""
  with open(os.path.join(coco_tiny, "annotations", "instances_train2017.json")) as f:
    ref = json.load(f)
  by = {}
  for a in ref["annotations"]:
    by.setdefault(a["image_id"], []).append(a)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  images, anns = [], []
  for i in range(n):
    im = ref["images"][i % len(ref["images"])]
    name = f"{i:012d}.jpg"
    os.symlink(os.path.abspath(os.path.join(coco_tiny, "train2017", im["file_name"])),
               os.path.join(root, "images", name))
    images.append({"id": i + 1, "file_name": name, "height": im["height"], "width": im["width"]})
    for a in by.get(im["id"], []):
      anns.append({**a, "id": len(anns) + 1, "image_id": i + 1})
  with open(os.path.join(root, "annotations", "train.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": ref["categories"]}, f)
  return root


def write_synthetic_json(path: str, n: int, seed: int = 0) -> int:
  """COCO-2017-shaped json streamed to disk; returns its size in bytes."""
  import numpy as np
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    f.write('{"info": {"description": "synthetic"}, "images": [')
    for i in range(n):
      f.write(("," if i else "") + json.dumps({
          "license": 1, "file_name": f"{i + 1:012d}.jpg", "coco_url": "", "height": 480,
          "width": 640, "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": i + 1}))
    f.write('], "annotations": [')
    k = 0
    for i in range(n):
      for _ in range(int(rng.poisson(9.5))):
        m = int(rng.integers(6, 47)) * 2  # vertices x 2, mean ~50 coordinates
        poly = [round(float(v), 2) for v in rng.uniform(0, 480, m)]
        f.write(("," if k else "") + json.dumps({
            "segmentation": [poly], "area": float(rng.uniform(10, 5e4)), "iscrowd": 0,
            "image_id": i + 1, "bbox": [round(float(v), 2) for v in rng.uniform(0, 300, 4)],
            "category_id": int(rng.integers(1, 91)), "id": k + 1}))
        k += 1
    f.write('], "categories": [{"id": 1, "name": "thing"}]}')
  return os.path.getsize(path)


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def child(argv):
  """Runs in a fresh process: prints one JSON line of measurements."""
  from aopsam_jax.sysinfo import peak_rss_kb
  what = argv[0]
  t = time.perf_counter()
  if what == "prep":
    from aopsam_jax.data import records
    records.prepare_split("bench", "train", argv[1], "annotations/train.json", "images", argv[2])
    out = {"seconds": time.perf_counter() - t, "disk_bytes": _du(argv[2])}
  elif what == "jsonload":  # the old way, for reference
    with open(argv[1]) as f:
      d = json.load(f)
    out = {"seconds": time.perf_counter() - t, "images": len(d["images"]),
           "annotations": len(d["annotations"])}
  else:
    from aopsam_jax.data import coco
    c = coco.parse_annotations(argv[1])
    out = {"seconds": time.perf_counter() - t, "images": len(c),
           "annotations": sum(len(v) for v in c.anns.values())}
  out["peak_rss_mib"] = peak_rss_kb() / 1024
  print(json.dumps(out))


def _run_child(*args) -> dict:
  r = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=REPO))
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def bench_prep(sizes, tmp):
  print(f"machine: {machine()}\n")
  print("| images | prepare s | ms / image | peak RSS MiB | records GiB | KB / image |")
  print("|---:|---:|---:|---:|---:|---:|")
  for n in sizes:
    src = make_cycled_source(os.path.join(tmp, f"src{n}"), n, COCO_TINY)
    m = _run_child("prep", src, os.path.join(tmp, f"rec{n}"))
    print(f"| {n} | {m['seconds']:.1f} | {1e3 * m['seconds'] / n:.2f} | {m['peak_rss_mib']:.0f} | "
          f"{m['disk_bytes'] / 2**30:.2f} | {m['disk_bytes'] / n / 1e3:.0f} |", flush=True)


def bench_parse(sizes, tmp, baseline):
  print(f"machine: {machine()}\n")
  print("| images | annotations | json MB | reader | s | peak RSS MiB |")
  print("|---:|---:|---:|---|---:|---:|")
  for n in sizes:
    path = os.path.join(tmp, f"synth{n}.json")
    size = write_synthetic_json(path, n)
    for what in ("parse", "jsonload") if baseline else ("parse",):
      m = _run_child(what, path)
      name = "coco.parse_annotations" if what == "parse" else "json.load (reference)"
      print(f"| {n} | {m['annotations']} | {size / 1e6:.0f} | {name} | {m['seconds']:.1f} | "
            f"{m['peak_rss_mib']:.0f} |", flush=True)
    os.remove(path)


def bench_train(sizes, tmp, steps):
  from configs import coco_tiny
  from aopsam_jax.train import train_and_evaluate
  from aopsam_jax.trainer.io import read_metrics
  print(f"machine: {machine()}\n")
  print("| images | train images/s (online, vit_tiny_test, batch 8) |")
  print("|---:|---:|")
  val = make_cycled_source(os.path.join(tmp, "val8"), 8, COCO_TINY)
  for n in sizes:
    src = os.path.join(tmp, f"src{n}")
    if not os.path.isdir(src):
      make_cycled_source(src, n, COCO_TINY)
    c = coco_tiny.get_config()
    c.data.sources = {"bench": {"format": "coco", "dir": src, "splits": {
        "train": ["annotations/train.json", "images"]}},
                      "v": {"format": "coco", "dir": val, "splits": {
        "val": ["annotations/train.json", "images"]}}}
    c.data.train, c.data.val, c.data.dir = "bench:train", "v:val", os.path.join(tmp, f"rec{n}")
    c.embeddings, c.total_steps, c.log_every, c.eval_every = "online", steps, 2, 0
    c.grid_baselines, c.tensorboard, c.ckpt_every, c.data.memo_targets = (), False, 10 ** 6, 0
    w = os.path.join(tmp, f"work{n}")
    train_and_evaluate(c, w)
    rates = [r["images_per_s"] for r in read_metrics(os.path.join(w, "metrics.jsonl"))["train"]]
    print(f"| {n} | {sum(rates[1:]) / max(1, len(rates) - 1):.2f} |", flush=True)


def main():
  if sys.argv[1:2] == ["_child"]:
    return child(sys.argv[2:])
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("what", choices=("prep", "parse", "train"))
  p.add_argument("--sizes", default="1000,5000,20000")
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--baseline", action="store_true", help="parse: also time json.load")
  p.add_argument("--tmp", default=None, help="scratch directory (default: a new temp dir)")
  a = p.parse_args()
  sizes = [int(s) for s in a.sizes.split(",")]
  tmp = a.tmp or tempfile.mkdtemp(prefix="bench_data_")
  os.makedirs(tmp, exist_ok=True)
  {"prep": lambda: bench_prep(sizes, tmp), "parse": lambda: bench_parse(sizes, tmp, a.baseline),
   "train": lambda: bench_train(sizes, tmp, a.steps)}[a.what]()


if __name__ == "__main__":
  main()
