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

from aopsam_jax import compile_cache
from aopsam_jax.sam.config import SAM_CONFIGS

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
RANDOM_LABEL = "random-init weights"

# AMG thresholds: official defaults, and those used with random-init weights
# (whose logits are within about +-0.4 and predicted IoUs near -0.1).
OFFICIAL_THRESHOLDS = dict(pred_iou_thresh=0.88, stability_score_thresh=0.95,
                           stability_score_offset=1.0, box_nms_thresh=0.7)
RANDOM_INIT_THRESHOLDS = dict(pred_iou_thresh=-1.0, stability_score_thresh=0.25,
                              stability_score_offset=0.05, box_nms_thresh=0.7)


# --- model -------------------------------------------------------------------

DEFAULT_MODEL_TYPE = "vit_b"  # random-init architecture when --model-type is not given


def load_model(checkpoint: Optional[str], model_type: Optional[str], seed: int = 0):
  """(model, weights description).  `checkpoint`: any source `checkpoints.load_sam`
  takes (converted .safetensors, official .pth of any size, HF folder, a name);
  its architecture comes from the file, `model_type` only asserts it.  None:
  random-init weights of `model_type` (default vit_b)."""
  from aopsam_jax.sam.checkpoints import load_params
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model
  if checkpoint is None:
    return build_model(get_sam_config(model_type or DEFAULT_MODEL_TYPE), seed=seed), RANDOM_LABEL
  cfg, params, desc = load_params(checkpoint, model_type)
  return build_model(cfg, params), desc


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


def _named(thresholds: Dict[str, Tuple[float, str]], name: str) -> str:
  v, src = thresholds.get(name, (None, ""))
  return f"{name}={v:g} ({src})" if v is not None else name


def aop_empty_diagnosis(out: Dict[str, Any], thresholds: Dict[str, Tuple[float, str]]) -> str:
  """Why an AoP-SAM run produced no mask: prompts decoded, what each filter
  removed, and the thresholds in force (with where each came from)."""
  n = {k: int(np.asarray(out[k])) for k in ("num_prompts", "num_candidates", "removed_iou",
                                             "removed_stability", "removed_redundant",
                                             "removed_nms")}
  if n["num_prompts"] == 0:
    return "0 masks: the prompt predictor put no prompt above its heatmap thresholds"
  return (f"0 masks: {n['num_prompts']} prompts decoded into {n['num_candidates']} candidate "
          f"masks; removed by {_named(thresholds, 'pred_iou_thresh')}: {n['removed_iou']}, by "
          f"{_named(thresholds, 'stability_score_thresh')} (offset "
          f"{thresholds.get('stability_score_offset', (0.0, ''))[0]:g}): "
          f"{n['removed_stability']}, as redundant prompts: {n['removed_redundant']}, by mask "
          f"NMS {_named(thresholds, 'nms_thresh')}: {n['removed_nms']}. Lower the thresholds "
          "(--pred-iou-thresh, --stability-score-thresh) to see the rejected masks")


def amg_empty_diagnosis(out: Dict[str, Any], n_prompts: int,
                        thresholds: Dict[str, Tuple[float, str]]) -> str:
  """Why a grid AMG run produced no mask."""
  passed = int(np.asarray(out["num_filtered"]))
  return (f"0 masks: {n_prompts} grid prompts decoded; {passed} candidates passed "
          f"{_named(thresholds, 'pred_iou_thresh')} and "
          f"{_named(thresholds, 'stability_score_thresh')}, {int(np.asarray(out['num_kept']))} "
          f"survived NMS {_named(thresholds, 'box_nms_thresh')}. Lower the thresholds "
          "(--pred-iou-thresh, --stability-score-thresh) to see the rejected masks")


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
    inputs = amg.prepare(image, cfg, model.config.img_size)
    out = amg.generate(model, inputs, cfg)
    records = amg.to_records(model, inputs, out, cfg)
    pts = np.array([r["point_coords"][0] for r in records], np.float32).reshape(-1, 2)
    extra = {"points": pts if args.show_points else None}
    if not records:
      extra["diagnosis"] = amg_empty_diagnosis(out, cfg.points_per_side ** 2 * cfg.num_crops, th)
    return records, extra

  return Session(run, weights, random_sam, th)


