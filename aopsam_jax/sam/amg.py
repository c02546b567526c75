"""Grid automatic mask generation: the official `SamAutomaticMaskGenerator` in JAX.

    from aopsam_jax import SamAutomaticMaskGenerator, load_sam
    generator = SamAutomaticMaskGenerator(load_sam("sam_vit_b.pth"), points_per_side=32)
    records = generator.generate(image)     # HxWx3 uint8 RGB -> list of official dicts

Same constructor arguments, algorithm and records (`records.masks_to_records`)
as `segment_anything`'s generator: a grid of single positive points per crop
(16 x 16 = "AMG_S", 32 x 32 = "AMG_D"), decoded `points_per_batch` at a
time, 3 candidate masks per point; a candidate survives when predicted IoU >
pred_iou_thresh (strict) and stability >= stability_score_thresh and its box
does not touch an inner crop edge; box NMS per crop (by predicted IoU), a
second NMS across crops preferring smaller crops, then optionally the
small-region clean-up (`regions.postprocess_small_regions`).

The stability score and the boxes are computed, as in the official code, on
the logits upsampled to the crop's original size (official
`postprocess_masks`).  Shapes stay static: the upsampled logits live in a
buffer of the crop size rounded up to a multiple of 64 (`OUT_ALIGN`), so one
compiled program serves every image of that size bucket.
`stability_at="input"` instead counts at the padded 1024 input resolution
(phase-wise, never materialised) and takes boxes from the low-res logits:
one program for all image sizes and less work per candidate, at the price of
flipped keep/drop decisions near the threshold (BENCHMARKS.md measures both).

The code follows the official split: `_process_batch` (one chunk of prompts
-> scores and boxes), `_process_crop` (one crop: encode, all chunks,
filters, NMS), `_generate_masks` (all crops, crop NMS) run in one `jax.jit`
and return fixed-size candidate slots, as many as there are candidates (no
cap unless `max_masks` is set, which warns with the number dropped).  Only the
surviving prompts are decoded again for their masks at the original size
(`decode_masks`), in chunks of `points_per_batch`, instead of keeping every
candidate's mask in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aopsam_jax.sam import mask_ops, records as records_lib, regions
from aopsam_jax.sam.compile_options import jit
from aopsam_jax.sam.predictor import OUT_ALIGN
from aopsam_jax.sam.prompts import single_point_prompts
from aopsam_jax.sam.transforms import postprocess_masks, prepare_image, preprocess

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class AmgConfig:
  """Grid-AMG settings; names and defaults are the official generator's.

  Beyond the official ones: `stability_at` ("original": official; "input":
  the faster padded-resolution variant) and `max_masks` (None: keep every
  surviving mask; a number caps the output and warns when masks are dropped).
  Explicit `point_grids` are data, not configuration: pass them to `prepare`.
  """

  points_per_side: Optional[int] = 32
  points_per_batch: int = 64
  pred_iou_thresh: float = 0.88
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  box_nms_thresh: float = 0.7
  crop_n_layers: int = 0
  crop_nms_thresh: float = 0.7
  crop_overlap_ratio: float = 512 / 1500
  crop_n_points_downscale_factor: int = 1
  min_mask_region_area: int = 0
  mask_threshold: float = 0.0
  stability_at: str = "original"
  max_masks: Optional[int] = None

  def __post_init__(self):
    if self.stability_at not in ("original", "input"):
      raise ValueError(f"stability_at must be 'original' or 'input', got {self.stability_at!r}")
    if self.points_per_batch < 1:
      raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")

  @property
  def num_crops(self) -> int:
    return sum(4 ** i for i in range(self.crop_n_layers + 1))


AMG_S = AmgConfig(points_per_side=16)
AMG_D = AmgConfig(points_per_side=32)

_TRACED = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh",
           "crop_nms_thresh")


class Thresholds(NamedTuple):
  """The numeric settings, passed to the compiled program as data (changing
  them does not recompile)."""

  pred_iou_thresh: jax.Array
  stability_score_thresh: jax.Array
  stability_score_offset: jax.Array
  box_nms_thresh: jax.Array
  crop_nms_thresh: jax.Array


def split_config(cfg: AmgConfig) -> Tuple[AmgConfig, Thresholds]:
  """-> (static part, with the thresholds and the host-only min_mask_region_area
  zeroed so that they do not key the compile cache; traced thresholds)."""
  th = Thresholds(*(jnp.float32(getattr(cfg, k)) for k in _TRACED))
  return dataclasses.replace(cfg, min_mask_region_area=0, **{k: 0.0 for k in _TRACED}), th


def layer_point_grids(cfg: AmgConfig, point_grids: Optional[Sequence[np.ndarray]] = None
                      ) -> List[np.ndarray]:
  """Normalised xy grids, one per crop layer (official `build_all_layer_point_grids`,
  or the user's `point_grids`: exactly one of the two)."""
  if (cfg.points_per_side is None) == (point_grids is None):
    raise ValueError("exactly one of points_per_side and point_grids must be given")
  if point_grids is None:
    return [mask_ops.build_point_grid(int(cfg.points_per_side
                                          / (cfg.crop_n_points_downscale_factor ** i)))
            for i in range(cfg.crop_n_layers + 1)]
  grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
  if len(grids) < cfg.crop_n_layers + 1:
    raise ValueError(f"point_grids holds {len(grids)} grids; crop_n_layers={cfg.crop_n_layers} "
                     f"needs one per layer ({cfg.crop_n_layers + 1})")
  return grids


class AmgInputs(NamedTuple):
  """Host-prepared inputs: one resized+padded image per crop (crop 0 = whole image)."""

  padded: np.ndarray        # (C, S, S, 3) uint8
  input_hw: np.ndarray      # (C, 2) int32: resized size of each crop
  crop_boxes: np.ndarray    # (C, 4) int32 XYXY in the original image
  original_hw: np.ndarray   # (2,) int32
  points: np.ndarray        # (C, P, 2) float32 normalised grid of each crop (P padded)
  points_valid: np.ndarray  # (C, P) bool


def prepare(image: np.ndarray, cfg: AmgConfig = AmgConfig(), img_size: int = 1024,
            point_grids: Optional[Sequence[np.ndarray]] = None) -> AmgInputs:
  """RGB uint8 (H, W, 3) -> AmgInputs (official PIL resize of every crop).

  The point count P is padded to a multiple of points_per_batch.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
  grids = layer_point_grids(cfg, point_grids)
  h, w = image.shape[:2]
  boxes, layers = mask_ops.generate_crop_boxes((h, w), cfg.crop_n_layers, cfg.crop_overlap_ratio)
  padded, input_hw = [], []
  for x0, y0, x1, y1 in boxes:
    p, ihw, _ = prepare_image(np.ascontiguousarray(image[y0:y1, x0:x1]), img_size)
    padded.append(p)
    input_hw.append(ihw)
  b = cfg.points_per_batch
  n = -(-max(len(grids[i]) for i in layers) // b) * b
  pts = np.zeros((len(layers), n, 2), np.float32)
  ok = np.zeros((len(layers), n), bool)
  for c, layer in enumerate(layers):
    pts[c, :len(grids[layer])] = grids[layer]
    ok[c, :len(grids[layer])] = True
  return AmgInputs(np.stack(padded), np.stack(input_hw).astype(np.int32),
                   np.asarray(boxes, np.int32), np.array([h, w], np.int32), pts, ok)


def out_bucket(inputs: AmgInputs) -> Tuple[int, int]:
  """Static buffer for masks at the crops' original sizes: the largest crop,
  rounded up to a multiple of OUT_ALIGN."""
  cb = np.asarray(inputs.crop_boxes)
  h, w = int((cb[:, 3] - cb[:, 1]).max()), int((cb[:, 2] - cb[:, 0]).max())
  return -(-h // OUT_ALIGN) * OUT_ALIGN, -(-w // OUT_ALIGN) * OUT_ALIGN


# --- device program: candidates -> surviving slots ---------------------------


def _stability_and_boxes(low, input_hw, crop_hw, cfg: AmgConfig, th: Thresholds, out_hw,
                         img_size):
  """(B, M, l, l) logits -> stability (B, M), XYXY boxes in the crop frame (B, M, 4)."""
  t, off = cfg.mask_threshold, th.stability_score_offset
  if out_hw is None:  # stability_at == "input"
    return (mask_ops.stability_score_upsampled(low, input_hw, img_size, t, off),
            mask_ops.boxes_from_low_res(low, input_hw, crop_hw, img_size, t))
  logits = postprocess_masks(low, input_hw, crop_hw, out_hw, img_size)  # (B, M, Hb, Wb)
  inside = ((jnp.arange(out_hw[0]) < crop_hw[0])[:, None]
            & (jnp.arange(out_hw[1]) < crop_hw[1])[None, :])
  stab = mask_ops.stability_score(logits, t, off, inside, empty=jnp.nan)
  return stab, mask_ops.masks_to_boxes((logits > t) & inside).astype(F32)


def _process_batch(model, emb, pts_in, ok, input_hw, crop_hw, cfg: AmgConfig, th: Thresholds,
                   out_hw):
  """One chunk of B prompts (input frame) of one crop -> predicted IoU (B, M),
  stability (B, M), boxes (B, M, 4) in the crop frame.  Skipped when every
  point of the chunk is padding."""
  m = model.config.num_multimask_outputs
  img_size = model.config.img_size

  def run(_):
    coords, labels = single_point_prompts(pts_in)
    low, iou = model.decode(emb, coords, labels, multimask_output=True)
    stab, box = _stability_and_boxes(low.astype(F32), input_hw, crop_hw, cfg, th, out_hw,
                                     img_size)
    return iou.astype(F32), stab, box

  b = pts_in.shape[0]
  empty = (jnp.zeros((b, m), F32), jnp.zeros((b, m), F32), jnp.zeros((b, m, 4), F32))
  return jax.lax.cond(jnp.any(ok), run, lambda _: empty, None)


def _keep_by_scores(iou, stab, valid, th: Thresholds):
  """The official filters: predicted IoU (strict) and stability, each only when > 0."""
  t_iou, t_stab = th.pred_iou_thresh, th.stability_score_thresh
  return valid & ((t_iou <= 0.0) | (iou > t_iou)) & ((t_stab <= 0.0) | (stab >= t_stab))


def _process_crop(model, crop, orig_box, cfg: AmgConfig, th: Thresholds, out_hw):
  """One crop: encode, decode the grid in chunks, filter, box NMS.

  Returns (P * M,)-slot arrays in NMS order (survivors first) plus the
  crop's embedding and counters.
  """
  padded, input_hw, crop_box, grid, grid_ok = crop
  emb = model.encode_image(preprocess(padded, input_hw)[None])  # (1, h, w, D)
  crop_hw = jnp.stack([crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]])
  crop_wh = crop_hw[::-1].astype(F32)
  pts_crop = grid * crop_wh  # official points_for_image
  pts_in = pts_crop * (input_hw[::-1].astype(F32) / crop_wh)  # official apply_coords
  bsz = cfg.points_per_batch
  iou, stab, box = jax.lax.map(
      lambda c: _process_batch(model, emb, c[0], c[1], input_hw, crop_hw, cfg, th, out_hw),
      (pts_in.reshape(-1, bsz, 2), grid_ok.reshape(-1, bsz)))
  m = iou.shape[-1]
  iou, stab, box = iou.reshape(-1), stab.reshape(-1), box.reshape(-1, 4)
  valid = _keep_by_scores(iou, stab, jnp.repeat(grid_ok, m), th)
  box_img = mask_ops.uncrop_boxes(box, crop_box)
  valid &= ~mask_ops.is_box_near_crop_edge(box_img, crop_box, orig_box)
  n_filtered = jnp.sum(valid.astype(jnp.int32))
  idx, ok, n_kept = mask_ops.nms_top_k(box, iou, valid, th.box_nms_thresh, iou.shape[0])
  point = idx // m
  return dict(emb=emb[0], iou=iou[idx], stability=stab[idx], boxes=box_img[idx],
              points=mask_ops.uncrop_points(pts_crop[point], crop_box),
              points_in=pts_in[point], mask_index=idx % m, valid=ok,
              n_filtered=n_filtered, n_nms=n_kept)


SLOT_KEYS = ("iou", "stability", "boxes", "points", "points_in", "mask_index", "valid")


def _merge_crops(per, crop_boxes, cfg: AmgConfig, th: Thresholds):
  """(C, K) per-crop slots -> one list; across crops, NMS prefers smaller crops."""
  c_n, k = per["valid"].shape
  crop_index = jnp.repeat(jnp.arange(c_n, dtype=jnp.int32), k)
  flat = {key: per[key].reshape((c_n * k,) + per[key].shape[2:]) for key in SLOT_KEYS}
  cap = min(cfg.max_masks or c_n * k, c_n * k)
  if c_n == 1:
    sel, ok, n_kept = jnp.arange(cap), flat["valid"][:cap], per["n_nms"][0]
  else:
    area = mask_ops.box_area(crop_boxes.astype(F32))[crop_index]
    sel, ok, n_kept = mask_ops.nms_top_k(flat["boxes"], 1.0 / area, flat["valid"],
                                         th.crop_nms_thresh, cap)
  out = {key: v[sel] for key, v in flat.items()}
  out.update(valid=ok, crop_index=crop_index[sel], num_kept=n_kept,
             num_filtered=jnp.sum(per["n_filtered"]))
  return out


def _generate_masks(model, inputs: AmgInputs, cfg: AmgConfig, th: Thresholds, out_hw):
  """Every crop, then the crop merge -> dict of fixed-size slot arrays."""
  original_hw = inputs.original_hw
  orig_box = jnp.stack([0, 0, original_hw[1], original_hw[0]]).astype(F32)
  crops = (inputs.padded, inputs.input_hw, inputs.crop_boxes, inputs.points, inputs.points_valid)
  crop_fn = lambda crop: _process_crop(model, crop, orig_box, cfg, th, out_hw)
  if inputs.padded.shape[0] == 1:  # no loop around a single crop
    per = jax.tree.map(lambda x: x[None], crop_fn(jax.tree.map(lambda x: x[0], crops)))
  else:
    per = jax.lax.map(crop_fn, crops)
  out = _merge_crops(per, inputs.crop_boxes, cfg, th)
  out.update(embeddings=per["emb"], original_hw=original_hw)
  return out


@functools.partial(jit, static_argnames=("graphdef", "cfg", "out_hw"))
def _generate_jit(graphdef, state, inputs: AmgInputs, th: Thresholds, cfg: AmgConfig, out_hw):
  return _generate_masks(nnx.merge(graphdef, state), inputs, cfg, th, out_hw)


def split_model(model) -> tuple:
  """Sam or (graphdef, state) -> (graphdef, state)."""
  return model if isinstance(model, tuple) else nnx.split(model)


def generate(model, inputs: AmgInputs, cfg: AmgConfig = AmgConfig()) -> Dict[str, jax.Array]:
  """Jitted candidate generation and selection on prepared inputs.

  `model` is a `Sam` or its (graphdef, state).  Returns K slots (K = every
  candidate, C * P * 3, or `max_masks`), survivors first in official order:
    iou, stability (K,)   predicted IoU, stability score
    boxes (K, 4)          XYXY in the image (float; the official mask boxes)
    points (K, 2)         the prompt, xy in the original image
    points_in (K, 2)      the prompt in its crop's input frame
    mask_index (K,)       which of the 3 multimask outputs
    crop_index (K,)       which crop of `inputs`
    valid (K,)            slot holds a surviving mask
    num_filtered          candidates passing the score and crop-edge filters
    num_kept              masks surviving NMS (> K only with `max_masks`)
    embeddings (C, h, w, D), original_hw (2,)
  """
  graphdef, state = split_model(model)
  if inputs.padded.shape[0] != cfg.num_crops:
    raise ValueError(f"inputs hold {inputs.padded.shape[0]} crops, cfg expects {cfg.num_crops}; "
                     "prepare them with the same AmgConfig")
  out_hw = out_bucket(inputs) if cfg.stability_at == "original" else None
  return _generate_jit(graphdef, state, *device_inputs(inputs, cfg), cfg=split_config(cfg)[0],
                       out_hw=out_hw)


# --- masks at the original size, records -------------------------------------


@functools.partial(jit, static_argnames=("graphdef", "out_hw"))
def _decode_masks_jit(graphdef, state, embeddings, crop_index, points_in, slot_prompt, slot_mask,
                      input_hw, crop_hw, threshold, out_hw):
  """B prompts -> the (S,) selected (prompt, mask) slots upsampled to `out_hw`, bool."""
  model = nnx.merge(graphdef, state)
  emb = embeddings if embeddings.shape[0] == 1 else embeddings[crop_index]
  coords, labels = single_point_prompts(points_in)
  low, _ = model.decode(emb, coords, labels, multimask_output=True)
  low = low.astype(F32)[slot_prompt, slot_mask]
  up = jax.vmap(lambda lo, ihw, chw: postprocess_masks(lo, ihw, chw, out_hw,
                                                       model.config.img_size))
  return up(low, input_hw, crop_hw) > threshold


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  """Pad with copies of the last row to a fixed length (one compiled program)."""
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def decode_masks(model, inputs: AmgInputs, out: Dict[str, Any], cfg: AmgConfig = AmgConfig()
                 ) -> np.ndarray:
  """Binary masks (n_valid, H, W) at the original size for the valid slots, in
  slot order: each surviving prompt is decoded once more (`points_per_batch`
  prompts at a time) and its selected masks upsampled (official
  `postprocess_masks` + threshold)."""
  graphdef, state = split_model(model)
  m_out = nnx.merge(graphdef, state).config.num_multimask_outputs
  idx = np.flatnonzero(np.asarray(out["valid"]))
  h, w = (int(v) for v in inputs.original_hw)
  masks = np.zeros((len(idx), h, w), bool)
  if not len(idx):
    return masks
  cb = np.asarray(inputs.crop_boxes)
  crop_hw = np.stack([cb[:, 3] - cb[:, 1], cb[:, 2] - cb[:, 0]], 1).astype(np.int32)
  ci = np.asarray(out["crop_index"])[idx]
  pts, mi = np.asarray(out["points_in"])[idx], np.asarray(out["mask_index"])[idx]
  prompts, inv = np.unique(np.c_[ci, pts], axis=0, return_inverse=True)
  inv = inv.reshape(-1)
  bsz, out_hw = cfg.points_per_batch, out_bucket(inputs)
  for s in range(0, len(prompts), bsz):
    chunk = _pad_to(prompts[s:s + bsz], bsz)
    slots = np.flatnonzero((inv >= s) & (inv < s + bsz))  # at most m_out per prompt
    sp = _pad_to(slots, bsz * m_out)
    c = ci[sp]
    res = _decode_masks_jit(
        graphdef, state, out["embeddings"], jnp.asarray(chunk[:, 0].astype(np.int32)),
        jnp.asarray(chunk[:, 1:].astype(np.float32)), jnp.asarray(inv[sp] - s),
        jnp.asarray(mi[sp]), jnp.asarray(inputs.input_hw[c]), jnp.asarray(crop_hw[c]),
        F32(cfg.mask_threshold), out_hw=out_hw)
    res = np.asarray(res[:len(slots)])
    for j, slot in enumerate(slots):
      x0, y0, x1, y1 = cb[ci[slot]]
      masks[slot, y0:y1, x0:x1] = res[j, :y1 - y0, :x1 - x0]
  return masks


def to_records(model, inputs: AmgInputs, out: Dict[str, Any], cfg: AmgConfig = AmgConfig(),
               output_mode: str = "binary_mask") -> List[Dict[str, Any]]:
  """`generate` output -> official records (masks decoded, small regions
  cleaned when cfg.min_mask_region_area > 0)."""
  records_lib.check_output_mode(output_mode)
  small = jax.device_get({k: v for k, v in out.items() if k != "embeddings"})
  n_kept, ok = int(small["num_kept"]), np.asarray(small["valid"])
  if n_kept > ok.sum():
    warnings.warn(f"max_masks={cfg.max_masks} dropped {n_kept - int(ok.sum())} of {n_kept} "
                  "surviving masks", stacklevel=2)
  masks = decode_masks(model, inputs, {**small, "embeddings": out["embeddings"]}, cfg)
  keep = np.arange(len(masks))
  if cfg.min_mask_region_area > 0:
    masks, keep = regions.postprocess_small_regions(
        masks, cfg.min_mask_region_area, max(cfg.box_nms_thresh, cfg.crop_nms_thresh))
  sel = np.flatnonzero(ok)[keep]
  return records_lib.masks_to_records(
      masks, small["iou"][sel], small["stability"][sel], small["points"][sel],
      np.asarray(inputs.crop_boxes)[small["crop_index"][sel]], output_mode)


class SamAutomaticMaskGenerator:
  """The official generator's interface over a JAX `Sam`.

  Arguments as `segment_anything.SamAutomaticMaskGenerator` (see its
  documentation); `model` is a `Sam` or its (graphdef, state).  Keyword-only
  extras: `stability_at` ("original" = official, "input" = faster variant,
  see the module docstring) and `max_masks` (None = no cap).
  """

  def __init__(self, model, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
               pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
               stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7,
               crop_n_layers: int = 0, crop_nms_thresh: float = 0.7,
               crop_overlap_ratio: float = 512 / 1500, crop_n_points_downscale_factor: int = 1,
               point_grids: Optional[List[np.ndarray]] = None, min_mask_region_area: int = 0,
               output_mode: str = "binary_mask", *, stability_at: str = "original",
               max_masks: Optional[int] = None) -> None:
    self.cfg = AmgConfig(
        points_per_side=points_per_side, points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
        crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
        crop_overlap_ratio=crop_overlap_ratio,
        crop_n_points_downscale_factor=crop_n_points_downscale_factor,
        min_mask_region_area=min_mask_region_area, stability_at=stability_at,
        max_masks=max_masks)
    self.point_grids = layer_point_grids(self.cfg, point_grids)
    self.output_mode = records_lib.check_output_mode(output_mode)
    self.graphdef, self.state = split_model(model)
    self.img_size = nnx.merge(self.graphdef, self.state).config.img_size

  def prepare(self, image: np.ndarray) -> AmgInputs:
    grids = None if self.cfg.points_per_side is not None else self.point_grids
    return prepare(image, self.cfg, self.img_size, grids)

  def generate_arrays(self, image: np.ndarray) -> Tuple[AmgInputs, Dict[str, jax.Array]]:
    inputs = self.prepare(image)
    return inputs, generate((self.graphdef, self.state), inputs, self.cfg)

  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """HxWx3 uint8 RGB image -> list of official mask records."""
    inputs, out = self.generate_arrays(image)
    return to_records((self.graphdef, self.state), inputs, out, self.cfg, self.output_mode)


def device_inputs(inputs: AmgInputs, cfg: AmgConfig) -> Tuple[AmgInputs, Thresholds]:
  """The compiled program's data arguments (after the state): inputs, thresholds."""
  return AmgInputs(*(jax.device_put(np.asarray(x)) for x in inputs)), split_config(cfg)[1]


def lower(model, inputs: AmgInputs, cfg: AmgConfig = AmgConfig()):
  """`generate` lowered for these inputs (ahead-of-time compilation: compile
  time and XLA memory analysis apart from running).  Call the compiled program
  with (state, *device_inputs(inputs, cfg)); one program per `out_bucket`."""
  graphdef, state = split_model(model)
  out_hw = out_bucket(inputs) if cfg.stability_at == "original" else None
  return _generate_jit.lower(graphdef, state, *device_inputs(inputs, cfg),
                             cfg=split_config(cfg)[0], out_hw=out_hw)
