"""Training augmentation: flips against targets of mirrored annotations, jitter
against PIL's ImageEnhance, and determinism over process sharding / resume."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from pycocotools import mask as mask_utils

from aopsam_jax.data import augment as A
from aopsam_jax.data import pipeline
from aopsam_jax.data.targets import TargetConfig, make_target
from tests.test_data import IndexSource


def _rle(m):
  r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
  r["counts"] = r["counts"].decode()
  return r


def _discs(h, w, centres, radius):
  yy, xx = np.mgrid[:h, :w]
  return [((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) for cx, cy in centres]


def test_flip_equals_target_of_mirrored_annotations():
  # 512 x 384 landscape -> resized 1024 x 768: every heatmap column is 2 source
  # pixels, so the flip is exact.  Discs centred on pixel centres have a unique
  # most-interior point, so the mirrored annotation's target is unambiguous.
  h, w = 384, 512
  masks = _discs(h, w, [(100, 200), (301, 77), (450, 300)], 20)
  crowd = np.zeros((h, w), bool)
  crowd[300:340, 10:90] = True
  anns = [{"segmentation": _rle(m), "iscrowd": 0} for m in masks]
  anns.append({"segmentation": _rle(crowd), "iscrowd": 1})
  mirrored = [dict(a, segmentation=_rle(mask_utils.decode(a["segmentation"])[:, ::-1].astype(bool)))
              for a in anns]
  heat, weight = make_target(anns, h, w, TargetConfig())
  heat_m, weight_m = make_target(mirrored, h, w, TargetConfig())
  assert heat.max() == 1.0 and not np.array_equal(heat, heat_m)
  ex = {"target": heat, "weight": weight}
  out = A.augment_example(ex, A.AugmentConfig(hflip=1.0), np.random.default_rng(0), (768, 1024))
  np.testing.assert_array_equal(out["target"], heat_m)
  np.testing.assert_array_equal(out["weight"], weight_m)
  assert out["target"] is not heat and np.array_equal(ex["target"], heat)  # input untouched


def test_flip_keeps_padding_right_and_is_an_involution():
  rng = np.random.default_rng(1)
  iw = 683  # portrait: resized 1024 x 683, padding from column 683 (1024 frame)
  ex = {"image": rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8),
        "image_small": rng.normal(size=(256, 256, 3)).astype(np.float32),
        "embedding": rng.normal(size=(64, 64, 8)).astype(np.float32),
        "target": rng.random((256, 256), dtype=np.float32)}
  for key, n in (("image", 683), ("image_small", 171), ("embedding", 43), ("target", 171)):
    ex[key][:, n:] = 0
  cfg = A.AugmentConfig(hflip=1.0)
  once = A.augment_example(ex, cfg, np.random.default_rng(0), (1024, iw))
  twice = A.augment_example(once, cfg, np.random.default_rng(0), (1024, iw))
  for key, n in (("image", 683), ("image_small", 171), ("embedding", 43), ("target", 171)):
    np.testing.assert_array_equal(once[key][:, :n], ex[key][:, n - 1::-1], err_msg=key)
    assert not once[key][:, n:].any(), key  # padding stays on the right
    np.testing.assert_array_equal(twice[key], ex[key], err_msg=key)


@pytest.mark.parametrize("fb,fc,fs", [(1.15, 1, 1), (1, 0.85, 1), (1, 1, 1.2), (1.15, 0.85, 1.2)])
def test_jitter_matches_pil_enhance(fb, fc, fs):
  rng = np.random.default_rng(2)
  img = rng.integers(30, 190, (40, 50, 3), dtype=np.uint8)  # no clipping at these factors
  ref = ImageEnhance.Brightness(Image.fromarray(img)).enhance(fb)
  ref = ImageEnhance.Contrast(ref).enhance(fc)
  ref = np.asarray(ImageEnhance.Color(ref).enhance(fs)).astype(np.float32)
  d = A.jitter_pixels(img.astype(np.float32), fb, fc, fs) - ref
  # PIL truncates to uint8 after every enhancement (and takes an integer mean
  # grey), so it sits up to 1 level below per stage
  stages = sum(f != 1 for f in (fb, fc, fs))
  assert d.min() >= -0.25 and d.max() <= stages * 1.0 + 0.25
  assert np.abs(d).mean() <= 0.5 * stages
  np.testing.assert_allclose(A.jitter_pixels(img.astype(np.float32), 1, 1, 1), img, atol=1e-4)


def test_jitter_cache_mode_only_touches_the_image():
  from aopsam_jax.sam.transforms import PIXEL_MEAN, PIXEL_STD
  rng = np.random.default_rng(3)
  pix = rng.uniform(40, 200, (256, 256, 3)).astype(np.float32)
  small = (pix - PIXEL_MEAN) / PIXEL_STD
  small[:, 192:] = 0  # padding of a 1024 x 768 input
  emb = rng.normal(size=(64, 64, 4)).astype(np.float32)
  cfg = A.AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3)
  out = A.augment_example({"image_small": small, "embedding": emb}, cfg,
                          np.random.default_rng(5), (1024, 768))
  assert not out["image_small"][:, 192:].any()
  assert np.array_equal(out["embedding"], emb)
  r = np.random.default_rng(5)
  r.random()
  f = [1 + 0.3 * (2 * r.random() - 1) for _ in range(3)]
  want = (A.jitter_pixels(pix[:, :192], *f) - PIXEL_MEAN) / PIXEL_STD
  np.testing.assert_allclose(out["image_small"][:, :192], want, atol=1e-4)


def test_config_validation():
  with pytest.raises(ValueError, match="probability"):
    A.AugmentConfig(hflip=1.5)
  with pytest.raises(ValueError, match="brightness"):
    A.AugmentConfig(brightness=-0.1)
  assert not A.AugmentConfig().enabled and A.AugmentConfig(saturation=0.1).enabled


class _AugTransform(pipeline.ExampleTransform):
  """Records the stream position and a draw from the example's generator."""

  def __call__(self, rec):
    out = {"i": np.int64(rec["i"]), "target": np.tile(np.arange(256.0, dtype=np.float32), (256, 1)),
           "input_hw": np.array([768, 1024], np.int32)}  # 48 x 64 records, resized
    out = self.maybe_augment(rec, out)
    out["flipped"] = np.bool_(out["target"][0, 0] != 0)
    return out


