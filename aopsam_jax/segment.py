"""`python -m aopsam_jax.segment`: segment images, write overlay PNGs and COCO-results JSON.

Modes are small functions registered in `MODES` (name -> runner); a runner
takes (args, model, image) and returns (records, overlay extras).  Adding a
mode = writing one runner and one `MODES` entry (plus its options in
`add_mode_arguments` if any).

Without --checkpoint the model has RANDOM-INIT weights (clearly labelled in
the console, the overlay title and the JSON) so the command runs offline;
random-init masks are meaningless and need permissive thresholds, which are
then used as defaults (see `RANDOM_INIT_THRESHOLDS`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
RANDOM_LABEL = "random-init weights"

# AMG thresholds: official defaults, and those used with random-init weights
# (whose logits are within about +-0.4 and predicted IoUs near -0.1).
OFFICIAL_THRESHOLDS = dict(pred_iou_thresh=0.88, stability_score_thresh=0.95,
                           stability_score_offset=1.0, box_nms_thresh=0.7)
RANDOM_INIT_THRESHOLDS = dict(pred_iou_thresh=-1.0, stability_score_thresh=0.25,
                              stability_score_offset=0.05, box_nms_thresh=0.7)


# --- model -------------------------------------------------------------------


def load_model(checkpoint: Optional[str], model_type: str, seed: int = 0):
  """(model, weights description).  Converted safetensors load directly;
  official / HF PyTorch checkpoints are converted on the fly (needs torch)."""
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model, load_sam
  if checkpoint is None:
    return build_model(get_sam_config(model_type), seed=seed), RANDOM_LABEL
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"no such checkpoint: {checkpoint}")
  try:
    return load_sam(checkpoint), os.path.basename(checkpoint)
  except Exception as first:  # not a converted file: try the conversion path
    try:
      from conversion.convert_sam import convert_checkpoint
    except ImportError:
      raise first from None
    cfg, params, _ = convert_checkpoint(checkpoint, model_type if model_type else "auto")
    return build_model(cfg, params), os.path.basename(checkpoint)


# --- modes -------------------------------------------------------------------


def _amg_config(args):
  from aopsam_jax.sam.amg import AmgConfig
  return AmgConfig(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                   pred_iou_thresh=args.pred_iou_thresh,
                   stability_score_thresh=args.stability_score_thresh,
                   stability_score_offset=args.stability_score_offset,
                   box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers,
                   crop_nms_thresh=args.crop_nms_thresh, max_masks=args.max_masks)


def run_amg(args, model, image: np.ndarray) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  from aopsam_jax.sam import amg
  cfg = _amg_config(args)
  out = amg.generate(model, amg.prepare(image, cfg, model.config.img_size), cfg)
  records = amg.to_records(out, "binary_mask", model.config.img_size)
  pts = np.array([r["point_coords"][0] for r in records], np.float32).reshape(-1, 2)
  return records, {"points": pts if args.show_points else None}


def _parse_floats(text: str, n: int, what: str) -> List[float]:
  try:
    vals = [float(v) for v in text.split(",")]
  except ValueError:
    vals = []
  if len(vals) != n:
    raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
  return vals


def run_prompt(args, model, image: np.ndarray) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  from aopsam_jax.sam import mask_ops
  from aopsam_jax.sam.predictor import SamPredictor
  if not args.point and not args.box:
    raise SystemExit("--mode prompt needs --point X,Y (repeatable) and/or --box X0,Y0,X1,Y1")
  pts = np.array([_parse_floats(p, 2, "--point") for p in args.point], np.float32) \
      if args.point else None
  labels = None
  if pts is not None:
    labels = np.ones(len(pts), np.int32)
    for i in args.negative or []:
      labels[i] = 0
  box = np.array(_parse_floats(args.box, 4, "--box"), np.float32) if args.box else None
  pred = SamPredictor(model)
  pred.set_image(image)
  multi = pts is not None and len(pts) == 1 and box is None
  masks, iou, _ = pred.predict(point_coords=pts, point_labels=labels, box=box,
                               multimask_output=multi)
  order = np.argsort(-np.asarray(iou))
  masks, iou = np.asarray(masks)[order], np.asarray(iou)[order]
  records = []
  for m, s in zip(masks, iou):
    b = np.asarray(mask_ops.masks_to_boxes(m[None]))[0]
    records.append({"segmentation": m, "area": int(m.sum()),
                    "bbox": [int(v) for v in mask_ops.box_xyxy_to_xywh(b)],
                    "predicted_iou": float(s),
                    "point_coords": pts.tolist() if pts is not None else [],
                    "stability_score": None, "crop_box": [0, 0, image.shape[1], image.shape[0]]})
  # overlay: the best mask only
  return records, {"points": pts, "labels": labels,
                   "boxes": None if box is None else box[None], "overlay_top": 1}


_AOP_CACHE: Dict[Any, Any] = {}


def run_aop(args, model, image: np.ndarray) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """AoP-SAM (prompt predictor + ASF, one jitted program) with bundle `args.bundle`
  (default: the shipped one).  With --checkpoint the given SAM replaces the
  bundle's.  The AMG threshold flags override the ASF mask filters."""
  import dataclasses
  import warnings
  from aopsam_jax.aop import bundle as bundle_lib, pipeline
  key = (args.bundle, args.checkpoint)
  if key not in _AOP_CACHE:
    b = bundle_lib.load_bundle(key[0], quiet=True)
    if b.random_sam and key[1] is None:
      warnings.warn("AoP bundle SAM has RANDOM weights: masks are meaningless.", stacklevel=2)
    if key[1] is not None:
      b = bundle_lib.Bundle(pipeline.AopSam(model, b.predictor), b.asf, {"weights": key[1]}, b.meta)
    over = {k: getattr(args, k) for k in ("pred_iou_thresh", "stability_score_thresh",
                                          "stability_score_offset")
            if getattr(args, k, None) is not None}
    _AOP_CACHE.clear()
    _AOP_CACHE[key] = (pipeline.split_model(b.model), dataclasses.replace(b.asf, **over))
  split, cfg = _AOP_CACHE[key]
  inp = pipeline.prepare(image, cfg.img_size)
  out = pipeline.segment_jit(split, inp.padded, inp.input_hw, inp.original_hw, cfg)
  records = pipeline.to_records(out, "binary_mask", cfg.img_size)
  # --show-points draws every DECODED prompt (not only those whose mask survived):
  # the prompt locations are what the predictor learned.
  pts = np.asarray(out["prompt_points"], np.float32)[np.asarray(out["prompt_valid"], bool)]
  return records, {"points": pts if args.show_points else None}


