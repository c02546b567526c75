"""Grid automatic mask generation (AMG) with static shapes.

The JAX counterpart of the official `SamAutomaticMaskGenerator`: an n x n
grid of single positive point prompts (16 x 16 = "AMG_S", 32 x 32 = "AMG_D"),
decoded in chunks, each prompt giving 3 candidate masks; candidates are kept
when predicted IoU > pred_iou_thresh (strict) and stability >=
stability_score_thresh, de-duplicated by greedy box NMS (by predicted IoU),
and the best `max_masks` are returned.  With crop_n_layers >= 1 the image is
also segmented in overlapping crops and the per-crop results are merged
with a second NMS that prefers masks from larger crops (official scheme).

Static shapes: `generate` returns fixed-size arrays with a `valid` flag, so
one `jax.jit` maps (prepared image) -> (masks) with no host round trip, and
images of any size share one compiled program (size enters as data).

How it differs from the official generator, by design (measured in
tests/test_amg.py):
  * the stability score is computed on the logits upsampled to the padded
    input resolution (1024, cropped to the resized image; phase-wise, never
    materialised) instead of at the original image resolution;
    `stability_at_input_res=False` uses the raw 256x256 logits (cheaper, but
    measurably different).  The NMS boxes come from row/column maxima of
    the low-res logits upsampled in 1-D (`mask_ops.boxes_from_low_res`).
    Candidates near a threshold can flip.
  * only the final (at most `max_masks`) prompts are decoded a second time
    to obtain their logits, instead of storing every candidate's mask; the
    final binary masks at the original resolution come from the same
    official upsampling (`to_records`, host or device, on demand).
  * outputs beyond `max_masks` (after NMS) are dropped; `num_kept` tells.
  * `min_mask_region_area` post-processing (OpenCV) is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aopsam_jax.sam import mask_ops, rle as rle_lib
from aopsam_jax.sam.transforms import postprocess_masks, prepare_image, preprocess


@dataclasses.dataclass(frozen=True)
class AmgConfig:
  """Grid-AMG settings; defaults are the official `SamAutomaticMaskGenerator` ones.

  `max_masks` (static output capacity) and `max_masks_per_crop` have no
  official counterpart: they bound the output arrays.
  """

  points_per_side: int = 32
  points_per_batch: int = 64
  pred_iou_thresh: float = 0.88
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  box_nms_thresh: float = 0.7
  crop_n_layers: int = 0
  crop_nms_thresh: float = 0.7
  crop_overlap_ratio: float = 512 / 1500
  crop_n_points_downscale_factor: int = 1
  max_masks: int = 256
  max_masks_per_crop: Optional[int] = None
  mask_threshold: float = 0.0
  # Stability on logits upsampled to the padded-input resolution (exact
  # official first stage, counted phase by phase) instead of the 256x256
  # low-res logits.  Measured in tests/test_amg.py: low-res stability is off
  # by ~0.24 on random-init weights (checkerboard ConvTranspose patterns that
  # bilinear upsampling smooths away), input-res agrees with the official.
  stability_at_input_res: bool = True

  @property
  def num_crops(self) -> int:
    return sum(4 ** i for i in range(self.crop_n_layers + 1))

  @property
  def per_crop_capacity(self) -> int:
    return self.max_masks_per_crop or self.max_masks


AMG_S = AmgConfig(points_per_side=16)
AMG_D = AmgConfig(points_per_side=32)


class AmgInputs(NamedTuple):
  """Host-prepared inputs: one resized+padded image per crop (crop 0 = whole image)."""

  padded: np.ndarray       # (C, S, S, 3) uint8
  input_hw: np.ndarray     # (C, 2) int32: resized size of each crop
  crop_boxes: np.ndarray   # (C, 4) int32 XYXY in the original image
  original_hw: np.ndarray  # (2,) int32


def prepare(image: np.ndarray, cfg: AmgConfig = AmgConfig(), img_size: int = 1024) -> AmgInputs:
  """RGB uint8 (H, W, 3) -> AmgInputs (official PIL resize of every crop)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
  h, w = image.shape[:2]
  boxes, _ = mask_ops.generate_crop_boxes((h, w), cfg.crop_n_layers, cfg.crop_overlap_ratio)
  padded, input_hw = [], []
  for x0, y0, x1, y1 in boxes:
    p, ihw, _ = prepare_image(np.ascontiguousarray(image[y0:y1, x0:x1]), img_size)
    padded.append(p)
    input_hw.append(ihw)
  return AmgInputs(np.stack(padded), np.stack(input_hw).astype(np.int32),
                   np.asarray(boxes, np.int32), np.array([h, w], np.int32))


