"""Convert a SAM checkpoint (official `.pth` or Hugging Face layout) to aopsam_jax safetensors.

    python -m conversion.convert_sam --checkpoint sam_vit_b_01ec64.pth --out sam_vit_b.safetensors

Accepted inputs:
  * the official releases (`sam_vit_{b,l,h}_*.pth`: a `torch.save`d state dict);
  * Hugging Face `transformers` SamModel weights (`facebook/sam-vit-*`): a
    `model.safetensors`, a `pytorch_model.bin`, a sharded
    `*.safetensors.index.json`, or the directory holding them.

`.pth`/`.bin` files are read with `torch.load(weights_only=True)`, which never
runs code from the file; a pickle that references anything beyond tensors and
plain containers is refused.  Every failure (missing file, truncated or
corrupt file, not a checkpoint, wrong model type) ends in one `CheckpointError`
whose message names the file; the CLI prints it and exits with status 1.  Path
mistakes on the command line (missing input, `--out` equal to the input, a
directory, or in a missing folder) exit with status 2 before anything is read.
Keys carrying a training wrapper's prefix (`module.`, `model.`) are stripped.

The output is a safetensors file named by Flax parameter path whose metadata
holds the `SamConfig`; `aopsam_jax.sam.params.load_sam(path)` loads it without torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import sys
import time
import warnings
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from aopsam_jax.sam import params as P
from aopsam_jax.sam.config import SAM_CONFIGS, SamConfig, get_sam_config

CheckpointError = P.CheckpointError
CONVERTER_VERSION = "1"
MODEL_TYPES = ("auto",) + tuple(SAM_CONFIGS)

_ZIP_MAGIC = b"PK\x03\x04"
_KNOWN_MAGIC = {  # a few common non-checkpoint formats, for a friendlier message
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
    b"\x89HDF": "an HDF5 file (Keras?)",
    b"\x93NUMPY": "a .npy array",
    b"version https://git-lfs": "a Git LFS pointer, not the weights (run `git lfs pull`)",
}


# --- reading checkpoints ------------------------------------------------------


def _sniff(path: str) -> str:
  """'zip' | 'pickle' | 'safetensors' | 'index' from the first bytes; else CheckpointError."""
  with open(path, "rb") as f:
    head = f.read(64)
  if not head:
    raise CheckpointError(f"{path}: the file is empty")
  if head.startswith(_ZIP_MAGIC):
    return "zip"
  if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode
    return "pickle"
  if len(head) >= 9:
    (n,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and 2 <= n <= os.path.getsize(path) - 8:
      return "safetensors"
  if head.lstrip()[:1] == b"{" and path.endswith(".json"):
    return "index"
  for magic, what in _KNOWN_MAGIC.items():
    if head.startswith(magic):
      raise CheckpointError(f"{path}: not a checkpoint; the file is {what}")
  raise CheckpointError(
      f"{path}: not a checkpoint (neither a PyTorch .pth/.bin nor a safetensors file; "
      f"first bytes {head[:8].hex(' ')})")


def _weights_only_reason(e: Exception) -> str:
  """The useful line out of torch's long weights-only error text."""
  text = str(e)
  for pat in (r"Trying to load unsupported (GLOBAL \S+)", r"Unsupported global: (GLOBAL \S+)",
              r"(Unsupported operand[^\n]*)", r"WeightsUnpickler error:\s*([^\n]+)"):
    m = re.search(pat, text)
    if m:
      return m.group(1).strip().rstrip(".")
  return text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__


def _first_sentence(e: Exception) -> str:
  text = str(e).strip()
  if not text:
    return type(e).__name__
  return re.split(r"(?<=[^.])\. ", text.splitlines()[0], maxsplit=1)[0][:200]


