"""Checkpoint key mapping and the converted-weights file format.

Official SAM `.pth` keys are mapped to Flax parameter paths by a regex table
(bonsai style).  Hugging Face `transformers` SamModel names are first rewritten
to the official names (`hf_to_official_key`), so both layouts share one table.

A converted file is a safetensors file whose tensors are named by Flax path
(`image_encoder.blocks.0.attn.qkv.kernel`) and whose metadata holds the
`SamConfig` as JSON under "sam_config".  Loading it needs no torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aopsam_jax.sam.config import SAM_CONFIGS, SamConfig, TinyViTConfig, get_sam_config
from aopsam_jax.sam.flat_state import flat_params, load_flat_params, variable_value
from aopsam_jax.sam.modeling import Sam

FORMAT_VERSION = "1"


class CheckpointError(ValueError):
  """A checkpoint that cannot be converted or loaded; the message says why."""


# --- tensor transforms (torch layout -> Flax layout) -------------------------


def _ident(x: np.ndarray) -> np.ndarray:
  return x


def _linear_t(x: np.ndarray) -> np.ndarray:  # (out, in) -> (in, out)
  return x.T


def _conv_t(x: np.ndarray) -> np.ndarray:  # (O, I, kh, kw) -> (kh, kw, I, O)
  return x.transpose(2, 3, 1, 0)


def _convtr_t(x: np.ndarray) -> np.ndarray:  # ConvTranspose (I, O, kh, kw) -> (kh, kw, I, O)
  return x.transpose(2, 3, 0, 1)


def _conv_bn_entries(rx: str, tmpl: str):
  """A MobileSAM `Conv2d_BN` (`.c` conv, `.bn` BatchNorm) -> one `tiny_vit.ConvBN`."""
  return [(rx + r"\.c\.weight", tmpl + ".kernel", _conv_t),
          (rx + r"\.bn\.weight", tmpl + ".scale", _ident),
          (rx + r"\.bn\.bias", tmpl + ".bias", _ident),
          (rx + r"\.bn\.running_mean", tmpl + ".mean", _ident),
          (rx + r"\.bn\.running_var", tmpl + ".var", _ident)]


# (official-key regex, Flax-path template, transform).  Order does not matter:
# every pattern is anchored and they are mutually exclusive.
_E = r"image_encoder\."
_P = r"prompt_encoder\."
_D = r"mask_decoder\."
KEY_TABLE: List[Tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (_E + r"patch_embed\.proj\.weight", "image_encoder.patch_embed.kernel", _conv_t),
    (_E + r"patch_embed\.proj\.bias", "image_encoder.patch_embed.bias", _ident),
    (_E + r"pos_embed", "image_encoder.pos_embed", _ident),
    (_E + r"blocks\.(\d+)\.norm([12])\.weight", r"image_encoder.blocks.\1.norm\2.scale", _ident),
    (_E + r"blocks\.(\d+)\.norm([12])\.bias", r"image_encoder.blocks.\1.norm\2.bias", _ident),
    (_E + r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"image_encoder.blocks.\1.attn.\2.kernel",
     _linear_t),
    (_E + r"blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"image_encoder.blocks.\1.attn.\2.bias", _ident),
    (_E + r"blocks\.(\d+)\.attn\.(rel_pos_[hw])", r"image_encoder.blocks.\1.attn.\2", _ident),
    (_E + r"blocks\.(\d+)\.mlp\.(lin[12])\.weight", r"image_encoder.blocks.\1.mlp.\2.kernel",
     _linear_t),
    (_E + r"blocks\.(\d+)\.mlp\.(lin[12])\.bias", r"image_encoder.blocks.\1.mlp.\2.bias", _ident),
    (_E + r"neck\.0\.weight", "image_encoder.neck_conv1.kernel", _conv_t),
    (_E + r"neck\.1\.weight", "image_encoder.neck_ln1.scale", _ident),
    (_E + r"neck\.1\.bias", "image_encoder.neck_ln1.bias", _ident),
    (_E + r"neck\.2\.weight", "image_encoder.neck_conv2.kernel", _conv_t),
    (_E + r"neck\.3\.weight", "image_encoder.neck_ln2.scale", _ident),
    (_E + r"neck\.3\.bias", "image_encoder.neck_ln2.bias", _ident),
] + _conv_bn_entries(_E + r"patch_embed\.seq\.0", "image_encoder.patch_embed.conv1") + \
    _conv_bn_entries(_E + r"patch_embed\.seq\.2", "image_encoder.patch_embed.conv2") + \
    _conv_bn_entries(_E + r"(layers\.\d+\.(?:blocks\.\d+|downsample)\.(?:conv[123]|local_conv))",
                     r"image_encoder.\1") + [
    # MobileSAM TinyViT attention and MLP (the neck shares the ViT entries)
    (_E + r"(layers\.\d+\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12]))\.weight",
     r"image_encoder.\1.kernel", _linear_t),
    (_E + r"(layers\.\d+\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12]))\.bias",
     r"image_encoder.\1.bias", _ident),
    (_E + r"(layers\.\d+\.blocks\.\d+\.(?:attn|mlp)\.norm)\.weight", r"image_encoder.\1.scale",
     _ident),
    (_E + r"(layers\.\d+\.blocks\.\d+\.(?:attn|mlp)\.norm)\.bias", r"image_encoder.\1.bias", _ident),
    (_E + r"(layers\.\d+\.blocks\.\d+\.attn\.attention_biases)", r"image_encoder.\1", _ident),
    (_P + r"pe_layer\.positional_encoding_gaussian_matrix", "prompt_encoder.pe_gaussian", _ident),
    # The four (1, 256) point embeddings become rows of one (4, 256) table;
    # "@row" tells `convert_state_dict` which row.
    (_P + r"point_embeddings\.(\d)\.weight", r"prompt_encoder.point_embeddings@\1", _ident),
    (_P + r"not_a_point_embed\.weight", "prompt_encoder.not_a_point_embed", _ident),
    (_P + r"no_mask_embed\.weight", "prompt_encoder.no_mask_embed", _ident),
    (_P + r"mask_downscaling\.0\.weight", "prompt_encoder.mask_conv1.kernel", _conv_t),
    (_P + r"mask_downscaling\.0\.bias", "prompt_encoder.mask_conv1.bias", _ident),
    (_P + r"mask_downscaling\.1\.weight", "prompt_encoder.mask_ln1.scale", _ident),
    (_P + r"mask_downscaling\.1\.bias", "prompt_encoder.mask_ln1.bias", _ident),
    (_P + r"mask_downscaling\.3\.weight", "prompt_encoder.mask_conv2.kernel", _conv_t),
    (_P + r"mask_downscaling\.3\.bias", "prompt_encoder.mask_conv2.bias", _ident),
    (_P + r"mask_downscaling\.4\.weight", "prompt_encoder.mask_ln2.scale", _ident),
    (_P + r"mask_downscaling\.4\.bias", "prompt_encoder.mask_ln2.bias", _ident),
    (_P + r"mask_downscaling\.6\.weight", "prompt_encoder.mask_conv3.kernel", _conv_t),
    (_P + r"mask_downscaling\.6\.bias", "prompt_encoder.mask_conv3.bias", _ident),
    (_D + r"transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|"
     r"cross_attn_image_to_token)\.(q_proj|k_proj|v_proj|out_proj)\.weight",
     r"mask_decoder.transformer.layers.\1.\2.\3.kernel", _linear_t),
    (_D + r"transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|"
     r"cross_attn_image_to_token)\.(q_proj|k_proj|v_proj|out_proj)\.bias",
     r"mask_decoder.transformer.layers.\1.\2.\3.bias", _ident),
    (_D + r"transformer\.layers\.(\d+)\.(norm[1-4])\.weight",
     r"mask_decoder.transformer.layers.\1.\2.scale", _ident),
    (_D + r"transformer\.layers\.(\d+)\.(norm[1-4])\.bias",
     r"mask_decoder.transformer.layers.\1.\2.bias", _ident),
    (_D + r"transformer\.layers\.(\d+)\.mlp\.(lin[12])\.weight",
     r"mask_decoder.transformer.layers.\1.mlp.\2.kernel", _linear_t),
    (_D + r"transformer\.layers\.(\d+)\.mlp\.(lin[12])\.bias",
     r"mask_decoder.transformer.layers.\1.mlp.\2.bias", _ident),
    (_D + r"transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\.weight",
     r"mask_decoder.transformer.final_attn_token_to_image.\1.kernel", _linear_t),
    (_D + r"transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\.bias",
     r"mask_decoder.transformer.final_attn_token_to_image.\1.bias", _ident),
    (_D + r"transformer\.norm_final_attn\.weight", "mask_decoder.transformer.norm_final_attn.scale",
     _ident),
    (_D + r"transformer\.norm_final_attn\.bias", "mask_decoder.transformer.norm_final_attn.bias",
     _ident),
    (_D + r"iou_token\.weight", "mask_decoder.iou_token", _ident),
    (_D + r"mask_tokens\.weight", "mask_decoder.mask_tokens", _ident),
    (_D + r"output_upscaling\.0\.weight", "mask_decoder.upscale_conv1.kernel", _convtr_t),
    (_D + r"output_upscaling\.0\.bias", "mask_decoder.upscale_conv1.bias", _ident),
    (_D + r"output_upscaling\.1\.weight", "mask_decoder.upscale_ln.scale", _ident),
    (_D + r"output_upscaling\.1\.bias", "mask_decoder.upscale_ln.bias", _ident),
    (_D + r"output_upscaling\.3\.weight", "mask_decoder.upscale_conv2.kernel", _convtr_t),
    (_D + r"output_upscaling\.3\.bias", "mask_decoder.upscale_conv2.bias", _ident),
    (_D + r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.weight",
     r"mask_decoder.\1.layers.\2.kernel", _linear_t),
    (_D + r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.bias",
     r"mask_decoder.\1.layers.\2.bias", _ident),
]
_COMPILED = [(re.compile(p + r"\Z"), t, f) for p, t, f in KEY_TABLE]

# Keys that may appear in a checkpoint but carry no parameters.
IGNORED_KEYS = ("pixel_mean", "pixel_std")
# ... and whole keys of MobileSAM that carry nothing the model uses: BatchNorm
# step counters, the attention-offset index tables (rebuilt from the window
# size), and TinyViT's ImageNet classifier head, which MobileSAM never calls.
IGNORED_KEY_RX = re.compile(r"(.*\.num_batches_tracked|.*\.attention_bias_idxs|"
                            r"image_encoder\.(?:norm_head|head)\.(?:weight|bias))\Z")


def map_key(key: str) -> Optional[Tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  """Official checkpoint key -> (Flax path, transform), or None if unknown."""
  for rx, tmpl, fn in _COMPILED:
    m = rx.match(key)
    if m:
      return m.expand(tmpl), fn
  return None


# --- Hugging Face transformers naming ----------------------------------------

# Ordered (regex, replacement) pairs turning a `facebook/sam-vit-*` key into the
# official one (inverse of transformers' convert_sam_to_hf.py mapping).
_HF_RULES: List[Tuple[str, str]] = [
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^prompt_encoder\.point_embed\.(\d)\.", r"prompt_encoder.point_embeddings.\1."),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^shared_image_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"\.proj_in\.", ".layers.0X."),  # placeholders so layers.0 -> layers.1 does not cascade
    (r"\.layers\.0\.(weight|bias)$", r".layers.1X.\1"),
    (r"\.proj_out\.", ".layers.2X."),
    (r"\.layers\.(\d)X\.", r".layers.\1."),
    (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"\.layer_norm(\d)\.", r".norm\1."),
]
_HF_COMPILED = [(re.compile(p), r) for p, r in _HF_RULES]


def is_hf_layout(keys: Iterable[str]) -> bool:
  return any(k.startswith("vision_encoder.") for k in keys)


def hf_to_official_key(key: str) -> str:
  for rx, rep in _HF_COMPILED:
    key = rx.sub(rep, key)
  return key


def hf_to_official(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Rename a transformers SamModel state dict to official keys.

  The tied positional matrix may appear twice (shared_image_embedding and
  prompt_encoder.shared_embedding): the copies must agree.  A stacked
  `prompt_encoder.point_embed.weight` (4, 256) is split into rows.
  """
  out: Dict[str, np.ndarray] = {}
  for k, v in sd.items():
    if k == "prompt_encoder.point_embed.weight" and np.ndim(v) == 2:
      for i in range(v.shape[0]):
        out[f"prompt_encoder.point_embeddings.{i}.weight"] = v[i:i + 1]
      continue
    nk = hf_to_official_key(k)
    if nk in out:
      if not np.array_equal(out[nk], v):
        raise CheckpointError(f"tied tensors disagree for {nk!r} (from {k!r})")
      continue
    out[nk] = v
  return out


