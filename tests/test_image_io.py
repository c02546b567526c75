"""image_io.load_image: every layout -> HxWx3 uint8 RGB, checked against numpy."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from aopsam_jax.sam.image_io import DEFAULT_MAX_PIXELS, load_image, sample_image_path


def _rgb(h=6, w=5, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _composite_ref(rgb, a, bg):
  a = a.astype(np.float64)[..., None] / 255.0
  return np.round(rgb * a + np.asarray(bg, np.float64) * (1 - a)).astype(np.uint8)


def test_sample_image():
  path = sample_image_path()
  img = load_image(path)
  assert img.shape == (428, 640, 3) and img.dtype == np.uint8
  assert os.path.getsize(path) < 200_000
  attribution = open(os.path.join(os.path.dirname(path), "ATTRIBUTION.md")).read()
  assert "343937" in attribution and "CC BY" in attribution


def test_rgb_png_roundtrip_and_array_passthrough(tmp_path):
  rgb = _rgb()
  Image.fromarray(rgb).save(tmp_path / "a.png")
  np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)
  np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), rgb)
  np.testing.assert_array_equal(load_image(rgb), rgb)
  np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), rgb)


def test_grayscale_file_and_arrays(tmp_path):
  g = _rgb()[..., 0]
  Image.fromarray(g).save(tmp_path / "g.png")  # mode L
  expect = np.stack([g] * 3, -1)
  np.testing.assert_array_equal(load_image(tmp_path / "g.png"), expect)
  np.testing.assert_array_equal(load_image(g), expect)
  np.testing.assert_array_equal(load_image(g[..., None]), expect)
  Image.fromarray(g > 128).save(tmp_path / "b.png")  # mode 1
  binary = np.stack([(g > 128).astype(np.uint8) * 255] * 3, -1)
  np.testing.assert_array_equal(load_image(tmp_path / "b.png"), binary)
  np.testing.assert_array_equal(load_image(g > 128), binary)


def test_rgba_and_la_composite_or_drop(tmp_path):
  rgb = _rgb(seed=1)
  a = np.array([0, 255, 128, 1, 254], np.uint8)[None, :].repeat(6, 0)
  Image.fromarray(np.dstack([rgb, a])).save(tmp_path / "rgba.png")
  white = _composite_ref(rgb, a, (255, 255, 255))
  np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), white)
  assert (white[:, 0] == 255).all() and (white[:, 1] == rgb[:, 1]).all()
  np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", background=(0, 0, 0)),
                                _composite_ref(rgb, a, (0, 0, 0)))
  np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", alpha="drop"), rgb)
  np.testing.assert_array_equal(load_image(np.dstack([rgb, a])), white)
  g = rgb[..., 0]
  Image.fromarray(np.dstack([g, a]), mode="LA").save(tmp_path / "la.png")
  gray3 = np.stack([g] * 3, -1)
  np.testing.assert_array_equal(load_image(tmp_path / "la.png"),
                                _composite_ref(gray3, a, (255, 255, 255)))
  np.testing.assert_array_equal(load_image(tmp_path / "la.png", alpha="drop"), gray3)
  with pytest.raises(ValueError, match="alpha"):
    load_image(rgb, alpha="keep")


def test_palette_with_and_without_transparency(tmp_path):
  palette = np.random.default_rng(2).integers(0, 256, (256, 3), dtype=np.uint8)
  idx = np.random.default_rng(3).integers(0, 8, (6, 5), dtype=np.uint8)
  im = Image.fromarray(idx, mode="P")
  im.putpalette(palette.tobytes())
  im.save(tmp_path / "p.png")
  np.testing.assert_array_equal(load_image(tmp_path / "p.png"), palette[idx])
  im.save(tmp_path / "pt.png", transparency=3)  # palette entry 3 fully transparent
  expect = palette[idx].copy()
  expect[idx == 3] = 255
  np.testing.assert_array_equal(load_image(tmp_path / "pt.png"), expect)
  np.testing.assert_array_equal(load_image(tmp_path / "pt.png", alpha="drop"), palette[idx])


def test_16bit_png_scaled_not_clipped(tmp_path):
  v = np.array([[0, 1, 128, 257, 1000], [30000, 32767, 40000, 65534, 65535]], np.uint16)
  Image.fromarray(v).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
  expect = np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)
  out = load_image(tmp_path / "g16.png")
  np.testing.assert_array_equal(out, np.stack([expect] * 3, -1))
  assert out[1, 3, 0] == 255 and out[0, 3, 0] == 1  # not saturated / wrapped
  np.testing.assert_array_equal(load_image(v), np.stack([expect] * 3, -1))
  np.testing.assert_array_equal(load_image(np.stack([v] * 3, -1)), np.stack([expect] * 3, -1))


def test_float_arrays(tmp_path):
  f = np.random.default_rng(4).random((4, 3, 3))
  np.testing.assert_array_equal(load_image(f), np.round(f * 255).astype(np.uint8))
  f32 = f.astype(np.float32)
  np.testing.assert_array_equal(load_image(f32),
                                np.round(f32.astype(np.float64) * 255).astype(np.uint8))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    load_image(f * 255)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    load_image(f - 0.5)
  bad = f.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    load_image(bad)
  # mode F files in [0, 1] are scaled like arrays
  g = f[..., 0].astype(np.float32)
  Image.fromarray(g, mode="F").save(tmp_path / "f.tif")
  np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[..., 0],
                                np.round(g.astype(np.float64) * 255).astype(np.uint8))


def test_exif_orientation(tmp_path):
  rgb = _rgb(4, 7, seed=5)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  Image.fromarray(rgb).save(tmp_path / "o6.png", exif=exif)
  np.testing.assert_array_equal(load_image(tmp_path / "o6.png"), np.rot90(rgb, k=-1))
  exif[0x0112] = 3  # 180
  Image.fromarray(rgb).save(tmp_path / "o3.png", exif=exif)
  np.testing.assert_array_equal(load_image(tmp_path / "o3.png"), rgb[::-1, ::-1])
  im = Image.open(tmp_path / "o6.png")  # PIL input gets the same treatment
  np.testing.assert_array_equal(load_image(im), np.rot90(rgb, k=-1))
  # JPEG with orientation 8 (rotate 90 CCW): shape and block colours
  big = np.zeros((32, 64, 3), np.uint8)
  big[:, :32] = (250, 0, 0)
  big[:, 32:] = (0, 0, 250)
  exif[0x0112] = 8
  Image.fromarray(big).save(tmp_path / "o8.jpg", exif=exif, quality=95)
  out = load_image(tmp_path / "o8.jpg")
  assert out.shape == (64, 32, 3)
  assert np.abs(out.astype(int) - np.rot90(big, k=1)).mean() < 6


def test_cmyk_jpeg(tmp_path):
  cmyk = np.random.default_rng(6).integers(0, 256, (8, 8, 4), dtype=np.uint8)
  Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.jpg", quality=100)
  out = load_image(tmp_path / "c.jpg")
  assert out.shape == (8, 8, 3)
  np.testing.assert_array_equal(out, np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))


def test_one_pixel(tmp_path):
  Image.fromarray(np.array([[[1, 2, 3]]], np.uint8)).save(tmp_path / "one.png")
  np.testing.assert_array_equal(load_image(tmp_path / "one.png"), [[[1, 2, 3]]])
  np.testing.assert_array_equal(load_image(np.array([[0.0]])), [[[0, 0, 0]]])


def test_missing_and_non_image_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    load_image(tmp_path / "nope.jpg")
  txt = tmp_path / "notes.jpg"
  txt.write_text("definitely not a jpeg")
  with pytest.raises(ValueError, match="notes.jpg"):
    load_image(txt)
  with pytest.raises(ValueError, match="directory"):
    load_image(tmp_path)
  Image.fromarray(_rgb(64, 64)).save(tmp_path / "t.jpg")
  data = (tmp_path / "t.jpg").read_bytes()
  (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="trunc.jpg"):
    load_image(tmp_path / "trunc.jpg")


def test_bad_arrays():
  with pytest.raises(ValueError, match="channels-first"):
    load_image(np.zeros((3, 10, 12), np.uint8))
  with pytest.raises(ValueError):
    load_image(np.zeros((2, 3, 4, 5), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    load_image(np.zeros((0, 5, 3), np.uint8))
  with pytest.raises(ValueError, match="0..255"):
    load_image(np.full((2, 2, 3), 300, np.int32))
  np.testing.assert_array_equal(load_image(np.full((2, 2, 3), 7, np.int64)), np.full((2, 2, 3), 7))
  with pytest.raises(ValueError):
    load_image(b"\x89PNG")
  with pytest.raises(ValueError):
    load_image(["a", "b"])


def _png_header_only(path, w, h):
  """A PNG whose header claims w x h without real pixel data (size-check test)."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                   + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_size_limit_checked_from_header(tmp_path):
  p = tmp_path / "huge.png"
  _png_header_only(p, 12000, 10000)  # 120 MP > DEFAULT_MAX_PIXELS, never decoded
  assert 12000 * 10000 > DEFAULT_MAX_PIXELS
  with pytest.raises(ValueError, match="huge.png.*limit"):
    load_image(p)
  with pytest.raises(ValueError, match="limit"):
    load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=99)