def _torch_load(path: str, kind: str):
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        f"{path}: reading PyTorch .pth/.bin files needs torch "
        "(`pip install 'aopsam-jax[convert]'`); safetensors inputs do not") from None
  import pickle
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    reason = _weights_only_reason(e)
    if reason.startswith("GLOBAL"):
      raise CheckpointError(
          f"{path}: refused to load: the pickle references {reason[7:]}, which is neither a "
          "tensor nor a plain container; only torch.save()d state dicts are accepted. "
          "Nothing from the file was executed") from None
    raise CheckpointError(
        f"{path}: not loadable as a weights-only PyTorch checkpoint ({reason}); the file is "
        "corrupt or not a torch.save() state dict. Nothing from the file was executed") from None
  except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError,
          AttributeError, struct.error) as e:
    detail = _first_sentence(e)
    if kind == "zip":
      what = "truncated or corrupt (its zip archive cannot be read)"
    elif isinstance(e, EOFError):
      what = "truncated (the pickle stream ends early)"
    else:
      what = "corrupt or not a PyTorch checkpoint"
    raise CheckpointError(f"{path}: {what}: {detail}") from None


def _tensor_to_numpy(name: str, v, path: str) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None and isinstance(v, torch.Tensor):
    v = v.detach()
    return v.to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
  raise CheckpointError(f"{path}: entry {name!r} has type {type(v).__name__}, not a tensor; "
                        "the file is a pickle but not a model state dict")


def _as_state_dict(obj, path: str) -> Dict[str, np.ndarray]:
  """Accept a state dict, or a training checkpoint wrapping one ('model'/'state_dict')."""
  if isinstance(obj, Mapping):
    for wrapper in ("model", "state_dict", "model_state_dict", "module"):
      inner = obj.get(wrapper)
      if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
        obj = inner
        break
  if not isinstance(obj, Mapping) or not obj:
    what = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise CheckpointError(f"{path}: the file holds {what}, not a model state dict")
  bad = [k for k in obj if not isinstance(k, str)]
  if bad:
    raise CheckpointError(f"{path}: state dict keys must be strings (found {bad[0]!r}); "
                          "the file is a pickle but not a model state dict")
  return {k: _tensor_to_numpy(k, v, path) for k, v in obj.items()}


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors import safe_open
  try:
    try:
      import torch  # noqa: F401  (handles bf16 / f16 exactly)
      framework = "pt"
    except ImportError:
      framework = "numpy"
    out = {}
    with safe_open(path, framework=framework) as f:
      for k in f.keys():
        t = f.get_tensor(k)
        if framework == "pt":
          t = t.to(__import__("torch").float32).numpy() if t.is_floating_point() else t.numpy()
        out[k] = t
    return out
  except CheckpointError:
    raise
  except Exception as e:  # safetensors raises several error types
    detail = _first_sentence(e)
    raise CheckpointError(f"{path}: truncated or corrupt safetensors file: {detail}") from None


def _read_index(path: str) -> Dict[str, np.ndarray]:
  """A sharded checkpoint: `{"weight_map": {key: shard file}}`."""
  try:
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: not a sharded-checkpoint index ({e})") from None
  base = os.path.dirname(path)
  out: Dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    out.update(read_checkpoint(os.path.join(base, shard)))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise CheckpointError(f"{path}: shards lack {len(missing)} indexed tensor(s), e.g. "
                          f"{missing[:5]}")
  return out


