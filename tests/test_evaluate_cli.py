"""`python -m aopsam_jax.evaluate` with user mistakes and messy data (synthetic COCO split).

An empty selection, a negative --limit and unknown --methods are usage errors
(exit 2) before any model is loaded; an image listed but missing is skipped
with a warning, counted in the report, and makes the exit status 1.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from aopsam_jax import evaluate

H, W = 64, 80


def make_split(root, n_images=3, split="val"):
  """COCO split with one 20x24 box-shaped instance per image; returns (root, file names)."""
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  (root / f"{split}2017").mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  images, anns, names = [], [], []
  for i in range(n_images):
    name = f"{i + 1:012d}.jpg"
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
        root / f"{split}2017" / name)
    images.append({"id": i + 1, "file_name": name, "height": H, "width": W})
    x0, y0 = 10 + 5 * i, 8
    anns.append({"id": 100 + i, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                 "area": 480.0, "bbox": [x0, y0, 24, 20],
                 "segmentation": [[x0, y0, x0 + 24, y0, x0 + 24, y0 + 20, x0, y0 + 20]]})
    names.append(name)
  (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
      {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
  return root, names


@pytest.fixture()
def no_model(monkeypatch):
  """Fail the test if anything tries to load a bundle (model work)."""
  from aopsam_jax.aop import bundle

  def refuse(*a, **k):
    raise AssertionError("a model was loaded before the usage error")
  monkeypatch.setattr(bundle, "load_bundle", refuse)


def _main(args, capsys):
  try:
    rc = evaluate.main([str(a) for a in args])
  except SystemExit as e:  # argparse's own errors
    rc = e.code
  return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--limit", "0"], "--limit"),
    (["--limit", "-1"], "--limit"),
    (["--methods", "aop,foo"], "foo"),
    (["--methods", ","], "--methods"),
    (["--methods", "aop,aop"], "twice"),
    (["--amg-images", "-2"], "--amg-images"),
    (["--split", "train"], "instances_train2017.json"),
    (["--bundle", "no_such_bundle"], "no_such_bundle"),
])
def test_usage_errors_before_model_work(extra, needle, tmp_path, capsys, no_model):
  root, _ = make_split(tmp_path / "data")
  rc, err = _main(["--data", root, "--out", tmp_path / "r"] + extra, capsys)
  assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
  assert not list(tmp_path.glob("r.*"))


def test_split_without_images_is_a_usage_error(tmp_path, capsys, no_model):
  root, _ = make_split(tmp_path / "data", n_images=0)
  rc, err = _main(["--data", root, "--out", tmp_path / "r"], capsys)
  assert rc == 2 and "lists no images" in err and len(err.strip().splitlines()) == 1
  rc, err = _main(["--data", tmp_path / "nowhere", "--out", tmp_path / "r"], capsys)
  assert rc == 2 and "nowhere" in err


def test_missing_image_is_skipped_counted_and_fails_the_status(tmp_path, capsys):
  """amg_s prompt metrics only (no compilation): 3 listed images, one file missing."""
  root, names = make_split(tmp_path / "data", n_images=3)
  os.remove(root / "val2017" / names[1])
  rc, err = _main(["--data", root, "--methods", "amg_s", "--amg-images", "0",
                   "--out", tmp_path / "r"], capsys)
  assert rc == 1, err
  warnings = [ln for ln in err.splitlines() if ln.startswith("warning: skipped")]
  assert len(warnings) == 1 and names[1] in warnings[0]
  res = json.loads((tmp_path / "r.json").read_text())
  ds = res["dataset"]
  assert ds["images"] == 2 and ds["listed_images"] == 3
  assert [s["image_id"] for s in ds["skipped_images"]] == [2]
  s = res["methods"]["amg_s"]
  # the two readable images' instances, each hit by the 16x16 grid
  assert s["gt_instances"] == 2 and s["prompt_images"] == 2 and s["prompt_recall"] == 1.0
  md = (tmp_path / "r.md").read_text()
  assert "1 of 3 listed images could not be read" in md


def test_every_image_missing_is_a_failure(tmp_path, capsys):
  root, names = make_split(tmp_path / "data", n_images=2)
  for n in names:
    os.remove(root / "val2017" / n)
  rc, err = _main(["--data", root, "--methods", "amg_s", "--amg-images", "0",
                   "--out", tmp_path / "r"], capsys)
  assert rc == 1 and "none of the 2 selected images" in err.splitlines()[-1]
  assert not list(tmp_path.glob("r.*"))


def test_existing_report_needs_overwrite_and_default_name(tmp_path, capsys, monkeypatch):
  """An earlier report is refused before any model work; --overwrite replaces it
  whole; without --out the report is eval_<data folder>_<split> in the cwd."""
  root, _ = make_split(tmp_path / "data", n_images=2)
  args = ["--data", root, "--methods", "amg_s", "--amg-images", "0"]
  monkeypatch.chdir(tmp_path)
  assert _main(args, capsys)[0] == 0
  first = json.loads((tmp_path / "eval_data_val.json").read_text())
  assert first["methods"]["amg_s"]["prompt_recall"] == 1.0
  assert (tmp_path / "eval_data_val.md").exists() and (tmp_path / "eval_data_val.png").exists()
  before = (tmp_path / "eval_data_val.json").stat().st_mtime_ns
  from aopsam_jax.aop import bundle

  def refuse(*a, **k):
    raise AssertionError("a model was loaded before the usage error")
  with monkeypatch.context() as m:
    m.setattr(bundle, "load_bundle", refuse)
    rc, err = _main(args, capsys)
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert "eval_data_val.json exists" in err and "--overwrite" in err
  assert (tmp_path / "eval_data_val.json").stat().st_mtime_ns == before
  rc, err = _main(args + ["--limit", "1", "--overwrite"], capsys)
  assert rc == 0, err
  again = json.loads((tmp_path / "eval_data_val.json").read_text())
  assert again["dataset"]["images"] == 1 and first["dataset"]["images"] == 2
  assert not list(tmp_path.glob("*.partial"))

