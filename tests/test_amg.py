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

import numpy as np
import pytest

from tests.reference import build_torch_sam, state_dict_numpy

import torch  # noqa: E402
from pycocotools import mask as coco_mask  # noqa: E402

from aopsam_jax.sam import amg, regions  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from aopsam_jax.sam.params import build_model, convert_state_dict  # noqa: E402

KW = dict(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_offset=0.05,
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
  """Keys, Python types and values of the records in all three output modes.
  The official binary_mask / coco_rle records are its uncompressed ones
  converted by its own `rle_to_mask` / `coco_encode_rle` (what its `generate`
  does), so one official run serves all modes."""
  from segment_anything.utils.amg import coco_encode_rle, rle_to_mask
  tsam, model = models
  kw = dict(KW, stability_score_thresh=0.0, points_per_side=2, points_per_batch=4)
  raw = _official(tsam, image, output_mode="uncompressed_rle", **kw)
  gen = amg.SamAutomaticMaskGenerator(model, **kw)
  inputs, out = gen.generate_arrays(image)
  convert = {"binary_mask": rle_to_mask, "coco_rle": coco_encode_rle, "uncompressed_rle": dict}
  for mode, fn in convert.items():
    ref = [{**r, "segmentation": fn(r["segmentation"])} for r in raw]
    ours = amg.to_records(model, inputs, out, gen.cfg, mode)
    assert len(ours) == len(ref) == 12
    for r, o in zip(ref, ours):
      assert list(o) == list(r)
      for k in r:
        assert type(o[k]) is type(r[k]), (mode, k, type(o[k]), type(r[k]))
      for k in ("bbox", "point_coords", "crop_box"):
        assert [type(v) for v in np.ravel(o[k])] == [type(v) for v in np.ravel(r[k])], k
      assert o["bbox"] == r["bbox"] and o["crop_box"] == r["crop_box"]
      assert abs(o["area"] - r["area"]) <= 2
      np.testing.assert_allclose(o["point_coords"], r["point_coords"], atol=1e-4)
      np.testing.assert_allclose(o["stability_score"], r["stability_score"], atol=1e-5)
      np.testing.assert_allclose(o["predicted_iou"], r["predicted_iou"], atol=1e-5)
      seg_o, seg_r = o["segmentation"], r["segmentation"]
      if mode == "binary_mask":
        assert seg_o.dtype == seg_r.dtype == bool and seg_o.shape == seg_r.shape == image.shape[:2]
        assert (seg_o != seg_r).sum() <= 2
      else:
        assert sorted(seg_o) == sorted(seg_r) and seg_o["size"] == seg_r["size"]
        assert type(seg_o["counts"]) is type(seg_r["counts"])
        if mode == "uncompressed_rle":
          assert {type(c) for c in seg_o["counts"]} == {type(c) for c in seg_r["counts"]} == {int}


def _blobs(n, h=40, w=50, seed=0):
  """Masks with islands and holes of many sizes (smoothed noise, thresholded)."""
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  return np.stack([ndimage.uniform_filter(rng.random((h, w)), 3) > t
                   for t in rng.uniform(0.45, 0.55, n)])


def test_remove_small_regions_matches_opencv():
  pytest.importorskip("cv2")
  from segment_anything.utils.amg import remove_small_regions
  changed = 0
  for mask in _blobs(6):
    for mode in ("holes", "islands"):
      for area in (1, 3, 10, 40, 5000):
        ref, ref_changed = remove_small_regions(mask, area, mode)
        got, got_changed = regions.remove_small_regions(mask, area, mode)
        assert got_changed == ref_changed
        np.testing.assert_array_equal(got, ref)
        changed += got_changed
  assert changed > 10


def test_postprocess_small_regions_matches_official():
  pytest.importorskip("cv2")
  from segment_anything import SamAutomaticMaskGenerator
  from segment_anything.utils.amg import MaskData, batched_mask_to_box, mask_to_rle_pytorch
  masks = _blobs(8, seed=1)
  masks[5] = masks[2]  # a duplicate the final NMS must drop
  masks[7] = False
  masks[7, 10:20, 10:20] = True  # clean: no holes, one island
  t = torch.from_numpy(masks)
  data = MaskData(rles=mask_to_rle_pytorch(t), boxes=batched_mask_to_box(t))
  ref = SamAutomaticMaskGenerator.postprocess_small_regions(data, 20, 0.7)
  got, idx = regions.postprocess_small_regions(masks, 20, 0.7)
  ref_masks = np.stack([coco_mask.decode(coco_mask.frPyObjects(r, *r["size"])) for r in ref["rles"]])
  assert len(got) == len(ref["rles"]) < len(masks)
  np.testing.assert_array_equal(got, ref_masks.astype(bool))
  np.testing.assert_array_equal(amg.records_lib.mask_boxes(got), ref["boxes"].numpy())
  assert idx[0] == 7  # the unchanged mask is preferred


def test_min_mask_region_area_end_to_end(models, image, official_all):
  """Our generator with min_mask_region_area vs the official post-processing
  applied to the official candidates (what its `generate` does)."""
  pytest.importorskip("cv2")
  from segment_anything import SamAutomaticMaskGenerator
  from segment_anything.utils.amg import MaskData, mask_to_rle_pytorch
  _, model = models
  area = 30
  ref_m = np.stack(_decode(official_all))
  data = MaskData(rles=mask_to_rle_pytorch(torch.from_numpy(ref_m)),
                  boxes=torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]]
                                      for b in (r["bbox"] for r in official_all)]))
  ref = SamAutomaticMaskGenerator.postprocess_small_regions(data, area, KW["box_nms_thresh"])
  ref_masks = [np.asarray(coco_mask.decode(coco_mask.frPyObjects(r, *r["size"])), bool)
               for r in ref["rles"]]
  n_changed = sum((a != b).any() for a, b in zip(ref_masks, ref_m))
  ours = amg.SamAutomaticMaskGenerator(model, output_mode="binary_mask", stability_score_thresh=0.0,
                                       min_mask_region_area=area, **KW).generate(image)
  print(f"min_mask_region_area={area}: {n_changed} of {len(ref_masks)} official masks changed")
  assert n_changed >= 5
  assert len(ours) == len(ref_masks)
  for o, rm in zip(ours, ref_masks):
    assert (o["segmentation"] != rm).sum() <= 2


