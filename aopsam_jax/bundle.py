"""`python -m aopsam_jax.bundle`: package a training run's predictor into an AoP-SAM bundle."""

from __future__ import annotations

import dataclasses
import os
import sys

from aopsam_jax.aop.asf import AsfConfig
from aopsam_jax.aop.bundle import EncoderMismatch, asf_from_dict, parse_overrides, save_bundle
from aopsam_jax.aop.prompt_predictor import load_predictor, predictor_metadata
from aopsam_jax.sam.checkpoints import load_sam
from aopsam_jax.sam.config import CHECKPOINT_NAMES, get_sam_config
from aopsam_jax.sam.params import build_model


def _sam_random(text: str):
  """'vit_tiny_test:0' -> ('vit_tiny_test', 0); argparse error otherwise."""
  import argparse

  from aopsam_jax.sam.config import SAM_CONFIGS
  model, _, seed = text.partition(":")
  if model not in SAM_CONFIGS:
    raise argparse.ArgumentTypeError(f"unknown SAM model {model!r} in {text!r}; one of "
                                     f"{', '.join(SAM_CONFIGS)} (as MODEL:SEED)")
  try:
    return model, int(seed or 0)
  except ValueError:
    raise argparse.ArgumentTypeError(f"the seed in {text!r} is not a whole number") from None


def build_parser():
  from aopsam_jax.cli import EXIT_STATUS_HELP, ArgumentParser
  p = ArgumentParser(
      prog="python -m aopsam_jax.bundle",
      description="Package a trained prompt predictor (the `predictor/` folder that "
                  "`python -m aopsam_jax.train` writes into its workdir) with the SAM it was "
                  "trained on and an ASF config into one AoP-SAM bundle directory, loadable "
                  "with `aopsam_jax.aop.bundle.load_bundle(DIR)` and `segment --bundle DIR`.",
      epilog=EXIT_STATUS_HELP)
  p.add_argument("--predictor", required=True,
                 help="predictor directory (config.json + params.safetensors), e.g. WORKDIR/predictor")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--sam-checkpoint", help="SAM weights stored in the bundle (any source: "
                                            "converted .safetensors, official .pth, HF folder, "
                                            "or a name such as vit_b); a predictor that reads "
                                            "the embedding must have been trained on them")
  src.add_argument("--sam-random", metavar="MODEL:SEED", type=_sam_random,
                   help="the predictor was trained on a RANDOM-init SAM (e.g. vit_tiny_test:0); only "
                        "the model name and seed are stored")
  p.add_argument("--asf", action="append", default=[], metavar="FIELD=VALUE",
                 help="AsfConfig field override (repeatable), e.g. --asf peak_kernel=7")
  p.add_argument("--notes", default="", help="free text stored in bundle.json")
  p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                 help="metadata entry stored in bundle.json (repeatable), e.g. --meta train_steps=400")
  p.add_argument("--out", required=True, help="bundle directory to write")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out directory (without it, one stops the run "
                      "before any work)")
  return p


def main(argv=None) -> int:
  from aopsam_jax.cli import run_main
  return run_main(_main, argv, "bundle")


def _main(argv) -> int:
  from aopsam_jax.cli import UsageError, WorkError, write_atomic
  p = build_parser()
  a = p.parse_args(argv)
  try:
    over, meta = parse_overrides(a.asf, "--asf"), parse_overrides(a.meta, "--meta")
  except ValueError as e:
    p.error(str(e))
  if not os.path.isfile(os.path.join(a.predictor, "config.json")):
    raise UsageError(f"--predictor {a.predictor}: no predictor there (needs config.json and "
                     "params.safetensors, as WORKDIR/predictor after training)")
  if a.sam_checkpoint and not os.path.exists(a.sam_checkpoint) \
      and a.sam_checkpoint not in CHECKPOINT_NAMES:
    raise UsageError(f"--sam-checkpoint {a.sam_checkpoint}: no such file or directory, nor a "
                     f"checkpoint name ({', '.join(CHECKPOINT_NAMES)})")
  a.out = os.path.normpath(a.out)
  if os.path.exists(a.out) and not os.path.isdir(a.out):
    raise UsageError(f"--out {a.out} is an existing file; give a directory")
  if os.path.isdir(a.out) and os.listdir(a.out) and not a.overwrite:
    what = "a bundle" if os.path.exists(os.path.join(a.out, "bundle.json")) else "not empty"
    raise UsageError(f"--out {a.out} already exists ({what}); pass --overwrite to replace it or "
                     "choose another --out")
  try:
    asf_cfg = asf_from_dict({**dataclasses.asdict(AsfConfig()), **over})
  except (TypeError, ValueError) as e:
    raise UsageError(f"--asf: {e}") from None
  try:
    predictor, _ = load_predictor(a.predictor)
    trained = predictor_metadata(a.predictor).get("sam_encoder_fingerprint")
    if predictor.config.use_embedding and trained is None:
      print(f"warning: {a.predictor} reads SAM's embedding but records no training encoder "
            "(trained before fingerprints were recorded?); make sure the SAM given here is the "
            "one it was trained with", file=sys.stderr)
    if a.sam_random:
      random_init = {"model": a.sam_random[0], "seed": a.sam_random[1]}
      sam = build_model(get_sam_config(random_init["model"]), seed=random_init["seed"])
    else:
      random_init, sam = None, load_sam(a.sam_checkpoint)
  except (OSError, ValueError) as e:  # CheckpointError is a ValueError
    raise WorkError(str(e)) from None
  try:
    write_atomic(a.out, lambda tmp: save_bundle(
        tmp, sam, predictor, asf_cfg, random_init=random_init, notes=a.notes, metadata=meta,
        trained_fingerprint=trained))
  except EncoderMismatch as e:
    raise WorkError(f"{a.predictor}: {e}") from None
  sam_desc = f"{a.sam_random[0]}:{a.sam_random[1]} (random)" if a.sam_random else a.sam_checkpoint
  print(f"wrote bundle {a.out} (SAM: {sam_desc})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
