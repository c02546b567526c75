r"""Sweep ASF prompt settings: prompt recall vs prompts/image on a COCO split.

  python benchmarks/sweep_asf.py --data /work/shared/data/coco_tiny --bundle DIR \
      [--split val] [--out benchmarks/results/eval_asf_sweep.json]

Heatmaps (SAM encoder + predictor) are computed once per image; ASF then
runs with one of two stand-in decoders (`--decoders`):

  none    accepts no mask: what random SAM weights give with the official
          IoU / stability filters, so the fine stage just takes the next peaks;
  oracle  a perfect segmenter: a prompt inside a ground-truth instance gets
          that instance's mask (the smallest one containing the point,
          sampled on the 256 x 256 low-res grid) with predicted IoU 1, a
          prompt outside every instance gets an empty, rejected mask.  This
          shows what the coarse-to-fine scheme does when masks are real:
          covered regions are removed before the fine stage samples.

Used to choose the AsfConfig defaults.  Prompt recall counts every DECODED
prompt (as `aopsam_jax.evaluate` does).
"""

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


MAX_GT = 64  # ground-truth instance slots per image for the oracle decoder


def main(argv=None):
  from aopsam_jax.aop import asf, bundle as bundle_lib, pipeline
  from aopsam_jax.data.coco import load_annotations
  from aopsam_jax.data.targets import TargetConfig, sample_to_heatmap
  from aopsam_jax.sam.geometry import LOW_RES_STRIDE
  from aopsam_jax.sam.image_io import load_image
  from aopsam_jax.trainer.evaluation import ImageGT, summarize

  p = argparse.ArgumentParser()
  p.add_argument("--data", required=True)
  p.add_argument("--split", default="val")
  p.add_argument("--bundle", default=None)
  p.add_argument("--out", default="benchmarks/results/eval_asf_sweep.json")
  ints = lambda t: [int(v) for v in t.split(",")]
  floats = lambda t: [float(v) for v in t.split(",")]
  p.add_argument("--k-coarse", type=ints, default=[16, 24, 32], help="comma-separated values")
  p.add_argument("--budget", type=int, default=32, help="k_coarse + k_fine (prompts/image cap)")
  p.add_argument("--kernels", type=ints, default=[3, 7, 11, 15], help="peak NMS windows")
  p.add_argument("--abs", type=floats, default=[0.02, 0.05], help="abs_threshold values")
  p.add_argument("--rel", type=floats, default=[0.0, 0.1], help="rel_threshold values")
  p.add_argument("--decoders", default="none", help="comma-separated: none, oracle")
  a = p.parse_args(argv)
  b = bundle_lib.load_bundle(a.bundle, quiet=True)
  images, anns = load_annotations(os.path.join(a.data, "annotations",
                                               f"instances_{a.split}2017.json"))
  hm_fn = jax.jit(lambda x, ihw: b.model.heatmap(x[None], ihw[None])[1][0])
  data = []
  for im in sorted(images, key=lambda i: i["id"]):
    img = load_image(os.path.join(a.data, f"{a.split}2017", im["file_name"]))
    inp = pipeline.prepare(img)
    hm = hm_fn(jnp.asarray(inp.padded), jnp.asarray(inp.input_hw))
    g = ImageGT(anns[im["id"]], img.shape[0], img.shape[1], TargetConfig())
    # oracle: GT instances on the low-res grid, padded to MAX_GT slots (one compile)
    gt = np.zeros((MAX_GT if "oracle" in a.decoders else 1, 256, 256), bool)
    for n, m in enumerate(g.gt[:len(gt)] if "oracle" in a.decoders else []):
      gt[n] = sample_to_heatmap(m, inp.input_hw, 256)
    data.append((hm, inp, g, jnp.asarray(gt)))

  def no_mask_decoder(gt, pts, ok):
    k = pts.shape[0]
    return jnp.full((k, 3, 256, 256), -10.0), jnp.zeros((k, 3))

  def oracle_decoder(gt, pts, ok):
    pix = jnp.clip(jnp.floor(pts / LOW_RES_STRIDE).astype(jnp.int32), 0, 255)
    inside = gt[:, pix[:, 1], pix[:, 0]]                       # (MAX_GT, K)
    area = gt.sum((1, 2)).astype(jnp.float32)
    pick = jnp.argmin(jnp.where(inside, area[:, None], jnp.inf), axis=0)
    hit = jnp.any(inside, axis=0) & ok
    masks = gt[pick] & hit[:, None, None]                      # (K, 256, 256)
    logits = jnp.where(masks, 10.0, -10.0)[:, None].repeat(3, axis=1)
    return logits, jnp.where(hit, 1.0, 0.0)[:, None].repeat(3, axis=1)

  decoders = {"none": no_mask_decoder, "oracle": oracle_decoder}

  rows = []
  grid = itertools.product(a.decoders.split(","), a.k_coarse, a.kernels, a.abs, a.rel)
  for dec_name, k1, kern, ab, rel in grid:
    k2 = a.budget - k1
    if k2 < 0:
      continue
    cfg = dataclasses.replace(asf.AsfConfig(), k_coarse=k1, k_fine=k2, peak_kernel=kern,
                              abs_threshold=ab,
                              rel_threshold=rel, fine_abs_threshold=ab / 2.5,
                              fine_rel_threshold=rel / 2)
    dec = decoders[dec_name]
    fn = jax.jit(lambda h, ihw, gt: asf.run(h, ihw, functools.partial(dec, gt), cfg))
    tot = {}
    for hm, inp, g, gt in data:
      o = jax.device_get(fn(hm, jnp.asarray(inp.input_hw), gt))
      sc = np.array([inp.original_hw[1] / inp.input_hw[1], inp.original_hw[0] / inp.input_hw[0]])
      c = g.counts(np.asarray(o["prompts_in"]) * sc, np.asarray(o["prompt_valid"]))
      for key, v in c.items():
        tot[key] = tot.get(key, 0.0) + v
    s = summarize(tot)
    rows.append(dict(decoder=dec_name, k_coarse=k1, k_fine=k2, peak_kernel=kern,
                     abs_threshold=ab, rel_threshold=rel, **s))
    print(json.dumps(rows[-1]), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