def _numbers(text: str, n: int, what: str) -> List[float]:
  """`n` finite comma-separated numbers, or an argparse error naming `what`."""
  try:
    vals = [float(v) for v in text.split(",")]
  except ValueError:
    vals = []
  if len(vals) != n:
    raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
  if not all(np.isfinite(vals)):
    raise argparse.ArgumentTypeError(f"{what} must be finite numbers, got {text!r}")
  return vals


def point_arg(text: str) -> List[float]:
  return _numbers(text, 2, "X,Y")


def box_arg(text: str) -> List[float]:
  x0, y0, x1, y1 = _numbers(text, 4, "X0,Y0,X1,Y1")
  if x1 <= x0 or y1 <= y0:
    raise argparse.ArgumentTypeError(f"the box needs X1 > X0 and Y1 > Y0, got {text!r}")
  return [x0, y0, x1, y1]


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
  pts = np.array(args.point, np.float32) if args.point else None
  labels = None
  if pts is not None:
    labels = np.ones(len(pts), np.int32)
    for i in args.negative or []:
      labels[i] = 0
  box = np.array(args.box, np.float32) if args.box else None
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
    return records, {"points": pts, "labels": labels, "warning": prompts_outside(pts, box, image),
                     "boxes": None if box is None else box[None], "overlay_top": 1}

  return Session(run, weights, args.checkpoint is None, {})


def prompts_outside(pts, box, image: np.ndarray) -> Optional[str]:
  """A warning when a --point or --box lies outside this image (x in [0, W],
  y in [0, H]): SAM still answers, but likely not about what was meant."""
  h, w = image.shape[:2]
  off = lambda x, y: not (0 <= x <= w and 0 <= y <= h)  # noqa: E731
  bad = [f"--point {x:g},{y:g}" for x, y in (pts if pts is not None else []) if off(x, y)]
  if box is not None and (off(box[0], box[1]) or off(box[2], box[3])):
    bad.append("--box " + ",".join(f"{v:g}" for v in box))
  if not bad:
    return None
  verb = "is" if len(bad) == 1 else "are"
  return (f"{', '.join(bad)} {verb} outside this {w}x{h} image (x from 0 to {w}, y from 0 to "
          f"{h}); the masks answer a prompt off the picture")


AOP_THRESHOLDS = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
                  "nms_thresh")


@dataclasses.dataclass
class AopModel:
  """An AoP-SAM bundle loaded as the apps load it (segment, label, export)."""

  bundle: Any                  # aop.bundle.Bundle (its SAM replaced by --checkpoint's)
  cfg: Any                     # the final AsfConfig: bundle + random-init + --asf + flags
  weights: str                 # weights description
  random_sam: bool
  thresholds: Dict[str, Tuple[float, str]]