def test_very_large_jpeg_memory(tmp_path):
  """10000 x 8000 JPEG (240 MB of RGB): loads and resizes in its own process
  with < 1.2 GB peak RSS (VmHWM of the child alone: ru_maxrss would include
  the pytest parent's peak, which survives fork + exec)."""
  path = str(tmp_path / "big.jpg")
  make = ("from PIL import Image, ImageDraw\n"
          "im = Image.new('RGB', (10000, 8000), (30, 60, 90))\n"
          "ImageDraw.Draw(im).rectangle([2000, 1000, 7000, 6000], fill=(200, 100, 50))\n"
          f"im.save({path!r}, quality=80)\n")
  subprocess.run([sys.executable, "-c", make], check=True)
  check = ("from aopsam_jax.sysinfo import peak_rss_kb\n"
           "from aopsam_jax.sam.image_io import load_image\n"
           "from aopsam_jax.sam.transforms import prepare_image\n"
           f"a = load_image({path!r})\n"
           "assert a.shape == (8000, 10000, 3), a.shape\n"
           "assert abs(int(a[3000, 4000, 0]) - 200) < 4 and abs(int(a[100, 100, 2]) - 90) < 4\n"
           "padded, ihw, ohw = prepare_image(a)\n"
           "assert tuple(ihw) == (819, 1024) and tuple(ohw) == (8000, 10000)\n"
           "print(peak_rss_kb())\n")
  out = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True)
  peak_kb = int(out.stdout.strip().splitlines()[-1])
  assert peak_kb < 1_200_000, peak_kb
