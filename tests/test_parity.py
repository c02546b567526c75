"""Numerical parity with the official PyTorch SAM (segment-anything 1.0), float32.

Every test goes through the real file path: official model with random
weights -> `torch.save(state_dict)` -> `conversion.convert_sam.main` ->
`params.load_sam` -> our pipeline (`transforms` -> `encode_image` ->
`prompts.build_sparse_prompts` -> `decode` -> `postprocess_masks`), compared
with the official `SamPredictor` on the same image and prompts.

Bounds: relative L2 error (||ours - torch|| / ||torch||) <= 1e-4 on the image
embedding, low-res mask logits and IoU predictions; thresholded masks at the
original size agree on >= 99.9 % of pixels.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import build_torch_sam, rel_err, save_official_pth

import torch  # noqa: E402  (after tests.reference installed the torchvision stand-in)
from segment_anything import SamPredictor  # noqa: E402

from aopsam_jax.sam import prompts, transforms  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS, SamConfig  # noqa: E402
from aopsam_jax.sam.params import load_sam, read_converted  # noqa: E402
from conversion import convert_sam  # noqa: E402

REL_TOL = 1e-4
PIXEL_AGREEMENT = 0.999
SAMPLE_JPG = os.path.join(os.path.dirname(__file__), "..", "aopsam_jax", "assets", "sample.jpg")


# --- helpers (imported by test_hf_layout.py too) -----------------------------


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
  """Smooth random RGB blobs plus a little noise: masks get real structure."""
  rng = np.random.RandomState(seed)
  coarse = rng.rand(max(2, h // 40), max(2, w // 40), 3)
  from PIL import Image
  img = np.stack([np.asarray(Image.fromarray((coarse[..., c] * 255).astype(np.uint8)).resize(
      (w, h), Image.BICUBIC)) for c in range(3)], -1).astype(np.float32)
  img += rng.randn(h, w, 3) * 8.0
  return np.clip(img, 0, 255).astype(np.uint8)


def sample_image() -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.open(SAMPLE_JPG).convert("RGB"))


def convert_torch_model(sam, tmp_dir, name: str, model_type: str = "auto"):
  """torch model -> .pth -> converter CLI main -> safetensors path."""
  pth = save_official_pth(sam, os.path.join(str(tmp_dir), f"{name}.pth"))
  out = os.path.join(str(tmp_dir), f"{name}.safetensors")
  rc = convert_sam.main(["--checkpoint", pth, "--out", out, "--model-type", model_type,
                         "--quiet", "--no-hash"])
  assert rc == 0
  return out


class OurPredictor:
  """The JAX path written out from the library pieces (no predictor class)."""

  def __init__(self, model):
    self.model = model
    self.cfg = model.config
    self._encode = nnx.jit(lambda m, x: m.encode_image(x))
    self._decode = nnx.jit(lambda m, e, c, l, mi, mm: m.decode(e, c, l, mi, mm),
                           static_argnums=(5,))
    self._post = jax.jit(transforms.postprocess_masks, static_argnums=(3, 4))

  def set_image(self, image: np.ndarray) -> np.ndarray:
    padded, self.input_hw, self.orig_hw = transforms.prepare_image(image, self.cfg.img_size)
    x = transforms.preprocess(jnp.asarray(padded)[None], jnp.asarray(self.input_hw)[None])
    self.features = self._encode(self.model, x)
    return np.asarray(self.features)

  def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
              multimask_output=True):
    """Batched like `SamPredictor.predict_torch`: points (B, N, 2), boxes (B, 4),
    mask_input (B, 256, 256); coordinates in the original image frame."""
    pts = None if point_coords is None else transforms.apply_coords(
        point_coords, self.orig_hw, self.input_hw)
    boxes = None if box is None else transforms.apply_boxes(box, self.orig_hw, self.input_hw)
    coords, labels = prompts.build_sparse_prompts(pts, point_labels, boxes)
    mi = None if mask_input is None else jnp.asarray(mask_input, jnp.float32)
    low, iou = self._decode(self.model, self.features, jnp.asarray(coords), jnp.asarray(labels),
                            mi, bool(multimask_output))
    masks = self._post(low, self.input_hw, self.orig_hw, tuple(int(v) for v in self.orig_hw),
                       self.cfg.img_size)
    return np.asarray(masks), np.asarray(iou), np.asarray(low)


def torch_predict(pred: SamPredictor, point_coords=None, point_labels=None, box=None,
                  mask_input=None, multimask_output=True):
  """Batched official prediction (predict_torch), original-size logits."""
  dev = pred.device
  pc = pl = bx = mi = None
  if point_coords is not None:
    pc = torch.as_tensor(pred.transform.apply_coords(np.asarray(point_coords, np.float64),
                                                     pred.original_size),
                         dtype=torch.float, device=dev)
    pl = torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=dev)
  if box is not None:
    bx = torch.as_tensor(pred.transform.apply_boxes(np.asarray(box, np.float64),
                                                    pred.original_size),
                         dtype=torch.float, device=dev)
  if mask_input is not None:
    mi = torch.as_tensor(np.asarray(mask_input), dtype=torch.float, device=dev)[:, None]
  with torch.no_grad():
    masks, iou, low = pred.predict_torch(pc, pl, bx, mi, multimask_output, return_logits=True)
  return masks.numpy(), iou.numpy(), low.numpy()


def compare(ours, theirs, what: str, stats: list | None = None):
  """Assert the bounds; returns (low-res rel err, IoU rel err, pixel agreement)."""
  m_j, iou_j, low_j = ours
  m_t, iou_t, low_t = theirs
  assert m_j.shape == m_t.shape and iou_j.shape == iou_t.shape and low_j.shape == low_t.shape, (
      what, m_j.shape, m_t.shape, low_j.shape, low_t.shape)
  e_low, e_iou = rel_err(low_j, low_t), rel_err(iou_j, iou_t)
  agree = float(np.mean((m_j > 0) == (m_t > 0)))
  e_full = rel_err(m_j, m_t)
  if stats is not None:
    stats.append((what, e_low, e_iou, e_full, agree))
  assert e_low <= REL_TOL, f"{what}: low-res logits rel err {e_low:.2e}"
  assert e_iou <= REL_TOL, f"{what}: IoU rel err {e_iou:.2e}"
  assert agree >= PIXEL_AGREEMENT, f"{what}: masks agree on {agree:.5f} of pixels"
  return e_low, e_iou, agree


def prompt_cases(h: int, w: int, seed: int):
  """(name, kwargs) prompt sets in the original-image frame, batch 1.

  A case with mask_input=\"prev\" feeds back the best low-res logits of the
  previous case, like interactive refinement in the official notebook.
  """
  rng = np.random.RandomState(seed)
  def pt():
    return [rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h]
  x0, x1 = sorted(rng.uniform(0.05, 0.95, 2) * w)
  y0, y1 = sorted(rng.uniform(0.05, 0.95, 2) * h)
  box = np.array([[x0, y0, x1, y1]])
  return [
      ("point/multi", dict(point_coords=np.array([[pt()]]), point_labels=np.array([[1]]),
                           multimask_output=True)),
      ("point+mask/single", dict(point_coords=np.array([[pt()]]), point_labels=np.array([[1]]),
                                 mask_input="prev", multimask_output=False)),
      ("pos+neg points/single", dict(point_coords=np.array([[pt(), pt()]]),
                                     point_labels=np.array([[1, 0]]), multimask_output=False)),
      ("box/single", dict(box=box, multimask_output=False)),
      ("box/multi", dict(box=box, multimask_output=True)),
      ("box+point/multi", dict(box=box, point_coords=np.array([[pt()]]),
                               point_labels=np.array([[1]]), multimask_output=True)),
      ("box+neg point+mask/single", dict(box=box, point_coords=np.array([[pt()]]),
                                         point_labels=np.array([[0]]), mask_input="prev",
                                         multimask_output=False)),
  ]


def run_cases(ours: OurPredictor, pred: SamPredictor, cases, label: str, stats=None):
  stats = [] if stats is None else stats
  _run_cases(ours, pred, cases, label, stats)
  print(f"\n{label}: {len(stats)} prompt sets, max rel err low-res "
        f"{max(s[1] for s in stats):.1e}, IoU {max(s[2] for s in stats):.1e}, full-size "
        f"{max(s[3] for s in stats):.1e}; min mask agreement {min(s[4] for s in stats):.6f}")


def _run_cases(ours, pred, cases, label, stats):
  prev = None
  for name, kw in cases:
    kw = dict(kw)
    if isinstance(kw.get("mask_input"), str):
      kw["mask_input"] = prev
    o = ours.predict(**kw)
    t = torch_predict(pred, **kw)
    assert t[2].std(axis=(-1, -2)).min() > 0.05 * np.abs(t[2]).mean(), f"{label} {name}: flat"
    compare(o, t, f"{label} {name}", stats)
    best = int(np.argmax(t[1][0]))
    prev = t[2][:, best]  # (1, 256, 256) torch low-res logits of the best mask


# --- vit_tiny_test: several images, every prompt kind ---------------------------------


@pytest.fixture(scope="module")
def vit_tiny_test(tmp_path_factory):
  """(torch Sam, our predictor): one converted model and one jit cache for the module."""
  cfg = SAM_CONFIGS["vit_tiny_test"]
  sam = build_torch_sam(cfg, seed=1)
  out = convert_torch_model(sam, tmp_path_factory.mktemp("vit_tiny_test"), "sam_vit_t", "vit_tiny_test")
  return sam, OurPredictor(load_sam(out))


# (h, w): landscape, portrait, very wide, tiny (upscaled 12.8x), real photo.  Every
# image runs the point / box+point / mask-feedback cases; one runs all seven.
IMAGES = [((480, 640), "all"), ((640, 427), "some"), ((300, 1000), "some"), ((50, 80), "some"),
          ("sample", "some")]
SOME = ("point/multi", "point+mask/single", "box+point/multi")


@pytest.mark.parametrize("size,which", IMAGES,
                         ids=lambda s: s if isinstance(s, str) else f"{s[0]}x{s[1]}")
def test_predictor_parity_vit_t(vit_tiny_test, size, which):
  sam, ours = vit_tiny_test
  image = sample_image() if size == "sample" else synthetic_image(*size, seed=sum(size))
  h, w = image.shape[:2]
  pred = SamPredictor(sam)
  pred.set_image(image)
  emb = ours.set_image(image)
  assert tuple(pred.input_size) == tuple(int(v) for v in ours.input_hw)
  e = rel_err(emb, pred.features.permute(0, 2, 3, 1).numpy())
  print(f"\nvit_t {h}x{w}: image embedding rel err {e:.1e}")
  assert e <= REL_TOL, f"image embedding rel err {e:.2e}"
  assert emb.std(axis=(1, 2)).mean() > 0.1 * np.abs(emb).mean()  # a non-degenerate reference
  cases = prompt_cases(h, w, seed=h + w)
  if which != "all":
    cases = [c for c in cases if c[0] in SOME]
  run_cases(ours, pred, cases, f"vit_tiny_test {h}x{w}")


def test_predictor_api_single_prompt(vit_tiny_test):
  """The official `SamPredictor.predict` (numpy API, one prompt) agrees too."""
  sam, ours = vit_tiny_test
  image = synthetic_image(480, 640, seed=5)
  pred = SamPredictor(sam)
  pred.set_image(image)
  ours.set_image(image)
  pc, pl, box = np.array([[300.0, 200.0], [100.0, 400.0]]), np.array([1, 0]), np.array(
      [50.0, 60.0, 500.0, 420.0])
  m_t, iou_t, low_t = pred.predict(pc, pl, box, multimask_output=True, return_logits=True)
  m_j, iou_j, low_j = ours.predict(pc[None], pl[None], box[None], multimask_output=True)
  compare((m_j[0], iou_j[0], low_j[0]), (m_t, iou_t, low_t), "SamPredictor.predict")
  # return_logits=False: the official boolean masks (logits > mask_threshold 0.0).
  masks_bool, _, _ = pred.predict(pc, pl, box, multimask_output=True)
  assert np.mean(masks_bool == (m_j[0] > SAM_CONFIGS["vit_tiny_test"].mask_threshold)) >= PIXEL_AGREEMENT


def test_batched_prompts_vit_t(vit_tiny_test):
  """B prompts on one embedding (broadcast) == official predict_torch with B boxes + points."""
  sam, ours = vit_tiny_test
  image = synthetic_image(427, 640, seed=7)
  pred = SamPredictor(sam)
  pred.set_image(image)
  ours.set_image(image)
  rng = np.random.RandomState(3)
  b = 5
  xy0 = rng.uniform(0, 0.5, (b, 2)) * [640, 427]
  boxes = np.concatenate([xy0, xy0 + rng.uniform(0.1, 0.5, (b, 2)) * [640, 427]], 1)
  pts = rng.uniform(0, 1, (b, 2, 2)) * [640, 427]
  lbl = rng.randint(0, 2, (b, 2))
  compare(ours.predict(pts, lbl, boxes, multimask_output=True),
          torch_predict(pred, pts, lbl, boxes, multimask_output=True), f"batched B={b}")
  # Points only, with padding labels (-1) inside a batch of unequal point counts.
  lbl_pad = lbl.copy()
  lbl_pad[0, 1] = -1
  compare(ours.predict(pts, lbl_pad, None, multimask_output=True),
          torch_predict(pred, pts, lbl_pad, None, multimask_output=True), "batched pad labels")


# --- layer by layer (diagnosis), vit_tiny_test ----------------------------------------


def _jax_intermediates(model, x, coords, labels, mask):
  enc, pe = model.image_encoder, model.prompt_encoder
  out = {}
  h = enc.patch_embed(x) + enc.pos_embed[...]
  out["patch_embed+pos"] = h
  for i, blk in enumerate(enc.blocks):
    h = blk(h)
    out[f"block{i}"] = h
  n = enc.neck_ln2(enc.neck_conv2(enc.neck_ln1(enc.neck_conv1(h))))
  out["neck"] = n
  out["sparse prompt"] = pe.embed_sparse(coords, labels)
  out["dense pe"] = pe.get_dense_pe()
  out["mask embed"] = pe.embed_mask(mask)
  out["decoder masks"], out["decoder iou"] = model.decode(n, coords, labels, None, True)
  return out


def test_layerwise_vit_t(vit_tiny_test):
  """Intermediate tensors (bonsai style), to tell where a divergence starts."""
  sam, ours = vit_tiny_test
  enc_t, pe_t = sam.image_encoder, sam.prompt_encoder
  x = np.random.RandomState(0).randn(1, 1024, 1024, 3).astype(np.float32)
  pts = np.array([[[100.0, 200.0], [700.0, 20.0]]], np.float32)
  lbl = np.array([[1, 0]])
  box = np.array([[50.0, 60.0, 900.0, 1000.0]], np.float32)
  mask = np.random.RandomState(1).randn(1, 256, 256).astype(np.float32) * 5
  c, l = prompts.build_sparse_prompts(pts, lbl, box)
  got = nnx.jit(_jax_intermediates)(ours.model, jnp.asarray(x), jnp.asarray(c), jnp.asarray(l),
                                    jnp.asarray(mask))
  ref = {}
  with torch.no_grad():
    h = enc_t.patch_embed(torch.from_numpy(x).permute(0, 3, 1, 2)) + enc_t.pos_embed
    ref["patch_embed+pos"] = h
    for i, blk in enumerate(enc_t.blocks):  # block 0 windowed (padded 64 -> 70), block 1 global
      h = blk(h)
      ref[f"block{i}"] = h
    n = enc_t.neck(h.permute(0, 3, 1, 2))
    ref["neck"] = n.permute(0, 2, 3, 1)
    sp, de = pe_t((torch.from_numpy(pts), torch.from_numpy(lbl)), torch.from_numpy(box), None)
    ref["sparse prompt"] = sp
    ref["dense pe"] = pe_t.get_dense_pe()[0].permute(1, 2, 0)
    _, dm = pe_t(None, None, torch.from_numpy(mask)[:, None])
    ref["mask embed"] = dm.permute(0, 2, 3, 1)
    ref["decoder masks"], ref["decoder iou"] = sam.mask_decoder(n, pe_t.get_dense_pe(), sp, de,
                                                                True)
  errs = {k: rel_err(got[k], ref[k].numpy()) for k in ref}
  print("\nlayerwise rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
  bad = {k: v for k, v in errs.items() if not v <= REL_TOL}
  assert not bad, f"layers over {REL_TOL}: {bad} (all: {errs})"


# --- full ViT-B at 1024 -------------------------------------------------------


def test_vit_b_full_parity(tmp_path):
  """Exact vit_b architecture (12 blocks, 768 wide, 1024 input): one image, a few prompts.

  About 50 s on an idle 2-core CPU (two ViT-B forwards at 1024), 100+ s on a
  busy one, hence `slow`: run with `pytest -m slow tests/test_parity.py`.
  """
  cfg = SAM_CONFIGS["vit_b"]
  sam = build_torch_sam(cfg, seed=2)
  out = convert_torch_model(sam, tmp_path, "sam_vit_b", "vit_b")
  os.remove(os.path.join(str(tmp_path), "sam_vit_b.pth"))  # 375 MB: free it early
  cfg_file, _, meta = read_converted(out)
  assert cfg_file == cfg and meta["model_type"] == "vit_b"
  model = load_sam(out)
  image = sample_image()
  h, w = image.shape[:2]
  pred = SamPredictor(sam)
  pred.set_image(image)
  ours = OurPredictor(model)
  emb = ours.set_image(image)
  e = rel_err(emb, pred.features.permute(0, 2, 3, 1).numpy())
  print(f"\nvit_b: image embedding rel err {e:.1e}")
  assert e <= REL_TOL, f"vit_b image embedding rel err {e:.2e}"
  cases = [c for c in prompt_cases(h, w, seed=11)
           if c[0] in ("point/multi", "point+mask/single", "box+point/multi")]
  run_cases(ours, pred, cases, "vit_b")


# --- vit_l / vit_h widths at reduced depth ------------------------------------


@pytest.mark.parametrize("width,heads,img_size", [
    (1280, 16, 512), (1024, 16, 256),
    pytest.param(1280, 16, 1024, marks=pytest.mark.slow)],
    ids=["vit_h-width-512", "vit_l-width-256", "vit_h-width-1024"])
def test_reduced_depth_parity(tmp_path, width, heads, img_size):
  """vit_h / vit_l block width and head count (head dim 80 / 64), depth 2 with
  block 1 global, through the converter's shape-based config detection.  The
  smaller inputs keep the default run short (grids 32 and 16 are padded to 42
  and 28 inside the 14-wide windows); the 1024 input is the `slow` variant."""
  cfg = SamConfig(encoder_embed_dim=width, encoder_depth=2, encoder_num_heads=heads,
                  encoder_global_attn_indexes=(1,), img_size=img_size)
  sam = build_torch_sam(cfg, seed=3)
  out = convert_torch_model(sam, tmp_path, "sam_reduced", "auto")
  cfg_file, _, meta = read_converted(out)
  assert cfg_file == cfg and meta["model_type"] == "custom"
  model = load_sam(out)
  image = synthetic_image(480, 640, seed=width)
  pred = SamPredictor(sam)
  pred.set_image(image)
  ours = OurPredictor(model)
  emb = ours.set_image(image)
  e = rel_err(emb, pred.features.permute(0, 2, 3, 1).numpy())
  print(f"\nwidth {width} input {img_size}: image embedding rel err {e:.1e}")
  assert e <= REL_TOL, f"image embedding rel err {e:.2e}"
  cases = [c for c in prompt_cases(480, 640, seed=width)
           if c[0] in ("point/multi", "box+neg point+mask/single")]
  run_cases(ours, pred, cases, f"width {width} input {img_size}")