def load_aop(args) -> AopModel:
  """The bundle `args.bundle` (default: the shipped one), its SAM replaced by
  `args.checkpoint` when given; the bundle's ASF config holds unless
  `args.asf_overrides` or a threshold attribute of `args` changes it."""
  import dataclasses as dc
  from aopsam_jax.aop import bundle as bundle_lib
  sam = None
  model_type = getattr(args, "model_type", None)
  if args.checkpoint is not None or model_type is not None:
    # no checkpoint: --model-type is the random-init architecture, as in the other modes
    # (`check_args` refused it for a bundle that holds SAM weights)
    sam, _ = load_model(args.checkpoint, model_type, getattr(args, "seed", 0))
  b = bundle_lib.load_bundle(args.bundle, sam=sam,
                             force_encoder=getattr(args, "force_encoder", False))
  random_sam = args.checkpoint is None and (b.random_sam or model_type is not None)
  if args.checkpoint is not None:
    weights = os.path.basename(os.path.normpath(args.checkpoint))
  elif random_sam:
    weights = RANDOM_LABEL
  else:
    bundle_dir = os.path.normpath(args.bundle or bundle_lib.DEFAULT_BUNDLE)
    weights = os.path.join(os.path.basename(bundle_dir), b.sam_info["weights"])
  th = resolve_thresholds(args, dc.asdict(b.asf), "bundle", random_sam, AOP_THRESHOLDS)
  cfg = bundle_lib.asf_from_dict({**dc.asdict(b.asf), **args.asf_overrides,
                                  **{k: v for k, (v, _) in th.items()}})
  return AopModel(b, cfg, weights, random_sam, th)


def setup_aop(args) -> Session:
  """AoP-SAM (prompt predictor + ASF, one jitted program), model from `load_aop`."""
  from aopsam_jax.aop import pipeline
  aop = load_aop(args)
  b, cfg = aop.bundle, aop.cfg
  split = pipeline.split_model(b.model)

  def run(image: np.ndarray):
    inp = pipeline.prepare(image, cfg.img_size)
    out = pipeline.segment_jit(split, inp.padded, inp.input_hw, inp.original_hw, cfg)
    records = pipeline.to_records(out, "binary_mask", cfg.img_size)
    # --show-points draws every DECODED prompt (not only those whose mask survived):
    # the prompt locations are what the predictor learned.
    pts = np.asarray(out["prompt_points"], np.float32)[np.asarray(out["prompt_valid"], bool)]
    extra = {"points": pts if args.show_points else None}
    if not records:
      extra["diagnosis"] = aop_empty_diagnosis(out, aop.thresholds)
    return records, extra

  return Session(run, aop.weights, aop.random_sam, aop.thresholds)


MODES: Dict[str, Callable[[Any], Session]] = {"aop": setup_aop, "amg": setup_amg,
                                               "prompt": setup_prompt}


# --- I/O ---------------------------------------------------------------------


def collect_images(paths: Sequence[str], subdirs: Optional[List[str]] = None) -> List[str]:
  """Image files named on the command line, and the images in named directories
  (not recursive; by extension; the subdirectories met are appended to
  `subdirs`).  A path given twice is kept once.  A missing path is a usage
  error; unreadable files are found later, when loaded."""
  from aopsam_jax.cli import UsageError
  out, seen = [], set()
  for p in paths:
    if os.path.isdir(p):
      names = sorted(os.listdir(p))
      if subdirs is not None:
        subdirs.extend(os.path.join(p, f) for f in names if os.path.isdir(os.path.join(p, f)))
      found = [os.path.join(p, f) for f in names
               if f.lower().endswith(IMAGE_EXTS) and not os.path.isdir(os.path.join(p, f))]
    elif os.path.lexists(p):
      found = [p]
    else:
      raise UsageError(f"no such image or directory: {p}")
    for f in found:
      key = os.path.abspath(f)
      if key not in seen:
        seen.add(key)
        out.append(f)
  return out


def drop_own_overlays(paths: Sequence[str], out: str) -> Tuple[List[str], int]:
  """(paths without the *_overlay.png files inside `out`, how many were dropped):
  with --out in an input folder, a re-run must not segment its own overlays."""
  root = os.path.realpath(out) + os.sep
  keep = [p for p in paths if not (os.path.realpath(p).startswith(root)
                                    and p.endswith("_overlay.png"))]
  return keep, len(paths) - len(keep)


