"""`python -m aopsam_jax.bundle`: package a training run's predictor into an AoP-SAM bundle."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from aopsam_jax.aop.asf import AsfConfig
from aopsam_jax.aop.bundle import asf_from_dict, parse_overrides, save_bundle
from aopsam_jax.aop.prompt_predictor import load_predictor
from aopsam_jax.sam.config import get_sam_config
from aopsam_jax.sam.params import build_model, load_sam


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m aopsam_jax.bundle",
      description="Package a trained prompt predictor (the `predictor/` folder that "
                  "`python -m aopsam_jax.train` writes into its workdir) with the SAM it was "
                  "trained on and an ASF config into one AoP-SAM bundle directory, loadable "
                  "with `aopsam_jax.aop.bundle.load_bundle(DIR)` and `segment --bundle DIR`.")
  p.add_argument("--predictor", required=True,
                 help="predictor directory (config.json + params.safetensors), e.g. WORKDIR/predictor")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--sam-checkpoint", help="converted SAM weights (.safetensors) the predictor "
                                            "was trained on; copied into the bundle")
  src.add_argument("--sam-random", metavar="MODEL:SEED",
                   help="the predictor was trained on a RANDOM-init SAM (e.g. vit_tiny_test:0); only "
                        "the model name and seed are stored")
  p.add_argument("--asf", action="append", default=[], metavar="FIELD=VALUE",
                 help="AsfConfig field override (repeatable), e.g. --asf peak_kernel=7")
  p.add_argument("--notes", default="", help="free text stored in bundle.json")
  p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                 help="metadata entry stored in bundle.json (repeatable), e.g. --meta train_steps=400")
  p.add_argument("--out", required=True, help="bundle directory to write")
  a = p.parse_args(argv)
  try:
    over, meta = parse_overrides(a.asf, "--asf"), parse_overrides(a.meta, "--meta")
  except ValueError as e:
    p.error(str(e))
  predictor, _ = load_predictor(a.predictor)
  asf_cfg = asf_from_dict({**dataclasses.asdict(AsfConfig()), **over})
  if a.sam_random:
    model, _, seed = a.sam_random.partition(":")
    random_init = {"model": model, "seed": int(seed or 0)}
    sam = build_model(get_sam_config(model), seed=random_init["seed"])
  else:
    random_init, sam = None, load_sam(a.sam_checkpoint)
  save_bundle(a.out, sam, predictor, asf_cfg, random_init=random_init, notes=a.notes,
              metadata=meta)
  print(f"wrote bundle {a.out} (SAM: {a.sam_random or a.sam_checkpoint})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