# --- model construction and config detection --------------------------------


def abstract_model(cfg: SamConfig) -> Sam:
  return nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=8)  # tracing a vit_h takes seconds; configs are frozen
def flat_param_shapes(cfg: SamConfig) -> Dict[str, Tuple[int, ...]]:
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return {".".join(str(p) for p in path): tuple(v.shape)
          for path, v in nnx.to_flat_state(state)}


def _detect_tiny_vit(sd: Mapping[str, np.ndarray]) -> SamConfig:
  """MobileSAM (vit_t, or a custom TinyViT) from the shapes of its encoder tensors."""
  depth: Dict[int, int] = {}
  for k in sd:
    m = re.match(r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k)
    if m:
      depth[int(m.group(1))] = max(depth.get(int(m.group(1)), 0), int(m.group(2)) + 1)
  n = len(depth)
  stage0 = "image_encoder.layers.0.blocks.0.conv1.c.weight"
  need = [stage0, "image_encoder.layers.0.blocks.0.conv3.c.weight"]
  for i in range(1, n):
    b = f"image_encoder.layers.{i}.blocks.0."
    need += [b + "attn.qkv.weight", b + "attn.attention_biases", b + "mlp.fc1.weight",
             b + "local_conv.c.weight"]
  absent = [k for k in need if k not in sd]
  if n < 2 or sorted(depth) != list(range(n)) or absent:
    raise CheckpointError("cannot infer the TinyViT size: missing "
                          + (", ".join(absent[:10]) if absent else "image_encoder.layers.*"))
  dims = [int(sd[need[1]].shape[0])]
  # Stage 0 (MBConv) has no heads or window; its entries are unused and keep
  # the defaults so that the MobileSAM release compares equal to vit_t.
  heads, windows, mlp = [TinyViTConfig().num_heads[0]], [TinyViTConfig().window_sizes[0]], 4.0
  for i in range(1, n):
    b = f"image_encoder.layers.{i}.blocks.0."
    dims.append(int(sd[b + "attn.qkv.weight"].shape[1]))
    nh, nb = sd[b + "attn.attention_biases"].shape
    heads.append(int(nh))
    windows.append(int(round(np.sqrt(nb))))
    mlp = sd[b + "mlp.fc1.weight"].shape[0] / dims[-1]
  local = int(sd["image_encoder.layers.1.blocks.0.local_conv.c.weight"].shape[-1])
  t = TinyViTConfig(embed_dims=tuple(dims), depths=tuple(depth[i] for i in range(n)),
                    num_heads=tuple(heads), window_sizes=tuple(windows), mlp_ratio=float(mlp),
                    mbconv_expand_ratio=sd[stage0].shape[0] / dims[0], local_conv_size=local)
  for cfg in SAM_CONFIGS.values():
    if cfg.tiny_vit == t:
      return cfg
  return SamConfig(tiny_vit=t)


