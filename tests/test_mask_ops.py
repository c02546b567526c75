"""mask_ops / rle against the official segment-anything helpers, torchvision
semantics (tests/torchvision_stub.py) and pycocotools."""

import numpy as np
import pytest

from tests import torchvision_stub

torchvision_stub.install()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from pycocotools import mask as coco_mask  # noqa: E402
from segment_anything.utils import amg as off  # noqa: E402

from aopsam_jax.sam import mask_ops, rle  # noqa: E402
from aopsam_jax.sam.transforms import postprocess_masks  # noqa: E402


def _blobs(rng, n, h, w, empty_every=5):
  """Random masks with a few rectangles each (some empty)."""
  m = np.zeros((n, h, w), bool)
  for i in range(n):
    if i % empty_every == 0:
      continue
    for _ in range(rng.integers(1, 4)):
      y0, x0 = rng.integers(0, h), rng.integers(0, w)
      m[i, y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] = True
  return m


def test_stability_score_matches_official():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (6, 3, 40, 50)).astype(np.float32)
  for offset in (1.0, 0.3):
    want = off.calculate_stability_score(torch.from_numpy(logits), 0.0, offset).numpy()
    got = np.asarray(mask_ops.stability_score(jnp.asarray(logits), 0.0, offset))
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # A valid region restricts the count; an empty union gives 0 (official: nan).
  valid = np.zeros((40, 50), bool)
  valid[:20, :30] = True
  want = off.calculate_stability_score(torch.from_numpy(logits[..., :20, :30].copy()), 0.0, 1.0)
  got = mask_ops.stability_score(jnp.asarray(logits), 0.0, 1.0, jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
  assert float(mask_ops.stability_score(-jnp.ones((4, 4)) * 5)) == 0.0


def test_masks_to_boxes_matches_official():
  rng = np.random.default_rng(1)
  m = _blobs(rng, 30, 33, 47)
  want = off.batched_mask_to_box(torch.from_numpy(m)).numpy()
  got = np.asarray(mask_ops.masks_to_boxes(jnp.asarray(m)))
  np.testing.assert_array_equal(got, want)
  assert (got[0] == 0).all()  # empty -> zeros


def test_box_iou_and_nms_match_torchvision():
  rng = np.random.default_rng(2)
  n = 300
  xy = rng.uniform(0, 200, (n, 2))
  wh = rng.uniform(1, 80, (n, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  boxes[::7] = boxes[3::7][: len(boxes[::7])] + 1.0  # near-duplicates
  scores = rng.uniform(size=n).astype(np.float32)
  valid = rng.uniform(size=n) < 0.8
  tb = torch.from_numpy(boxes)
  np.testing.assert_allclose(np.asarray(mask_ops.box_iou(jnp.asarray(boxes), jnp.asarray(boxes))),
                             torchvision_stub._box_iou(tb, tb).numpy(), rtol=1e-5, atol=1e-6)
  for thr in (0.3, 0.7):
    vi = np.nonzero(valid)[0]
    want = vi[torchvision_stub.nms(tb[vi], torch.from_numpy(scores[vi]), thr).numpy()]
    order, keep = mask_ops.nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid), thr)
    got = np.asarray(order)[np.asarray(keep)]
    np.testing.assert_array_equal(got, want)
    assert 0 < len(want) < valid.sum()
    idx, ok, n_kept = mask_ops.nms_top_k(jnp.asarray(boxes), jnp.asarray(scores),
                                         jnp.asarray(valid), thr, 10)
    assert int(n_kept) == len(want)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], want[:10])
  idx, ok = mask_ops.top_k_valid(jnp.asarray(scores), jnp.asarray(valid), n)
  assert int(np.asarray(ok).sum()) == valid.sum()
  s = scores[np.asarray(idx)[np.asarray(ok)]]
  assert (np.diff(s) <= 0).all()
  # jittable with static shapes
  jax.jit(mask_ops.nms, static_argnums=3)(jnp.asarray(boxes), jnp.asarray(scores),
                                           jnp.asarray(valid), 0.5)


