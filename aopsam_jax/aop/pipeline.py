"""AoP-SAM in one program: image -> encoder -> prompt predictor -> ASF -> masks.

    from aopsam_jax.aop import bundle, pipeline
    b = bundle.load_bundle(path)                       # SAM + predictor + AsfConfig
    inp = pipeline.prepare(image)                      # host: PIL resize + pad
    out = pipeline.segment_jit(b.model, inp.padded, inp.input_hw, inp.original_hw, b.asf)
    records = pipeline.to_records(out)                 # official records (sam.records)
    # or simply: pipeline.AopMaskGenerator(b).generate(image)

`segment` is a pure function of (model, padded image(s), sizes): image
encoder, prompt predictor, ASF (coarse + fine decoding, filtering, mask
NMS) all trace into the caller's program, so it can be embedded in user
code under `jax.jit`.  `segment_jit` is the jitted version: ONE compiled
executable per (model structure, AsfConfig, batch shape); the image size
is data (`input_hw`, `original_hw`), so images of any size share it.
Inputs may be one image (S, S, 3) with (2,) sizes, or a batch (B, S, S, 3)
with (B, 2) sizes (vmapped).

Outputs (N = cfg.max_masks, P = cfg.k_coarse + cfg.k_fine, one leading B
axis for batches); `masks_at_original` / `to_records` turn them into masks / records:
  low_res_logits (N, 256, 256)  decoder logits of each output mask
  iou, stability (N,)           predicted IoU, stability score (low-res)
  boxes (N, 4)                  XYXY in the original image (from low-res logits)
  input_hw, original_hw (2,)    the image's sizes
  points (N, 2)                 the prompt of each mask, xy in the original image
  mask_index (N,), stage (N,)   multimask output index; 0 coarse / 1 fine prompt
  valid (N,)                    slot holds a mask (valid first, by predicted IoU)
  prompt_points (P, 2), prompt_valid (P,), prompt_accepted (P,): every decoded prompt
  num_prompts, num_filtered, num_kept, heatmap (256, 256) logits
  num_candidates, removed_iou, removed_stability, removed_redundant, removed_nms:
                                what each mask filter removed (`asf.filter_counts`)
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aopsam_jax.sam import geometry, mask_ops, records as records_lib
from aopsam_jax.aop import asf
from aopsam_jax.aop.prompt_predictor import PromptPredictor, predictor_inputs
from aopsam_jax.sam.compile_options import jit
from aopsam_jax.sam.modeling import resolve_prompt_chunk
from aopsam_jax.sam.predictor import OUT_ALIGN
from aopsam_jax.sam.prompts import single_point_prompts
from aopsam_jax.sam.transforms import postprocess_masks, prepare_image

AsfConfig = asf.AsfConfig
# per-filter candidate counts passed through from `asf.filter_counts`
FILTER_COUNTS = ("num_candidates", "removed_iou", "removed_stability", "removed_redundant",
                 "removed_nms")


class AopSam(nnx.Module):
  """SAM + prompt predictor, one NNX graph (split / merge as a unit)."""

  def __init__(self, sam, predictor: PromptPredictor):
    self.sam = sam
    self.predictor = predictor

  def heatmap(self, padded: jax.Array, input_hw: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Padded uint8 (B, S, S, 3), input_hw (B, 2) -> (embeddings (B, 64, 64, 256),
    heatmap logits (B, 256, 256))."""
    emb, small = predictor_inputs(self.sam.encode_image, padded, input_hw)
    return emb, self.predictor(emb, small)


class AopInputs(NamedTuple):
  padded: np.ndarray       # (S, S, 3) uint8
  input_hw: np.ndarray     # (2,) int32
  original_hw: np.ndarray  # (2,) int32


def prepare(image: np.ndarray, img_size: int = 1024) -> AopInputs:
  """RGB uint8 (H, W, 3) -> AopInputs (official PIL resize, zero padding)."""
  padded, ihw, ohw = prepare_image(np.asarray(image), img_size)
  return AopInputs(padded, ihw.astype(np.int32), ohw.astype(np.int32))


