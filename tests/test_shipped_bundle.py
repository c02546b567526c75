"""The shipped AoP-SAM bundle and the README's main-job command, from a clean checkout.

The bundle's predictor weights are a tracked file (the rest of *.safetensors
is git-ignored): these tests fail if it is missing, stale (its config or
encoder fingerprint no longer match) or untrained.
"""

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from aopsam_jax import bundle as bundle_cli
from aopsam_jax.aop import bundle as bundle_lib
from aopsam_jax.aop.asf import AsfConfig
from aopsam_jax import segment
from aopsam_jax.sam.flat_state import count_params
from tests.reference import shared_data_dir

COCO_TINY = os.path.join(shared_data_dir(), "coco_tiny")


@pytest.fixture(scope="module")
def shipped():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    b = bundle_lib.load_bundle()
  return b, [str(w.message) for w in caught]


def test_shipped_bundle_is_complete_and_consistent(shipped):
  b, msgs = shipped
  assert os.path.exists(os.path.join(bundle_lib.DEFAULT_BUNDLE, "predictor", "params.safetensors"))
  # random SAM is announced; the encoder it was trained on is re-created exactly
  assert b.random_sam and any("RANDOM" in m for m in msgs)
  assert not any("differs" in m for m in msgs), msgs
  assert count_params(b.predictor) > 10_000
  assert b.asf.k_coarse + b.asf.k_fine <= 256 // 8


def test_readme_main_job_default_aop_mode(tmp_path):
  """The README's command: `python -m aopsam_jax.segment --out DIR --show-points`
  (no image, no checkpoint)."""
  out = tmp_path / "out"
  assert segment.main(["--out", str(out), "--show-points"]) == 0
  res = json.load(open(out / "sample.json"))
  assert 1 <= len(res) <= 32
  assert all(r["weights"] == segment.RANDOM_LABEL for r in res)
  # the bundle's SAM really is random: the permissive thresholds replace the bundle's
  assert res[0]["thresholds"]["pred_iou_thresh"] == {
      "value": segment.RANDOM_INIT_THRESHOLDS["pred_iou_thresh"], "source": "random-init defaults"}
  png = Image.open(out / "sample_overlay.png")
  assert png.size[0] > 100 and png.size[1] > 100


