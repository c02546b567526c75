"""The one-program AoP-SAM pipeline: one executable, no host transfers,
size-independent compilation, batches, embedding in user jit code.

Uses vit_tiny_test with random weights and a small UNTRAINED predictor whose head
bias is 0 (so the heatmap has peaks); the mask filters are switched off so
that every accepted prompt yields masks (random SAM's predicted IoU means
nothing).  Checks are against independent references: numpy peak finding on
the returned heatmap and an eager `Sam.decode` of the returned prompts.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aopsam_jax.aop import bundle as bundle_lib
from aopsam_jax.aop import pipeline
from aopsam_jax.sam.image_io import load_image, sample_image_path
from aopsam_jax.aop.prompt_predictor import PromptPredictorConfig
from aopsam_jax.sam.config import get_sam_config
from aopsam_jax.sam.params import build_model

CFG = pipeline.AsfConfig(k_coarse=6, k_fine=2, peak_kernel=7, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0,
                         abs_threshold=0.0, rel_threshold=0.0, fine_abs_threshold=0.0,
                         fine_rel_threshold=0.0, max_masks=8, nms_thresh=0.9)
PP = PromptPredictorConfig(img_channels=(8, 16, 32), embed_proj=32, hidden=32, dec_channels=(16, 8),
                           head_bias=0.0)


@pytest.fixture(scope="module")
def setup():
  b = bundle_lib.random_bundle("vit_tiny_test", seed=0, predictor_cfg=PP, asf_cfg=CFG)
  img = load_image(sample_image_path())
  h, w = img.shape[:2]
  img2 = np.ascontiguousarray(img[: h // 2, : (3 * w) // 4])  # different size and aspect
  inps = [pipeline.prepare(img), pipeline.prepare(img2)]
  gd, st = nnx.split(b.model)
  return b, (gd, st), inps


def _dev(inp):
  return tuple(jax.device_put(np.asarray(x)) for x in inp)


@pytest.fixture(scope="module")
def outputs(setup):
  b, split, inps = setup
  before = pipeline.compiled_executables()
  dev = [_dev(i) for i in inps]
  outs = []
  with jax.transfer_guard("disallow"):
    for d in dev:
      o = pipeline.segment_jit(split, *d, cfg=CFG)
      jax.block_until_ready(o)
      outs.append(o)
  n_compiled = pipeline.compiled_executables() - before
  return [jax.device_get(o) for o in outs], n_compiled


def test_one_executable_no_recompile_no_transfers(setup, outputs):
  outs, n_compiled = outputs
  assert n_compiled == 1  # two image sizes, one executable, both under transfer_guard
  _, _, inps = setup
  assert tuple(inps[0].input_hw) != tuple(inps[1].input_hw)
  for o in outs:
    assert int(o["num_prompts"]) >= 1 and np.asarray(o["valid"]).any()


def test_prompts_are_heatmap_peaks(setup, outputs):
  _, _, inps = setup
  outs, _ = outputs
  for inp, o in zip(inps, outs):
    hm = np.asarray(o["heatmap"])
    ih, iw = (int(v) for v in inp.input_hw)
    oh, ow = (int(v) for v in inp.original_hw)
    pv = np.asarray(o["prompt_valid"])
    pts = np.asarray(o["prompt_points"])[pv] * np.array([iw / ow, ih / oh])  # input frame
    pix = np.floor(pts / 4.0).astype(int)
    # numpy reference: k x k local maxima inside the valid region, top-k by value
    reg = np.zeros_like(hm, bool)
    reg[: -(-ih // 4), : -(-iw // 4)] = True
    x = np.where(reg, hm, -np.inf)
    r = CFG.peak_kernel // 2
    xp = np.pad(x, r, constant_values=-np.inf)
    nb = np.stack([xp[r + dy:r + dy + 256, r + dx:r + dx + 256]
                   for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)])
    is_max = reg & (x >= nb.max(0))
    coarse = pix[: min(pv[:CFG.k_coarse].sum(), len(pix))]
    vals = np.sort(hm[is_max])[::-1]
    np.testing.assert_allclose(np.sort(hm[coarse[:, 1], coarse[:, 0]])[::-1],
                               vals[: len(coarse)], rtol=1e-5)
    assert is_max[pix[:, 1], pix[:, 0]].all()
    assert pv[:CFG.k_coarse].sum() == min(CFG.k_coarse, is_max.sum())


def test_masks_match_eager_decoder(setup, outputs):
  b, _, inps = setup
  outs, _ = outputs
  from aopsam_jax.sam.transforms import preprocess
  inp, o = inps[0], outs[0]
  emb = b.sam.encode_image(preprocess(jnp.asarray(inp.padded), jnp.asarray(inp.input_hw))[None])
  ok = np.nonzero(np.asarray(o["valid"]))[0][:2]
  ih, iw = (int(v) for v in inp.input_hw)
  oh, ow = (int(v) for v in inp.original_hw)
  pts_in = np.asarray(o["points"])[ok] * np.array([iw / ow, ih / oh])
  coords = np.stack([pts_in, np.zeros_like(pts_in)], 1).astype(np.float32)
  labels = np.tile(np.array([[1, -1]], np.int32), (len(ok), 1))
  low, iou = b.sam.decode(emb, jnp.asarray(coords), jnp.asarray(labels), multimask_output=True)
  mi = np.asarray(o["mask_index"])[ok]
  ref = np.asarray(low)[np.arange(len(ok)), mi]
  got = np.asarray(o["low_res_logits"])[ok]
  assert np.mean((ref > 0) == (got > 0)) > 0.999
  np.testing.assert_allclose(np.asarray(iou)[np.arange(len(ok)), mi], o["iou"][ok], atol=2e-3)
  recs = pipeline.to_records(o)
  assert len(recs) == int(np.asarray(o["valid"]).sum())
  for r in recs:
    assert r["segmentation"].shape == (oh, ow)
    x, y, w, h = r["bbox"]
    assert 0 <= x and x + w <= ow and 0 <= y and y + h <= oh


def test_batch_inside_user_jit_matches_single(setup, outputs):
  b, (gd, st), inps = setup
  outs, _ = outputs
  # On a CPU the single-image program runs ASF's two stages as one loop and
  # the vmapped one as two decoder calls: this also compares the two forms.
  if jax.default_backend() == "cpu":
    assert pipeline._skips_padding(b.sam, CFG, batched=False)
    assert not pipeline._skips_padding(b.sam, CFG, batched=True)

  @jax.jit
  def user_fn(state, padded, ihw, ohw):  # user code embedding the pure pipeline
    model = nnx.merge(gd, state)
    out = pipeline.segment(model, padded, ihw, ohw, CFG)
    return out["num_prompts"], out["valid"], out["iou"], out["prompt_points"]

  stack = lambda k: jnp.asarray(np.stack([getattr(i, k) for i in inps]))
  n, valid, iou, pp = jax.device_get(user_fn(st, stack("padded"), stack("input_hw"),
                                             stack("original_hw")))
  for i, o in enumerate(outs):
    assert int(n[i]) == int(o["num_prompts"])
    np.testing.assert_array_equal(valid[i], o["valid"])
    np.testing.assert_allclose(pp[i], o["prompt_points"], atol=1e-3)
    np.testing.assert_allclose(iou[i], o["iou"], atol=2e-3)


def test_bundle_roundtrip(tmp_path, setup):
  b, _, _ = setup
  path = tmp_path / "bundle"
  bundle_lib.save_bundle(str(path), b.sam, b.predictor, CFG,
                         random_init={"model": "vit_tiny_test", "seed": 0}, notes="test")
  assert not (path / "sam.safetensors").exists()
  with pytest.warns(UserWarning, match="RANDOM"):
    b2 = bundle_lib.load_bundle(str(path))
  assert b2.random_sam and b2.asf == CFG
  for a, c in zip(jax.tree.leaves(nnx.state(b.model, nnx.Param)),
                  jax.tree.leaves(nnx.state(b2.model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  other = build_model(get_sam_config("vit_tiny_test"), seed=1)
  # the predictor reads the embedding of another encoder: refused, unless forced
  with pytest.raises(bundle_lib.EncoderMismatch, match="another image encoder"):
    bundle_lib.load_bundle(str(path), sam=other)
  with pytest.warns(UserWarning, match="forced"):
    b3 = bundle_lib.load_bundle(str(path), sam=other, force_encoder=True)
  assert b3.sam is other and not b3.random_sam
  with pytest.raises(ValueError, match="reproduce"):
    bundle_lib.save_bundle(str(tmp_path / "b3"), b.sam, b.predictor, CFG,
                           random_init={"model": "vit_tiny_test", "seed": 1})