def output_stems(paths: Sequence[str]) -> List[str]:
  """Output name (without suffix) of each input; distinct for distinct inputs.

  Each name is the input's path relative to the deepest directory holding all
  inputs, without its extension (`a/photo.jpg`, `b/photo.jpg` -> `a/photo`,
  `b/photo`; one folder -> bare stems).  Inputs that still share a name
  differ only by extension and get it appended (`photo.jpg`, `photo.png` ->
  `photo_jpg`, `photo_png`); any clash left gets `_2`, `_3`, ... in input order.
  """
  absolute = [os.path.abspath(p) for p in paths]
  if not absolute:
    return []
  base = os.path.commonpath([os.path.dirname(p) for p in absolute])
  rel = [os.path.splitext(os.path.relpath(p, base))[0] for p in absolute]
  counts: Dict[str, int] = {}
  for r in rel:
    counts[r] = counts.get(r, 0) + 1
  named = [f"{r}_{os.path.splitext(p)[1].lstrip('.').lower()}" if counts[r] > 1 else r
           for r, p in zip(rel, absolute)]
  taken, out = set(named), []
  for name in named:
    final, k = name, 2
    while final in out:
      while f"{name}_{k}" in taken:
        k += 1
      final = f"{name}_{k}"
      taken.add(final)
    out.append(final)
  return out


def output_files(out_dir: str, stem: str) -> Tuple[str, str]:
  """(results JSON, overlay PNG) of one input."""
  base = os.path.join(out_dir, *stem.split("/"))
  return base + ".json", base + "_overlay.png"


def image_id_for(path: str, index: int) -> int:
  """COCO-style numeric file names (000000343937.jpg) give their id; else the index."""
  m = re.fullmatch(r"0*(\d+)", os.path.splitext(os.path.basename(path))[0])
  return int(m.group(1) or 0) if m else index


def input_problem(path: str) -> Optional[str]:
  """What makes `path` unusable that a stat or its header can tell (a link
  that cannot be followed, an empty file, not an image PIL can open), naming
  the file; None otherwise.  Cheap (nothing decoded, no JAX): a run checks its
  inputs with it before building a model."""
  if os.path.islink(path) and not os.path.exists(path):
    try:
      os.stat(path)
    except OSError as e:
      return f"{path}: symbolic link that cannot be followed ({e.strerror})"
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    return f"{path}: empty file (0 bytes)"
  from aopsam_jax.sam.image_io import check_image_file
  try:
    check_image_file(path)
  except (OSError, ValueError) as e:
    return str(e)
  return None


def load_input(path: str) -> np.ndarray:
  """The image at `path`, or a ValueError / OSError whose text names the file
  and the problem (empty file, not an image, truncated, looping link)."""
  from aopsam_jax.sam.image_io import load_image
  problem = input_problem(path)
  if problem:
    raise ValueError(problem)
  return load_image(path)


def coco_results(records, image_id: int, weights: str,
                 thresholds: Optional[Dict[str, Tuple[float, str]]] = None
                 ) -> List[Dict[str, Any]]:
  """COCO results entries; each names the weights and the mask-quality
  thresholds ({name: {"value", "source"}}) that produced it."""
  from aopsam_jax.sam import records as records_lib
  th = {k: {"value": v, "source": src} for k, (v, src) in (thresholds or {}).items()}
  out = records_lib.coco_results(records, image_id, weights=weights, thresholds=th)
  for entry, r in zip(out, records):
    entry["crop_box"] = r["crop_box"]
  return out


# --- CLI ---------------------------------------------------------------------


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
  """--checkpoint (any SAM source), --model-type (an assertion) and --force-encoder."""
  p.add_argument("--checkpoint", default=None,
                 help="SAM weights: an official sam_vit_{b,l,h}_*.pth (any size, detected from "
                      "the shapes; read without torch), a converted .safetensors, a Hugging Face "
                      "SamModel folder, or a name (vit_b, vit_l, vit_h, facebook/sam-vit-base|"
                      "large|huge) downloaded once into the cache ($AOPSAM_CACHE, default "
                      "~/.cache/aopsam_jax). Omitted: RANDOM-INIT weights (meaningless masks; "
                      "for smoke tests)")
  p.add_argument("--model-type", default=None, choices=sorted(SAM_CONFIGS),
                 help="without --checkpoint: the random-init architecture (default vit_b; vit_t "
                      "is MobileSAM); with it: an optional assertion (fail unless the weights "
                      "are this one)")
  p.add_argument("--force-encoder", action="store_true",
                 help="aop mode: run a bundle whose predictor reads SAM's image embedding with a "
                      "SAM it was not trained with (refused otherwise; the shipped image-only "
                      "predictor fits every SAM)")


