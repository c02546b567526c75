"""Prompt recall of AoP-SAM bundles next to regular grids on a COCO split.

  python benchmarks/prompt_budget.py --data ../shared/data/coco_tiny --bundle A --bundle B \
      --grid 6 --grid 16 --out benchmarks/results/prompt_budget_coco_tiny.json

Each bundle's prompts (the top k = k_coarse + k_fine peaks of its heatmap
with the bundle's ASF peak window, inside the image: what ASF decodes when
the SAM accepts no mask, as with random weights; no mask decoding, so it is
fast) and each n x n grid (`trainer.evaluation.grid_points`) are scored by
the same `ImageGT` counter: the share of ground-truth instances (non-crowd,
>= 64 px in the 1024 frame) holding at least one prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bundle_recall(path, images, anns_by, img_dir):
  """(instances hit, instances, k) of a bundle's top-k heatmap peaks."""
  import jax
  import jax.numpy as jnp
  from aopsam_jax.aop import bundle as bundle_lib, peaks, pipeline
  from aopsam_jax.data.targets import TargetConfig
  from aopsam_jax.sam.image_io import load_image
  from aopsam_jax.sam.geometry import heatmap_to_original
  from aopsam_jax.trainer.evaluation import ImageGT
  b = bundle_lib.load_bundle(path, quiet=True)
  k = b.asf.k_coarse + b.asf.k_fine

  @jax.jit
  def top_peaks(x, ihw):
    hm = b.model.heatmap(x[None], ihw[None])[1][0]
    rows = jnp.arange(hm.shape[0])[:, None] < -(-ihw[0] // 4)
    cols = jnp.arange(hm.shape[1])[None, :] < -(-ihw[1] // 4)
    coords, _, ok = peaks.extract_peaks(jnp.where(rows & cols, hm, -jnp.inf)[None], k,
                                        kernel=b.asf.peak_kernel)
    return coords[0], ok[0]

  hit = gt = 0.0
  for im in images:
    img = load_image(os.path.join(img_dir, im["file_name"]))
    h0, w0 = img.shape[:2]
    inp = pipeline.prepare(img)
    coords, ok = top_peaks(jnp.asarray(inp.padded), jnp.asarray(inp.input_hw))
    g = ImageGT(anns_by.get(im["id"], []), h0, w0, TargetConfig())
    c = g.counts(heatmap_to_original(np.asarray(coords), h0, w0), np.asarray(ok))
    hit, gt = hit + c["hit"], gt + c["gt"]
  return hit, gt, k


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True)
  p.add_argument("--split", default="val")
  p.add_argument("--bundle", action="append", default=[])
  p.add_argument("--grid", action="append", type=int, default=[])
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  from aopsam_jax import evaluate as ev
  from aopsam_jax.data.targets import TargetConfig
  from aopsam_jax.sam.image_io import load_image
  from aopsam_jax.trainer.evaluation import ImageGT, grid_points
  images, anns_by, img_dir = ev.load_split(a.data, a.split, None)
  rows = []
  for b in a.bundle:
    hit, gt, k = bundle_recall(b, images, anns_by, img_dir)
    rows.append({"method": f"AoP-SAM {os.path.basename(os.path.normpath(b))}",
                 "prompts_per_image": float(k), "prompt_recall": hit / max(gt, 1.0)})
  for n in a.grid:
    hit = gt = 0.0
    for im in images:
      img = load_image(os.path.join(img_dir, im["file_name"]))
      h0, w0 = img.shape[:2]
      g = ImageGT(anns_by.get(im["id"], []), h0, w0, TargetConfig())
      c = g.counts(grid_points(n, h0, w0), np.ones(n * n, bool))
      hit, gt = hit + c["hit"], gt + c["gt"]
    rows.append({"method": f"grid {n}x{n}", "prompts_per_image": float(n * n),
                 "prompt_recall": hit / max(gt, 1.0)})
  out = {"dataset": a.data, "split": a.split, "images": len(images),
         "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
         "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)
  print("| method | prompts/image | prompt recall |\n|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['prompts_per_image']:.1f} | {r['prompt_recall']:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
