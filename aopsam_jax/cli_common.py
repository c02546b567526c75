"""Command-line pieces shared by the apps (segment, label, export): loading SAM
weights and AoP-SAM bundles the same way everywhere, and the multi-process
flags `train` also takes.

Without --checkpoint a model has RANDOM-INIT weights; random-init masks are
meaningless and their predicted IoUs sit near -0.1, so the permissive
`RANDOM_INIT_THRESHOLDS` replace the official mask filters unless the user
sets them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, Optional

RANDOM_LABEL = "random-init weights"

# Mask filters: official defaults, and those used with random-init weights
# (whose logits are within about +-0.4 and predicted IoUs near -0.1).
OFFICIAL_THRESHOLDS = dict(pred_iou_thresh=0.88, stability_score_thresh=0.95,
                           stability_score_offset=1.0, box_nms_thresh=0.7)
RANDOM_INIT_THRESHOLDS = dict(pred_iou_thresh=-1.0, stability_score_thresh=0.25,
                              stability_score_offset=0.05, box_nms_thresh=0.7)
ASF_FILTERS = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset")


def load_model(checkpoint: Optional[str], model_type: str, seed: int = 0):
  """(SAM model, weights description).  Converted safetensors load directly;
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


# --- AoP-SAM bundles ---------------------------------------------------------


def add_bundle_arguments(p: argparse.ArgumentParser) -> None:
  """--bundle, --checkpoint, --asf: what `load_aop` reads."""
  p.add_argument("--bundle", default=None,
                 help="AoP-SAM bundle dir (default: the shipped coco_tiny vit_tiny_test demo, "
                      "random-init SAM); --checkpoint replaces its SAM")
  p.add_argument("--checkpoint", default=None,
                 help="SAM weights replacing the bundle's: a converted .safetensors or an "
                      "official/HF PyTorch checkpoint (converted on the fly, needs torch)")
  p.add_argument("--asf", action="append", default=[], metavar="FIELD=VALUE",
                 help="AsfConfig override (repeatable), e.g. --asf pred_iou_thresh=0.8; the "
                      "bundle's own config is used otherwise")


def check_bundle_arguments(args, parser: argparse.ArgumentParser) -> Dict[str, Any]:
  """Usage errors before any model is loaded: missing paths, bad --asf.  -> overrides."""
  from aopsam_jax.aop.bundle import asf_from_dict, parse_overrides
  if args.bundle is not None and not os.path.isfile(os.path.join(args.bundle, "bundle.json")):
    parser.error(f"--bundle {args.bundle}: not an AoP-SAM bundle directory (no bundle.json)")
  if args.checkpoint is not None and not os.path.exists(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint}: no such file")
  try:
    over = parse_overrides(args.asf, "--asf")
    asf_from_dict(over)
  except (ValueError, TypeError) as e:
    parser.error(f"--asf: {e}")
  return over


def load_aop(bundle: Optional[str], checkpoint: Optional[str], asf_overrides: Dict[str, Any],
             model_type: str = "vit_b"):
  """(Bundle with the final AsfConfig, weights label, thresholds note).

  The bundle's AsfConfig is the source of truth; `asf_overrides` change it.
  A random-init SAM gets `RANDOM_INIT_THRESHOLDS` for the mask filters that
  are not overridden (its masks would all be filtered out otherwise)."""
  from aopsam_jax.aop import bundle as bundle_lib
  from aopsam_jax.aop.pipeline import AopSam
  b = bundle_lib.load_bundle(bundle, quiet=True)
  weights = RANDOM_LABEL
  if checkpoint is not None:
    sam, weights = load_model(checkpoint, model_type)
    b = bundle_lib.Bundle(AopSam(sam, b.predictor), b.asf, {"weights": checkpoint}, b.meta)
  over = dict(asf_overrides)
  note = "bundle"
  if b.random_sam:
    for k in ASF_FILTERS:
      over.setdefault(k, RANDOM_INIT_THRESHOLDS[k])
    note = "random-init"
  b.asf = dataclasses.replace(b.asf, **over)
  filters = ", ".join(f"{k}={getattr(b.asf, k)}" for k in ASF_FILTERS)
  return b, weights, f"{filters} ({note}{' + --asf' if asf_overrides else ''})"


def random_weights_banner(what: str) -> str:
  return ("=" * 72 + f"\nWARNING: RANDOM-INIT weights ({what}).\nThe masks are meaningless; "
          "this run only exercises the pipeline.\n" + "=" * 72)


# --- multi-process ------------------------------------------------------------


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
  """The multi-process flags of `train`, same names and meaning."""
  g = p.add_argument_group("multi-process (every host runs the same command)")
  g.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() (auto-detects TPU pods / SLURM)")
  g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                 help="address of process 0 (explicit multi-process)")
  g.add_argument("--num_processes", type=int, default=None,
                 help="number of processes (with --coordinator_address)")
  g.add_argument("--process_id", type=int, default=None,
                 help="this process, 0..N-1 (with --coordinator_address)")


def check_distributed_arguments(args, parser: argparse.ArgumentParser) -> None:
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      parser.error("--coordinator_address, --num_processes and --process_id go together")
    if args.multihost:
      parser.error("--multihost auto-detects the processes: drop --coordinator_address etc.")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      parser.error(f"--process_id must be in 0..{args.num_processes - 1}")


def init_distributed(args) -> None:
  """jax.distributed.initialize() as the flags ask (before any other JAX call)."""
  import jax
  if args.multihost:
    jax.distributed.initialize()
  elif args.coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)


def fail(msg: str, code: int = 1) -> int:
  """Print one line to stderr and return the exit status."""
  print(msg, file=sys.stderr)
  return code