def test_augmentation_independent_of_process_count_and_resumable():
  tr = _AugTransform(TargetConfig(), augment=A.AugmentConfig(hflip=0.5), augment_seed=7)
  single = iter(pipeline.train_dataset(IndexSource(10), tr, 4, seed=3))
  shards = [iter(pipeline.train_dataset(IndexSource(10), tr, 4, seed=3, process_index=p,
                                        process_count=2)) for p in range(2)]
  flips = []
  for _ in range(6):
    g = next(single)
    s = [next(it) for it in shards]
    assert g["i"].tolist() == s[0]["i"].tolist() + s[1]["i"].tolist()
    assert g["flipped"].tolist() == s[0]["flipped"].tolist() + s[1]["flipped"].tolist()
    flips += list(zip(g["i"].tolist(), g["flipped"].tolist()))
  outcomes = {}
  for i, f in flips:
    outcomes.setdefault(i, set()).add(f)
  # draws follow the stream position, not the image: some image is seen both
  # flipped and not flipped over the 2.4 epochs
  assert any(len(v) == 2 for v in outcomes.values())
  it = iter(pipeline.train_dataset(IndexSource(10), tr, 4, seed=3))
  for _ in range(2):
    next(it)
  state = it.get_state()
  want = [next(it)["flipped"].tolist() for _ in range(3)]
  it2 = iter(pipeline.train_dataset(IndexSource(10), tr, 4, seed=3))
  it2.set_state(state)
  assert [next(it2)["flipped"].tolist() for _ in range(3)] == want
  # evaluation never augments
  ev = next(iter(pipeline.eval_dataset(IndexSource(10), tr, 4)))
  assert not ev["flipped"].any()