def _segment_one(model: AopSam, padded, input_hw, original_hw, cfg: AsfConfig,
                 batched: bool = False):
  sam = model.sam
  img_size = padded.shape[-2]
  if img_size != cfg.img_size:
    raise ValueError(f"padded input is {img_size} wide, AsfConfig.img_size is {cfg.img_size}")
  input_hw = input_hw.astype(jnp.int32)
  original_hw = original_hw.astype(jnp.int32)
  emb, hm = model.heatmap(padded[None], input_hw[None])
  hm = hm[0]

  def decode_fn(points_in, valid):
    # ASF's valid slots come first; where prompts run in chunks (CPU), the
    # chunks past them are skipped.  Invalid slots are ignored by ASF.
    coords, labels = single_point_prompts(points_in)
    return sam.decode(emb, coords, labels, multimask_output=True,
                      num_valid=jnp.sum(valid.astype(jnp.int32)))

  out = asf.run(hm, input_hw, decode_fn, cfg, stage_loop=_skips_padding(sam, cfg, batched))
  to_orig = geometry.input_to_original_scale(input_hw, original_hw)
  boxes = mask_ops.boxes_from_low_res(out["low_res_logits"], input_hw, original_hw, img_size,
                                      cfg.mask_threshold)
  return dict(
      low_res_logits=out["low_res_logits"], iou=out["iou"], stability=out["stability"],
      boxes=jnp.where(out["valid"][:, None], boxes, 0.0),
      points=out["points_in"] * to_orig, mask_index=out["mask_index"], stage=out["stage"],
      valid=out["valid"], prompt_points=out["prompts_in"] * to_orig,
      prompt_scores=out["prompt_scores"], prompt_valid=out["prompt_valid"],
      prompt_accepted=out["prompt_accepted"], num_prompts=out["num_prompts"],
      num_filtered=out["num_filtered"], num_kept=out["num_kept"], heatmap=hm,
      **{k: out[k] for k in FILTER_COUNTS},
      input_hw=input_hw, original_hw=original_hw)


def _skips_padding(sam, cfg: AsfConfig, batched: bool) -> bool:
  """Whether the decoder skips the prompt slots past the valid ones: it runs
  prompts in chunks (CPU) and no vmap turns its `lax.cond` into a select.
  Then ASF's two stages run as one loop (`asf.run`'s `stage_loop`), which
  compiles the decoder once: measured on the 2-core CPU VM, vit_b, the
  AoP-SAM program compiles in ~0.6 s less (BENCHMARKS §0.1)."""
  chunk = resolve_prompt_chunk(sam.mask_decoder.prompt_chunk)
  return not batched and chunk is not None and chunk < max(cfg.k_coarse, cfg.k_fine)


def segment(model: AopSam, padded: jax.Array, input_hw: jax.Array, original_hw: jax.Array,
            cfg: AsfConfig = AsfConfig()) -> Dict[str, jax.Array]:
  """Pure AoP-SAM: padded uint8 image(s) + sizes -> dict of fixed-size arrays.

  padded (S, S, 3) or (B, S, S, 3); input_hw / original_hw (2,) or (B, 2).
  Traceable: call it inside your own `jax.jit` (with `model` merged there).
  """
  padded = jnp.asarray(padded)
  if padded.ndim == 3:
    return _segment_one(model, padded, jnp.asarray(input_hw), jnp.asarray(original_hw), cfg)
  if padded.ndim != 4:
    raise ValueError(f"padded must be (S, S, 3) or (B, S, S, 3), got {padded.shape}")
  return jax.vmap(lambda p, i, o: _segment_one(model, p, i, o, cfg, batched=True))(
      padded, jnp.asarray(input_hw), jnp.asarray(original_hw))


@functools.partial(jit, static_argnames=("graphdef", "cfg"))
def _segment_jit(graphdef, state, padded, input_hw, original_hw, cfg):
  return segment(nnx.merge(graphdef, state), padded, input_hw, original_hw, cfg)


def split_model(model) -> tuple:
  """AopSam or (graphdef, state) -> (graphdef, state)."""
  return model if isinstance(model, tuple) else nnx.split(model)


def segment_jit(model, padded, input_hw, original_hw,
                cfg: AsfConfig = AsfConfig()) -> Dict[str, jax.Array]:
  """Jitted `segment`.  `model`: AopSam or its (graphdef, state) split (faster:
  no per-call split).  Inputs may be numpy (transferred) or device arrays
  (no host transfer at all: runs under `jax.transfer_guard("disallow")`)."""
  graphdef, state = split_model(model)
  return _segment_jit(graphdef, state, padded, input_hw, original_hw, cfg=cfg)