def build_parser() -> argparse.ArgumentParser:
  from aopsam_jax.cli import EXIT_STATUS_HELP, ArgumentParser
  p = ArgumentParser(
      prog="python -m aopsam_jax.segment",
      description="Segment images with SAM in JAX. For each image writes OUT/<name>_overlay.png "
                  "(coloured masks over the image) and OUT/<name>.json (COCO results format: a "
                  "list of {image_id, category_id, segmentation (compressed RLE), score, bbox "
                  "XYWH, area, predicted_iou, stability_score, point_coords, crop_box}). Outputs mirror "
                  "the inputs' paths relative to their common folder (a/photo.jpg, b/photo.jpg -> "
                  "OUT/a/photo.json, OUT/b/photo.json; photo.jpg + photo.png -> photo_jpg, "
                  "photo_png). The overlay is drawn at most 2048 pixels on its longest side; the "
                  "JSON keeps full resolution. An unreadable image is reported in one line and "
                  "skipped; a summary ends the run.",
      epilog=EXIT_STATUS_HELP + " Any skipped image makes the status 1.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR",
                 help="image files and/or directories of images; none = the bundled sample image")
  add_weights_arguments(p)
  p.add_argument("--mode", default="aop", choices=sorted(MODES),
                 help="aop: AoP-SAM (prompt predictor + adaptive sampling, --bundle); amg: grid "
                      "automatic mask generation; prompt: masks from --point/--box")
  p.add_argument("--bundle", default=None,
                 help="aop mode: AoP-SAM bundle dir (default: the shipped image-only predictor, "
                      "valid for every SAM; its own SAM is random-init); --checkpoint replaces "
                      "its SAM")
  p.add_argument("--asf", action="append", default=[], metavar="FIELD=VALUE",
                 help="aop mode: change a field of the bundle's ASF config (repeatable), e.g. "
                      "--asf k_coarse=16 --asf nms_thresh=0.6")
  p.add_argument("--out", default="segment_out", help="output directory")
  p.add_argument("--overwrite", action="store_true",
                 help="replace results already in --out (without it, existing results of these "
                      "inputs stop the run before any work)")
  p.add_argument("--skip-existing", action="store_true",
                 help="keep the results already in --out and segment only the other inputs "
                      "(finishes an interrupted run; an image counts as done when both its "
                      "JSON and its overlay are there)")
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
  q.add_argument("--point", action="append", metavar="X,Y", type=point_arg,
                 help="prompt point in image pixels; repeat for several points")
  q.add_argument("--negative", action="append", type=int, metavar="I",
                 help="mark the I-th --point (0-based) as background; repeatable")
  q.add_argument("--box", metavar="X0,Y0,X1,Y1", type=box_arg, help="prompt box in image pixels (XYXY)")
  compile_cache.add_flag(p)
  return p