def test_crop_layers_match_official(models, image, monkeypatch):
  """crop_n_layers=1: 5 crops, crop frames and the NMS across crops that prefers
  smaller crops.  Random-init masks fill their whole crop, so the crop-edge
  filter (tested in test_mask_ops.py) would drop every crop mask: it is
  switched off on both sides to let the crops reach the merge."""
  import segment_anything.automatic_mask_generator as off_amg
  tsam, model = models
  monkeypatch.setattr(off_amg, "is_box_near_crop_edge",
                      lambda boxes, *a, **k: torch.zeros(len(boxes), dtype=torch.bool))
  monkeypatch.setattr(amg.mask_ops, "is_box_near_crop_edge",
                      lambda boxes, *a, **k: amg.jnp.zeros(boxes.shape[:-1], bool))
  kw = dict(KW, points_per_side=2, points_per_batch=4, stability_score_thresh=0.0, crop_n_layers=1,
            crop_n_points_downscale_factor=2, crop_nms_thresh=0.9)
  ref = _official(tsam, image, output_mode="coco_rle", **kw)
  ours = amg.SamAutomaticMaskGenerator(model, output_mode="coco_rle", **kw).generate(image)
  crops = {tuple(r["crop_box"]) for r in ref}
  print(f"crop layers: official {len(ref)} masks from {len(crops)} crops")
  assert len(crops) == 5
  assert len(ours) == len(ref)
  assert [r["crop_box"] for r in ours] == [r["crop_box"] for r in ref]
  assert [r["bbox"] for r in ours] == [r["bbox"] for r in ref]
  assert _match(ref, ours) == len(ref)


def test_compiles_once_per_size_bucket_and_thresholds(models):
  _, model = models
  rng = np.random.default_rng(0)
  # points_per_batch 2: a static configuration no other test compiles
  kw = dict(points_per_side=2, points_per_batch=2, pred_iou_thresh=0.0, stability_score_offset=0.05,
            box_nms_thresh=1.0)
  before = amg._generate_jit._cache_size()
  for hw, t in (((100, 150), 0.0), ((120, 160), 0.2), ((65, 130), 0.3)):  # one 128x192 bucket
    img = rng.integers(0, 255, hw + (3,), dtype=np.uint8)
    gen = amg.SamAutomaticMaskGenerator(model, stability_score_thresh=t, **kw)
    inputs, out = gen.generate_arrays(img)
    assert amg.out_bucket(inputs) == (128, 192)
    assert int(np.asarray(out["valid"]).sum()) <= 12
  assert amg._generate_jit._cache_size() == before + 1
  for hw in ((100, 150), (300, 90)):  # the input-resolution variant: one program for all sizes
    img = rng.integers(0, 255, hw + (3,), dtype=np.uint8)
    recs = amg.SamAutomaticMaskGenerator(model, stability_score_thresh=0.0, stability_at="input",
                                         **kw).generate(img)
    assert all(r["segmentation"].shape == hw for r in recs) and len(recs) == 12
  assert amg._generate_jit._cache_size() == before + 2


def test_point_grids_batches_and_capacity(models, image):
  _, model = models
  kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
            box_nms_thresh=1.0, output_mode="coco_rle")
  base = amg.SamAutomaticMaskGenerator(model, points_per_side=3, points_per_batch=9, **kw)
  ref = base.generate(image)
  grids = amg.SamAutomaticMaskGenerator(model, points_per_side=None, points_per_batch=4,
                                        point_grids=[amg.mask_ops.build_point_grid(3)], **kw)
  got = grids.generate(image)
  assert len(got) == len(ref) == 27
  for a, b in zip(ref, got):
    assert a["point_coords"] == b["point_coords"] and a["bbox"] == b["bbox"]
    assert abs(a["stability_score"] - b["stability_score"]) < 1e-5
  with pytest.raises(ValueError, match="exactly one"):
    amg.SamAutomaticMaskGenerator(model, point_grids=[amg.mask_ops.build_point_grid(3)])
  capped = amg.SamAutomaticMaskGenerator(model, points_per_side=3, points_per_batch=9,
                                         max_masks=10, **kw)
  with pytest.warns(UserWarning, match="dropped 17 of 27"):
    assert len(capped.generate(image)) == 10
