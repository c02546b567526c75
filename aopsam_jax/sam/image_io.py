"""Loading images as HxWx3 uint8 RGB, the input of `SamPredictor`.

`load_image` accepts a path or an array-like (numpy / jax array, PIL image)
and normalises every common layout to an (H, W, 3) uint8 RGB array:

  * EXIF orientation is applied (the image is rotated / flipped upright, as
    viewers show it).
  * Grayscale (L, 1-bit, HxW or HxWx1 arrays) is replicated to three channels.
  * Alpha (RGBA, LA, PA, palette images with a transparency entry, HxWx4 /
    HxWx2 arrays): by default the image is *composited over a background*
    (`background`, white by default) -- what a viewer shows.  With
    `alpha="drop"` the alpha channel is ignored and the stored colours are
    kept (what `cv2.imread(path)` in the official SAM notebooks gives).
  * Palette (P) images are expanded through their palette.
  * 16-bit images (PNG `I;16`, `I` mode, uint16 arrays) are scaled to 8 bit
    as round(v * 255 / 65535), never clipped.  32-bit integer images whose
    values exceed 65535 and float images outside [0, 1] are rescaled from
    their own min..max range (file input) or rejected (array input).
  * Float arrays must lie in [0, 1] and become round(255 * x); NaN / inf
    are rejected.  Bool arrays become 0 / 255.
  * CMYK, YCbCr, LAB, HSV are converted with PIL's `convert("RGB")`.

Size limit: images above `max_pixels` (default `DEFAULT_MAX_PIXELS` =
100 million pixels, e.g. 10000 x 10000) are rejected *from the header*,
before decoding, with a ValueError.  Decoding needs about 9 bytes per pixel
at peak (PIL's 4-byte RGBX buffer, the 3-byte result, decoder buffers):
measured 0.74 GB peak RSS for a 10000 x 8000 JPEG, so the default limit keeps
the peak under ~1 GB.  Pass `max_pixels=None` to lift the limit (PIL's own
decompression-bomb error at ~179 MP still applies).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Tuple, Union

import numpy as np

DEFAULT_MAX_PIXELS = 100_000_000

PathLike = Union[str, "os.PathLike[str]"]


def sample_image_path() -> str:
  """Path of the bundled sample image (COCO val2017 #343937, CC BY 2.0; see
  `aopsam_jax/assets/ATTRIBUTION.md`)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "sample.jpg")
  if not os.path.exists(path):  # pragma: no cover - broken installation
    raise FileNotFoundError(f"bundled sample image missing: {path}")
  return path