MODES: Dict[str, Callable] = {"aop": run_aop, "amg": run_amg, "prompt": run_prompt}


# --- I/O ---------------------------------------------------------------------


def collect_images(paths: Sequence[str]) -> List[str]:
  out = []
  for p in paths:
    if os.path.isdir(p):
      out.extend(os.path.join(p, f) for f in sorted(os.listdir(p))
                 if f.lower().endswith(IMAGE_EXTS))
    elif os.path.exists(p):
      out.append(p)
    else:
      raise FileNotFoundError(f"no such image or directory: {p}")
  return out


def image_id_for(path: str, index: int) -> int:
  """COCO-style numeric file names (000000343937.jpg) give their id; else the index."""
  m = re.fullmatch(r"0*(\d+)", os.path.splitext(os.path.basename(path))[0])
  return int(m.group(1) or 0) if m else index


def _load(path: str) -> np.ndarray:
  try:
    from aopsam_jax.sam.image_io import load_image
    return load_image(path)
  except ImportError:  # pragma: no cover
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def coco_results(records, image_id: int, weights: str) -> List[Dict[str, Any]]:
  from aopsam_jax.sam import rle
  out = []
  for r in records:
    seg = rle.encode(np.asarray(r["segmentation"], bool))
    out.append({"image_id": image_id, "category_id": 1, "segmentation": seg,
                "score": r["predicted_iou"], "bbox": r["bbox"], "area": r["area"],
                "predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
                "point_coords": r["point_coords"], "crop_box": r["crop_box"],
                "weights": weights})
  return out


