"""Convert a SAM checkpoint (official `.pth`, Hugging Face layout, or a name) to aopsam_jax safetensors.

    python -m conversion.convert_sam --checkpoint sam_vit_b_01ec64.pth --out sam_vit_b.safetensors

Accepted inputs:
  * the official releases (`sam_vit_{b,l,h}_*.pth`: a `torch.save`d state dict),
    any size: the architecture is detected from the tensor shapes;
  * Hugging Face `transformers` SamModel weights (`facebook/sam-vit-*`): a
    `model.safetensors`, a `pytorch_model.bin`, a sharded
    `*.safetensors.index.json`, or the directory holding them;
  * a name (vit_b, vit_l, vit_h, facebook/sam-vit-base|large|huge): downloaded
    once into the cache (see `aopsam_jax.sam.checkpoints`) and written to --out.

No torch is needed: `.pth`/`.bin` files are read by `aopsam_jax.sam.pth_reader`,
whose unpickler rebuilds only tensors, storages and ordered dicts and refuses
every other global, so nothing from the file is ever executed.  Every failure
(missing file, truncated or corrupt file, not a checkpoint, wrong model type)
ends in one `CheckpointError` whose message names the file; the CLI prints it
and exits with status 1.  Path mistakes on the command line (missing input,
`--out` equal to the input, a directory, or in a missing folder) exit with
status 2 before anything is read.  Keys carrying a training wrapper's prefix
(`module.`, `model.`) are stripped.  The library does the work
(`checkpoints.convert`); this module is its command line.

The output is a safetensors file named by Flax parameter path whose metadata
holds the `SamConfig`; `aopsam_jax.sam.checkpoints.load_sam(path)` loads it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

from aopsam_jax.sam import checkpoints as C
from aopsam_jax.sam import params as P
from aopsam_jax.sam.config import SAM_CONFIGS

CheckpointError = C.CheckpointError
CONVERTER_VERSION = C.CONVERTER_VERSION
MODEL_TYPES = ("auto",) + tuple(SAM_CONFIGS)
read_checkpoint = C.read_checkpoint
convert_checkpoint = C.convert_checkpoint
config_name = C.config_name
common_prefix = C.common_prefix
strip_wrapper_prefix = C.strip_wrapper_prefix


def convert(checkpoint: str, out: str, model_type: str = "auto", *, verbose: bool = True,
            hash_source: bool = True):
  """Convert `checkpoint` (a path or a name) and write `out`; returns the config."""
  if not os.path.exists(checkpoint) and checkpoint in C.NAMES:
    cached = C.fetch_named(checkpoint, progress=verbose)
    cfg, _, _ = C.load_params(cached, model_type)
    tmp = P.partial_path(out)
    try:
      shutil.copyfile(cached, tmp)
      os.replace(tmp, out)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return cfg
  return C.convert(checkpoint, out, model_type, verbose=verbose, hash_source=hash_source)


def build_parser() -> argparse.ArgumentParser:
  from aopsam_jax.cli import EXIT_STATUS_HELP, ArgumentParser
  ap = ArgumentParser(
      prog="python -m conversion.convert_sam",
      description="Convert a Segment Anything (SAM v1) checkpoint to aopsam_jax safetensors "
      "(Flax parameter names, SamConfig in the metadata; load with "
      "aopsam_jax.sam.checkpoints.load_sam). Accepts the official sam_vit_{b,l,h}_*.pth files "
      "(any size, detected from the shapes), Hugging Face transformers SamModel weights "
      "(facebook/sam-vit-*: model.safetensors, pytorch_model.bin, a sharded *.index.json, or "
      "the model directory), and the names " + ", ".join(C.NAMES) + " (downloaded once into "
      "the cache: $AOPSAM_CACHE, else $XDG_CACHE_HOME/aopsam_jax, else ~/.cache/aopsam_jax).",
      epilog="Example: python -m conversion.convert_sam --checkpoint sam_vit_b_01ec64.pth "
      "--out sam_vit_b.safetensors. No torch needed: .pth/.bin files are read by a restricted "
      "unpickler (tensors and ordered dicts only, like torch.load(weights_only=True)) that "
      "never executes code from the file. The output is written under a temporary "
      "<out>.<pid>.partial name and renamed when complete; a leftover from a killed run is "
      "refused by the loader and removed by the next conversion into that directory. A state "
      "dict whose keys all carry a training wrapper's prefix (DataParallel 'module.', Lightning "
      "'model.') is accepted; the prefix is stripped and reported. " + EXIT_STATUS_HELP)
  ap.add_argument("--checkpoint", "-c", required=True,
                  help="input: official .pth, HF .safetensors / .bin / .index.json, HF model dir, "
                       "or a name (" + ", ".join(C.NAMES) + ")")
  ap.add_argument("--out", "-o", required=True, help="output .safetensors path")
  ap.add_argument("--overwrite", action="store_true",
                  help="replace an existing --out file (without it, one stops the run before "
                       "any reading)")
  ap.add_argument("--model-type", default="auto", choices=MODEL_TYPES,
                  help="optional assertion: fail unless the weights are this architecture; "
                  "'auto' (default) accepts what the tensor shapes say (also non-standard sizes)")
  ap.add_argument("--no-hash", action="store_true",
                  help="do not record the input file's SHA-256 in the output metadata")
  ap.add_argument("--quiet", "-q", action="store_true", help="print errors only")
  return ap


def check_paths(args) -> Optional[str]:
  """A path mistake on the command line (exit status 2), or None."""
  src, out = args.checkpoint, args.out
  if not os.path.exists(src) and src not in C.NAMES:
    return (f"--checkpoint {src}: no such file or directory (nor a known name: "
            f"{', '.join(C.NAMES)})")
  if os.path.isdir(out):
    return f"--out {out} is a directory; give the path of the .safetensors file to write"
  if os.path.exists(src) and (os.path.abspath(src) == os.path.abspath(out) or (
      os.path.exists(out) and os.path.samefile(src, out))):
    return (f"--out {out} is the --checkpoint itself; converting would replace the source "
            "weights: choose another --out")
  if os.path.isdir(src) and os.path.abspath(out).startswith(os.path.abspath(src) + os.sep) \
      and os.path.basename(out) in C.DIR_CANDIDATES:
    return f"--out {out} would replace one of the checkpoint's own files; choose another --out"
  if os.path.exists(out) and not args.overwrite:
    return f"--out {out} exists; pass --overwrite to replace it or choose another --out"
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    return f"--out {out}: output directory {out_dir} does not exist; create it first"
  return None


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  problem = check_paths(args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  try:
    convert(args.checkpoint, args.out, args.model_type, verbose=not args.quiet,
            hash_source=not args.no_hash)
  except (CheckpointError, OSError) as e:
    msg = str(e) if isinstance(e, CheckpointError) else f"{e.filename or ''}: {e.strerror or e}"
    print(f"error: {msg}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"error: interrupted; {args.out} was not written", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
