"""SAM pre- and post-processing.

Resizing of the *image* happens on the host with PIL exactly as the official
`ResizeLongestSide.apply_image` (torchvision's PIL path: bilinear with
antialias, rounding to uint8).  Everything after that is jittable and works
with a fixed (S, S) buffer plus the valid size as data, so images of
different sizes share one compiled program:

  * `preprocess`: normalise with SAM's mean/std, then zero the padding
    (official order: normalise, then pad with zeros).
  * `postprocess_masks`: low-res logits -> padded input size -> crop to the
    resized image -> original size, all bilinear with half-pixel centres
    (torch `F.interpolate(..., align_corners=False)`), written as two small
    interpolation matrices so the crop and output sizes may be traced values.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


def get_preprocess_shape(h: int, w: int, long_side: int = 1024) -> Tuple[int, int]:
  """Official `ResizeLongestSide.get_preprocess_shape` (round half up)."""
  scale = long_side * 1.0 / max(h, w)
  return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
  """HWC uint8 RGB -> resized HWC uint8, as the official predictor does."""
  from PIL import Image
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
  newh, neww = get_preprocess_shape(image.shape[0], image.shape[1], long_side)
  return np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))


def pad_to_square(image: np.ndarray, size: int = 1024) -> np.ndarray:
  """Zero-pad an HWC image bottom/right to (size, size, C)."""
  h, w = image.shape[:2]
  if h > size or w > size:
    raise ValueError(f"image {h}x{w} larger than the {size} input")
  out = np.zeros((size, size) + image.shape[2:], image.dtype)
  out[:h, :w] = image
  return out


def prepare_image(image: np.ndarray, img_size: int = 1024):
  """Host side: RGB uint8 image -> (padded uint8 (S,S,3), input_hw, original_hw)."""
  resized = resize_longest_side(image, img_size)
  return (pad_to_square(resized, img_size), np.array(resized.shape[:2], np.int32),
          np.array(np.asarray(image).shape[:2], np.int32))


def preprocess(padded: jax.Array, input_hw: jax.Array) -> jax.Array:
  """(..., S, S, 3) resized+padded pixels, (..., 2) valid size -> model input.

  Pixels outside the valid region become exactly 0 after normalisation, as
  in the official code (which pads after normalising).
  """
  x = (padded.astype(jnp.float32) - PIXEL_MEAN) / PIXEL_STD
  s_h, s_w = x.shape[-3], x.shape[-2]
  rows = jnp.arange(s_h) < input_hw[..., 0, None]
  cols = jnp.arange(s_w) < input_hw[..., 1, None]
  valid = rows[..., :, None] & cols[..., None, :]
  return jnp.where(valid[..., None], x, 0.0)


def image_small_np(padded: np.ndarray, input_hw, factor: int = 4) -> np.ndarray:
  """Host numpy twin of `downsample_image(preprocess(padded, input_hw))` for one
  (S, S, 3) image: the prompt predictor's image input, with no device round trip."""
  x = (np.asarray(padded, np.float32) - PIXEL_MEAN) / PIXEL_STD
  x[int(input_hw[0]):] = 0.0
  x[:, int(input_hw[1]):] = 0.0
  s = x.shape[0] // factor
  return x.reshape(s, factor, s, factor, 3).mean(axis=(1, 3), dtype=np.float32)


def apply_coords(coords: np.ndarray, original_hw, input_hw) -> np.ndarray:
  """Official `apply_coords`: xy in the original image -> xy in the resized input."""
  coords = np.array(coords, np.float64, copy=True)
  oh, ow = original_hw
  ih, iw = input_hw
  coords[..., 0] = coords[..., 0] * (iw / ow)
  coords[..., 1] = coords[..., 1] * (ih / oh)
  return coords


def apply_boxes(boxes: np.ndarray, original_hw, input_hw) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64)
  return apply_coords(boxes.reshape(-1, 2, 2), original_hw, input_hw).reshape(boxes.shape)


def interp_matrix(out_len: int, out_valid, in_len: int, in_valid) -> jax.Array:
  """(out_len, in_len) matrix of torch bilinear (align_corners=False) resizing
  from the first `in_valid` input samples to `out_valid` output samples.

  Rows past `out_valid` are zero.  `in_valid`/`out_valid` may be traced.
  """
  in_valid = jnp.asarray(in_valid, jnp.float32)
  out_valid = jnp.asarray(out_valid, jnp.float32)
  i = jnp.arange(out_len, dtype=jnp.float32)
  src = (i + 0.5) * (in_valid / out_valid) - 0.5
  src = jnp.maximum(src, 0.0)  # torch clamps negative source positions to 0
  i0 = jnp.floor(src)
  frac = src - i0
  i0 = jnp.minimum(i0, in_valid - 1)
  i1 = jnp.minimum(i0 + 1, in_valid - 1)
  cols = jnp.arange(in_len, dtype=jnp.float32)
  m = ((cols[None, :] == i0[:, None]) * (1.0 - frac)[:, None]
       + (cols[None, :] == i1[:, None]) * frac[:, None])
  return jnp.where((i < out_valid)[:, None], m, 0.0)


def postprocess_matrices(low_res: int, img_size: int, input_hw, original_hw,
                         out_hw: Tuple[int, int]) -> Tuple[jax.Array, jax.Array]:
  """Row and column matrices (Hout x low_res, Wout x low_res) for `postprocess_masks`."""
  up = interp_matrix(img_size, img_size, low_res, low_res)  # (S, low)
  ry = interp_matrix(out_hw[0], original_hw[0], img_size, input_hw[0]) @ up
  rx = interp_matrix(out_hw[1], original_hw[1], img_size, input_hw[1]) @ up
  return ry, rx


def postprocess_masks(low_res_logits: jax.Array, input_hw, original_hw,
                      out_hw: Tuple[int, int], img_size: int = 1024) -> jax.Array:
  """(..., l, l) low-res logits -> (..., Hout, Wout) logits at the original size.

  Equivalent to the official `Sam.postprocess_masks` (upsample to S x S,
  crop to `input_hw`, resize to `original_hw`).  `out_hw` is the static
  output buffer; for out_hw == original_hw this is exactly the official output,
  otherwise the region past `original_hw` is 0.
  """
  low = low_res_logits.shape[-1]
  return resize_masks(low_res_logits,
                      *postprocess_matrices(low, img_size, input_hw, original_hw, out_hw))


def resize_masks(low_res_logits: jax.Array, ry: jax.Array, rx: jax.Array) -> jax.Array:
  """`postprocess_masks` with its `postprocess_matrices` computed once by the
  caller (e.g. outside a loop over mask chunks).  The columns are resized by
  one matmul; each output row mixes at most four low-res rows (bilinear of
  bilinear), which are gathered rather than multiplied by a mostly-zero matrix.
  """
  cols = jnp.einsum("...lm,wm->...lw", low_res_logits.astype(jnp.float32), rx,
                    precision=jax.lax.Precision.HIGHEST)
  weights, rows = jax.lax.top_k(ry, 4)  # weights are >= 0: the top four hold every non-zero
  out = weights[:, 0, None] * jnp.take(cols, rows[:, 0], axis=-2)
  for k in range(1, 4):
    out = out + weights[:, k, None] * jnp.take(cols, rows[:, k], axis=-2)
  return out
