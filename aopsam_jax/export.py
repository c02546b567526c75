"""`python -m aopsam_jax.export --bundle B [--checkpoint C] --out prog.bin`: serialise the
whole one-program AoP-SAM pipeline (encoder, prompt predictor, ASF, decoder)
with `jax.export` for a fixed batch and padded size.

The artefact (see `exported_runner`, which loads and runs it with no model
code) holds StableHLO for every platform asked for (`--platforms`, default
cpu,cuda,tpu: one program runs on whichever the loading process has).
Weights are either embedded as constants in the program (`--weights embedded`,
default: one self-contained file) or kept as its first argument, a list of
arrays stored beside it in the same file (`--weights arguments`: the program
itself stays small, e.g. to swap fine-tuned weights of the same shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import zipfile
from typing import Optional, Sequence

import numpy as np

from aopsam_jax import cli
from aopsam_jax.exported_runner import FORMAT

OUTPUTS = ("low_res_logits", "iou", "stability", "boxes", "points", "mask_index", "stage",
           "valid", "prompt_points", "prompt_valid", "prompt_accepted", "num_prompts",
           "num_filtered", "num_kept", "heatmap", "input_hw", "original_hw")
PLATFORMS = ("cpu", "cuda", "tpu")


def export_pipeline(model, cfg, batch: int, platforms: Sequence[str], embed_weights: bool):
  """-> (jax.export.Exported, flat weights or None).  Inputs: padded (batch, S, S, 3)
  uint8, input_hw / original_hw (batch, 2) int32 [, preceded by the weights list]."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from aopsam_jax.aop import pipeline
  from aopsam_jax.sam import modeling

  with modeling.portable_attention(model):  # the artefact runs without this library
    graphdef, state = pipeline.split_model(model)
  leaves, treedef = jax.tree.flatten(state)

  def run(weights, padded, input_hw, original_hw):
    m = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
    out = pipeline.segment(m, padded, input_hw, original_hw, cfg)
    return {k: out[k] for k in OUTPUTS if k in out}  # a stable subset of the pipeline's dict

  s = cfg.img_size
  specs = (jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8),
           jax.ShapeDtypeStruct((batch, 2), jnp.int32), jax.ShapeDtypeStruct((batch, 2), jnp.int32))
  if embed_weights:
    consts = [jnp.asarray(x) for x in leaves]
    fn = jax.jit(lambda p, i, o: run(consts, p, i, o))
    return jax.export.export(fn, platforms=platforms)(*specs), None
  wspecs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  exp = jax.export.export(jax.jit(run), platforms=platforms)(wspecs, *specs)
  return exp, [np.asarray(x) for x in leaves]


def write_artefact(path: str, exp, weights, meta) -> None:
  """One zip file, written to a temp name then renamed (never a half artefact)."""
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
    z.writestr("meta.json", json.dumps(meta, indent=1))
    z.writestr("program.bin", bytes(exp.serialize()))
    if weights is not None:
      buf = io.BytesIO()
      np.savez(buf, **{f"w{i:05d}": w for i, w in enumerate(weights)})
      z.writestr("weights.npz", buf.getvalue())
  os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m aopsam_jax.export", description=__doc__.split("\n\n")[0],
                         epilog=cli.EXIT_STATUS_HELP,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  cli.add_bundle_arguments(p)
  p.add_argument("--out", required=True, help="artefact to write (e.g. prog.bin)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  p.add_argument("--batch", type=int, default=1, help="images per call (fixed)")
  p.add_argument("--weights", choices=("embedded", "arguments"), default="embedded",
                 help="weights as constants in the program, or as its first argument "
                      "(stored beside it in the artefact)")
  p.add_argument("--platforms", default=",".join(PLATFORMS),
                 help="comma-separated jax.export platforms to lower for")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(_main, argv, "python -m aopsam_jax.export")


def _check_args(args) -> Sequence[str]:
  cli.check_bundle_arguments(args)
  platforms = tuple(x.strip() for x in args.platforms.split(",") if x.strip())
  if args.batch < 1:
    raise cli.UsageError("--batch must be at least 1")
  known = PLATFORMS + ("rocm",)
  if not platforms or any(x not in known for x in platforms):
    raise cli.UsageError(f"--platforms {args.platforms}: choose from {','.join(known)}")
  if os.path.isdir(args.out):
    raise cli.UsageError(f"--out {args.out} is a folder; give a file name")
  if os.path.exists(args.out) and not args.overwrite:
    raise cli.UsageError(f"--out {args.out} already exists; pass --overwrite to replace it or "
                         "choose another name")
  return platforms


def _main(argv: Optional[Sequence[str]]) -> int:
  import jax
  from aopsam_jax import segment
  args = build_parser().parse_args(argv)
  platforms = _check_args(args)
  try:
    aop = segment.load_aop(args)
  except (OSError, ValueError) as e:
    raise cli.WorkError(f"cannot load {args.checkpoint or args.bundle or 'the shipped bundle'}: "
                        f"{e}") from None
  if aop.random_sam:
    print(segment.random_init_banner("aop", None), file=sys.stderr)
  cfg = aop.cfg
  print(f"exporting for {','.join(platforms)}, batch {args.batch}, {cfg.img_size}x{cfg.img_size}, "
        f"weights {args.weights}; thresholds {segment.describe_thresholds(aop.thresholds)} "
        "(tracing and lowering)...", file=sys.stderr)
  exp, weights = export_pipeline(aop.bundle.model, cfg, args.batch, platforms,
                                 args.weights == "embedded")
  meta = {"format": FORMAT, "format_version": 1, "batch": args.batch, "img_size": cfg.img_size,
          "platforms": list(exp.platforms), "weights": args.weights,
          "outputs": sorted(exp.out_tree.node_data()[1]), "asf": dataclasses.asdict(cfg),
          "sam_weights": aop.weights, "random_sam": aop.random_sam,
          "exported_with": {"jax": jax.__version__}}
  write_artefact(args.out, exp, weights, meta)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 2 ** 20:.1f} MiB; platforms "
        f"{','.join(exp.platforms)}; run it with aopsam_jax/exported_runner.py)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