def _grids(cfg: AmgConfig):
  """Per-crop normalised point grids padded to a common multiple of the batch."""
  _, layers = mask_ops.generate_crop_boxes((1000, 1000), cfg.crop_n_layers, cfg.crop_overlap_ratio)
  per_layer = [mask_ops.build_point_grid(int(cfg.points_per_side
                                             / (cfg.crop_n_points_downscale_factor ** i)))
               for i in range(cfg.crop_n_layers + 1)]
  n = max(len(g) for g in per_layer)
  b = cfg.points_per_batch
  n = -(-n // b) * b
  pts = np.zeros((len(layers), n, 2), np.float32)
  ok = np.zeros((len(layers), n), bool)
  for c, layer in enumerate(layers):
    g = per_layer[layer]
    pts[c, :len(g)] = g
    ok[c, :len(g)] = True
  return pts, ok


def _single_point_prompts(pts_in: jax.Array):
  """(B, 2) points -> official tokens [point (1), pad point (0, 0) (-1)]."""
  b = pts_in.shape[0]
  coords = jnp.stack([pts_in, jnp.zeros_like(pts_in)], axis=1)
  labels = jnp.broadcast_to(jnp.array([[1, -1]], jnp.int32), (b, 2))
  return coords, labels


def _generate_impl(model, padded, input_hw, crop_boxes, original_hw, cfg: AmgConfig):
  img_size = padded.shape[-2]
  grid_np, gvalid_np = _grids(cfg)
  c_n, p_n = gvalid_np.shape
  bsz = cfg.points_per_batch
  k_crop = min(cfg.per_crop_capacity, p_n * model.config.num_multimask_outputs)
  l = model.config.low_res_size
  orig_box = jnp.stack([0, 0, original_hw[1], original_hw[0]]).astype(jnp.float32)

  def crop_stage(args):
    pad_c, ihw, cbox, grid, gvalid = args
    emb = model.encode_image(preprocess(pad_c, ihw)[None])  # (1, h, w, D)
    crop_hw = jnp.stack([cbox[3] - cbox[1], cbox[2] - cbox[0]])
    crop_wh = crop_hw[::-1].astype(jnp.float32)
    pts_crop = grid * crop_wh  # official points_for_image (crop frame)
    pts_in = pts_crop * (ihw[::-1].astype(jnp.float32) / crop_wh)
    lr_valid = mask_ops.low_res_valid_region(ihw, l, img_size)

    def decode_chunk(chunk):
      pts, ok = chunk
      def run(_):
        coords, labels = _single_point_prompts(pts)
        low, iou = model.decode(emb, coords, labels, multimask_output=True)
        low = low.astype(jnp.float32)
        if cfg.stability_at_input_res:
          stab = mask_ops.stability_score_upsampled(low, ihw, img_size, cfg.mask_threshold,
                                                    cfg.stability_score_offset)
        else:
          stab = mask_ops.stability_score(low, cfg.mask_threshold,
                                          cfg.stability_score_offset, lr_valid)
        box = mask_ops.boxes_from_low_res(low, ihw, crop_hw, img_size, cfg.mask_threshold)
        return iou.astype(jnp.float32), stab, box
      m = model.config.num_multimask_outputs
      empty = (jnp.zeros((bsz, m), jnp.float32), jnp.zeros((bsz, m), jnp.float32),
               jnp.zeros((bsz, m, 4), jnp.float32))
      return jax.lax.cond(jnp.any(ok), run, lambda _: empty, None)

    iou, stab, box = jax.lax.map(decode_chunk, (pts_in.reshape(-1, bsz, 2),
                                                gvalid.reshape(-1, bsz)))
    m = iou.shape[-1]
    iou, stab, box = iou.reshape(-1), stab.reshape(-1), box.reshape(-1, 4)
    valid = jnp.repeat(gvalid, m)
    if cfg.pred_iou_thresh > 0.0:
      valid &= iou > cfg.pred_iou_thresh
    if cfg.stability_score_thresh > 0.0:
      valid &= stab >= cfg.stability_score_thresh
    box_img = mask_ops.uncrop_boxes(box, cbox)
    valid &= ~mask_ops.is_box_near_crop_edge(box_img, cbox, orig_box)
    n_filtered = jnp.sum(valid.astype(jnp.int32))
    idx, ok, n_kept = mask_ops.nms_top_k(box, iou, valid, cfg.box_nms_thresh, k_crop)
    point = idx // m
    return dict(emb=emb[0], iou=iou[idx], stability=stab[idx], boxes=box_img[idx],
                points=mask_ops.uncrop_points(pts_crop[point], cbox),
                points_in=pts_in[point], points_index=point, mask_index=idx % m, valid=ok,
                n_filtered=n_filtered, n_nms=n_kept)

  grid = jnp.asarray(grid_np)
  gvalid = jnp.asarray(gvalid_np)
  if c_n == 1:
    per = crop_stage((padded[0], input_hw[0], crop_boxes[0], grid[0], gvalid[0]))
    per = jax.tree.map(lambda x: x[None], per)
  else:
    per = jax.lax.map(crop_stage, (padded, input_hw, crop_boxes, grid, gvalid))

  # Merge crops: flatten (C, K) candidates.
  k_final = cfg.max_masks
  crop_index = jnp.repeat(jnp.arange(c_n), k_crop)
  flat = {k: v.reshape((c_n * k_crop,) + v.shape[2:]) for k, v in per.items()
          if k not in ("emb", "n_filtered", "n_nms")}
  if c_n == 1:
    total = k_crop
    sel = jnp.arange(min(k_final, total))
    ok = flat["valid"][sel]
    n_kept = per["n_nms"][0]
  else:
    area = mask_ops.box_area(crop_boxes.astype(jnp.float32))[crop_index]
    sel, ok, n_kept = mask_ops.nms_top_k(flat["boxes"], 1.0 / area, flat["valid"],
                                         cfg.crop_nms_thresh, min(k_final, c_n * k_crop))
  out = {k: v[sel] for k, v in flat.items()}
  out["valid"] = ok
  out["crop_index"] = crop_index[sel]
  out["crop_boxes"] = crop_boxes[out["crop_index"]]
  out["input_hw"] = input_hw[out["crop_index"]]

  # Decode the selected prompts again for their logits.  Each prompt is
  # decoded once (several of its 3 masks may be selected); prompts come
  # first-occurrence first, and chunks holding no prompt are skipped.
  k_sel = sel.shape[0]
  k_pad = -(-k_sel // bsz) * bsz
  m = model.config.num_multimask_outputs
  pid = jnp.where(ok, out["crop_index"] * p_n + out["points_index"], -1 - jnp.arange(k_sel))
  first = jnp.argmax(pid[:, None] == pid[None, :], axis=1)  # first slot with that prompt
  is_first = (first == jnp.arange(k_sel)) & ok
  uorder = jnp.argsort(~is_first, stable=True)
  n_unique = jnp.sum(is_first.astype(jnp.int32))
  upos = jnp.argsort(uorder)[first]  # where slot j's prompt is decoded
  padk = lambda x: jnp.concatenate([x, jnp.zeros((k_pad - k_sel,) + x.shape[1:], x.dtype)])
  emb_all = per["emb"]

  def redecode(chunk):
    pts, ci, start = chunk
    def run(_):
      coords, labels = _single_point_prompts(pts)
      emb = emb_all[:1] if c_n == 1 else emb_all[ci]
      low, _ = model.decode(emb, coords, labels, multimask_output=True)
      return low.astype(jnp.float32)
    return jax.lax.cond(start < n_unique, run,
                        lambda _: jnp.zeros((bsz, m, l, l), jnp.float32), None)

  chunks = (padk(out["points_in"][uorder]).reshape(-1, bsz, 2),
            padk(out["crop_index"][uorder]).reshape(-1, bsz),
            jnp.arange(0, k_pad, bsz))
  dec = jax.lax.map(redecode, chunks).reshape(k_pad, m, l, l)
  logits = dec[upos, out["mask_index"]]
  out["low_res_logits"] = logits
  out["num_filtered"] = jnp.sum(per["n_filtered"])
  out["num_kept"] = n_kept
  out["original_hw"] = original_hw
  del out["points_in"], out["points_index"]
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _generate_jit(graphdef, state, padded, input_hw, crop_boxes, original_hw, cfg):
  model = nnx.merge(graphdef, state)
  return _generate_impl(model, padded, input_hw, crop_boxes, original_hw, cfg)


def generate(model, inputs: AmgInputs, cfg: AmgConfig = AmgConfig()) -> Dict[str, jax.Array]:
  """Jitted AMG on prepared inputs -> dict of fixed-size arrays.

  `model` is a `Sam` or a (graphdef, state) pair.  Keys (K = min(max_masks, ...)):
    low_res_logits (K, 256, 256)  decoder logits of each selected mask
    iou, stability (K,)           predicted IoU, stability score (low-res)
    boxes (K, 4)                  approximate XYXY box in the image (used by NMS)
    points (K, 2)                 the prompt point, xy in the original image
    mask_index (K,)               which of the 3 multimask outputs
    crop_index (K,), crop_boxes (K, 4) XYXY, input_hw (K, 2): the crop it came from
    valid (K,)                    slot holds a mask (valid ones first)
    num_filtered                  candidates passing the IoU/stability filters
    num_kept                      masks surviving NMS (> K means overflow)
    original_hw (2,)
  The same compiled program serves every image size.
  """
  graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
  if inputs.padded.shape[0] != cfg.num_crops:
    raise ValueError(f"inputs hold {inputs.padded.shape[0]} crops, cfg expects {cfg.num_crops}; "
                     "prepare them with the same AmgConfig")
  return _generate_jit(graphdef, state, jnp.asarray(inputs.padded), jnp.asarray(inputs.input_hw),
                       jnp.asarray(inputs.crop_boxes), jnp.asarray(inputs.original_hw), cfg=cfg)


# --- host side ---------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("out_hw", "img_size"))
def _upscale(low_res, input_hw, crop_hw, threshold, out_hw, img_size):
  return postprocess_masks(low_res, input_hw, crop_hw, out_hw, img_size) > threshold


def upscale_masks(low_res_logits: np.ndarray, input_hw, crop_hw, img_size: int = 1024,
                  threshold: float = 0.0, chunk_pixels: int = 2 ** 25) -> np.ndarray:
  """(N, l, l) low-res logits of one crop -> (N, h, w) bool masks at the crop's
  original size (official `postprocess_masks` + threshold).  Chunked, fixed
  chunk size so the jitted kernel compiles once per output size."""
  low_res_logits = np.asarray(low_res_logits, np.float32)
  h, w = int(crop_hw[0]), int(crop_hw[1])
  n = low_res_logits.shape[0]
  chunk = int(max(1, min(n, 32, chunk_pixels // max(h * w, 1))))
  out = np.zeros((n, h, w), bool)
  for s in range(0, n, chunk):
    part = low_res_logits[s:s + chunk]
    if part.shape[0] < chunk:
      part = np.concatenate([part, np.zeros((chunk - part.shape[0],) + part.shape[1:],
                                            part.dtype)])
    res = _upscale(part, jnp.asarray(input_hw, jnp.int32), jnp.asarray([h, w], jnp.int32),
                   jnp.float32(threshold), out_hw=(h, w), img_size=img_size)
    out[s:s + chunk] = np.asarray(res)[:min(chunk, n - s)]
  return out


def masks_at_original(out: Dict[str, Any], img_size: int = 1024,
                      threshold: float = 0.0) -> np.ndarray:
  """Binary masks (n_valid, H, W) at the original resolution for the valid slots."""
  out = jax.device_get(out)
  ok = np.asarray(out["valid"])
  h, w = (int(v) for v in out["original_hw"])
  logits = np.asarray(out["low_res_logits"])[ok]
  boxes = np.asarray(out["crop_boxes"])[ok]
  ihw = np.asarray(out["input_hw"])[ok]
  masks = np.zeros((len(logits), h, w), bool)
  keys = [tuple(b) for b in boxes.tolist()]
  for key in dict.fromkeys(keys):
    sel = np.array([k == key for k in keys])
    x0, y0, x1, y1 = key
    masks[sel, y0:y1, x0:x1] = upscale_masks(logits[sel], ihw[sel][0], (y1 - y0, x1 - x0),
                                             img_size, threshold)
  return masks


def _boxes_np(masks: np.ndarray) -> np.ndarray:
  """Official `batched_mask_to_box` in numpy (inclusive max; empty -> zeros)."""
  n, h, w = masks.shape
  rows, cols = masks.any(2), masks.any(1)
  out = np.zeros((n, 4), np.int64)
  for i in range(n):
    ys, xs = np.nonzero(rows[i])[0], np.nonzero(cols[i])[0]
    if len(ys) and len(xs):
      out[i] = [xs[0], ys[0], xs[-1], ys[-1]]
  return out


def to_records(out: Dict[str, Any], output_mode: str = "binary_mask", img_size: int = 1024,
               threshold: float = 0.0) -> List[Dict[str, Any]]:
  """Fixed-size `generate` output -> list of official-style mask records.

  Each record: segmentation (bool (H, W) for output_mode "binary_mask", a
  COCO compressed RLE dict for "coco_rle", uncompressed for
  "uncompressed_rle"), area, bbox (XYWH, exact, from the full-res mask),
  predicted_iou, point_coords [[x, y]], stability_score, crop_box (XYWH).
  """
  if output_mode not in ("binary_mask", "coco_rle", "uncompressed_rle"):
    raise ValueError(f"unknown output_mode {output_mode!r}")
  out = jax.device_get(out)
  ok = np.asarray(out["valid"])
  masks = masks_at_original(out, img_size, threshold)
  boxes = _boxes_np(masks)
  rles = rle_lib.encode_uncompressed(masks) if output_mode != "binary_mask" else None
  records = []
  for j, i in enumerate(np.nonzero(ok)[0]):
    if output_mode == "binary_mask":
      seg = masks[j]
    elif output_mode == "coco_rle":
      seg = rle_lib.compress(rles[j])
    else:
      seg = rles[j]
    records.append({
        "segmentation": seg,
        "area": int(masks[j].sum()),
        "bbox": [int(v) for v in mask_ops.box_xyxy_to_xywh(boxes[j])],
        "predicted_iou": float(out["iou"][i]),
        "point_coords": [[float(v) for v in out["points"][i]]],
        "stability_score": float(out["stability"][i]),
        "crop_box": [int(v) for v in mask_ops.box_xyxy_to_xywh(np.asarray(out["crop_boxes"][i]))],
    })
  return records


class AutomaticMaskGenerator:
  """Convenience wrapper: `AutomaticMaskGenerator(model, cfg).generate(image)` -> records."""

  def __init__(self, model, cfg: AmgConfig = AmgConfig(), output_mode: str = "binary_mask"):
    self.graphdef, self.state = model if isinstance(model, tuple) else nnx.split(model)
    self.cfg = cfg
    self.output_mode = output_mode
    self.img_size = nnx.merge(self.graphdef, self.state).config.img_size

  def generate_arrays(self, image: np.ndarray) -> Dict[str, jax.Array]:
    return generate((self.graphdef, self.state), prepare(image, self.cfg, self.img_size), self.cfg)

  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    return to_records(self.generate_arrays(image), self.output_mode, self.img_size)
