"""COCO preparation (array_record), YOLO converter and grain pipeline on synthetic data."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from aopsam_jax.data import coco, pipeline, records, yolo
from aopsam_jax.data.targets import TargetConfig


def _rect_poly(x0, y0, x1, y1):
  return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_synthetic_coco(root, n_images=6, seed=0, missing=(), empty=(2,), size=(120, 160)):
  """Images with coloured rectangles/ellipses; polygon, compressed-RLE and
  crowd (uncompressed RLE) annotations.  Returns (root, split dict)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  images, anns = [], []
  for i in range(n_images):
    h, w = size if i % 2 == 0 else size[::-1]
    img = (rng.integers(0, 40, (h, w, 3))).astype(np.uint8)
    iid = 100 + i
    name = f"{iid:06d}.png"
    images.append({"id": iid, "file_name": name, "height": h, "width": w})
    if i not in empty:
      # polygon rectangle
      x0, y0 = int(rng.integers(5, w // 2)), int(rng.integers(5, h // 2))
      x1, y1 = x0 + int(rng.integers(15, w // 2 - 4)), y0 + int(rng.integers(15, h // 2 - 4))
      img[y0:y1, x0:x1] = (220, 40, 40)
      anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 1, "iscrowd": 0,
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                   "segmentation": _rect_poly(x0, y0, x1, y1)})
      # compressed RLE ellipse
      yy, xx = np.mgrid[:h, :w]
      cy, cx = h * 0.7, w * 0.3
      m = (((yy - cy) / (h * 0.15)) ** 2 + ((xx - cx) / (w * 0.12)) ** 2) <= 1
      img[m] = (40, 200, 60)
      rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
      rle["counts"] = rle["counts"].decode()
      anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 2, "iscrowd": 0,
                   "bbox": [0, 0, 1, 1], "area": float(m.sum()), "segmentation": rle})
      # crowd region (uncompressed RLE) in the bottom-right corner
      c = np.zeros((h, w), bool)
      c[h - 20:h - 2, w - 30:w - 2] = True
      counts, prev, run = [], False, 0
      for v in c.T.reshape(-1):  # column-major runs, starting with zeros
        if v != prev:
          counts.append(run); run, prev = 0, v
        run += 1
      counts.append(run)
      anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 1, "iscrowd": 1,
                   "bbox": [w - 30, h - 20, 28, 18], "area": float(c.sum()),
                   "segmentation": {"counts": counts, "size": [h, w]}})
    if i not in missing:
      Image.fromarray(img).save(os.path.join(root, "images", name))
  with open(os.path.join(root, "annotations", "instances.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}, f)
  return root, {"train": ("annotations/instances.json", "images"),
                "val": ("annotations/instances.json", "images")}


def test_builder_roundtrip(tmp_path):
  root, splits = make_synthetic_coco(str(tmp_path / "src"), missing=(4,))
  src = records.RecordSource(records.prepare("synth", root, str(tmp_path / "rec"), splits)["train"])
  ref = json.load(open(os.path.join(root, "annotations", "instances.json")))
  # image 104 is missing on disk -> skipped; the empty image 102 is kept
  assert len(src) == 5
  ids = sorted(int(src[i]["image_id"]) for i in range(len(src)))
  assert ids == [100, 101, 102, 103, 105]
  for i in range(len(src)):
    d = coco.decode_record(src[i])
    iid = d["image_id"]
    np.testing.assert_array_equal(
        d["image"], np.asarray(Image.open(os.path.join(root, "images", f"{iid:06d}.png"))))
    want = [a for a in ref["annotations"] if a["image_id"] == iid]
    assert [a["segmentation"] for a in d["annotations"]] == [a["segmentation"] for a in want]
    assert [a["iscrowd"] for a in d["annotations"]] == [a["iscrowd"] for a in want]
  empty = [coco.decode_record(src[i]) for i in range(len(src)) if int(src[i]["image_id"]) == 102]
  assert empty[0]["annotations"] == []


def test_bad_inputs(tmp_path):
  root, splits = make_synthetic_coco(str(tmp_path / "src"), missing=(1,))
  with pytest.raises(coco.DatasetError, match="not found"):
    records.prepare("x1", root, str(tmp_path / "t1"), {"train": ("annotations/nope.json", "images")})
  bad = tmp_path / "src" / "annotations" / "bad.json"
  bad.write_text('{"images": [')
  with pytest.raises(coco.DatasetError, match="not valid JSON"):
    records.prepare("x2", root, str(tmp_path / "t2"), {"train": ("annotations/bad.json", "images")})
  bad.write_text('{"images": {}}')
  with pytest.raises(coco.DatasetError, match="COCO instances format"):
    records.prepare("x3", root, str(tmp_path / "t3"), {"train": ("annotations/bad.json", "images")})
  with pytest.raises(coco.DatasetError, match="file missing"):
    records.prepare("x4", root, str(tmp_path / "t4"), splits, on_missing_image="error")
  # malformed annotation entry: skipped by default, error on request
  d = json.load(open(os.path.join(root, "annotations", "instances.json")))
  d["annotations"].append({"image_id": 100, "segmentation": "garbage"})
  d["annotations"].append({"image_id": 99999, "segmentation": [[0, 0, 1, 0, 1, 1]]})
  (tmp_path / "src" / "annotations" / "bad2.json").write_text(json.dumps(d))
  images, by_image = coco.load_annotations(str(tmp_path / "src" / "annotations" / "bad2.json"))
  assert sum(len(v) for v in by_image.values()) == len(d["annotations"]) - 2
  with pytest.raises(coco.DatasetError, match="malformed segmentation"):
    coco.load_annotations(str(tmp_path / "src" / "annotations" / "bad2.json"), "error")
  # corrupt image bytes -> skipped
  with open(os.path.join(root, "images", "000100.png"), "wb") as f:
    f.write(b"not a png")
  src = records.RecordSource(records.prepare("x5", root, str(tmp_path / "t5"), splits)["train"])
  assert sorted(int(src[i]["image_id"]) for i in range(len(src))) == [102, 103, 104, 105]


def test_yolo_converter(tmp_path):
  img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
  img_dir.mkdir(); lab_dir.mkdir()
  Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(img_dir / "000000000007.jpg")
  Image.fromarray(np.zeros((40, 40), np.uint8)).save(img_dir / "000000000008.jpg")  # no labels
  (lab_dir / "000000000007.txt").write_text("3 0.1 0.2 0.5 0.2 0.5 0.8\n0 0 0 1 0 1 1 0 1\n")
  d = yolo.yolo_to_coco(str(img_dir), str(lab_dir), str(tmp_path / "out.json"))
  assert [im["id"] for im in d["images"]] == [7, 8]
  a = d["annotations"][0]
  np.testing.assert_allclose(a["segmentation"][0], [10, 10, 50, 10, 50, 40])
  assert a["category_id"] == 4 and a["iscrowd"] == 0
  np.testing.assert_allclose(a["area"], 0.5 * 40 * 30)
  np.testing.assert_allclose(d["annotations"][1]["bbox"], [0, 0, 100, 50])
  (lab_dir / "000000000007.txt").write_text("3 0.1 0.2\n")
  with pytest.raises(coco.DatasetError, match=":1:"):
    yolo.yolo_to_coco(str(img_dir), str(lab_dir), str(tmp_path / "out2.json"))


class IndexSource:
  """Records {i, height, width}: a random-access source for pipeline tests."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"i": i, "height": 48, "width": 64}


def _ids(batch):
  return batch["i"].tolist()


def test_process_sharding_and_resume():
  src, tr = IndexSource(10), (lambda r: {"i": np.int64(r["i"])})
  single = iter(pipeline.train_dataset(src, tr, 4, seed=3))
  shards = [iter(pipeline.train_dataset(src, tr, 4, seed=3, process_index=p, process_count=2))
            for p in range(2)]
  seen = []
  for _ in range(10):  # 4 epochs
    g = _ids(next(single))
    assert g == _ids(next(shards[0])) + _ids(next(shards[1]))
    seen += g
  # each epoch of 10 is a permutation (first 8 from epoch 1 + 2 ...)
  assert sorted(seen[:10]) == list(range(10))
  assert seen[:10] != seen[10:20]  # reshuffled per epoch
  # resume from a saved state continues exactly
  it = iter(pipeline.train_dataset(src, tr, 4, seed=3))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [_ids(next(it)) for _ in range(4)]
  it2 = iter(pipeline.train_dataset(src, tr, 4, seed=3))
  it2.set_state(state)
  assert [_ids(next(it2)) for _ in range(4)] == want


def test_eval_dataset_padding():
  src, tr = IndexSource(5), (lambda r: {"i": np.int64(r["i"])})
  batches = list(pipeline.eval_dataset(src, tr, 4))
  assert len(batches) == 2
  ids = np.concatenate([b["i"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert ids[valid].tolist() == [0, 1, 2, 3, 4] and valid.sum() == 5
  p0 = list(pipeline.eval_dataset(src, tr, 4, 0, 2))
  p1 = list(pipeline.eval_dataset(src, tr, 4, 1, 2))
  assert np.concatenate([p0[0]["i"], p1[0]["i"]]).tolist() == [0, 1, 2, 3]


def test_example_transform_online(tmp_path):
  root, splits = make_synthetic_coco(str(tmp_path / "src"), n_images=2)
  src = records.RecordSource(records.prepare("synth", root, str(tmp_path / "rec"), splits)["train"])
  ex = pipeline.ExampleTransform(TargetConfig())(src[0])
  assert ex["image"].shape == (1024, 1024, 3) and ex["image"].dtype == np.uint8
  h, w = int(src[0]["height"]), int(src[0]["width"])
  from aopsam_jax.sam.transforms import get_preprocess_shape
  assert tuple(ex["input_hw"]) == get_preprocess_shape(h, w)
  ih, iw = ex["input_hw"]
  assert ex["image"][ih:].sum() == 0 and ex["image"][:, iw:].sum() == 0
  assert ex["target"].shape == ex["weight"].shape == (256, 256)


def test_shared_coco_tiny(tmp_path):
  from tests.reference import shared_data_dir
  root = os.path.join(shared_data_dir(), "coco_tiny")
  if not os.path.isdir(root):
    pytest.skip("shared coco_tiny not available")
  d = records.prepare("coco_tiny", root, str(tmp_path), {
      "val": ("annotations/instances_val2017.json", "val2017")})
  assert len(records.RecordSource(d["val"])) == 80
