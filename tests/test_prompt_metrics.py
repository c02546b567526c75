"""Training-time prompt metrics (`trainer.evaluation`) against brute force."""

import numpy as np
from pycocotools import mask as mask_utils

from aopsam_jax.data.targets import TargetConfig
from aopsam_jax.trainer.evaluation import ImageGT, summarize


def _rle(m):
  r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
  r["counts"] = r["counts"].decode()
  return r


def test_counts_match_brute_force():
  rng = np.random.default_rng(0)
  h, w = 60, 90
  masks = []
  for _ in range(5):
    m = np.zeros((h, w), bool)
    y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
    m[y0:y0 + rng.integers(4, 20), x0:x0 + rng.integers(4, 25)] = True
    masks.append(m)
  tiny = np.zeros((h, w), bool); tiny[0, 0] = True       # below min_area: not GT, still "annotated"
  crowd = np.zeros((h, w), bool); crowd[50:58, 70:88] = True
  anns = [{"segmentation": _rle(m), "iscrowd": 0} for m in masks]
  anns += [{"segmentation": _rle(tiny), "iscrowd": 0}, {"segmentation": _rle(crowd), "iscrowd": 1}]
  g = ImageGT(anns, h, w, TargetConfig(min_area=200.0))  # 90 -> 1024: 1 px = 129 input px
  assert len(g.gt) == 5
  pts = rng.uniform([-3, -3], [w + 3, h + 3], (200, 2))  # some outside the image: clipped
  valid = rng.random(200) < 0.8
  inside = g.inside(pts)
  c = g.counts(pts, valid)
  pix = [(min(max(int(np.floor(y)), 0), h - 1), min(max(int(np.floor(x)), 0), w - 1))
         for x, y in pts]
  hit = np.zeros(5, bool)
  dups = 0
  for n, m in enumerate(masks):
    for k, (yi, xi) in enumerate(pix):
      assert inside[n, k] == m[yi, xi]
    k_in = sum(bool(ok and m[yi, xi]) for (yi, xi), ok in zip(pix, valid))
    hit[n] = k_in > 0
    dups += max(k_in - 1, 0)
  union = np.any(masks, 0) | tiny | crowd
  pin = sum(bool(ok and union[yi, xi]) for (yi, xi), ok in zip(pix, valid))
  assert c == {"gt": 5.0, "hit": float(hit.sum()), "points": float(valid.sum()),
               "points_in": float(pin), "dups": float(dups), "images": 1.0}
  s = summarize(c)
  assert s["recall"] == hit.sum() / 5 and s["precision"] == pin / valid.sum()