def detect_config(sd: Mapping[str, np.ndarray]) -> SamConfig:
  """Infer vit_b / vit_l / vit_h / vit_t (or a custom size) from official-layout shapes."""
  if "image_encoder.patch_embed.seq.0.c.weight" in sd:
    return _detect_tiny_vit(sd)
  try:
    dim = int(sd["image_encoder.patch_embed.proj.weight"].shape[0])
    pos = sd["image_encoder.pos_embed"].shape
  except KeyError as e:
    raise CheckpointError(f"not a SAM checkpoint: missing {e.args[0]!r}") from None
  depth = 1 + max((int(m.group(1)) for k in sd
                   for m in [re.match(r"image_encoder\.blocks\.(\d+)\.", k)] if m), default=-1)
  rel = [f"image_encoder.blocks.{i}.attn.rel_pos_h" for i in range(depth)]
  absent = [k for k in rel if k not in sd]
  if depth == 0 or absent:
    raise CheckpointError("cannot infer the SAM size: missing "
                          + (", ".join(absent[:10]) if absent else "image_encoder.blocks.*"))
  head_dim = int(sd[rel[0]].shape[1])
  grid = int(pos[1])
  global_idx = tuple(i for i in range(depth) if sd[rel[i]].shape[0] == 2 * grid - 1)
  for cfg in SAM_CONFIGS.values():
    if (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_global_attn_indexes,
        cfg.embed_size) == (dim, depth, global_idx, grid) and \
        dim // cfg.encoder_num_heads == head_dim:
      return cfg
  base = SamConfig()
  return SamConfig(encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=dim // head_dim,
                   encoder_global_attn_indexes=global_idx, img_size=grid * base.patch_size)


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: Optional[SamConfig] = None
                       ) -> Tuple[SamConfig, Dict[str, np.ndarray]]:
  """Official or HF state dict (numpy values) -> (config, flat Flax params).

  Every key must be used and every parameter filled with the right shape;
  otherwise a CheckpointError lists the offending keys.
  """
  sd = {k: np.asarray(v) for k, v in sd.items()}
  if is_hf_layout(sd):
    sd = hf_to_official(sd)
  cfg = cfg or detect_config(sd)
  expected = flat_param_shapes(cfg)
  out: Dict[str, np.ndarray] = {}
  rows: Dict[str, Dict[int, np.ndarray]] = {}
  unexpected, bad_shape = [], []
  misshaped = set()  # present but wrongly shaped: reported as such, not as missing
  for key, value in sd.items():
    if key.split(".")[-1] in IGNORED_KEYS or IGNORED_KEY_RX.match(key):
      continue
    hit = map_key(key)
    if hit is None:
      unexpected.append(key)
      continue
    path, fn = hit
    value = np.ascontiguousarray(fn(value.astype(np.float32)))
    if "@" in path:
      path, row = path.split("@")
      rows.setdefault(path, {})[int(row)] = value
      continue
    if path not in expected:
      unexpected.append(key)
    elif tuple(value.shape) != expected[path]:
      bad_shape.append(f"{key}: got {tuple(value.shape)} -> expected {expected[path]} at {path}")
      misshaped.add(path)
    else:
      out[path] = value
  for path, parts in rows.items():
    if path not in expected:
      unexpected.extend(f"{path} row {i}" for i in parts)
      continue
    n = expected[path][0]
    if sorted(parts) != list(range(n)):
      bad_shape.append(f"{path}: rows {sorted(parts)} present, expected 0..{n - 1}")
      continue
    value = np.concatenate([parts[i] for i in range(n)], axis=0)
    if value.shape != expected[path]:
      bad_shape.append(f"{path}: got {value.shape}, expected {expected[path]}")
    else:
      out[path] = value
  natural = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]  # noqa: E731
  missing = sorted(set(expected) - set(out) - set(rows) - misshaped, key=natural)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing parameter(s): {', '.join(missing[:20])}"
                    + (" ..." if len(missing) > 20 else ""))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(sorted(unexpected)[:20])}"
                    + (" ..." if len(unexpected) > 20 else ""))
  if bad_shape:
    problems.append(f"{len(bad_shape)} wrongly shaped: " + "; ".join(bad_shape[:20]))
  if problems:
    raise CheckpointError(f"checkpoint does not match SAM config ({cfg.encoder_summary()}): "
                          + " | ".join(problems))
  return cfg, out