_DIR_CANDIDATES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def read_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """Any supported checkpoint file (or HF model directory) -> {key: float32 numpy}."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in _DIR_CANDIDATES:
      if os.path.exists(os.path.join(path, name)):
        return read_checkpoint(os.path.join(path, name))
    raise CheckpointError(f"{path}: directory holds none of {', '.join(_DIR_CANDIDATES)}")
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(P.PARTIAL_SUFFIX):
    raise CheckpointError(f"{path}: an unfinished file left by an interrupted conversion, not a "
                          "checkpoint; delete it and convert again")
  kind = _sniff(path)
  if kind == "safetensors":
    return _read_safetensors(path)
  if kind == "index":
    return _read_index(path)
  return _as_state_dict(_torch_load(path, kind), path)


# --- conversion ---------------------------------------------------------------


# First key components of SAM state dicts: official, and Hugging Face SamModel.
_SAM_ROOTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.", "vision_encoder.",
              "shared_image_embedding.")


def common_prefix(keys) -> str:
  """The leading dotted components every key shares ('module.', 'model.net.', or '')."""
  keys = list(keys)
  prefix = ""
  while keys and all("." in k for k in keys):
    first = keys[0].split(".", 1)[0] + "."
    if not all(k.startswith(first) for k in keys):
      break
    prefix += first
    keys = [k[len(first):] for k in keys]
  return prefix


def strip_wrapper_prefix(sd: Mapping[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], str]:
  """(state dict, stripped prefix): a training wrapper's prefix on every key
  (`module.` from DataParallel / DistributedDataParallel, `model.` from
  Lightning) is removed when what it leaves is a SAM state dict."""
  if any(k.startswith(_SAM_ROOTS) for k in sd):
    return dict(sd), ""
  full = common_prefix(sd)
  parts = full.split(".")[:-1]
  for n in range(1, len(parts) + 1):  # shortest prefix that reveals SAM keys
    prefix = ".".join(parts[:n]) + "."
    if any(k[len(prefix):].startswith(_SAM_ROOTS) for k in sd):
      return {k[len(prefix):]: v for k, v in sd.items()}, prefix
  return dict(sd), ""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def config_name(cfg: SamConfig) -> str:
  for name, c in SAM_CONFIGS.items():
    if c == cfg:
      return name
  return "custom"


def convert_checkpoint(checkpoint: str, model_type: str = "auto", notes: Optional[list] = None
                       ) -> Tuple[SamConfig, Dict[str, np.ndarray], str]:
  """Read and convert; returns (config, flat Flax params, source layout 'official'|'hf').

  A wrapper prefix on every key (`module.`, `model.`) is stripped; `notes`
  (a list) receives a line saying so.
  """
  sd, prefix = strip_wrapper_prefix(read_checkpoint(checkpoint))
  if prefix and notes is not None:
    notes.append(f"stripped the key prefix {prefix!r} (a DataParallel / Lightning training "
                 "wrapper) from every key")
  layout = "hf" if P.is_hf_layout(sd) else "official"
  cfg: Optional[SamConfig] = None
  if model_type != "auto":
    try:
      cfg = get_sam_config(model_type)
    except ValueError as e:
      raise CheckpointError(str(e)) from None
  try:
    return (*P.convert_state_dict(sd, cfg), layout)
  except CheckpointError as e:
    hint = ""
    if cfg is not None:
      try:
        official = P.hf_to_official(sd) if layout == "hf" else sd
        found = config_name(P.detect_config(official))
        if found != model_type:
          hint = (f" the tensor shapes look like {found} (use --model-type {found} or auto);")
      except CheckpointError:
        pass
    shared = common_prefix(sd)
    if shared and not prefix:
      hint += (f" every key starts with {shared!r}, and no SAM module name follows it (is this "
               "a SAM state dict?);")
    raise CheckpointError(f"{checkpoint}: --model-type {model_type}:{hint} {e}"
                          if cfg is not None else f"{checkpoint}:{hint} {e}") from None


def convert(checkpoint: str, out: str, model_type: str = "auto", *, verbose: bool = True,
            hash_source: bool = True) -> SamConfig:
  """Convert `checkpoint` and write `out`; returns the config."""
  t0 = time.time()
  log = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    raise CheckpointError(f"{out}: output directory {out_dir} does not exist")
  for stale in P.remove_stale_partials(out_dir):
    log(f"removed {stale} (left by an interrupted conversion)")
  log(f"reading {checkpoint}")
  notes: list = []
  cfg, flat, layout = convert_checkpoint(checkpoint, model_type, notes)
  for note in notes:
    log(f"  {note}")
  n = sum(int(v.size) for v in flat.values())
  name = config_name(cfg)
  log(f"  {layout} layout, {name} ({cfg.encoder_summary()}), {n:,} parameters")
  meta = {"model_type": name, "source_layout": layout,
          "source_file": os.path.basename(os.path.normpath(checkpoint)),
          "converter": f"conversion.convert_sam v{CONVERTER_VERSION}"}
  if hash_source and os.path.isfile(checkpoint):
    meta["source_sha256"] = _sha256(checkpoint)
  P.save_converted(out, cfg, flat, extra_metadata=meta)
  # Read back: the file must be complete and self-describing.
  cfg2, back, _ = P.read_converted(out)
  if cfg2 != cfg or set(back) != set(flat) or any(back[k].shape != flat[k].shape for k in flat):
    raise CheckpointError(f"{out}: written file does not read back identically")
  log(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) in {time.time() - t0:.1f} s")
  return cfg


def build_parser() -> argparse.ArgumentParser:
  from aopsam_jax.cli import EXIT_STATUS_HELP, ArgumentParser
  ap = ArgumentParser(
      prog="python -m conversion.convert_sam",
      description="Convert a Segment Anything (SAM v1) checkpoint to aopsam_jax safetensors "
      "(Flax parameter names, SamConfig in the metadata; load with "
      "aopsam_jax.sam.params.load_sam). Accepts the official sam_vit_{b,l,h}_*.pth files and "
      "Hugging Face transformers SamModel weights (facebook/sam-vit-*: model.safetensors, "
      "pytorch_model.bin, a sharded *.index.json, or the model directory).",
      epilog="Example: python -m conversion.convert_sam --checkpoint sam_vit_b_01ec64.pth "
      "--out sam_vit_b.safetensors. .pth/.bin files are read with torch.load(weights_only=True) "
      "and never execute code; reading them needs torch. The output is written under a "
      "temporary <out>.<pid>.partial name and renamed when complete; a leftover from a killed "
      "run is refused by the loader and removed by the next conversion into that directory. "
      "A state dict whose keys all carry a training wrapper's prefix (DataParallel 'module.', "
      "Lightning 'model.') is accepted; the prefix is stripped and reported. " + EXIT_STATUS_HELP)
  ap.add_argument("--checkpoint", "-c", required=True,
                  help="input: official .pth, HF .safetensors / .bin / .index.json, or HF model dir")
  ap.add_argument("--out", "-o", required=True, help="output .safetensors path")
  ap.add_argument("--model-type", default="auto", choices=MODEL_TYPES,
                  help="architecture to check the weights against; 'auto' (default) infers it "
                  "from the tensor shapes (and accepts non-standard sizes)")
  ap.add_argument("--no-hash", action="store_true",
                  help="do not record the input file's SHA-256 in the output metadata")
  ap.add_argument("--quiet", "-q", action="store_true", help="print errors only")
  return ap


def check_paths(args) -> Optional[str]:
  """A path mistake on the command line (exit status 2), or None."""
  src, out = args.checkpoint, args.out
  if not os.path.exists(src):
    return f"--checkpoint {src}: no such file or directory"
  if os.path.isdir(out):
    return f"--out {out} is a directory; give the path of the .safetensors file to write"
  if os.path.abspath(src) == os.path.abspath(out) or (
      os.path.exists(out) and os.path.samefile(src, out)):
    return (f"--out {out} is the --checkpoint itself; converting would replace the source "
            "weights: choose another --out")
  if os.path.isdir(src) and os.path.abspath(out).startswith(os.path.abspath(src) + os.sep) \
      and os.path.basename(out) in _DIR_CANDIDATES:
    return f"--out {out} would replace one of the checkpoint's own files; choose another --out"
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
