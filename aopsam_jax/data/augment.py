"""Training-time augmentation of prepared examples (host side, numpy).

Applied after the example transform, to the arrays the step consumes, so it
works the same in both embedding modes:

* horizontal flip of the IMAGE CONTENT only: SAM pads bottom/right, so the
  resized image occupies columns [0, w) of every frame and the padding must
  stay on the right (the predictor never sees left padding at test time).
  Each array is flipped over its first ``ceil(w * size / 1024)`` columns:
  target, weight, ``image_small`` (256 frame), ``embedding`` (64 frame) and
  the online ``image`` (1024 frame, exact).  For a landscape image (w = 1024)
  every flip is exact; for a portrait one the last, partly padded heatmap
  column lands at column 0 (at most 1/2 heatmap pixel of misalignment).
  In 'cache' mode the cached embedding is flipped too, which is an
  APPROXIMATION of the embedding of the flipped image (SAM's ViT is not
  exactly flip-equivariant); 'online' mode encodes the flipped image itself.
* photometric jitter (brightness, contrast, saturation) of the image in
  pixel space; the embedding is not recomputed (cache mode) - it is the
  geometry the targets depend on, and that is unchanged.

Randomness: each example draws from ``numpy.random.default_rng([seed,
position])`` where `position` is its index in the GLOBAL shuffled stream
(before per-process sharding), so 1 or 8 devices and 1 or 2 processes see the
same augmented batches, and a resumed run the same ones as an uninterrupted
run.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from aopsam_jax.sam.transforms import PIXEL_MEAN, PIXEL_STD

STREAM_INDEX = "_stream_index"  # record key set by `pipeline.train_dataset`


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  hflip: float = 0.0        # probability of a horizontal flip
  brightness: float = 0.0   # factor drawn from [1 - b, 1 + b]
  contrast: float = 0.0     # factor drawn from [1 - c, 1 + c] around the mean grey
  saturation: float = 0.0   # factor drawn from [1 - s, 1 + s] around each pixel's grey

  def __post_init__(self):
    if not 0.0 <= self.hflip <= 1.0:
      raise ValueError(f"augment.hflip is a probability, got {self.hflip}")
    for name in ("brightness", "contrast", "saturation"):
      v = getattr(self, name)
      if not 0.0 <= v < 1.0:
        raise ValueError(f"augment.{name} must be in [0, 1), got {v}")

  @property
  def enabled(self) -> bool:
    return bool(self.hflip or self.brightness or self.contrast or self.saturation)


def flip_content(x: np.ndarray, width: int) -> np.ndarray:
  """Mirror columns [0, width) of an (H, W, ...) array; columns >= width stay."""
  out = np.array(x, copy=True)
  out[:, :width] = x[:, :width][:, ::-1]
  return out


def _cols(input_w: int, size: int, img_size: int) -> int:
  return min(size, math.ceil(input_w * size / img_size))


def jitter_pixels(pix: np.ndarray, f_bright: float, f_contrast: float, f_sat: float) -> np.ndarray:
  """(..., 3) float RGB in [0, 255] -> jittered, clipped to [0, 255]."""
  grey = pix @ np.array([0.299, 0.587, 0.114], np.float32)
  pix = pix * f_bright
  grey = grey * f_bright
  mean = grey.mean()
  pix = (pix - mean) * f_contrast + mean
  grey = (grey - mean) * f_contrast + mean
  pix = grey[..., None] + (pix - grey[..., None]) * f_sat
  return np.clip(pix, 0.0, 255.0)


def augment_example(ex: dict, cfg: AugmentConfig, rng: np.random.Generator,
                    input_hw, img_size: int = 1024) -> dict:
  """Augment one prepared example in place of its arrays (returns a new dict).

  `input_hw`: the resized image size inside the padded img_size frame.
  Draws are made in a fixed order whatever is enabled, so turning one
  augmentation off does not change the others' draws.
  """
  u_flip = rng.random()
  f = [1.0 + v * (2.0 * rng.random() - 1.0) for v in (cfg.brightness, cfg.contrast, cfg.saturation)]
  ih, iw = int(input_hw[0]), int(input_hw[1])
  out = dict(ex)
  if u_flip < cfg.hflip:
    for key in ("target", "weight", "image_small", "embedding", "image"):
      if key in out:
        out[key] = flip_content(out[key], _cols(iw, out[key].shape[1], img_size))
  if any(v != 1.0 for v in f):
    if "image" in out:  # online: uint8 padded 1024 frame
      img = out["image"].copy()
      img[:ih, :iw] = np.round(jitter_pixels(img[:ih, :iw].astype(np.float32), *f)).astype(np.uint8)
      out["image"] = img
    if "image_small" in out:  # cache: SAM-normalised, zero padding, 4x area-downsampled
      s = out["image_small"]
      h, w = _cols(ih, s.shape[0], img_size), _cols(iw, s.shape[1], img_size)
      pix = s[:h, :w] * PIXEL_STD + PIXEL_MEAN
      small = s.copy()
      small[:h, :w] = (jitter_pixels(pix, *f) - PIXEL_MEAN) / PIXEL_STD
      out["image_small"] = small.astype(s.dtype)
  return out


def example_rng(seed: int, position: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(position)])