def test_mask_iou_and_uncrop():
  rng = np.random.default_rng(3)
  a, b = _blobs(rng, 7, 20, 30), _blobs(rng, 5, 20, 30, empty_every=2)
  got = np.asarray(mask_ops.mask_iou(jnp.asarray(a), jnp.asarray(b)))
  inter = (a[:, None] & b[None]).sum((2, 3))
  union = (a[:, None] | b[None]).sum((2, 3))
  np.testing.assert_allclose(got, np.where(union > 0, inter / np.maximum(union, 1), 0), rtol=1e-6)
  boxes = rng.integers(0, 100, (9, 4))
  crop = [10, 20, 300, 400]
  np.testing.assert_array_equal(np.asarray(mask_ops.uncrop_boxes(jnp.asarray(boxes), jnp.asarray(crop))),
                                off.uncrop_boxes_xyxy(torch.from_numpy(boxes), crop).numpy())
  near = mask_ops.is_box_near_crop_edge(mask_ops.uncrop_boxes(jnp.asarray(boxes), jnp.asarray(crop)),
                                        jnp.asarray(crop), jnp.asarray([0, 0, 500, 420]))
  want = off.is_box_near_crop_edge(torch.from_numpy(boxes).float(), crop, [0, 0, 500, 420])
  np.testing.assert_array_equal(np.asarray(near), want.numpy())


def test_grid_and_crop_boxes_match_official():
  for n in (1, 7, 16, 32):
    np.testing.assert_array_equal(mask_ops.build_point_grid(n), off.build_point_grid(n))
  for hw in ((428, 640), (1000, 333)):
    for layers in (0, 1, 2):
      assert mask_ops.generate_crop_boxes(hw, layers, 512 / 1500) == \
          off.generate_crop_boxes(hw, layers, 512 / 1500)


@pytest.mark.parametrize("orig_hw", [(428, 640), (1500, 900)])
def test_boxes_from_low_res_close_to_full_res(orig_hw):
  """The NMS boxes from low-res logits vs the official full-resolution ones."""
  from aopsam_jax.sam.transforms import get_preprocess_shape
  rng = np.random.default_rng(4)
  input_hw = np.array(get_preprocess_shape(*orig_hw), np.int32)
  # smooth random logits: sums of a few Gaussian bumps minus a bias
  yy, xx = np.mgrid[0:256, 0:256]
  logits = []
  for _ in range(24):
    f = -1.0 + sum(3 * np.exp(-(((yy - rng.uniform(0, 200)) / rng.uniform(3, 40)) ** 2
                                + ((xx - rng.uniform(0, 256)) / rng.uniform(3, 40)) ** 2))
                   for _ in range(rng.integers(1, 4)))
    logits.append(f)
  logits = jnp.asarray(np.stack(logits), jnp.float32)
  full = postprocess_masks(logits, input_hw, orig_hw, tuple(orig_hw)) > 0
  want = np.asarray(mask_ops.masks_to_boxes(full))
  got = np.asarray(mask_ops.boxes_from_low_res(logits, jnp.asarray(input_hw),
                                               jnp.asarray(orig_hw), 1024))
  err = np.abs(got - want)
  assert err.max() <= 3, err.max()
  assert err.mean() <= 0.5, err.mean()


def test_rle_matches_pycocotools():
  rng = np.random.default_rng(5)
  masks = _blobs(rng, 12, 37, 23)
  masks[1] = True  # starts with a 1: zero-length first run
  masks[2, 0, 0] = True
  ours = rle.encode_uncompressed(masks)
  want = off.mask_to_rle_pytorch(torch.from_numpy(masks))
  assert [r["counts"] for r in ours] == [r["counts"] for r in want]
  comp = rle.encode(masks)
  ref = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for c, r, m in zip(comp, ref, masks):
    assert c["counts"] == r["counts"].decode("ascii")
    assert c["size"] == list(r["size"])
    np.testing.assert_array_equal(rle.decode(c), m)
    np.testing.assert_array_equal(coco_mask.decode({"size": c["size"], "counts": c["counts"]}), m)
    assert rle.area(c) == int(coco_mask.area(r)) == int(m.sum())
    np.testing.assert_array_equal(rle.decode(off.coco_encode_rle(off.mask_to_rle_pytorch(
        torch.from_numpy(m[None]))[0])), m)
  big = rng.uniform(size=(300, 500)) < 0.5  # long strings, negative deltas
  assert rle.encode(big)["counts"] == coco_mask.encode(np.asfortranarray(big.astype(np.uint8)))[
      "counts"].decode()
  np.testing.assert_array_equal(rle.decode(rle.encode_uncompressed(big)[0]), big)
  assert rle.compress(rle.encode_uncompressed(big)[0]) == rle.encode(big)


def test_stability_upsampled_matches_materialised_upsampling():
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 0.3, (3, 2, 64, 64)).astype(np.float32)
  input_hw = np.array([256, 171], np.int32)
  up = np.asarray(postprocess_masks(jnp.asarray(logits), input_hw, input_hw, (256, 256), 256))
  up = up[..., :256, :171]
  want = off.calculate_stability_score(torch.from_numpy(np.ascontiguousarray(up)), 0.0, 0.05)
  got = mask_ops.stability_score_upsampled(jnp.asarray(logits), jnp.asarray(input_hw), 256,
                                           0.0, 0.05)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-3)
