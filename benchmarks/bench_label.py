"""`python -m aopsam_jax.label` throughput: 1 process vs N processes on one machine.

  python benchmarks/bench_label.py --images 24 --processes 1,2          # CPU VM
  python benchmarks/bench_label.py --images 64 --processes 1 --sam vit_b --batch 4   # a GPU

Writes --images JPEGs (random crops and scales of the bundled sample, 320 to
640 px on the long side) and labels them with the real command in
subprocesses (`--processes 2`: two jax.distributed processes on localhost,
each with its own devices).  Per run: wall time, images/s after compilation
(the slowest process' images / its time after its compile), the share of the
time the main loop waited for the host input pipeline (decode, resize, pad),
peak RSS per process and (GPU) peak device memory.  `--sam vit_b` swaps the
demo bundle's random vit_tiny_test SAM for a random-init vit_b (same
predictor: both have 256-channel embeddings), for realistic encoder cost.
Writes benchmarks/results/label_<platform>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def make_images(folder: str, n: int) -> None:
  import numpy as np
  from PIL import Image
  from aopsam_jax.sam.image_io import load_image, sample_image_path
  img = load_image(sample_image_path())
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    h, w = img.shape[:2]
    ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(img[y:y + ch, x:x + cw])
    scale = rng.uniform(320, 640) / max(ch, cw)
    crop = crop.resize((max(1, int(cw * scale)), max(1, int(ch * scale))), Image.BILINEAR)
    crop.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def make_bundle(path: str, sam: str) -> str:
  """The shipped demo bundle, or the same predictor over a random-init `sam`."""
  from aopsam_jax.aop import bundle as bundle_lib
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model
  if sam == "vit_tiny_test":
    return bundle_lib.DEFAULT_BUNDLE
  demo = bundle_lib.load_bundle(quiet=True)
  bundle_lib.save_bundle(path, build_model(get_sam_config(sam), seed=0), demo.predictor, demo.asf,
                         random_init={"model": sam, "seed": 0})
  return path


def run(images: str, bundle: str, out: str, nproc: int, args) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "aopsam_jax.label", images, "--out", out, "--bundle", bundle,
         "--batch", str(args.batch), "--workers", str(args.workers), "--no-progress"]
  port = socket.socket()
  port.bind(("localhost", 0))
  addr = f"localhost:{port.getsockname()[1]}"
  port.close()
  t0 = time.perf_counter()
  procs = []
  for i in range(nproc):
    dist = ["--coordinator_address", addr, "--num_processes", str(nproc),
            "--process_id", str(i)] if nproc > 1 else []
    procs.append(subprocess.Popen(cmd + dist, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate()[0] for p in procs]
  wall = time.perf_counter() - t0
  for p, log in zip(procs, logs):
    if p.returncode != 0:
      raise SystemExit(f"label failed:\n{log[-3000:]}")
  stats = [json.load(open(os.path.join(out, f"stats_p{i:05d}.json"))) for i in range(nproc)]
  total = sum(s["images"] for s in stats)
  steady = max(s["wall_s"] - s["compile_s"] for s in stats)
  return {"processes": nproc, "devices": sum(s["local_devices"] for s in stats),
          "platform": stats[0]["platform"], "images": total, "wall_s": wall,
          "compile_s": max(s["compile_s"] for s in stats),
          "images_per_s": total / steady,
          "input_wait": [s["input_wait_s"] / s["wall_s"] for s in stats],
          "rss_mib": [s["peak_rss_mib"] for s in stats],
          "dev_peak_mib": [s.get("device_peak_mib") for s in stats]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=24)
  p.add_argument("--processes", default="1,2")
  p.add_argument("--sam", default="vit_tiny_test", choices=["vit_tiny_test", "vit_b", "vit_l", "vit_h"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--workers", type=int, default=4)
  p.add_argument("--note", default="", help="free text for the table (e.g. machine load)")
  p.add_argument("--results", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="bench_label_")
  make_images(os.path.join(tmp, "images"), args.images)
  bundle = make_bundle(os.path.join(tmp, "bundle"), args.sam)
  rows = [run(os.path.join(tmp, "images"), bundle, os.path.join(tmp, f"out{n}"), n, args)
          for n in (int(x) for x in args.processes.split(","))]
  fmt = lambda xs: " / ".join("-" if x is None else f"{x:.0f}" for x in xs)
  lines = [f"# label throughput ({args.sam}, {args.images} images, batch {args.batch}/device, "
           f"{args.workers} loader threads)", "",
           f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
           f"platform {rows[0]['platform']}; {args.note}", "",
           "| processes | devices | images/s after compile | wall (s) | compile (s) | input wait "
           "(share of each process' time) | peak RSS per process (MiB) | peak device MiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['processes']} | {r['devices']} | {r['images_per_s']:.2f} | {r['wall_s']:.1f} "
                 f"| {r['compile_s']:.1f} | {' / '.join(f'{100 * w:.1f}%' for w in r['input_wait'])} "
                 f"| {fmt(r['rss_mib'])} | {fmt(r['dev_peak_mib'])} |")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(args.results, exist_ok=True)
  name = f"label_{rows[0]['platform']}_{args.sam}.md"
  with open(os.path.join(args.results, name), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
