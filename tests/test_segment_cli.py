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
                     "--box", "5,5,50,80", "--out", str(out2), "--overwrite"])
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


def test_aop_uses_the_bundle_thresholds_unless_overridden(tmp_path, capsys):
  """A bundle with saved (not random-init) SAM weights and distinctive ASF
  thresholds: `segment` uses them as they are (here: nothing can pass
  predicted IoU > 5, so no masks), a flag overrides one, and `--asf`
  another; each run's masks match `AopMaskGenerator` on the bundle loaded
  with the same overrides, and the console and JSON name each source."""
  from aopsam_jax.aop import bundle as bundle_lib
  from aopsam_jax.aop.pipeline import AopMaskGenerator, AsfConfig
  from aopsam_jax.aop.prompt_predictor import PromptPredictorConfig
  from aopsam_jax.sam.image_io import load_image
  asf = AsfConfig(k_coarse=4, k_fine=2, peak_kernel=7, abs_threshold=0.0, rel_threshold=0.0,
                  fine_abs_threshold=0.0, fine_rel_threshold=0.0, max_masks=6,
                  pred_iou_thresh=5.0, stability_score_thresh=0.125, nms_thresh=0.9)
  pp = PromptPredictorConfig(img_channels=(8, 16, 32), embed_proj=32, hidden=32,
                             dec_channels=(16, 8), head_bias=0.0)
  rb = bundle_lib.random_bundle("vit_tiny_test", seed=0, predictor_cfg=pp)
  bdir = tmp_path / "bundle"
  bundle_lib.save_bundle(str(bdir), rb.sam, rb.predictor, asf)
  img = tmp_path / "a.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), np.uint8)).save(img)
  image = load_image(str(img))

  def run(*extra, status=0):
    out = tmp_path / f"out{len(extra)}"
    assert segment.main([str(img), "--bundle", str(bdir), "--out", str(out), *extra]) == status
    return json.load(open(out / "a.json")), capsys.readouterr().err

  res, err = run(status=1)  # nothing produced: said, and the exit status says it too
  assert res == [] and "(1 with no mask)" in err and "no masks at all" in err.splitlines()[-1]
  assert "pred_iou_thresh=5 (bundle)" in err and "stability_score_thresh=0.125 (bundle)" in err
  assert "RANDOM-INIT" not in err  # the bundle's weights are saved, not random-init
  assert len(AopMaskGenerator(bundle_lib.load_bundle(str(bdir))).generate(image)) == 0

  res, err = run("--pred-iou-thresh", "-1", "--asf", "stability_score_thresh=0")
  assert "pred_iou_thresh=-1 (flag)" in err and "stability_score_thresh=0 (--asf)" in err
  assert "stability_score_offset=1 (bundle)" in err
  ref = AopMaskGenerator(bundle_lib.load_bundle(str(bdir), asf_overrides=dict(
      pred_iou_thresh=-1.0, stability_score_thresh=0.0))).generate(image)
  assert len(res) == len(ref) >= 1
  assert [r["area"] for r in res] == [int(r["segmentation"].sum()) for r in ref]
  assert res[0]["thresholds"]["pred_iou_thresh"] == {"value": -1.0, "source": "flag"}
  assert res[0]["thresholds"]["nms_thresh"] == {"value": 0.9, "source": "bundle"}


def test_segment_usage_errors_before_loading(tmp_path, capsys):
  import pytest
  for argv, what in ((["--asf", "no_such_field=1"], "no_such_field"),
                     (["--asf", "k_coarse"], "KEY=VALUE"),
                     (["--mode", "amg", "--asf", "k_coarse=3"], "--mode aop"),
                     (["--asf", "pred_iou_thresh=0.5", "--pred-iou-thresh", "0.4"], "both"),
                     (["--box-nms-thresh", "0.5"], "nms_thresh")):
    with pytest.raises(SystemExit) as e:
      segment.main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and what in capsys.readouterr().err


def test_aop_model_type_without_checkpoint(tmp_path, capsys):
  """--model-type without --checkpoint is the random-init architecture in aop
  mode too (as in amg / prompt mode), not silently the bundle's SAM; a bundle
  holding SAM weights refuses it in one line (exit 2, a usage error found
  before any model is built) instead of dropping them."""
  from aopsam_jax.aop import bundle as bundle_lib
  from aopsam_jax.aop.prompt_predictor import PromptPredictorConfig
  from aopsam_jax.sam.config import get_sam_config

  def parsed(*argv):
    parser = segment.build_parser()
    args = parser.parse_args(list(argv))
    segment.check_args(parser, args)
    return args

  args = parsed("--mode", "aop", "--model-type", "vit_t")
  aop = segment.load_aop(args)
  assert aop.random_sam and aop.bundle.sam.config == get_sam_config("vit_t")
  assert segment.program_name(args).endswith("for random-init vit_t")
  assert "(vit_t)" in segment.random_init_banner("aop", "vit_t")
  shipped = segment.load_aop(parsed("--mode", "aop"))
  assert shipped.random_sam and shipped.bundle.sam.config == get_sam_config("vit_tiny_test")
  assert "the AoP bundle's SAM" in segment.random_init_banner("aop", None)

  pp = PromptPredictorConfig(img_channels=(8, 16, 32), embed_proj=32, hidden=32,
                             dec_channels=(16, 8), head_bias=0.0)
  rb = bundle_lib.random_bundle("vit_tiny_test", seed=0, predictor_cfg=pp)
  bdir = tmp_path / "bundle"
  bundle_lib.save_bundle(str(bdir), rb.sam, rb.predictor)
  img = tmp_path / "a.png"
  Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(img)
  capsys.readouterr()
  import pytest
  with pytest.raises(SystemExit) as e:
    segment.main([str(img), "--mode", "aop", "--bundle", str(bdir), "--model-type", "vit_b",
                  "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "--model-type vit_b without --checkpoint" in err[0], err
  assert not (tmp_path / "out" / "a.json").exists()
