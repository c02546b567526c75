"""SAM weights from whatever the user has: a file, a folder or a name.

    from aopsam_jax.sam.checkpoints import load_sam
    sam = load_sam("sam_vit_h_4b8939.pth")         # official .pth, any size (shapes decide)
    sam = load_sam("sam_vit_b.safetensors")        # converted by conversion.convert_sam
    sam = load_sam("path/to/sam-vit-base")         # Hugging Face transformers SamModel folder
    sam = load_sam("vit_l")                        # official release: downloaded once, cached
    sam = load_sam("facebook/sam-vit-huge")        # HF hub id (huggingface_hub), cached

Every source ends as one `params.convert_state_dict` (key map + shape
checks); `model_type` is only an assertion on the detected architecture.
Nothing here imports torch: `.pth` / `.bin` files are read by `pth_reader`.

Names are downloaded from the official URLs (segment-anything README;
`AOPSAM_SAM_BASE_URL` replaces the base, e.g. for a mirror) or from the HF
hub, converted, and the converted file is kept in the cache directory
`$AOPSAM_CACHE`, else `$XDG_CACHE_HOME/aopsam_jax`, else
`~/.cache/aopsam_jax` (subfolder `checkpoints/`).  Downloads go to a
`.partial` file that is removed on any failure; the converted file is
written under a temporary name and renamed, so the cache never holds a
half-written file under a final name.  Every failure is one
`CheckpointError` whose message names the file or URL and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import sys
import time
import urllib.error
import urllib.request
import zipfile
from typing import Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from aopsam_jax.sam import params as P
from aopsam_jax.sam import pth_reader
from aopsam_jax.sam.config import (CHECKPOINT_NAMES, HF_CHECKPOINTS, OFFICIAL_CHECKPOINTS,
                                   SAM_CONFIGS, SamConfig)

CheckpointError = P.CheckpointError
CONVERTER_VERSION = "2"

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL_FILES = OFFICIAL_CHECKPOINTS
HF_IDS = HF_CHECKPOINTS
NAMES = CHECKPOINT_NAMES

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


# --- reading checkpoint files -------------------------------------------------


def sniff(path: str) -> str:
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


def _first_sentence(e: Exception) -> str:
  text = str(e).strip()
  if not text:
    return type(e).__name__
  return re.split(r"(?<=[^.])\. ", text.splitlines()[0], maxsplit=1)[0][:200]


def read_pth(path: str, kind: str) -> Dict[str, np.ndarray]:
  """A torch.save state dict, through the torch-free allowlist reader."""
  try:
    return pth_reader.read_pth(path)
  except pth_reader.RefusedGlobal as e:
    raise CheckpointError(
        f"{path}: refused to load: the pickle references {e.module}.{e.name}, which is neither "
        "a tensor nor a plain container; only torch.save()d state dicts are accepted. "
        "Nothing from the file was executed") from None
  except pth_reader.PthError as e:
    raise CheckpointError(f"{path}: {e}" if not str(e).startswith(path) else str(e)) from None
  except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, KeyError,
          IndexError, TypeError, AttributeError, struct.error) as e:
    if kind == "zip":
      what = "truncated or corrupt (its zip archive cannot be read)"
    elif isinstance(e, EOFError):
      what = "truncated (the pickle stream ends early)"
    else:
      what = "corrupt or not a PyTorch checkpoint"
    raise CheckpointError(f"{path}: {what}: {_first_sentence(e)}. Nothing from the file was "
                          "executed") from None


_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
              "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
              "BOOL": np.dtype("?")}


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """(tensors, metadata) of a safetensors file, bf16 included (memory-mapped read)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for k, info in header.items():
      dt = _ST_DTYPES.get(info["dtype"])
      if dt is None:
        raise ValueError(f"tensor {k}: unsupported dtype {info['dtype']}")
      a, b = info["data_offsets"]
      shape = tuple(info["shape"])
      if not 0 <= a <= b <= data.size or b - a != int(np.prod(shape)) * dt.itemsize:
        raise ValueError(f"tensor {k}: data offsets [{a}, {b}) outside the file "
                         f"({data.size} data bytes)")
      out[k] = np.array(data[a:b].view(dt).reshape(shape))
    return out, meta
  except (ValueError, KeyError, TypeError, struct.error, OSError) as e:
    raise CheckpointError(f"{path}: truncated or corrupt safetensors file: "
                          f"{_first_sentence(e)}") from None


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


