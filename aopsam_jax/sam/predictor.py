"""SamPredictor: embed an image once, then predict masks for batches of prompts.

Same semantics as the official `segment_anything.SamPredictor.predict` /
`predict_torch` (prompt coordinates in the *original* image frame, masks
returned at the original size), built on pure jitted functions of
`(graphdef, state)` from `nnx.split`:

  embed_fn(graphdef, state, padded, input_hw)            -> embeddings
  decode_fn(graphdef, state, embeddings, image_index, coords, labels,
            mask_input, multimask_output=...)             -> low-res logits, iou
  predict_fn(graphdef, state, embeddings, image_index, input_hw, original_hw,
             coords, labels, mask_input, multimask_output=..., out_hw=...,
             return_logits=..., mask_threshold=...)       -> masks, iou, low-res
  postprocess_fn(low_res, input_hw, original_hw, out_hw=..., img_size=...)

`graphdef`, `multimask_output`, `out_hw`, `return_logits` and `img_size` are
static; everything else is traced, so they can be called inside a user's own
`jax.jit` too.  `coords` here are already in the resized-input frame and in the
decoder's static form (see `aopsam_jax.sam.prompts.build_sparse_prompts`).

Recompilation: the number of prompts B is padded up to a bucket of
`prompt_buckets` (default 1, 4, 16, 64; larger batches run in chunks of the
largest bucket), and the output buffer is the original size rounded up to a
multiple of 64 (cropped on the host), so one compiled program serves every
prompt count and all images of similar size.  A new program is compiled per
(bucket, tokens per prompt, mask_input given or not, multimask_output,
return_logits, rounded output size).  Padded prompt rows are copies of a
real row and never mix with real rows (every decoder op is per prompt).
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aopsam_jax.sam.compile_options import jit
from aopsam_jax.sam.image_io import load_image
from aopsam_jax.sam.modeling import Sam, attention_impl, map_chunks, resolve_prompt_chunk
from aopsam_jax.sam.prompts import build_sparse_prompts
from aopsam_jax.sam.transforms import (apply_boxes, apply_coords, postprocess_masks,
                                       postprocess_matrices, prepare_image, preprocess,
                                       resize_masks)

DEFAULT_PROMPT_BUCKETS = (1, 4, 16, 64)
OUT_ALIGN = 64

# Number of times each jitted function body was traced (= compiled); tests
# use it to prove that changing prompt counts do not recompile.
TRACE_COUNTS: Dict[str, int] = {"embed": 0, "decode": 0, "predict": 0}


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def _embed(graphdef, state, padded, input_hw):
  TRACE_COUNTS["embed"] += 1
  model = nnx.merge(graphdef, state)
  return model.encode_image(preprocess(padded, input_hw))


def _decode_impl(model, embeddings, image_index, coords, labels, mask_input, multimask_output,
                 num_valid=None):
  emb = jax.lax.dynamic_index_in_dim(embeddings, image_index, 0, keepdims=True)
  return model.decode(emb, coords, labels, mask_input, multimask_output, num_valid)


def _decode(graphdef, state, embeddings, image_index, coords, labels, mask_input,
            multimask_output=True, num_valid=None):
  TRACE_COUNTS["decode"] += 1
  return _decode_impl(nnx.merge(graphdef, state), embeddings, image_index, coords, labels,
                      mask_input, multimask_output, num_valid)


def _postprocess(low_res, input_hw, original_hw, out_hw, img_size=1024):
  return postprocess_masks(low_res, input_hw, original_hw, out_hw, img_size)


def _predict(graphdef, state, embeddings, image_index, input_hw, original_hw, coords, labels,
             mask_input, multimask_output=True, out_hw=(1024, 1024), return_logits=False,
             mask_threshold=0.0, num_valid=None):
  TRACE_COUNTS["predict"] += 1
  model = nnx.merge(graphdef, state)
  low, iou = _decode_impl(model, embeddings, image_index, coords, labels, mask_input,
                          multimask_output, num_valid)
  ihw = jax.lax.dynamic_index_in_dim(input_hw, image_index, 0, keepdims=False)
  ohw = jax.lax.dynamic_index_in_dim(original_hw, image_index, 0, keepdims=False)

  ry, rx = postprocess_matrices(low.shape[-1], model.config.img_size, ihw, ohw, out_hw)

  def post(lo):
    m = resize_masks(lo, ry, rx)
    return m if return_logits else m > mask_threshold
  # in the decoder's prompt chunks, so that padding prompts are skipped here too
  chunk = resolve_prompt_chunk(model.mask_decoder.prompt_chunk)
  masks = post(low) if chunk is None else map_chunks(post, low, chunk, num_valid)
  return masks, iou, low


embed_fn = jit(_embed, static_argnums=(0,))
embed_fn.__doc__ = """(graphdef, state, padded (N,S,S,3) uint8, input_hw (N,2)) -> (N,h,w,256) f32."""
decode_fn = jit(_decode, static_argnums=(0,), static_argnames=("multimask_output",))
decode_fn.__doc__ = """(graphdef, state, embeddings (N,h,w,256), image_index, coords (B,T,2) in the
input frame, labels (B,T), mask_input (B,4h,4w) | None, multimask_output, num_valid = None |
traced count of real prompts, the rest padding) -> (low-res logits (B,M,4h,4w), iou (B,M))."""
postprocess_fn = jit(_postprocess, static_argnames=("out_hw", "img_size"))
predict_fn = jit(_predict, static_argnums=(0,),
                     static_argnames=("multimask_output", "out_hw", "return_logits"))
predict_fn.__doc__ = """decode_fn + postprocess to `out_hw` (static; zero past original_hw) +
threshold: -> (masks (B,M,*out_hw) bool or logits, iou (B,M), low-res logits)."""


def split_sam(model: Sam, dtype=None):
  """(graphdef, state) of a Sam for the pure functions, optionally with another
  compute dtype (same parameters, e.g. `jnp.bfloat16`)."""
  if not isinstance(model, Sam):
    raise TypeError(f"expected an aopsam_jax Sam model, got {type(model).__name__}")
  _, state = nnx.split(model)
  if dtype is None:
    graphdef, _ = nnx.split(model)
  else:
    cfg = model.config
    attention = attention_impl(model)
    abstract = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0), dtype=dtype, attention=attention))
    graphdef, _ = nnx.split(abstract)
  return graphdef, state


# ----------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


class Prompts(NamedTuple):
  """Validated prompts with a leading batch axis of `b` (numpy, original frame)."""
  coords: Optional[np.ndarray]   # (b, N, 2) float
  labels: Optional[np.ndarray]   # (b, N) int32
  boxes: Optional[np.ndarray]    # (b, 4) float64 XYXY
  batched: bool                  # the caller passed a batch (results keep the B axis)
  b: int
  mask: Optional[np.ndarray]     # (b, low, low) float32 logits


def _check_points(point_coords, point_labels):
  """-> coords (B, N, 2), labels (B, N) int32, batched."""
  if point_labels is None:
    raise ValueError("point_coords need point_labels (1 = foreground, 0 = background)")
  coords = np.asarray(point_coords)
  labels = np.asarray(point_labels)
  if coords.dtype == object or not (np.issubdtype(coords.dtype, np.number)):
    raise ValueError(f"point_coords must be numeric, got dtype {coords.dtype}")
  batched = False
  if coords.ndim == 2 and coords.shape[-1] == 2:
    if labels.shape != coords.shape[:1]:
      raise ValueError(f"point_labels must have shape {coords.shape[:1]} for point_coords "
                       f"{coords.shape}, got {labels.shape}")
    coords, labels = coords[None], labels[None]
  elif coords.ndim == 3 and coords.shape[-1] == 2:
    batched = True
    if labels.shape != coords.shape[:2]:
      raise ValueError(f"point_labels must have shape {coords.shape[:2]} for point_coords "
                       f"{coords.shape}, got {labels.shape}")
  else:
    raise ValueError(f"point_coords must be (N, 2) xy, or (B, N, 2) for a batch; got "
                     f"{coords.shape}")
  if coords.shape[1] == 0:
    raise ValueError("point_coords has no points")
  if not np.isfinite(coords).all():
    raise ValueError("point_coords contain NaN or inf")
  if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)
          or (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))):
    raise ValueError(f"point_labels must be integers 0/1, got {labels.dtype}")
  allowed = (0, 1, -1) if batched else (0, 1)
  if not np.isin(labels, allowed).all():
    bad = np.unique(labels[~np.isin(labels, allowed)])
    raise ValueError(f"point_labels must be 1 (foreground) or 0 (background)"
                     f"{' or -1 (padding)' if batched else ''}; got {bad.tolist()}")
  return coords, labels.astype(np.int32), batched


def _check_box(box, have_points: bool, batched: bool, b: Optional[int]):
  """-> boxes (B, 4) float64, batched."""
  bx = np.asarray(box, np.float64) if np.asarray(box).dtype != object else None
  if bx is None or not (bx.shape == (4,) or (bx.ndim == 2 and bx.shape[1] == 4)):
    raise ValueError(f"box must be (4,) XYXY, or (B, 4) for a batch; got "
                     f"{np.shape(box)}")
  if not np.isfinite(bx).all():
    raise ValueError("box contains NaN or inf")
  if bx.ndim == 2:
    if have_points and not batched:
      raise ValueError("a (B, 4) box batch needs (B, N, 2) point_coords, got (N, 2)")
    if b is not None and bx.shape[0] != b:
      raise ValueError(f"{b} point prompts but {bx.shape[0]} boxes")
    return bx, True
  if batched:
    raise ValueError("batched point_coords (B, N, 2) need boxes of shape (B, 4)")
  return bx[None], batched


def _check_mask(mask_input, b: Optional[int], low: int) -> np.ndarray:
  """-> (B, low, low) float32 (one mask repeated over B prompts)."""
  mask = np.asarray(mask_input, np.float32)
  if mask.ndim == 4 and mask.shape[1] == 1:
    mask = mask[:, 0]
  elif mask.ndim == 2:
    mask = mask[None]
  if mask.ndim != 3 or mask.shape[1:] != (low, low):
    raise ValueError(f"mask_input must be low-res logits of shape (1, {low}, {low}) (or "
                     f"(B, {low}, {low}) / (B, 1, {low}, {low}) for a batch); got "
                     f"{np.shape(mask_input)}")
  if b is not None and mask.shape[0] != b:
    if mask.shape[0] != 1:
      raise ValueError(f"mask_input has {mask.shape[0]} masks for {b} prompts")
    mask = np.repeat(mask, b, 0)
  return mask


def check_prompts(point_coords, point_labels, box, mask_input, low_res: int) -> Prompts:
  """Validate `SamPredictor.predict`'s prompts (ValueError naming the
  problem) and give them one leading batch axis."""
  if point_coords is None and box is None and mask_input is None:
    raise ValueError("predict() needs point_coords (+ point_labels), a box, or mask_input")
  if point_coords is None and point_labels is not None:
    raise ValueError("point_labels given without point_coords")
  coords = labels = boxes = mask = None
  batched, b = False, None
  if point_coords is not None:
    coords, labels, batched = _check_points(point_coords, point_labels)
    b = coords.shape[0]
  if box is not None:
    boxes, batched = _check_box(box, coords is not None, batched, b)
    b = boxes.shape[0]
  if mask_input is not None:
    mask = _check_mask(mask_input, b, low_res)
  if b == 0:
    raise ValueError("empty prompt batch")
  if b is None:  # mask_input alone (allowed by the official predictor)
    b = mask.shape[0]
    batched = np.ndim(mask_input) == 4 or mask.shape[0] > 1
  return Prompts(coords, labels, boxes, batched, b, mask)


class SamPredictor:
  """Official-style predictor over a JAX Sam.

  >>> predictor = SamPredictor.from_checkpoint("sam_vit_b_01ec64.pth")  # or "vit_b", ...
  >>> predictor.set_image(load_image("photo.jpg"))   # or a path
  >>> masks, iou, low_res = predictor.predict(point_coords=np.array([[500, 375]]),
  ...                                         point_labels=np.array([1]))
  """

  def __init__(self, model: Sam, *, dtype=None,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               embed_batch_size: int = 1):
    self.graphdef, self.state = split_sam(model, dtype)
    self.model = model
    self.config = model.config
    buckets = tuple(sorted(int(b) for b in prompt_buckets))
    if not buckets or buckets[0] < 1:
      raise ValueError(f"prompt_buckets must be positive sizes, got {prompt_buckets!r}")
    self.prompt_buckets = buckets
    if embed_batch_size < 1:
      raise ValueError("embed_batch_size must be >= 1")
    self.embed_batch_size = int(embed_batch_size)
    self.mask_threshold = float(self.config.mask_threshold)
    self.reset_image()

  @classmethod
  def from_checkpoint(cls, source: str, *, model_type=None, dtype=None,
                      **kwargs) -> "SamPredictor":
    """Any SAM source (`checkpoints.load_sam`): a converted .safetensors, an
    official .pth, a Hugging Face folder, or a name such as "vit_h"."""
    from aopsam_jax.sam.checkpoints import load_sam
    return cls(load_sam(source, model_type), dtype=dtype, **kwargs)

  # --- images ---------------------------------------------------------------

  def reset_image(self) -> None:
    self.features: Optional[jax.Array] = None
    self.input_hw: Optional[np.ndarray] = None
    self.original_hw: Optional[np.ndarray] = None
    self.is_image_set = False

  def set_image(self, image: Any, image_format: str = "RGB") -> None:
    """Embed one image: HxWx3 uint8 RGB (or anything `load_image` accepts)."""
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    arr = self._as_rgb(image)
    if image_format == "BGR":
      arr = np.ascontiguousarray(arr[..., ::-1])
    self.embed([arr])

  def embed(self, images: Union[Sequence[Any], np.ndarray]) -> jax.Array:
    """Embed a list of images (sizes may differ) or an (N, H, W, 3) batch.

    Afterwards `predict(..., image_index=i)` prompts image i.  Returns the
    (N, h, w, 256) embeddings.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    elif isinstance(images, (np.ndarray, str)) or not isinstance(images, Sequence):
      raise ValueError("embed() takes a list of images or an (N, H, W, 3) array; use "
                       "set_image() for a single image")
    if len(images) == 0:
      raise ValueError("embed() got no images")
    s = self.config.img_size
    prepared = [prepare_image(self._as_rgb(im), s) for im in images]
    padded = np.stack([p[0] for p in prepared])
    input_hw = np.stack([p[1] for p in prepared]).astype(np.int32)
    original_hw = np.stack([p[2] for p in prepared]).astype(np.int32)
    n, bs = len(prepared), self.embed_batch_size
    outs = []
    for i in range(0, n, bs):
      p, h = padded[i:i + bs], input_hw[i:i + bs]
      k = p.shape[0]
      if k < bs:  # pad the last chunk: one compiled program
        p = np.concatenate([p, np.repeat(p[-1:], bs - k, 0)])
        h = np.concatenate([h, np.repeat(h[-1:], bs - k, 0)])
      outs.append(embed_fn(self.graphdef, self.state, p, h)[:k])
    self.features = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
    self.input_hw, self.original_hw = input_hw, original_hw
    self._input_hw_dev = jnp.asarray(input_hw)
    self._original_hw_dev = jnp.asarray(original_hw)
    self.is_image_set = True
    return self.features

  @staticmethod
  def _as_rgb(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
        and image.shape[-1] == 3:
      if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
      return image
    return load_image(image)

  def get_image_embedding(self) -> jax.Array:
    """(N, h, w, 256) embeddings of the set images (NHWC, not the official NCHW)."""
    self._require_image()
    return self.features

  @property
  def num_images(self) -> int:
    return 0 if self.features is None else int(self.features.shape[0])

  def _require_image(self) -> None:
    if not self.is_image_set:
      raise RuntimeError("no image set: call set_image(image) or embed(images) before predict()")

  # --- prompts --------------------------------------------------------------

  def _bucket(self, b: int) -> int:
    for s in self.prompt_buckets:
      if b <= s:
        return s
    return self.prompt_buckets[-1]

  def predict(self, point_coords: Optional[np.ndarray] = None,
              point_labels: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None,
              mask_input: Optional[np.ndarray] = None, multimask_output: bool = True,
              return_logits: bool = False, image_index: int = 0
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks for one prompt or a batch of B prompts on image `image_index`.

    Single prompt (as the official `predict`): point_coords (N, 2) xy in the
    original image, point_labels (N,) with 1 = foreground, 0 = background,
    box (4,) XYXY, mask_input (1, 256, 256) low-res logits of a previous
    call.  Returns masks (M, H, W) (bool, or float logits with
    return_logits), iou predictions (M,), low-res logits (M, 256, 256), with
    M = 3 if multimask_output else 1.

    Batch (as `predict_torch`): point_coords (B, N, 2), point_labels (B, N)
    (-1 marks padding points, as in the official prompt encoder), boxes
    (B, 4), mask_input (B, 256, 256) or (B, 1, 256, 256).  Results get a
    leading B axis.
    """
    self._require_image()
    if not isinstance(image_index, (int, np.integer)) or not 0 <= image_index < self.num_images:
      raise ValueError(f"image_index {image_index!r} out of range for {self.num_images} "
                       "embedded image(s)")
    coords, labels, box_arr, batched, b, mask = check_prompts(
        point_coords, point_labels, box, mask_input, self.config.low_res_size)
    ohw = self.original_hw[image_index]
    ihw = self.input_hw[image_index]
    pts = apply_coords(coords, ohw, ihw) if coords is not None else None
    bxs = apply_boxes(box_arr, ohw, ihw) if box_arr is not None else None
    if pts is None and bxs is None:  # mask-only prompt: no sparse tokens (official)
      tok_c, tok_l = np.zeros((b, 0, 2), np.float32), np.zeros((b, 0), np.int32)
    else:
      tok_c, tok_l = build_sparse_prompts(pts, labels, bxs)
    out_hw = (_round_up(ohw[0], OUT_ALIGN), _round_up(ohw[1], OUT_ALIGN))
    masks, ious, lows = [], [], []
    chunk = self.prompt_buckets[-1]
    for i in range(0, b, chunk):
      c, l = tok_c[i:i + chunk], tok_l[i:i + chunk]
      m = None if mask is None else mask[i:i + chunk]
      k = c.shape[0]
      pad = self._bucket(k) - k
      if pad:
        c = np.concatenate([c, np.repeat(c[:1], pad, 0)])
        l = np.concatenate([l, np.repeat(l[:1], pad, 0)])
        m = None if m is None else np.concatenate([m, np.repeat(m[:1], pad, 0)])
      res = predict_fn(self.graphdef, self.state, self.features, np.int32(image_index),
                       self._input_hw_dev, self._original_hw_dev, c, l, m,
                       multimask_output=bool(multimask_output), out_hw=out_hw,
                       return_logits=bool(return_logits), mask_threshold=self.mask_threshold,
                       num_valid=np.int32(k))
      mk, io, lo = jax.device_get(res)
      masks.append(mk[:k, :, :ohw[0], :ohw[1]])
      ious.append(io[:k])
      lows.append(lo[:k])
    masks = np.ascontiguousarray(np.concatenate(masks) if len(masks) > 1 else masks[0])
    ious = np.concatenate(ious) if len(ious) > 1 else ious[0]
    lows = np.concatenate(lows) if len(lows) > 1 else lows[0]
    if not batched:
      return masks[0], ious[0], lows[0]
    return masks, ious, lows