@pytest.mark.skipif(not os.path.isdir(COCO_TINY), reason="../shared/data/coco_tiny not present")
def test_shipped_predictor_beats_a_grid_of_the_same_budget(shipped):
  """The learned prompts hit more GT instances than a regular grid with at
  least as many points (6 x 6 = 36 >= 32), on 20 coco_tiny val images scored
  by the independent host-side `ImageGT` counter."""
  import jax
  import jax.numpy as jnp

  from aopsam_jax.aop import pipeline, peaks
  from aopsam_jax.data.coco import load_annotations
  from aopsam_jax.data.targets import TargetConfig
  from aopsam_jax.sam.image_io import load_image
  from aopsam_jax.sam.geometry import heatmap_to_original
  from aopsam_jax.trainer.evaluation import ImageGT, grid_points

  b, _ = shipped
  k = b.asf.k_coarse + b.asf.k_fine
  images, anns = load_annotations(os.path.join(COCO_TINY, "annotations",
                                               "instances_val2017.json"))
  hm_fn = jax.jit(lambda x, ihw: b.model.heatmap(x[None], ihw[None])[1][0])
  learned, grid = {"gt": 0.0, "hit": 0.0}, {"gt": 0.0, "hit": 0.0}
  for im in sorted(images, key=lambda i: i["id"])[:20]:
    img = load_image(os.path.join(COCO_TINY, "val2017", im["file_name"]))
    h0, w0 = img.shape[:2]
    inp = pipeline.prepare(img)
    hm = hm_fn(jnp.asarray(inp.padded), jnp.asarray(inp.input_hw))
    ih, iw = inp.input_hw
    region = np.zeros(hm.shape, bool)
    region[: -(-ih // 4), : -(-iw // 4)] = True
    logits = jnp.where(jnp.asarray(region), hm, -jnp.inf)
    coords, _, ok = peaks.extract_peaks(logits[None], k, kernel=b.asf.peak_kernel)
    pts = heatmap_to_original(np.asarray(coords[0]), h0, w0)
    g = ImageGT(anns[im["id"]], h0, w0, TargetConfig())
    for acc, c in ((learned, g.counts(pts, np.asarray(ok[0]))),
                   (grid, g.counts(grid_points(6, h0, w0), np.ones(36, bool)))):
      acc["gt"] += c["gt"]
      acc["hit"] += c["hit"]
  r_learned, r_grid = learned["hit"] / learned["gt"], grid["hit"] / grid["gt"]
  print(f"prompt recall on 20 val images: learned {k} = {r_learned:.3f}, grid 36 = {r_grid:.3f}")
  assert r_learned > r_grid + 0.03


def test_bundle_cli_packages_a_training_run(tmp_path, capsys):
  """`python -m aopsam_jax.bundle`: predictor dir + SAM source + ASF overrides -> loadable bundle."""
  pred_dir = os.path.join(bundle_lib.DEFAULT_BUNDLE, "predictor")
  out = tmp_path / "b"
  assert bundle_cli.main(["--predictor", pred_dir, "--sam-random", "vit_tiny_test:0", "--out", str(out),
                          "--asf", "k_coarse=8", "--asf", "nms_thresh=0.5",
                          "--meta", "train_steps=7"]) == 0
  b = bundle_lib.load_bundle(str(out), quiet=True)
  assert (b.asf.k_coarse, b.asf.nms_thresh) == (8, 0.5)
  assert b.meta["metadata"]["train_steps"] == 7
  capsys.readouterr()
  # an existing bundle is kept unless --overwrite; replaced whole, no temporary left
  again = ["--predictor", pred_dir, "--sam-random", "vit_tiny_test:0", "--out", str(out)]
  assert bundle_cli.main(again) == 2
  err = capsys.readouterr().err
  assert "already exists (a bundle)" in err and "--overwrite" in err and len(err.splitlines()) == 1
  assert bundle_lib.load_bundle(str(out), quiet=True).asf.k_coarse == 8
  assert bundle_cli.main(again + ["--overwrite"]) == 0
  assert bundle_lib.load_bundle(str(out), quiet=True).asf.k_coarse == AsfConfig().k_coarse
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
  capsys.readouterr()
  assert bundle_cli.main(["--predictor", pred_dir, "--sam-random", "vit_tiny_test:0", "--out",
                          str(tmp_path / "c"), "--asf", "no_such_field=1"]) == 2
  err = capsys.readouterr().err
  assert "unknown AsfConfig" in err and len(err.splitlines()) == 1
  # a missing predictor or SAM file, or a bad MODEL:SEED: one line, exit status 2
  for argv, needle in ((["--predictor", str(tmp_path / "nope"), "--sam-random", "vit_tiny_test:0"],
                        "nope"),
                       (["--predictor", pred_dir, "--sam-checkpoint", str(tmp_path / "x.st")],
                        "x.st"),
                       (["--predictor", pred_dir, "--sam-random", "vit_q:0"], "vit_q")):
    try:
      rc = bundle_cli.main(argv + ["--out", str(tmp_path / "e")])
    except SystemExit as e:  # argparse's own errors
      rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "e").exists()
  with pytest.raises(SystemExit):  # malformed override: a usage error, not a traceback
    bundle_cli.main(["--predictor", pred_dir, "--sam-random", "vit_tiny_test:0", "--out",
                     str(tmp_path / "d"), "--asf", "k_coarse"])
  assert "--asf needs KEY=VALUE" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bundle_cli.main(["--help"])
  assert "--sam-checkpoint" in capsys.readouterr().out
