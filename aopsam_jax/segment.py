"""`python -m aopsam_jax.segment`: segment images, write overlay PNGs and COCO-results JSON.

Modes are small functions registered in `MODES` (name -> setup); a setup
takes the parsed args, loads what the mode needs ONCE and returns a
`Session` whose `run(image)` gives (records, overlay extras).  Adding a
mode = writing one setup function and one `MODES` entry.

Without --checkpoint the model has RANDOM-INIT weights (clearly labelled in
the console, the overlay title and the JSON) so the command runs offline.

Mask-quality thresholds (`resolve_thresholds`), lowest priority first: the
bundle's ASF config (aop) or the official AMG defaults (amg); the permissive
`RANDOM_INIT_THRESHOLDS` when the SAM really has random weights (its
predicted IoUs sit near -0.1, so nothing passes the official ones); `--asf
KEY=VALUE`; threshold flags given explicitly.  The console, every JSON
entry and the overlay title say which values were used and where each came
from.
"""

from __future__ import annotations

import argparse
import dataclasses
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


# --- thresholds --------------------------------------------------------------


def resolve_thresholds(args, base: Dict[str, float], base_source: str, random_sam: bool,
                       names: Sequence[str]) -> Dict[str, Tuple[float, str]]:
  """{name: (value, source)} for the mask-quality thresholds `names`.

  Lowest first: `base` (the bundle's ASF config or the official AMG
  defaults), the permissive `RANDOM_INIT_THRESHOLDS` when the SAM really
  has random weights (nothing would survive the official ones), `--asf`
  entries, then threshold flags given explicitly.
  """
  out = {k: (base[k], base_source) for k in names}
  if random_sam:
    out.update({k: (RANDOM_INIT_THRESHOLDS[k], "random-init defaults")
                for k in names if k in RANDOM_INIT_THRESHOLDS})
  out.update({k: (v, "--asf") for k, v in getattr(args, "asf_overrides", {}).items()
              if k in names})
  out.update({k: (getattr(args, k), "flag") for k in names
              if getattr(args, k, None) is not None})
  return out


def describe_thresholds(thresholds: Dict[str, Tuple[float, str]]) -> str:
  """'pred_iou_thresh=0.88 (bundle), ...' for the console and the overlay title."""
  return ", ".join(f"{k}={v:g} ({src})" for k, (v, src) in thresholds.items())


# --- modes -------------------------------------------------------------------


@dataclasses.dataclass
class Session:
  """What a mode prepared once for all images."""

  run: Callable[[np.ndarray], Tuple[List[Dict[str, Any]], Dict[str, Any]]]
  weights: str                 # weights description written into every result
  random_sam: bool             # the SAM has random weights: masks are meaningless
  thresholds: Dict[str, Tuple[float, str]]  # {name: (value, source)}; {} = none apply


def setup_amg(args) -> Session:
  from aopsam_jax.sam import amg
  model, weights = load_model(args.checkpoint, args.model_type, args.seed)
  random_sam = args.checkpoint is None
  th = resolve_thresholds(args, OFFICIAL_THRESHOLDS, "official defaults", random_sam,
                          tuple(OFFICIAL_THRESHOLDS))
  cfg = amg.AmgConfig(points_per_side=args.points_per_side,
                      points_per_batch=args.points_per_batch,
                      crop_n_layers=args.crop_n_layers, crop_nms_thresh=args.crop_nms_thresh,
                      max_masks=args.max_masks, **{k: v for k, (v, _) in th.items()})

  def run(image: np.ndarray):
    out = amg.generate(model, amg.prepare(image, cfg, model.config.img_size), cfg)
    records = amg.to_records(out, "binary_mask", model.config.img_size)
    pts = np.array([r["point_coords"][0] for r in records], np.float32).reshape(-1, 2)
    return records, {"points": pts if args.show_points else None}

  return Session(run, weights, random_sam, th)


def _parse_floats(text: str, n: int, what: str) -> List[float]:
  try:
    vals = [float(v) for v in text.split(",")]
  except ValueError:
    vals = []
  if len(vals) != n:
    raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
  return vals


