"""Evaluation metrics against pycocotools / constructed ground truth."""

import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from aopsam_jax import evaluate
from tests.reference import shared_data_dir

COCO_TINY = os.path.join(shared_data_dir(), "coco_tiny")


def test_best_ious_matches_pycocotools():
  rng = np.random.default_rng(0)
  gt = rng.random((4, 30, 40)) < 0.3
  pred = rng.random((6, 30, 40)) < 0.4
  pred[0] = gt[1]  # exact match
  enc = lambda m: mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
  ref = mask_utils.iou(enc(pred), enc(gt), [0] * len(gt))  # (N, G)
  got = evaluate.best_ious(gt, pred)
  np.testing.assert_allclose(got, np.asarray(ref).max(0), rtol=1e-6)
  assert got[1] == 1.0
  assert evaluate.best_ious(gt, pred[:0]).tolist() == [0.0] * 4
  assert evaluate.best_ious(gt[:0], pred).shape == (0,)


def test_size_classes_and_summary():
  assert [evaluate.size_class(a) for a in (10, 32 ** 2, 96 ** 2 - 1, 96 ** 2)] == \
      ["small", "medium", "medium", "large"]
  s = evaluate.MethodStats()
  gt = np.zeros((2, 10, 10), bool)
  gt[0, :2, :2] = True
  gt[1, 5:, 5:] = True
  pred = gt[:1].copy()
  s.add_masks(gt, [4.0, 2000.0], pred)
  s.add_prompts({"gt": 2.0, "hit": 1.0, "points": 3.0, "points_in": 1.0, "dups": 0.0,
                 "images": 1.0})
  out = s.summary()
  assert out["miou"] == pytest.approx(0.5) and out["recall_50"] == pytest.approx(0.5)
  assert out["miou_small"] == 1.0 and out["miou_medium"] == 0.0
  assert out["prompt_recall"] == 0.5 and out["prompts_per_image"] == 3.0


def test_markdown_and_plot(tmp_path):
  res = {"dataset": {"dir": "/x/coco_tiny", "split": "val", "images": 2, "amg_mask_images": 1},
         "sam": {"model": "vit_tiny_test", "random_weights": True, "source": {}},
         "machine": {"backend": "cpu", "cpu_count": 2, "jax": "0", "process_peak_rss_mib": 1.0},
         "methods": {"aop": {"prompts_per_image": 30.0, "prompt_recall": 0.5,
                             "latency_median_s": 1.0},
                     "amg_s": {"prompts_per_image": 256.0, "prompt_recall": 0.6,
                               "latency_median_s": 8.0}},
         "aop_vs_amg_s": {"prompt_ratio": 30 / 256, "target_prompt_ratio_max": 0.125,
                          "prompt_recall_delta": -0.1},
         "notes": ["SAM weights are RANDOM"]}
  evaluate.write_outputs(res, str(tmp_path / "r"))
  md = (tmp_path / "r.md").read_text()
  assert "RANDOM" in md and "AoP-SAM" in md and "| 30.0 |" in md
  assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.skipif(not os.path.isdir(COCO_TINY), reason="coco_tiny not available")
def test_evaluate_runs_on_coco_tiny(tmp_path):
  res = evaluate.evaluate(COCO_TINY, "val", methods=("aop", "amg_s"), limit=2, amg_images=0,
                          progress=False)
  ms = res["methods"]
  assert ms["amg_s"]["prompts_per_image"] == 256.0
  assert 0 < ms["aop"]["prompts_per_image"] <= 32
  assert 0.0 <= ms["aop"]["prompt_recall"] <= 1.0


def test_coco_metrics_class_agnostic(tmp_path):
  """Hand-computed COCO numbers: two GT instances of different classes (useCats=0
  ignores classes); a perfect detection of one of them, a low-scored miss."""
  import json
  gt = np.zeros((2, 40, 50), bool)
  gt[0, 2:20, 3:30] = True
  gt[1, 25:38, 10:45] = True
  anns = []
  for i, m in enumerate(gt):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    anns.append({"id": i + 1, "image_id": 7, "category_id": i + 1, "iscrowd": 0,
                 "area": float(m.sum()), "bbox": list(map(float, mask_utils.toBbox(r))),
                 "segmentation": {"size": r["size"], "counts": r["counts"].decode()}})
  path = tmp_path / "instances_val2017.json"
  path.write_text(json.dumps({"images": [{"id": 7, "height": 40, "width": 50, "file_name": "a"}],
                              "annotations": anns,
                              "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
  miss = np.zeros((1, 40, 50), bool)
  miss[0, :3, 45:] = True
  s = evaluate.MethodStats()
  s.add_masks(gt, [1.0, 1.0], np.concatenate([gt[:1], miss]), [0.9, 0.1], image_id=7)
  got = evaluate.coco_metrics(str(path), s)
  # recall 0.5 at precision 1 (the hit scores higher): 51 of 101 recall points.
  assert got["coco_ap"] == pytest.approx(51 / 101) and got["coco_ap50"] == pytest.approx(51 / 101)
  assert got["coco_ar100"] == pytest.approx(0.5)
  s2 = evaluate.MethodStats()
  s2.add_masks(gt, [1.0, 1.0], np.concatenate([miss, gt]), [0.1, 0.9, 0.8], image_id=7)
  got = evaluate.coco_metrics(str(path), s2)
  assert got == {"coco_ap": pytest.approx(1.0), "coco_ap50": pytest.approx(1.0),
                 "coco_ar100": pytest.approx(1.0)}