# --- converted file I/O (no torch) -------------------------------------------


PARTIAL_SUFFIX = ".partial"


def partial_path(path: str) -> str:
  """Where `path` is written before it is complete: `<path>.<pid>.partial`
  beside it (same filesystem, so the final rename is atomic)."""
  return f"{path}.{os.getpid()}{PARTIAL_SUFFIX}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # exists, owned by someone else
    return True
  return True


def remove_stale_partials(directory: str) -> List[str]:
  """Delete `*.<pid>.partial` files in `directory` whose writer is gone (a
  killed run's leftovers); returns their paths.  Files of live writers stay."""
  removed = []
  try:
    names = os.listdir(directory or ".")
  except OSError:
    return removed
  for name in names:
    m = re.fullmatch(r".+\.(\d+)" + re.escape(PARTIAL_SUFFIX), name)
    if m and not _pid_alive(int(m.group(1))):
      path = os.path.join(directory, name)
      try:
        os.remove(path)
        removed.append(path)
      except OSError:
        pass
  return removed


def _default_file_mode() -> int:
  """0o666 minus the umask: the mode `open()` would give a new file."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def save_converted(path: str, cfg: SamConfig, params: Mapping[str, np.ndarray],
                   extra_metadata: Optional[Mapping[str, str]] = None) -> None:
  """Write a converted safetensors file atomically.

  The data goes to `partial_path(path)` first, renamed onto `path` only when
  complete; on any error the partial file is removed, and one left by a
  killed process is refused by `read_converted` (and removed by
  `remove_stale_partials`).  The file gets the umask's normal mode
  (safetensors itself creates 0600 files).
  """
  from safetensors.numpy import save_file
  meta = {"format": "aopsam_jax.sam", "format_version": FORMAT_VERSION,
          "sam_config": cfg.to_json()}
  meta.update(extra_metadata or {})
  tmp = partial_path(path)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, tmp, metadata=meta)
    os.chmod(tmp, _default_file_mode())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_converted(path: str) -> Tuple[SamConfig, Dict[str, np.ndarray], Dict[str, str]]:
  from safetensors import safe_open
  if os.fspath(path).endswith(PARTIAL_SUFFIX):
    raise CheckpointError(f"{path} is an unfinished file left by an interrupted conversion or "
                          "save, not weights; delete it and convert again")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such weights file: {path}")
  try:
    with safe_open(path, framework="numpy") as f:
      meta = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises several error types
    raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
  if meta.get("format") != "aopsam_jax.sam" or "sam_config" not in meta:
    raise CheckpointError(
        f"{path} is not a converted aopsam_jax SAM file (no sam_config metadata); "
        "convert official checkpoints with `python -m conversion.convert_sam`")
  return SamConfig.from_json(meta["sam_config"]), tensors, meta


def params_into_model(model: Sam, params: Mapping[str, np.ndarray]) -> Sam:
  """Write flat Flax params into `model` (in place, float32), checking keys and shapes."""
  return load_flat_params(model, params, error=CheckpointError, dtype=jnp.float32)


def build_model(cfg: Union[SamConfig, str], params: Optional[Mapping[str, np.ndarray]] = None,
                *, dtype=None, seed: int = 0) -> Sam:
  """A Sam of `cfg` (a SamConfig, or a model type such as "vit_b") with the
  given flat params, or random-init when params is None.

  With params, the model is built abstractly (`nnx.eval_shape`) and filled, so
  no random init runs: no op-by-op compile, no second copy of the weights.
  """
  if isinstance(cfg, str):
    cfg = get_sam_config(cfg)
  elif not isinstance(cfg, SamConfig):
    raise TypeError(f"build_model takes a SamConfig or a model type "
                    f"({', '.join(sorted(SAM_CONFIGS))}), not {type(cfg).__name__}")
  if params is None:
    return Sam(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
  model = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(seed), dtype=dtype))
  params_into_model(model, params)
  leftover = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model))
              if isinstance(variable_value(v), jax.ShapeDtypeStruct)]
  if leftover:  # state outside nnx.Param would stay abstract
    raise CheckpointError(f"model state not filled from params: {leftover[:5]}")
  return model


def load_converted(path: str, *, dtype=None) -> Sam:
  """Load a converted safetensors file into a Sam (no torch needed).  Every
  other source (official .pth, HF folder, a name) goes through
  `aopsam_jax.sam.checkpoints.load_sam`."""
  cfg, params, _ = read_converted(path)
  return build_model(cfg, params, dtype=dtype)


load_sam = load_converted  # converted files only; see checkpoints.load_sam


def encoder_fingerprint(sam) -> str:
  """sha256 of the image encoder's config and weights: which encoder a predictor was trained on."""
  h = hashlib.sha256()
  h.update(sam.config.to_json().encode())
  # dotted names sort like the key tuples ('.' is below every identifier character)
  for name, arr in sorted(flat_params(sam.image_encoder).items()):
    h.update(name.encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()
