"""Effect of the bfloat16 embedding cache on the Prompt Predictor's output.

  python benchmarks/bench_cache_dtype.py [--images 20] [--split val]

For coco_tiny images: SAM (the shipped bundle's encoder) embedding and
downsampled image in float32, the bundle's predictor on them as stored by the
cache (rounded to bfloat16) vs float32: max / mean |Δ probability| and the
share of the top-32 peaks (NMS kernel 11, as training evaluates) that stay
the same.  The shipped predictor was trained on a RANDOM vit_tiny_test
encoder; run with --sam-checkpoint for real weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from aopsam_jax.aop import bundle as bundle_lib  # noqa: E402
from aopsam_jax.aop.peaks import extract_peaks  # noqa: E402
from aopsam_jax.aop.prompt_predictor import predictor_inputs  # noqa: E402
from aopsam_jax.data import embedding_cache as ec  # noqa: E402
from aopsam_jax.sam import transforms  # noqa: E402
from aopsam_jax.sam.image_io import load_image  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--images", type=int, default=20)
  p.add_argument("--split", default="val")
  p.add_argument("--data", default=os.path.join(os.environ.get(
      "AOPSAM_DATA", os.path.join(REPO, "..", "shared", "data")), "coco_tiny"))
  p.add_argument("--sam-checkpoint", default=None)
  a = p.parse_args()
  b = bundle_lib.load_bundle(sam_checkpoint=a.sam_checkpoint, quiet=True)
  enc_g, enc_s = nnx.split(b.sam.image_encoder)
  pp_g, pp_s = nnx.split(b.predictor)

  @jax.jit
  def encode(enc_s, padded, hw):
    return predictor_inputs(nnx.merge(enc_g, enc_s), padded, hw)

  @jax.jit
  def predict(pp_s, emb, small):
    logits = nnx.merge(pp_g, pp_s)(emb, small)
    return jax.nn.sigmoid(logits), extract_peaks(logits, 32, 11)[0]

  with open(os.path.join(a.data, "annotations", f"instances_{a.split}2017.json")) as f:
    names = [im["file_name"] for im in json.load(f)["images"]][:a.images]
  dp, same = [], []
  for name in names:
    img = load_image(os.path.join(a.data, f"{a.split}2017", name))
    padded, hw, _ = transforms.prepare_image(img, b.sam.config.img_size)
    emb, small = encode(enc_s, jnp.asarray(padded)[None], jnp.asarray(hw, jnp.int32)[None])
    p32, c32 = predict(pp_s, emb, small)
    e16, s16 = (ec.from_stored(ec.to_stored(np.asarray(x))) for x in (emb, small))
    p16, c16 = predict(pp_s, jnp.asarray(e16), jnp.asarray(s16))
    dp.append(np.abs(np.asarray(p32) - np.asarray(p16)))
    s32 = {tuple(c) for c in np.asarray(c32)[0].tolist()}
    same.append(len(s32 & {tuple(c) for c in np.asarray(c16)[0].tolist()}) / len(s32))
  dp = np.stack(dp)
  print(f"{len(names)} coco_tiny {a.split} images, SAM {b.sam_info}")
  print(f"| max abs Δp | mean abs Δp | top-32 peaks unchanged |\n|---:|---:|---:|\n"
        f"| {dp.max():.2e} | {dp.mean():.2e} | {np.mean(same):.3f} (min {np.min(same):.3f}) |")


if __name__ == "__main__":
  main()