def lower(model, padded, input_hw, original_hw, cfg: AsfConfig = AsfConfig()):
  """`segment_jit` lowered for these inputs; `.compile()` it for ahead-of-time
  use (compile time and XLA memory analysis apart from running), then call
  the compiled program with (state, padded, input_hw, original_hw)."""
  graphdef, state = split_model(model)
  return _segment_jit.lower(graphdef, state, padded, input_hw, original_hw, cfg=cfg)


def compiled_executables() -> int:
  """Number of executables compiled so far by `segment_jit` (all configs)."""
  return _segment_jit._cache_size()


# --- host side ---------------------------------------------------------------


@functools.partial(jit, static_argnames=("out_hw", "img_size"))
def _upscale(low_res, input_hw, original_hw, threshold, out_hw, img_size):
  return postprocess_masks(low_res, input_hw, original_hw, out_hw, img_size) > threshold


def masks_at_original(out: Dict[str, Any], img_size: int = 1024, threshold: float = 0.0,
                      chunk: int = 16) -> np.ndarray:
  """One image's `segment` output -> (n_valid, H, W) bool masks at the original
  size (official `postprocess_masks` + threshold), in slot order.  Fixed-size
  chunks in a buffer rounded up to OUT_ALIGN: one program per size bucket."""
  small = jax.device_get({k: out[k] for k in ("valid", "input_hw", "original_hw")})
  idx = np.flatnonzero(small["valid"])
  h, w = (int(v) for v in small["original_hw"])
  out_hw = (-(-h // OUT_ALIGN) * OUT_ALIGN, -(-w // OUT_ALIGN) * OUT_ALIGN)
  masks = np.zeros((len(idx), h, w), bool)
  for s in range(0, len(idx), chunk):
    sl = idx[s:s + chunk]
    sl = np.concatenate([sl, np.repeat(sl[-1:], chunk - len(sl))])
    res = _upscale(out["low_res_logits"][sl], small["input_hw"], small["original_hw"],
                   jnp.float32(threshold), out_hw=out_hw, img_size=img_size)
    masks[s:s + chunk] = np.asarray(res)[:min(chunk, len(idx) - s), :h, :w]
  return masks


def to_records(out: Dict[str, Any], output_mode: str = "binary_mask", img_size: int = 1024,
               threshold: float = 0.0) -> List[Dict[str, Any]]:
  """One image's `segment` output -> the official mask records (`sam.records`),
  crop_box = the whole image."""
  records_lib.check_output_mode(output_mode)
  small = jax.device_get({k: out[k] for k in ("valid", "iou", "stability", "points")})
  ok = np.asarray(small["valid"])
  return records_lib.masks_to_records(masks_at_original(out, img_size, threshold),
                                      small["iou"][ok], small["stability"][ok],
                                      small["points"][ok], None, output_mode)


class AopMaskGenerator:
  """The official generator's interface for AoP-SAM:
  `AopMaskGenerator(bundle).generate(image)` -> the same records as
  `SamAutomaticMaskGenerator.generate`.  `model` is a Bundle (its ASF config
  is used unless `cfg` is given), an AopSam or its (graphdef, state)."""

  def __init__(self, model, cfg: AsfConfig | None = None, output_mode: str = "binary_mask"):
    if hasattr(model, "model") and hasattr(model, "asf"):  # a Bundle
      cfg = cfg or model.asf
      model = model.model
    self.graphdef, self.state = split_model(model)
    self.cfg = cfg or AsfConfig()
    self.output_mode = records_lib.check_output_mode(output_mode)

  def generate_arrays(self, image: np.ndarray) -> Dict[str, jax.Array]:
    inp = prepare(image, self.cfg.img_size)
    return segment_jit((self.graphdef, self.state), inp.padded, inp.input_hw, inp.original_hw,
                       self.cfg)

  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """HxWx3 uint8 RGB image -> list of official mask records."""
    return to_records(self.generate_arrays(image), self.output_mode, self.cfg.img_size)