def _prompt_records(masks, iou, pts, image_shape) -> List[Dict[str, Any]]:
  from aopsam_jax.sam import mask_ops
  records = []
  for m, s in zip(masks, iou):
    b = np.asarray(mask_ops.masks_to_boxes(m[None]))[0]
    records.append({"segmentation": m, "area": int(m.sum()),
                    "bbox": [int(v) for v in mask_ops.box_xyxy_to_xywh(b)],
                    "predicted_iou": float(s),
                    "point_coords": pts.tolist() if pts is not None else [],
                    "stability_score": None, "crop_box": [0, 0, image_shape[1], image_shape[0]]})
  return records


def setup_prompt(args) -> Session:
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
  model, weights = load_model(args.checkpoint, args.model_type, args.seed)
  pred = SamPredictor(model)
  multi = pts is not None and len(pts) == 1 and box is None

  def run(image: np.ndarray):
    pred.set_image(image)
    masks, iou, _ = pred.predict(point_coords=pts, point_labels=labels, box=box,
                                 multimask_output=multi)
    order = np.argsort(-np.asarray(iou))
    records = _prompt_records(np.asarray(masks)[order], np.asarray(iou)[order], pts, image.shape)
    # overlay: the best mask only
    return records, {"points": pts, "labels": labels,
                     "boxes": None if box is None else box[None], "overlay_top": 1}

  return Session(run, weights, args.checkpoint is None, {})


AOP_THRESHOLDS = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
                  "nms_thresh")


def setup_aop(args) -> Session:
  """AoP-SAM (prompt predictor + ASF, one jitted program) with bundle `args.bundle`
  (default: the shipped one).  With --checkpoint the given SAM replaces the
  bundle's.  The bundle's ASF config holds unless --asf or a threshold flag
  changes it."""
  import dataclasses as dc
  from aopsam_jax.aop import bundle as bundle_lib, pipeline
  sam = None
  if args.checkpoint is not None:
    sam, _ = load_model(args.checkpoint, args.model_type, args.seed)
  b = bundle_lib.load_bundle(args.bundle, sam=sam)
  random_sam = args.checkpoint is None and b.random_sam
  if args.checkpoint is not None:
    weights = os.path.basename(args.checkpoint)
  elif random_sam:
    weights = RANDOM_LABEL
  else:
    bundle_dir = os.path.normpath(args.bundle or bundle_lib.DEFAULT_BUNDLE)
    weights = os.path.join(os.path.basename(bundle_dir), b.sam_info["weights"])
  th = resolve_thresholds(args, dc.asdict(b.asf), "bundle", random_sam, AOP_THRESHOLDS)
  cfg = bundle_lib.asf_from_dict({**dc.asdict(b.asf), **args.asf_overrides,
                                  **{k: v for k, (v, _) in th.items()}})
  split = pipeline.split_model(b.model)

  def run(image: np.ndarray):
    inp = pipeline.prepare(image, cfg.img_size)
    out = pipeline.segment_jit(split, inp.padded, inp.input_hw, inp.original_hw, cfg)
    records = pipeline.to_records(out, "binary_mask", cfg.img_size)
    # --show-points draws every DECODED prompt (not only those whose mask survived):
    # the prompt locations are what the predictor learned.
    pts = np.asarray(out["prompt_points"], np.float32)[np.asarray(out["prompt_valid"], bool)]
    return records, {"points": pts if args.show_points else None}

  return Session(run, weights, random_sam, th)


MODES: Dict[str, Callable[[Any], Session]] = {"aop": setup_aop, "amg": setup_amg,
                                               "prompt": setup_prompt}


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


