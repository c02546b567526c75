"""`python -m aopsam_jax.segment` end to end (random-init vit_tiny_test, tiny grid)."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from aopsam_jax import segment


def _check_results(path, hw, weights):
  res = json.load(open(path))
  assert isinstance(res, list) and len(res) >= 1
  for r in res:
    rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
    m = coco_mask.decode(rle)
    assert m.shape == hw
    assert int(coco_mask.area(rle)) == r["area"] == int(m.sum())
    if r["area"]:
      np.testing.assert_allclose(coco_mask.toBbox(rle), r["bbox"], atol=1)
    assert r["weights"] == weights and r["category_id"] == 1
    assert r["score"] == r["predicted_iou"]
  return res


def test_segment_amg_and_prompt(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)).save(d / "000000000042.png")
  Image.fromarray(rng.integers(0, 255, (90, 60, 3), dtype=np.uint8)).save(d / "b.jpg")
  out = tmp_path / "out"
  rc = segment.main([str(d), "--model-type", "vit_tiny_test", "--mode", "amg", "--points-per-side", "2",
                     "--points-per-batch", "4", "--max-masks", "8", "--out", str(out),
                     "--show-points"])
  assert rc == 0
  res = _check_results(out / "000000000042.json", (120, 200), "random-init weights")
  assert res[0]["image_id"] == 42
  _check_results(out / "b.json", (90, 60), "random-init weights")
  for stem in ("000000000042", "b"):
    png = Image.open(out / f"{stem}_overlay.png")
    assert png.size[0] >= 60

  out2 = tmp_path / "out2"
  rc = segment.main([str(d / "b.jpg"), "--model-type", "vit_tiny_test", "--mode", "prompt",
                     "--point", "30,40", "--out", str(out2)])
  assert rc == 0
  res = _check_results(out2 / "b.json", (90, 60), "random-init weights")
  assert len(res) == 3 and res[0]["point_coords"] == [[30.0, 40.0]]
  rc = segment.main([str(d / "b.jpg"), "--model-type", "vit_tiny_test", "--mode", "prompt",
                     "--box", "5,5,50,80", "--out", str(out2)])
  assert rc == 0
  assert len(json.load(open(out2 / "b.json"))) == 1


def test_segment_help_explains_every_option():
  proc = subprocess.run([sys.executable, "-m", "aopsam_jax.segment", "--help"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0
  parser = segment.build_parser()
  for action in parser._actions:
    for opt in action.option_strings:
      assert opt in proc.stdout
    assert action.help, action.dest