def check_usage(args) -> None:
  """Argument mistakes argparse cannot see, as `UsageError` (before any model work)."""
  from aopsam_jax.cli import UsageError
  prompt_flags = [f for f, v in (("--point", args.point), ("--box", args.box),
                                 ("--negative", args.negative)) if v]
  if args.mode != "prompt" and prompt_flags:
    raise UsageError(f"{prompt_flags[0]} applies only to --mode prompt (this is --mode "
                     f"{args.mode}); add --mode prompt or drop it")
  if args.overwrite and args.skip_existing:
    raise UsageError("--overwrite replaces existing results, --skip-existing keeps them: give one")
  if args.mode == "prompt" and not (args.point or args.box):
    raise UsageError("--mode prompt needs --point X,Y (repeatable) and/or --box X0,Y0,X1,Y1")
  n_points = len(args.point or [])
  for i in args.negative or []:
    if not 0 <= i < n_points:
      raise UsageError(f"--negative {i}: there are {n_points} --point(s), so the index must be "
                       f"in 0..{n_points - 1}" if n_points else
                       f"--negative {i}: it marks a --point as background, but none is given")
  for flag, value, low in (("--points-per-side", args.points_per_side, 1),
                           ("--points-per-batch", args.points_per_batch, 1),
                           ("--max-masks", args.max_masks, 1),
                           ("--crop-n-layers", args.crop_n_layers, 0)):
    if value < low:
      raise UsageError(f"{flag} must be >= {low}, got {value}")
  from aopsam_jax.sam.config import CHECKPOINT_NAMES
  if args.checkpoint is not None and not os.path.exists(args.checkpoint) \
      and args.checkpoint not in CHECKPOINT_NAMES:
    raise UsageError(f"--checkpoint {args.checkpoint}: no such file or directory, nor a "
                     f"checkpoint name ({', '.join(CHECKPOINT_NAMES)})")
  if args.bundle is not None and not os.path.exists(args.bundle):
    raise UsageError(f"--bundle {args.bundle}: no such file or directory")


def check_out(out: str, stems: Sequence[str], overwrite: bool, keep: bool = False) -> None:
  """--out must be a directory we can write, without results of these inputs
  (unless --overwrite, or `keep`: --skip-existing).  Creates it."""
  import tempfile
  from aopsam_jax.cli import UsageError
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out {out} is an existing file; give a directory (it is created if needed)")
  if not (overwrite or keep) and os.path.isdir(out):
    clash = [f for stem in stems for f in output_files(out, stem) if os.path.exists(f)]
    if clash:
      raise UsageError(f"--out {out} already holds results of these inputs ({len(clash)} "
                       f"file(s), e.g. {clash[0]}); pass --skip-existing to keep them and do the "
                       "rest (an interrupted run), --overwrite to replace them, or choose another "
                       "--out")
  try:
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
      pass
  except OSError as e:
    raise UsageError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable "
                     "directory") from None


def check_args(p: argparse.ArgumentParser, args) -> None:
  """Usage errors found before any model is loaded (exit 2 through `p.error`)."""
  if args.mode == "aop" and args.box_nms_thresh is not None:
    p.error("--box-nms-thresh is for --mode amg; AoP-SAM's mask NMS is --asf nms_thresh=X")
  if args.mode == "aop" and args.model_type is not None and args.checkpoint is None:
    from aopsam_jax.aop.bundle import read_meta
    try:
      has_weights = "weights" in read_meta(args.bundle)["sam"]
    except (OSError, ValueError, KeyError):
      has_weights = False  # loading the bundle says what is wrong with it
    if has_weights:
      p.error(f"--model-type {args.model_type} without --checkpoint asks for a random-init SAM, "
              "but this bundle holds SAM weights: drop --model-type, or pass --checkpoint")
  args.asf_overrides = {}
  if not args.asf:  # the rest needs the aop modules (and so jax): only with --asf
    return
  from aopsam_jax.aop.asf import AsfConfig
  from aopsam_jax.aop.bundle import parse_overrides
  try:
    args.asf_overrides = parse_overrides(args.asf, "--asf")
  except ValueError as e:
    p.error(str(e))
  if args.mode != "aop":
    p.error("--asf changes the AoP-SAM ASF config: it needs --mode aop")
  fields = {f.name for f in dataclasses.fields(AsfConfig)}
  unknown = sorted(set(args.asf_overrides) - fields)
  if unknown:
    p.error(f"--asf: unknown AsfConfig field(s) {unknown}; known: {sorted(fields)}")
  both = [k for k in args.asf_overrides if getattr(args, k, None) is not None]
  if both:
    p.error(f"{both[0]} given both as --asf and as --{both[0].replace('_', '-')}: give one")