# --- CLI ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m aopsam_jax.segment",
      description="Segment images with SAM in JAX. For each image writes OUT/<name>_overlay.png "
                  "(coloured masks over the image) and OUT/<name>.json (COCO results format: a "
                  "list of {image_id, category_id, segmentation (compressed RLE), score, bbox "
                  "XYWH, area, predicted_iou, stability_score, point_coords, crop_box}).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR",
                 help="image files and/or directories of images; none = the bundled sample image")
  p.add_argument("--checkpoint", default=None,
                 help="SAM weights: a converted .safetensors (conversion.convert_sam) or an "
                      "official/HF PyTorch checkpoint (converted on the fly, needs torch). "
                      "Omitted: RANDOM-INIT weights (meaningless masks; for smoke tests)")
  p.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_tiny_test"],
                 help="architecture for random-init weights (and a hint for PyTorch "
                      "checkpoints); converted files carry their own config")
  p.add_argument("--mode", default="aop", choices=sorted(MODES),
                 help="aop: AoP-SAM (prompt predictor + adaptive sampling, --bundle); amg: grid "
                      "automatic mask generation; prompt: masks from --point/--box")
  p.add_argument("--bundle", default=None,
                 help="aop mode: AoP-SAM bundle dir (default: the shipped coco_tiny vit_tiny_test one, "
                      "random-init SAM); --checkpoint replaces its SAM")
  p.add_argument("--out", default="segment_out", help="output directory")
  p.add_argument("--seed", type=int, default=0, help="seed of the random-init weights")
  g = p.add_argument_group("amg (grid automatic mask generation; AMG_S = 16, AMG_D = 32 points "
                           "per side)")
  g.add_argument("--points-per-side", type=int, default=32,
                 help="the prompt grid is N x N points over the image (per crop)")
  g.add_argument("--points-per-batch", type=int, default=64,
                 help="prompts decoded together (memory vs speed; on a CPU 16 halves the peak "
                      "memory and is faster, BENCHMARKS.md section 2)")
  g.add_argument("--pred-iou-thresh", type=float, default=None,
                 help="keep masks with predicted IoU > this (official default 0.88; -1.0 with "
                      "random-init weights)")
  g.add_argument("--stability-score-thresh", type=float, default=None,
                 help="keep masks with stability score >= this (official 0.95; 0.25 random-init)")
  g.add_argument("--stability-score-offset", type=float, default=None,
                 help="logit offset of the stability score (official 1.0; 0.05 random-init)")
  g.add_argument("--box-nms-thresh", type=float, default=None,
                 help="box IoU above which NMS drops the lower-scored mask (official 0.7)")
  g.add_argument("--crop-n-layers", type=int, default=0,
                 help="also segment 4^i overlapping crops for layers i = 1..N (0 = whole image)")
  g.add_argument("--crop-nms-thresh", type=float, default=0.7,
                 help="box NMS threshold between masks of different crops")
  g.add_argument("--max-masks", type=int, default=256,
                 help="static capacity: at most this many masks per image (highest scores)")
  g.add_argument("--show-points", action="store_true",
                 help="draw the prompt points on the overlay (amg: each mask's point; aop: every "
                      "decoded prompt)")
  q = p.add_argument_group("prompt (segment from a prompt)")
  q.add_argument("--point", action="append", metavar="X,Y",
                 help="prompt point in image pixels; repeat for several points")
  q.add_argument("--negative", action="append", type=int, metavar="I",
                 help="mark the I-th --point (0-based) as background; repeatable")
  q.add_argument("--box", metavar="X0,Y0,X1,Y1", help="prompt box in image pixels (XYXY)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  random_init = args.checkpoint is None
  defaults = RANDOM_INIT_THRESHOLDS if random_init else OFFICIAL_THRESHOLDS
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.images:
    paths = collect_images(args.images)
  else:
    from aopsam_jax.sam.image_io import sample_image_path
    paths = [sample_image_path()]
  if not paths:
    print("no images found", file=sys.stderr)
    return 1
  # aop mode without --checkpoint runs the bundle's own SAM: build no second one.
  bundle_sam = args.mode == "aop" and random_init
  if random_init:
    which = "the AoP bundle's SAM" if bundle_sam else args.model_type
    print("=" * 72 + "\nWARNING: no --checkpoint given: using RANDOM-INIT weights "
          f"({which}).\nThe masks are meaningless; this run only exercises the "
          "pipeline.\n" + "=" * 72, file=sys.stderr)
  if bundle_sam:
    model, weights = None, RANDOM_LABEL
  else:
    model, weights = load_model(args.checkpoint, args.model_type, args.seed)
  os.makedirs(args.out, exist_ok=True)
  runner = MODES[args.mode]
  from tqdm import tqdm
  from aopsam_jax.sam.visualize import save_overlay
  for i, path in enumerate(tqdm(paths, desc=f"segment ({args.mode})", unit="img")):
    image = _load(path)
    t0 = time.perf_counter()
    records, extra = runner(args, model, image)
    secs = time.perf_counter() - t0
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
      json.dump(coco_results(records, image_id_for(path, i), weights), f)
    shown = records[:extra.get("overlay_top", len(records))]
    title = f"{stem}: {len(records)} masks ({args.mode}) -- {weights}"
    if random_init:
      title = f"[{RANDOM_LABEL.upper()}] " + title
    save_overlay(os.path.join(args.out, stem + "_overlay.png"), image,
                 [r["segmentation"] for r in shown], points=extra.get("points"),
                 labels=extra.get("labels"), boxes=extra.get("boxes"), title=title)
    tqdm.write(f"{path}: {len(records)} masks in {secs:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