def coco_results(records, image_id: int, weights: str,
                 thresholds: Optional[Dict[str, Tuple[float, str]]] = None
                 ) -> List[Dict[str, Any]]:
  """COCO results entries; each names the weights and the mask-quality
  thresholds ({name: {"value", "source"}}) that produced it."""
  from aopsam_jax.sam import rle
  th = {k: {"value": v, "source": src} for k, (v, src) in (thresholds or {}).items()}
  out = []
  for r in records:
    seg = rle.encode(np.asarray(r["segmentation"], bool))
    out.append({"image_id": image_id, "category_id": 1, "segmentation": seg,
                "score": r["predicted_iou"], "bbox": r["bbox"], "area": r["area"],
                "predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
                "point_coords": r["point_coords"], "crop_box": r["crop_box"],
                "weights": weights, "thresholds": th})
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
  p.add_argument("--asf", action="append", default=[], metavar="FIELD=VALUE",
                 help="aop mode: change a field of the bundle's ASF config (repeatable), e.g. "
                      "--asf k_coarse=16 --asf nms_thresh=0.6")
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
                 help="keep masks with predicted IoU > this (default: the bundle's value in "
                      "aop mode, official 0.88 in amg mode; -1.0 with random-init weights)")
  g.add_argument("--stability-score-thresh", type=float, default=None,
                 help="keep masks with stability score >= this (default: bundle / official 0.95; "
                      "0.25 random-init)")
  g.add_argument("--stability-score-offset", type=float, default=None,
                 help="logit offset of the stability score (default: bundle / official 1.0; "
                      "0.05 random-init)")
  g.add_argument("--box-nms-thresh", type=float, default=None,
                 help="amg mode: box IoU above which NMS drops the lower-scored mask (official "
                      "0.7)")
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


def check_args(p: argparse.ArgumentParser, args) -> None:
  """Usage errors found before any model is loaded (exit 2 through `p.error`)."""
  from aopsam_jax.aop.asf import AsfConfig
  from aopsam_jax.aop.bundle import parse_overrides
  try:
    args.asf_overrides = parse_overrides(args.asf, "--asf")
  except ValueError as e:
    p.error(str(e))
  if args.asf and args.mode != "aop":
    p.error("--asf changes the AoP-SAM ASF config: it needs --mode aop")
  fields = {f.name for f in dataclasses.fields(AsfConfig)}
  unknown = sorted(set(args.asf_overrides) - fields)
  if unknown:
    p.error(f"--asf: unknown AsfConfig field(s) {unknown}; known: {sorted(fields)}")
  both = [k for k in args.asf_overrides if getattr(args, k, None) is not None]
  if both:
    p.error(f"{both[0]} given both as --asf and as --{both[0].replace('_', '-')}: give one")
  if args.mode == "aop" and args.box_nms_thresh is not None:
    p.error("--box-nms-thresh is for --mode amg; AoP-SAM's mask NMS is --asf nms_thresh=X")


def random_init_banner(mode: str, model_type: str) -> str:
  which = "the AoP bundle's SAM" if mode == "aop" else model_type
  return ("=" * 72 + "\nWARNING: no --checkpoint given: using RANDOM-INIT weights "
          f"({which}).\nThe masks are meaningless; this run only exercises the "
          "pipeline.\n" + "=" * 72)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_args(parser, args)
  if args.images:
    paths = collect_images(args.images)
  else:
    from aopsam_jax.sam.image_io import sample_image_path
    paths = [sample_image_path()]
  if not paths:
    print("no images found", file=sys.stderr)
    return 1
  session = MODES[args.mode](args)
  if session.random_sam:
    print(random_init_banner(args.mode, args.model_type), file=sys.stderr)
  if session.thresholds:
    print(f"thresholds: {describe_thresholds(session.thresholds)}", file=sys.stderr)
  os.makedirs(args.out, exist_ok=True)
  from tqdm import tqdm
  from aopsam_jax.sam.image_io import load_image
  from aopsam_jax.sam.visualize import save_overlay
  for i, path in enumerate(tqdm(paths, desc=f"segment ({args.mode})", unit="img")):
    image = load_image(path)
    t0 = time.perf_counter()
    records, extra = session.run(image)
    secs = time.perf_counter() - t0
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
      json.dump(coco_results(records, image_id_for(path, i), session.weights,
                             session.thresholds), f)
    shown = records[:extra.get("overlay_top", len(records))]
    title = f"{stem}: {len(records)} masks ({args.mode}) -- {session.weights}"
    if session.random_sam:
      title = f"[{RANDOM_LABEL.upper()}] " + title
    if session.thresholds:
      title += "\n" + describe_thresholds(session.thresholds)
    save_overlay(os.path.join(args.out, stem + "_overlay.png"), image,
                 [r["segmentation"] for r in shown], points=extra.get("points"),
                 labels=extra.get("labels"), boxes=extra.get("boxes"), title=title)
    note = " (every mask was filtered out: see the thresholds above)" if not records else ""
    tqdm.write(f"{path}: {len(records)} masks in {secs:.1f}s{note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
