"""Prompt targets against independent numpy / scipy references."""

import numpy as np
import pytest
from scipy import ndimage

from aopsam_jax.data import targets as T
from aopsam_jax.sam.rle import segmentation_to_mask
from aopsam_jax.sam.transforms import get_preprocess_shape


def _blob(rng, h, w):
  m = np.zeros((h, w), bool)
  for _ in range(3):
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    ry, rx = rng.integers(3, h // 2), rng.integers(3, w // 2)
    yy, xx = np.mgrid[:h, :w]
    m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  return m


@pytest.mark.parametrize("seed", range(6))
def test_interior_point_matches_full_frame_edt(seed):
  rng = np.random.default_rng(seed)
  m = _blob(rng, 57, 83)
  x, y, d = T.interior_point(m)
  ref = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]  # border = outside
  iy, ix = np.unravel_index(np.argmax(ref), ref.shape)  # first max, row-major
  assert (x, y) == (ix + 0.5, iy + 0.5)
  assert d == pytest.approx(ref.max())


def test_segmentation_to_mask_formats():
  h, w = 20, 30
  poly = segmentation_to_mask([[5, 4, 15, 4, 15, 12, 5, 12]], h, w)
  # pycocotools rasterises the polygon [5,15) x [4,12) (pixel-centre rule)
  ref = np.zeros((h, w), bool); ref[4:12, 5:15] = True
  assert np.abs(poly.astype(int) - ref).sum() <= 2 * (10 + 8)  # boundary pixels only
  from pycocotools import mask as mu
  rle = mu.encode(np.asfortranarray(ref.astype(np.uint8)))
  np.testing.assert_array_equal(segmentation_to_mask(rle, h, w), ref)
  rle_s = dict(rle, counts=rle["counts"].decode())
  np.testing.assert_array_equal(segmentation_to_mask(rle_s, h, w), ref)
  flat = ref.T.reshape(-1)
  change = np.flatnonzero(np.diff(flat.astype(int))) + 1
  counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
  np.testing.assert_array_equal(segmentation_to_mask({"counts": counts, "size": [h, w]}, h, w), ref)


def test_draw_gaussian_matches_formula():
  hm = np.zeros((40, 50), np.float32)
  T.draw_gaussian(hm, 10, 7, 2.5)
  T.draw_gaussian(hm, 12, 9, 1.0)
  yy, xx = np.mgrid[:40, :50]
  g1 = np.exp(-((xx - 10) ** 2 + (yy - 7) ** 2) / (2 * 2.5 ** 2))
  g2 = np.exp(-((xx - 12) ** 2 + (yy - 9) ** 2) / (2 * 1.0 ** 2))
  ref = np.maximum(g1 * (np.abs(xx - 10) <= 8) * (np.abs(yy - 7) <= 8),
                   g2 * (np.abs(xx - 12) <= 3) * (np.abs(yy - 9) <= 3))
  np.testing.assert_allclose(hm, ref, atol=1e-6)
  assert hm[7, 10] == 1.0 and hm[9, 12] == 1.0


def _poly_ann(x0, y0, x1, y1, crowd=0):
  return {"iscrowd": crowd, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


def test_make_target_geometry():
  h0, w0 = 300, 500
  cfg = T.TargetConfig(min_area=64.0)
  anns = [_poly_ann(20, 30, 120, 90), _poly_ann(300, 100, 460, 260),
          _poly_ann(200, 200, 203, 203),                 # tiny: dropped
          _poly_ann(400, 10, 490, 60, crowd=1)]          # crowd: ignore region
  heat, weight = T.make_target(anns, h0, w0, cfg)
  ih, iw = get_preprocess_shape(h0, w0)
  assert (ih, iw) == (614, 1024)
  # peaks: most interior pixel of each kept mask, mapped by SAM's apply_coords / 4
  peaks = np.argwhere(heat == 1.0)
  assert len(peaks) == 2
  want = []
  for a in anns[:2]:
    m = segmentation_to_mask(a["segmentation"], h0, w0)
    ref = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    iy, ix = np.unravel_index(np.argmax(ref), ref.shape)
    want.append((int((iy + 0.5) * ih / h0 / 4), int((ix + 0.5) * iw / w0 / 4)))
  assert sorted(map(tuple, peaks.tolist())) == sorted(want)
  # sigma grows with the instance: the larger one has a wider bump
  (r1, c1), (r2, c2) = want
  assert heat[r2, c2 + 4] > heat[r1, c1 + 4]
  # padding rows are ignored, image rows are not
  rows_valid = (np.arange(256) * 4 + 2) < ih
  assert weight[~rows_valid].max() == 0 and weight[rows_valid][:, :].min() in (0.0, 1.0)
  # crowd region (original x 400..490, y 10..60) is ignored at its centre
  cy, cx = int(35 * ih / h0 / 4), int(445 * iw / w0 / 4)
  assert weight[cy, cx] == 0 and weight[cy + 20, cx] == 1
  # values in [0, 1], maximum over instances
  assert heat.min() >= 0 and heat.max() == 1.0


def test_empty_image_target():
  heat, weight = T.make_target([], 100, 200)
  assert heat.max() == 0 and weight.sum() == 256 * 128