DIR_CANDIDATES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def read_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """Any supported checkpoint file (or HF model directory) -> {key: numpy array}."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in DIR_CANDIDATES:
      if os.path.exists(os.path.join(path, name)):
        return read_checkpoint(os.path.join(path, name))
    raise CheckpointError(f"{path}: directory holds none of {', '.join(DIR_CANDIDATES)}")
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(P.PARTIAL_SUFFIX):
    raise CheckpointError(f"{path}: an unfinished file left by an interrupted conversion, not a "
                          "checkpoint; delete it and convert again")
  kind = sniff(path)
  if kind == "safetensors":
    return read_safetensors(path)[0]
  if kind == "index":
    return _read_index(path)
  return read_pth(path, kind)


# --- conversion -----------------------------------------------------------------


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


def strip_wrapper_prefix(sd: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], str]:
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


def config_name(cfg: SamConfig) -> str:
  for name, c in SAM_CONFIGS.items():
    if c == cfg:
      return name
  return "custom"


def check_model_type(cfg: SamConfig, model_type: Optional[str], where: str) -> None:
  """`model_type` (None / 'auto': anything) must name the detected architecture."""
  if model_type in (None, "", "auto"):
    return
  if model_type not in SAM_CONFIGS:
    raise CheckpointError(f"--model-type {model_type}: unknown; expected one of "
                          f"{', '.join(sorted(SAM_CONFIGS))}")
  found = config_name(cfg)
  if found != model_type:
    raise CheckpointError(f"{where}: --model-type {model_type} given, but the tensor shapes are "
                          f"{found} ({cfg.encoder_summary()}); drop --model-type to accept "
                          "what the file holds")


def convert_checkpoint(checkpoint: str, model_type: Optional[str] = None,
                       notes: Optional[list] = None
                       ) -> Tuple[SamConfig, Dict[str, np.ndarray], str]:
  """Read and convert; returns (config, flat Flax params, source layout 'official'|'hf').

  The architecture always comes from the tensor shapes; `model_type` is an
  assertion.  A wrapper prefix on every key (`module.`, `model.`) is stripped;
  `notes` (a list) receives a line saying so."""
  sd, prefix = strip_wrapper_prefix(read_checkpoint(checkpoint))
  if prefix and notes is not None:
    notes.append(f"stripped the key prefix {prefix!r} (a DataParallel / Lightning training "
                 "wrapper) from every key")
  layout = "hf" if P.is_hf_layout(sd) else "official"
  try:
    cfg, flat = P.convert_state_dict(sd)
  except CheckpointError as e:
    shared = common_prefix(sd)
    hint = (f" every key starts with {shared!r}, and no SAM module name follows it (is this "
            "a SAM state dict?);") if shared and not prefix else ""
    raise CheckpointError(f"{checkpoint}:{hint} {e}") from None
  check_model_type(cfg, model_type, checkpoint)
  return cfg, flat, layout


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def convert(checkpoint: str, out: str, model_type: Optional[str] = None, *, verbose: bool = True,
            hash_source: bool = True, source_name: Optional[str] = None,
            stream=None) -> SamConfig:
  """Convert `checkpoint` and write `out` atomically; returns the config.
  Progress lines go to `stream` (default stdout) when `verbose`."""
  t0 = time.time()
  log = (lambda *a: print(*a, file=stream or sys.stdout, flush=True)) if verbose else \
      (lambda *a: None)
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
          "source_file": source_name or os.path.basename(os.path.normpath(checkpoint)),
          "converter": f"aopsam_jax.sam.checkpoints v{CONVERTER_VERSION}"}
  if hash_source and os.path.isfile(checkpoint):
    meta["source_sha256"] = sha256_file(checkpoint)
  P.save_converted(out, cfg, flat, extra_metadata=meta)
  # Read back: the file must be complete and self-describing.
  cfg2, back, _ = P.read_converted(out)
  if cfg2 != cfg or set(back) != set(flat) or any(back[k].shape != flat[k].shape for k in flat):
    raise CheckpointError(f"{out}: written file does not read back identically")
  log(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) in {time.time() - t0:.1f} s")
  return cfg


# --- names: download once, convert, cache ---------------------------------------


def cache_dir() -> str:
  """`$AOPSAM_CACHE`, else `$XDG_CACHE_HOME/aopsam_jax`, else `~/.cache/aopsam_jax`."""
  root = os.environ.get("AOPSAM_CACHE")
  if not root:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(xdg, "aopsam_jax")
  return os.path.abspath(os.path.expanduser(root))


def official_url(name: str) -> str:
  base = os.environ.get("AOPSAM_SAM_BASE_URL") or OFFICIAL_BASE_URL
  return base.rstrip("/") + "/" + OFFICIAL_FILES[name]


def cached_path(name: str) -> str:
  """Where the converted weights of a named checkpoint live in the cache."""
  stem = OFFICIAL_FILES[name][:-4] if name in OFFICIAL_FILES else name.replace("/", "--")
  return os.path.join(cache_dir(), "checkpoints", stem + ".safetensors")


def download(url: str, dest: str, *, progress: bool = True, timeout: float = 60.0) -> None:
  """`url` -> `dest` through `<dest>.<pid>.partial`, removed on any failure (no half
  file remains)."""
  from tqdm import tqdm
  part = P.partial_path(dest)
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      total = int(r.headers.get("Content-Length") or 0) or None
      got = 0
      with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                       desc=os.path.basename(dest), disable=not progress,
                                       file=sys.stderr) as bar:
        for chunk in iter(lambda: r.read(1 << 20), b""):
          f.write(chunk)
          got += len(chunk)
          bar.update(len(chunk))
    if total is not None and got != total:
      raise OSError(f"connection closed after {got} of {total} bytes")
    os.replace(part, dest)
  except BaseException:
    if os.path.exists(part):
      os.remove(part)
    raise


def _fetch_official(name: str, out: str, progress: bool) -> None:
  url = official_url(name)
  raw = out[:-len(".safetensors")] + ".pth"
  try:
    download(url, raw, progress=progress)
  except (OSError, urllib.error.URLError, ValueError) as e:
    reason = getattr(e, "reason", None) or _first_sentence(e)
    raise CheckpointError(
        f"could not download {name} from {url} ({reason}); download it where you have network "
        f"access and pass the file instead: --checkpoint /path/to/{OFFICIAL_FILES[name]}") from None
  try:
    convert(raw, out, name, verbose=progress, source_name=OFFICIAL_FILES[name],
            stream=sys.stderr)
  finally:
    os.remove(raw)  # the converted file is all the cache keeps


def _fetch_hf(repo_id: str, out: str, progress: bool) -> None:
  try:
    from huggingface_hub import hf_hub_download
    path = hf_hub_download(repo_id, "model.safetensors")
  except Exception as e:  # hub / network errors come in many types
    raise CheckpointError(
        f"could not download {repo_id} from the Hugging Face hub ({_first_sentence(e)}); download "
        f"the model folder where you have network access (huggingface-cli download {repo_id}) "
        "and pass it instead: --checkpoint /path/to/folder") from None
  convert(path, out, HF_IDS[repo_id], verbose=progress, source_name=repo_id, stream=sys.stderr)


def fetch_named(name: str, *, progress: bool = True) -> str:
  """The converted file of a named checkpoint, downloading and converting it once."""
  out = cached_path(name)
  if os.path.isfile(out):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  (_fetch_official if name in OFFICIAL_FILES else _fetch_hf)(name, out, progress)
  return out


# --- one entry point --------------------------------------------------------------


def is_converted(path: str) -> bool:
  """A file written by `params.save_converted` (read without conversion)."""
  if not os.path.isfile(path):
    return False
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > 100 << 20:
        return False
      meta = json.loads(f.read(n)).get("__metadata__") or {}
  except (ValueError, struct.error, OSError, AttributeError):
    return False
  return meta.get("format") == "aopsam_jax.sam"


def resolve(source: str, *, progress: bool = True) -> str:
  """A local file / folder path, or the cached converted file of a known name."""
  source = os.fspath(source)
  if os.path.exists(source):
    return source
  if source in NAMES:
    return fetch_named(source, progress=progress)
  raise CheckpointError(
      f"{source}: no such file or folder, and not a known checkpoint name "
      f"({', '.join(NAMES)})")


def load_params(source: str, model_type: Optional[str] = None, *, progress: bool = True
                ) -> Tuple[SamConfig, Dict[str, np.ndarray], str]:
  """(config, flat params, description) of any source (see module docstring)."""
  path = resolve(source, progress=progress)
  if is_converted(path):
    cfg, flat, _ = P.read_converted(path)
    check_model_type(cfg, model_type, source)
  else:
    cfg, flat, _ = convert_checkpoint(path, model_type)
  return cfg, flat, source if source in NAMES else os.path.basename(os.path.normpath(source))


def load_sam(source: str, model_type: Optional[str] = None, *, dtype=None,
             progress: bool = True):
  """A `Sam` from any source; `model_type` only asserts the detected architecture."""
  cfg, flat, _ = load_params(source, model_type, progress=progress)
  return P.build_model(cfg, flat, dtype=dtype)

