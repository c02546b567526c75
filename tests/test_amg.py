"""Grid AMG vs the official PyTorch `SamAutomaticMaskGenerator`.

Same random-init weights (vit_tiny_test: real 1024 input and real decoder,
thin encoder), a small crop of the bundled sample image and a coarse grid, so
the official generator (slow on a CPU: it runs the decoder per prompt and
RLE-encodes every candidate) stays cheap.  Random-init SAM gives
low-contrast (|logit| < ~0.4), image-wide masks, so:
  * stability_score_offset 0.05 (the default 1.0 makes every stability 0);
  * pred_iou_thresh 0 (predicted IoUs are negative; the official generator
    skips the filter at <= 0, and so do we);
  * box_nms_thresh 1.0: every mask spans the whole image, so every box is
    the full image and NMS below 1 would keep a single mask (NMS itself is
    checked against torchvision semantics in test_mask_ops.py).
With NMS at 1.0 and one crop the official pipeline is filter-only, so its
output at a stability threshold t is its unfiltered candidate list
restricted to stability >= t; one official run with a real filter checks
that, and the other thresholds (quartiles) reuse the unfiltered run.
"""

import warnings

import numpy as np
import pytest

from tests.reference import build_torch_sam, state_dict_numpy

import torch  # noqa: E402
from pycocotools import mask as coco_mask  # noqa: E402

from aopsam_jax.sam import amg, regions  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from aopsam_jax.sam.params import build_model, convert_state_dict  # noqa: E402

KW = dict(points_per_side=5, points_per_batch=25, pred_iou_thresh=0.0, stability_score_offset=0.05,
          box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def image():
  from aopsam_jax.sam.image_io import load_image, sample_image_path
  return np.ascontiguousarray(load_image(sample_image_path())[60:260:2, 100:400:2])  # 100 x 150


@pytest.fixture(scope="module")
def models():
  cfg = SAM_CONFIGS["vit_tiny_test"]
  tsam = build_torch_sam(cfg, seed=0)
  _, params = convert_state_dict(state_dict_numpy(tsam), cfg)
  return tsam, build_model(cfg, params)


def _official(tsam, image, **kw):
  from segment_anything import SamAutomaticMaskGenerator
  torch.set_num_threads(2)
  with torch.no_grad():
    return SamAutomaticMaskGenerator(tsam, **kw).generate(image)


@pytest.fixture(scope="module")
def official_all(models, image):
  """Every official candidate (no stability filter), COCO RLE."""
  return _official(models[0], image, output_mode="coco_rle", stability_score_thresh=0.0, **KW)


def _decode(recs):
  return [coco_mask.decode(r["segmentation"]).astype(bool) for r in recs]


def _match(ref, ours, stab_tol=1e-4):
  """Number of `ref` records with an `ours` record of the same prompt, mask
  IoU >= 0.95 and (unless stab_tol is None) the same stability score."""
  ref_m, our_m = _decode(ref), _decode(ours)
  our_pts = np.array([r["point_coords"][0] for r in ours]).reshape(-1, 2)
  matched = 0
  for r, rm in zip(ref, ref_m):
    for j in np.flatnonzero(np.abs(our_pts - r["point_coords"][0]).max(1) < 1e-3):
      u = (rm | our_m[j]).sum()
      same_stab = stab_tol is None or abs(ours[j]["stability_score"] - r["stability_score"]) < stab_tol
      if (u == 0 or (rm & our_m[j]).sum() / u >= 0.95) and same_stab:
        matched += 1
        break
  return matched


def _thresholds(stabs):
  """Thresholds at the quartiles, midway between neighbouring scores (a
  threshold equal to a score would turn float rounding into a coin flip)."""
  s = np.sort(stabs[np.isfinite(stabs)])
  return [float((s[i] + s[i + 1]) / 2) for i in (len(s) // 4, len(s) // 2, 3 * len(s) // 4)]


def test_amg_parity_with_official_stability_filter(models, image, official_all):
  tsam, model = models
  stabs = np.array([r["stability_score"] for r in official_all])
  assert len(official_all) == 3 * KW["points_per_side"] ** 2
  ths = _thresholds(stabs)
  # The official generator with the real filter = its candidates restricted.
  real = _official(tsam, image, output_mode="coco_rle", stability_score_thresh=ths[1], **KW)
  assert [r["point_coords"] for r in real] == \
      [r["point_coords"] for r in official_all if r["stability_score"] >= ths[1]]

  flips_input = []
  for t in ths:
    ref = [r for r in official_all if r["stability_score"] >= t]
    gen = amg.SamAutomaticMaskGenerator(model, output_mode="coco_rle", stability_score_thresh=t,
                                        **KW)
    ours = gen.generate(image)
    print(f"threshold {t:.4f}: official {len(ref)} masks, ours {len(ours)}")
    assert len(ref) >= 10
    assert abs(len(ours) - len(ref)) <= 0.01 * len(ref)
    assert _match(ref, ours) >= 0.99 * len(ref)
    fast = amg.SamAutomaticMaskGenerator(model, output_mode="coco_rle", stability_score_thresh=t,
                                         stability_at="input", **KW).generate(image)
    m = _match(ref, fast, stab_tol=None)
    flips_input.append((len(ref) - m + len(fast) - m) / len(official_all))
  print(f"stability_at='input': decisions flipped {np.round(flips_input, 3)} of candidates")


def test_record_types_equal_official(models, image):
  tsam, model = models
  kw = dict(KW, stability_score_thresh=0.0, points_per_side=2, points_per_batch=4)
  for mode in ("binary_mask", "uncompressed_rle", "coco_rle"):
    ref = _official(tsam, image, output_mode=mode, **kw)
    ours = amg.SamAutomaticMaskGenerator(model, output_mode=mode, **kw).generate(image)
    assert len(ours) == len(ref) == 12
    for r, o in zip(ref, ours):
      assert list(o) == list(r)
      for k in r:
        assert type(o[k]) is type(r[k]), (mode, k, type(o[k]), type(r[k]))
      for k in ("bbox", "point_coords", "crop_box"):
        assert [type(v) for v in np.ravel(o[k])] == [type(v) for v in np.ravel(r[k])], k
      assert o["bbox"] == r["bbox"] and o["crop_box"] == r["crop_box"]
      assert abs(o["area"] - r["area"]) <= 2
      seg_o, seg_r = o["segmentation"], r["segmentation"]
      if mode == "binary_mask":
        assert seg_o.dtype == seg_r.dtype == bool and seg_o.shape == seg_r.shape == image.shape[:2]
        assert (seg_o != seg_r).sum() <= 2
      else:
        assert sorted(seg_o) == sorted(seg_r) and seg_o["size"] == seg_r["size"]
        assert type(seg_o["counts"]) is type(seg_r["counts"])
        if mode == "uncompressed_rle":
          assert all(type(c) is type(d) for c, d in zip(seg_o["counts"], seg_r["counts"]))