def random_init_banner(mode: str, model_type: Optional[str]) -> str:
  which = ("the AoP bundle's SAM" if mode == "aop" and model_type is None
           else (model_type or DEFAULT_MODEL_TYPE))
  return ("=" * 72 + "\nWARNING: no --checkpoint given: using RANDOM-INIT weights "
          f"({which}).\nThe masks are meaningless; this run only exercises the "
          "pipeline.\n" + "=" * 72)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from aopsam_jax.cli import run_main
  return run_main(_main, argv, "segment", "every result written so far is complete: add "
                  "--skip-existing to the same command to do the rest")


def _main(argv: Optional[Sequence[str]]) -> int:
  from aopsam_jax.cli import UsageError, WorkError
  parser = build_parser()
  args = parser.parse_args(argv)
  check_usage(args)
  check_args(parser, args)
  subdirs: List[str] = []
  if args.images:
    paths = collect_images(args.images, subdirs)
  else:
    from aopsam_jax.sam.image_io import sample_image_path
    paths = [sample_image_path()]
  paths, ours = drop_own_overlays(paths, args.out)
  if ours:
    print(f"note: {ours} overlay(s) in --out {args.out} (*_overlay.png, written by segment) are "
          "not taken as inputs", file=sys.stderr)
  if not paths:
    raise UsageError(f"no images in {', '.join(args.images)} (looked for {', '.join(IMAGE_EXTS)})")
  stems = output_stems(paths)
  check_out(args.out, stems, args.overwrite, args.skip_existing)
  subdirs = [d for d in subdirs if os.path.abspath(d) != os.path.abspath(args.out)]
  if subdirs:
    print(f"note: {len(subdirs)} subfolder(s) not searched (e.g. {subdirs[0]}): segment reads the "
          "images directly in a named folder; name subfolders too, or label whole trees with "
          "python -m aopsam_jax.label", file=sys.stderr)
  done = (frozenset(i for i, stem in enumerate(stems)
                    if all(os.path.exists(f) for f in output_files(args.out, stem)))
          if args.skip_existing else frozenset())
  if done:
    print(f"--skip-existing: {len(done)} of {len(paths)} image(s) already have results in "
          f"{args.out}; segmenting the other {len(paths) - len(done)}", file=sys.stderr)
  left = [p for i, p in enumerate(paths) if i not in done]
  problems = [input_problem(p) for p in left]
  if all(problems):  # nothing left a model could do (a re-run): build none
    for reason in problems:
      print(f"skipped {reason}", file=sys.stderr)
    return report(args.out, 0, list(zip(left, problems)), len(done))
  compile_cache.setup(args.no_compile_cache)
  try:
    session = MODES[args.mode](args)
  except (OSError, ValueError) as e:  # CheckpointError is a ValueError
    source = args.checkpoint or args.bundle or "the shipped bundle"
    raise WorkError(f"cannot load {source}: {e}") from None
  session.run = compile_cache.announce_first_call(session.run, program_name(args))
  if session.random_sam:
    print(random_init_banner(args.mode, args.model_type), file=sys.stderr)
  if session.thresholds:
    print(f"thresholds: {describe_thresholds(session.thresholds)}", file=sys.stderr)
  written, failed, empty = segment_all(args, session, paths, stems, done)
  return report(args.out, written, failed, len(done), empty)


def program_name(args) -> str:
  """'the AoP-SAM program for sam_vit_b.safetensors', for the compiling notice."""
  what = {"aop": "the AoP-SAM program", "amg": "the grid AMG program",
          "prompt": "the SAM predictor"}[args.mode]
  if args.checkpoint:
    return f"{what} for {os.path.basename(args.checkpoint)}"
  if args.mode == "aop" and args.model_type is None:
    return f"{what} for the bundle's SAM"
  return f"{what} for random-init {args.model_type}"