def _to_uint8_from_16bit(a: np.ndarray) -> np.ndarray:
  return np.round(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def _minmax_to_uint8(a: np.ndarray) -> np.ndarray:
  a = a.astype(np.float64)
  finite = np.isfinite(a)
  if not finite.any():
    return np.zeros(a.shape, np.uint8)
  lo, hi = float(a[finite].min()), float(a[finite].max())
  a = np.where(finite, a, lo)
  if hi <= lo:
    return np.zeros(a.shape, np.uint8)
  return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
  """Alpha-composite uint8 rgb (H, W, 3) with uint8 alpha (H, W) over `background`."""
  bg = np.asarray(background, np.float32).reshape(1, 1, 3)
  a = alpha.astype(np.float32)[..., None] / 255.0
  out = rgb.astype(np.float32) * a + bg * (1.0 - a)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _check_alpha_args(alpha: str, background) -> None:
  if alpha not in ("composite", "drop"):
    raise ValueError(f"alpha must be 'composite' or 'drop', got {alpha!r}")
  bg = np.asarray(background)
  if bg.shape != (3,) or (bg < 0).any() or (bg > 255).any():
    raise ValueError(f"background must be an (R, G, B) triple in 0..255, got {background!r}")


def _pil_to_rgb(im, alpha: str, background, where: str) -> np.ndarray:
  mode = im.mode
  if mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    mode = im.mode
  elif mode == "PA":
    im = im.convert("RGBA")
    mode = "RGBA"
  if mode == "RGB":
    return _rgb_array(im)
  if mode in ("L", "1"):
    g = np.asarray(im.convert("L"), np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
  if mode in ("RGBA", "RGBa", "LA", "La"):
    if mode in ("RGBa", "La"):  # premultiplied alpha
      im = im.convert("RGBA" if mode == "RGBa" else "LA")
    a = np.asarray(im)
    rgb = a[..., :-1] if a.shape[-1] == 4 else np.repeat(a[..., :1], 3, axis=-1)
    if alpha == "drop":
      return np.ascontiguousarray(rgb)
    return _composite(rgb, a[..., -1], background)
  if mode.startswith("I;16"):
    return _gray_to_rgb(_to_uint8_from_16bit(np.asarray(im).astype(np.uint16)))
  if mode == "I":
    a = np.asarray(im)
    if a.size and a.min() >= 0 and a.max() <= 65535:
      return _gray_to_rgb(_to_uint8_from_16bit(a))  # 16-bit PNG decoded as 32-bit
    return _gray_to_rgb(_minmax_to_uint8(a))
  if mode == "F":
    a = np.asarray(im, np.float32)
    if a.size and np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0:
      return _gray_to_rgb(np.round(a * 255.0).astype(np.uint8))
    return _gray_to_rgb(_minmax_to_uint8(a))
  try:
    return np.asarray(im.convert("RGB"), np.uint8)  # CMYK, YCbCr, LAB, HSV, ...
  except (ValueError, OSError) as e:
    raise ValueError(f"{where}: cannot convert PIL mode {mode!r} to RGB ({e})") from None


def _rgb_array(im, stripe: int = 256) -> np.ndarray:
  """An RGB PIL image as a writable (H, W, 3) uint8 array, copied in row
  stripes: `np.asarray(im)` would hold a full-size `tobytes()` copy as well
  (peak ~10 bytes/pixel instead of ~7 for huge images)."""
  w, h = im.size
  out = np.empty((h, w, 3), np.uint8)
  for y0 in range(0, h, stripe):
    y1 = min(h, y0 + stripe)
    out[y0:y1] = np.asarray(im.crop((0, y0, w, y1)), np.uint8)
  return out


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
  return np.repeat(g[..., None], 3, axis=-1)


def _open_checked(path: str, max_pixels: Optional[int]):
  from PIL import Image, UnidentifiedImageError
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such image file: {path}")
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory, not an image file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      im = Image.open(path)
  except UnidentifiedImageError:
    raise ValueError(f"{path} is not an image file PIL can read") from None
  except Image.DecompressionBombError as e:
    raise ValueError(f"{path}: image too large ({e})") from None
  except OSError as e:
    raise ValueError(f"{path}: cannot open image ({e})") from None
  w, h = im.size
  if max_pixels is not None and w * h > max_pixels:
    im.close()
    raise ValueError(f"{path}: image is {w}x{h} = {w * h / 1e6:.1f} MP, above the limit of "
                     f"{max_pixels / 1e6:.1f} MP (load_image(..., max_pixels=None) lifts it; "
                     "downscale very large images first)")
  if w == 0 or h == 0:
    raise ValueError(f"{path}: empty image ({w}x{h})")
  return im


def check_image_file(path: str) -> None:
  """Raise the ValueError / OSError `load_image(path)` would for a file PIL
  cannot open as an image, reading only its header (nothing is decoded, so
  a truncated image still passes)."""
  _open_checked(path, None).close()


def _orientation(im) -> int:
  try:
    return int(im.getexif().get(0x0112, 1) or 1)
  except Exception:  # malformed EXIF: treat as upright
    return 1


def _load_path(path: str, alpha: str, background, max_pixels: Optional[int]) -> np.ndarray:
  from PIL import Image, ImageOps
  im = _open_checked(path, max_pixels)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      im.load()
      if _orientation(im) != 1:
        ImageOps.exif_transpose(im, in_place=True)
      return _pil_to_rgb(im, alpha, background, path)
  except (OSError, SyntaxError) as e:  # truncated / corrupt data
    raise ValueError(f"{path}: cannot decode image ({e})") from None
  finally:
    im.close()


def _array_to_rgb(a: np.ndarray, alpha: str, background) -> np.ndarray:
  if a.ndim == 3 and a.shape[-1] in (1, 2, 3, 4):
    pass
  elif a.ndim == 2:
    a = a[..., None]
  else:
    hint = (" (channels-first? transpose to HxWxC)"
            if a.ndim == 3 and a.shape[0] in (1, 3, 4) else "")
    raise ValueError(f"expected an image array of shape (H, W) or (H, W, C) with C in 1..4, "
                     f"got {a.shape}{hint}")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ValueError(f"empty image array of shape {a.shape}")
  if a.dtype == np.bool_:
    a = a.astype(np.uint8) * 255
  elif np.issubdtype(a.dtype, np.floating):
    af = a.astype(np.float64)
    if not np.isfinite(af).all():
      raise ValueError("float image contains NaN or inf")
    lo, hi = float(af.min()), float(af.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f"float images must have values in [0, 1]; got range [{lo:g}, {hi:g}] "
                       "(pass uint8 for 0..255 data)")
    a = np.round(af * 255.0).astype(np.uint8)
  elif a.dtype == np.uint16:
    a = _to_uint8_from_16bit(a)
  elif np.issubdtype(a.dtype, np.integer):
    if a.dtype != np.uint8:
      lo, hi = int(a.min()), int(a.max())
      if lo < 0 or hi > 255:
        raise ValueError(f"integer image of dtype {a.dtype} has values in [{lo}, {hi}]; expected "
                         "0..255 (uint16 arrays are scaled from 0..65535)")
      a = a.astype(np.uint8)
  else:
    raise ValueError(f"unsupported image dtype {a.dtype}")
  c = a.shape[-1]
  if c == 3:
    return np.ascontiguousarray(a)
  if c == 1:
    return np.repeat(a, 3, axis=-1)
  rgb = a[..., :3] if c == 4 else np.repeat(a[..., :1], 3, axis=-1)
  if alpha == "drop":
    return np.ascontiguousarray(rgb)
  return _composite(rgb, a[..., -1], background)


def load_image(image: Any, *, alpha: str = "composite",
               background: Tuple[int, int, int] = (255, 255, 255),
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """A path, PIL image or array -> (H, W, 3) uint8 RGB (see the module docstring).

  Raises FileNotFoundError for a missing path and ValueError (naming the path)
  for anything that is not a decodable image, and for images above
  `max_pixels`.
  """
  _check_alpha_args(alpha, background)
  if isinstance(image, (str, os.PathLike)):
    return _load_path(os.fspath(image), alpha, background, max_pixels)
  if isinstance(image, bytes):
    raise ValueError("load_image got bytes; pass a path, or io.BytesIO via PIL.Image.open")
  from PIL import Image, ImageOps
  if isinstance(image, Image.Image):
    w, h = image.size
    if max_pixels is not None and w * h > max_pixels:
      raise ValueError(f"image is {w}x{h}, above the limit of {max_pixels} pixels")
    if _orientation(image) != 1:
      image = ImageOps.exif_transpose(image)  # a transposed copy
    return _pil_to_rgb(image, alpha, background, "PIL image")
  a = np.asarray(image)
  if a.dtype == object:
    raise ValueError(f"cannot interpret {type(image).__name__} as an image")
  if max_pixels is not None and a.ndim >= 2 and a.shape[0] * a.shape[1] > max_pixels:
    raise ValueError(f"image is {a.shape[1]}x{a.shape[0]}, above the limit of {max_pixels} pixels")
  return _array_to_rgb(a, alpha, background)
