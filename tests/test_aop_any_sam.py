"""AoP-SAM with the SAM a user brings: the shipped image-only predictor runs with any
checkpoint and returns that SAM's masks; a predictor that reads the embedding refuses
an encoder it was not trained with; a run whose masks are all filtered out says why;
conversion and AoP segmentation need no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.reference import build_torch_sam, save_official_pth
from tests.subprocess_helpers import BLOCK_TORCH

import torch  # noqa: E402,F401  (after tests.reference installed the torchvision stand-in)

from aopsam_jax import bundle as bundle_cli  # noqa: E402
from aopsam_jax import segment  # noqa: E402
from aopsam_jax.aop import bundle as bundle_lib  # noqa: E402
from aopsam_jax.aop.prompt_predictor import (PromptPredictor, PromptPredictorConfig,  # noqa: E402
                                             save_predictor)
from aopsam_jax.sam.config import SAM_CONFIGS, get_sam_config  # noqa: E402
from aopsam_jax.sam.params import build_model, encoder_fingerprint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(img_channels=(8, 8, 8), embed_proj=8, hidden=8, dec_channels=(8, 8))


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
  sam = build_torch_sam(SAM_CONFIGS["vit_tiny_test"], seed=11)
  return save_official_pth(sam, str(tmp_path_factory.mktemp("any") / "sam_tiny.pth"))


def test_shipped_bundle_is_image_only():
  b = bundle_lib.load_bundle(quiet=True)
  assert b.meta["predictor_consumes"] == "image"
  assert not b.predictor.config.use_embedding and b.predictor.config.use_image
  # valid with any encoder: another random SAM loads with no warning and no error
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    other = build_model(get_sam_config("vit_tiny_test"), seed=5)
    bundle_lib.load_bundle(sam=other)


def test_embedding_predictor_refuses_another_encoder(tmp_path, capsys):
  sam0 = build_model(get_sam_config("vit_tiny_test"), seed=0)
  sam1 = build_model(get_sam_config("vit_tiny_test"), seed=1)
  from flax import nnx
  pred = PromptPredictor(PromptPredictorConfig(use_embedding=True, **SMALL), rngs=nnx.Rngs(0))
  bdir = tmp_path / "emb_bundle"
  bundle_lib.save_bundle(str(bdir), sam0, pred, random_init={"model": "vit_tiny_test", "seed": 0},
                         trained_fingerprint=encoder_fingerprint(sam0))
  assert json.load(open(bdir / "bundle.json"))["predictor_consumes"] == "image+embedding"
  bundle_lib.load_bundle(str(bdir), quiet=True)  # its own encoder: fine
  with pytest.raises(bundle_lib.EncoderMismatch, match="trained with another image encoder"):
    bundle_lib.load_bundle(str(bdir), sam=sam1, quiet=True)
  with pytest.warns(UserWarning, match=r"\[forced\]"):
    bundle_lib.load_bundle(str(bdir), sam=sam1, quiet=True, force_encoder=True)
  # `bundle` cannot pair a trained predictor with another SAM: train records the encoder
  pdir = tmp_path / "run" / "predictor"
  save_predictor(str(pdir), pred, metadata={"sam_encoder_fingerprint": encoder_fingerprint(sam0),
                                            "consumes": "image+embedding"})
  rc = bundle_cli.main(["--predictor", str(pdir), "--sam-random", "vit_tiny_test:1",
                        "--out", str(tmp_path / "wrong")])
  err = capsys.readouterr().err
  assert rc == 1 and "another image encoder" in err and str(pdir) in err
  assert not (tmp_path / "wrong").exists()
  assert bundle_cli.main(["--predictor", str(pdir), "--sam-random", "vit_tiny_test:0",
                          "--out", str(tmp_path / "right")]) == 0
  # segment: the same refusal as one line, exit 1; --force-encoder runs it
  img = tmp_path / "img.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(img)
  from aopsam_jax.sam.params import flat_params, save_converted
  ck = tmp_path / "sam1.safetensors"
  save_converted(str(ck), sam1.config, flat_params(sam1))
  rc = segment.main([str(img), "--bundle", str(bdir), "--checkpoint", str(ck),
                     "--out", str(tmp_path / "o1")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and "another image encoder" in err[-1] and "--force-encoder" in err[-1]
  rc = segment.main([str(img), "--bundle", str(bdir), "--checkpoint", str(ck), "--force-encoder",
                     "--out", str(tmp_path / "o2")])
  # it ran (a random predictor places no prompt here: said, and exit status 1 for "nothing")
  assert json.load(open(tmp_path / "o2" / "img.json")) == []
  err = capsys.readouterr().err
  assert rc == 1 and "no prompt above its heatmap thresholds" in err and "no masks at all" in err


def test_zero_masks_are_explained(tiny_pth, tmp_path, capsys):
  """Official thresholds reject every mask of a random SAM: the CLI says how many
  prompts were decoded, what each filter removed, and which thresholds held."""
  img = tmp_path / "img.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), np.uint8)).save(img)
  rc = segment.main([str(img), "--checkpoint", tiny_pth, "--out", str(tmp_path / "o")])
  assert rc == 1  # nothing produced
  assert json.load(open(tmp_path / "o" / "img.json")) == []
  err = capsys.readouterr().err
  assert err.splitlines()[-1].startswith("segment: no masks at all")
  line = next(ln for ln in err.splitlines() if "0 masks:" in ln)
  import re
  m = re.search(r"0 masks: (\d+) prompts decoded into (\d+) candidate masks; removed by "
                r"pred_iou_thresh=0.88 \(bundle\): (\d+), by stability_score_thresh=0.95 "
                r"\(bundle\) \(offset 1\): (\d+), as redundant prompts: (\d+), by mask NMS "
                r"nms_thresh=0.7 \(bundle\): (\d+)", line)
  assert m, line
  n_prompts, n_cand, *removed = (int(v) for v in m.groups())
  assert n_prompts >= 1 and n_cand == 3 * n_prompts and sum(removed) == n_cand


NO_TORCH_CHILD = BLOCK_TORCH + r"""
try:
  import torch  # noqa: F401
  raise SystemExit("torch importable")