def segment_all(args, session: Session, paths: Sequence[str], stems: Sequence[str],
                done: frozenset = frozenset()) -> Tuple[int, List[Tuple[str, str]], int]:
  """Segment every input but those whose index is in `done`; a bad file is
  reported in one line and skipped.  Returns (images written, [(path,
  reason)] of those that failed, images written with no mask)."""
  from tqdm import tqdm
  written, failed, empty = 0, [], 0
  todo = [(i, path, stem) for i, (path, stem) in enumerate(zip(paths, stems)) if i not in done]
  for i, path, stem in tqdm(todo, desc=f"segment ({args.mode})", unit="img"):
    try:
      image = load_input(path)
    except (OSError, ValueError) as e:
      reason = str(e) if path in str(e) else f"{path}: {e}"
      tqdm.write(f"skipped {reason}", file=sys.stderr)
      failed.append((path, reason))
      continue
    t0 = time.perf_counter()
    records, extra = session.run(image)
    secs = time.perf_counter() - t0
    try:
      write_outputs(args, session, path, i, stem, image, records, extra)
    except OSError as e:
      reason = f"{path}: cannot write its results in {args.out} ({e.strerror or e})"
      tqdm.write(f"failed {reason}", file=sys.stderr)
      failed.append((path, reason))
      continue
    written += 1
    tqdm.write(f"{path}: {len(records)} masks in {secs:.1f}s")
    if extra.get("warning"):
      tqdm.write(f"  warning: {extra['warning']}", file=sys.stderr)
    if not records:
      empty += 1
      tqdm.write(f"  {extra.get('diagnosis', '0 masks: every mask was filtered out')}",
                 file=sys.stderr)
  return written, failed, empty


def write_outputs(args, session: Session, path: str, index: int, stem: str, image: np.ndarray,
                  records, extra: Dict[str, Any]) -> None:
  """The image's results JSON and overlay PNG, each written atomically."""
  from aopsam_jax.cli import write_atomic
  from aopsam_jax.sam.visualize import save_overlay
  json_path, png_path = output_files(args.out, stem)
  results = coco_results(records, image_id_for(path, index), session.weights,
                         session.thresholds)

  def dump(tmp):
    with open(tmp, "w") as f:
      json.dump(results, f)
  write_atomic(json_path, dump)
  shown = records[:extra.get("overlay_top", len(records))]
  title = f"{os.path.basename(path)}: {len(records)} masks ({args.mode}) -- {session.weights}"
  if session.random_sam:
    title = f"[{RANDOM_LABEL.upper()}] " + title
  if session.thresholds:
    title += "\n" + describe_thresholds(session.thresholds)
  write_atomic(png_path, lambda tmp: save_overlay(
      tmp, image, [r["segmentation"] for r in shown], points=extra.get("points"),
      labels=extra.get("labels"), boxes=extra.get("boxes"), title=title))


def report(out: str, written: int, failed: Sequence[Tuple[str, str]], kept: int = 0,
           empty: int = 0) -> int:
  """The closing summary; exit status 1 when any input failed or when no
  image written has a single mask (nothing was produced)."""
  nothing = written > 0 and empty == written
  print(f"segment: {written} image(s) written to {out}"
        + (f" ({empty} with no mask)" if empty else "")
        + (f", {kept} already there (kept)" if kept else "")
        + f", {len(failed)} failed" + (":" if failed else ""),
        file=sys.stderr if failed or nothing else sys.stdout)
  for _, reason in failed:
    print(f"  {reason}", file=sys.stderr)
  if nothing:
    print("segment: no masks at all, in any image (the line under each image says why)",
          file=sys.stderr)
  return 1 if failed or nothing else 0


if __name__ == "__main__":
  sys.exit(main())