except ImportError:
  pass
from conversion import convert_sam
from aopsam_jax import segment
pth, out, img, res = sys.argv[1:5]
assert convert_sam.main(["-c", pth, "-o", out, "-q"]) == 0
# aop segmentation straight from the official .pth and from the converted file
for ck, sub in ((pth, "a"), (out, "b")):
  assert segment.main([img, "--checkpoint", ck, "--out", res + sub, "--pred-iou-thresh", "-1",
                       "--stability-score-thresh", "0"]) == 0
assert "torch" not in sys.modules
"""


def test_conversion_and_aop_segmentation_without_torch(tiny_pth, tmp_path):
  img = tmp_path / "img.png"
  Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 56, 3), np.uint8)).save(img)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", NO_TORCH_CHILD, tiny_pth, str(tmp_path / "c.safetensors"),
                      str(img), str(tmp_path / "res_")], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  a = json.load(open(tmp_path / "res_a" / "img.json"))
  b = json.load(open(tmp_path / "res_b" / "img.json"))
  assert len(a) >= 1 and [x["segmentation"] for x in a] == [x["segmentation"] for x in b]
  assert a[0]["weights"] == "sam_tiny.pth" and b[0]["weights"] == "c.safetensors"


@pytest.mark.slow  # vit_b at 1024 on a CPU: about 2 minutes
def test_aop_with_converted_random_vit_b_gives_that_sams_masks(tmp_path, capsys):
  """The shipped bundle + a converted random-init official vit_b: no encoder complaint,
  and every mask is the one that vit_b decodes at the mask's prompt."""
  from aopsam_jax.sam.checkpoints import load_sam
  from aopsam_jax.sam.predictor import SamPredictor
  sam_t = build_torch_sam(SAM_CONFIGS["vit_b"], seed=2)
  pth = save_official_pth(sam_t, str(tmp_path / "sam_vit_b_random.pth"))
  del sam_t
  ck = tmp_path / "vit_b.safetensors"
  from conversion import convert_sam
  assert convert_sam.main(["-c", pth, "-o", str(ck), "-q"]) == 0
  img = tmp_path / "img.png"
  image = np.random.default_rng(3).integers(0, 255, (48, 64, 3), np.uint8)
  Image.fromarray(image).save(img)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rc = segment.main([str(img), "--checkpoint", str(ck), "--out", str(tmp_path / "o"),
                       "--pred-iou-thresh", "-1", "--stability-score-thresh", "0"])
  assert rc == 0
  msgs = [str(w.message) for w in caught] + capsys.readouterr().err.splitlines()
  assert not [m for m in msgs if "encoder" in m.lower() or "RANDOM" in m], msgs
  res = json.load(open(tmp_path / "o" / "img.json"))
  assert res and all(r["weights"] == "vit_b.safetensors" for r in res)
  pred = SamPredictor(load_sam(str(ck)))
  pred.set_image(image)
  from pycocotools import mask as coco_mask
  for r in res[:3]:
    masks, iou, _ = pred.predict(point_coords=np.array(r["point_coords"], np.float32),
                                 point_labels=np.array([1]), multimask_output=True)
    j = int(np.argmin(np.abs(np.asarray(iou) - r["predicted_iou"])))
    assert abs(float(iou[j]) - r["predicted_iou"]) < 2e-3
    seg = coco_mask.decode({"size": r["segmentation"]["size"],
                            "counts": r["segmentation"]["counts"].encode()}).astype(bool)
    m = np.asarray(masks[j], bool)
    assert (seg & m).sum() / max((seg | m).sum(), 1) > 0.98


def test_image_only_training_reads_no_embedding():
  """An image-only predictor trains on `transforms.image_small_np` (host numpy,
  no SAM encoder): the same input the pipeline gives it at inference, and the
  train step hands it no embedding at all."""
  import jax.numpy as jnp
  from aopsam_jax.aop.prompt_predictor import downsample_image
  from aopsam_jax.sam import transforms
  from aopsam_jax.trainer.steps import model_inputs
  image = np.random.default_rng(4).integers(0, 255, (300, 200, 3), np.uint8)
  padded, hw, _ = transforms.prepare_image(image, 1024)
  ours = transforms.image_small_np(padded, hw)
  ref = np.asarray(downsample_image(transforms.preprocess(jnp.asarray(padded)[None],
                                                          jnp.asarray(hw)[None])))[0]
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  emb, small = model_inputs({"image_small": ours[None]}, None, None)
  assert emb is None and small.shape == (1, 256, 256, 3)
  from flax import nnx
  pp = PromptPredictor(PromptPredictorConfig(use_embedding=False, **SMALL), rngs=nnx.Rngs(0))
  assert pp(None, jnp.asarray(small)).shape == (1, 256, 256)
