"""Hugging Face `transformers` SamModel layout (`facebook/sam-vit-*`).

Two independent references:
  * `official_to_hf` below re-implements transformers' `convert_sam_to_hf.py`
    renaming (KEYS_TO_MODIFY_MAPPING + the hypernetwork-MLP rule + the tied
    `shared_image_embedding` copy) without using `params._HF_RULES`; files
    written with those names must convert to exactly the official-path params.
  * when `transformers` is installed, a real `SamModel` with random weights is
    saved with `save_pretrained` and converted, and its outputs are compared
    with ours (skipped cleanly without transformers).
"""

from __future__ import annotations

import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import build_torch_sam, rel_err, save_official_pth, state_dict_numpy

import torch  # noqa: E402  (after tests.reference installed the torchvision stand-in)

from aopsam_jax.sam import params as P  # noqa: E402
from aopsam_jax.sam import prompts  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from conversion import convert_sam  # noqa: E402
from conversion.convert_sam import CheckpointError  # noqa: E402

REL_TOL = 1e-4

# transformers/models/sam/convert_sam_to_hf.py, applied in this order as substring
# replacements (dict order), then the output_hypernetworks_mlps rule.
_KEYS_TO_MODIFY = [
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
]
_HYPER = re.compile(r".*.output_hypernetworks_mlps.(\d+).layers.(\d+).*")


def official_to_hf(sd: dict) -> dict:
  out = {}
  for key, value in sd.items():
    if key in ("pixel_mean", "pixel_std"):
      continue
    for old, new in _KEYS_TO_MODIFY:
      if old in key:
        key = key.replace(old, new)
    m = _HYPER.match(key)
    if m:
      key = key.replace(f"layers.{m.group(2)}",
                        {"0": "proj_in", "1": "layers.0", "2": "proj_out"}[m.group(2)])
    out[key] = value
  out["shared_image_embedding.positional_embedding"] = out[
      "prompt_encoder.shared_embedding.positional_embedding"]
  return out


def _save_st(sd: dict, path) -> str:
  from safetensors.torch import save_file
  save_file({k: torch.as_tensor(np.array(v)).contiguous() for k, v in sd.items()}, str(path))
  return str(path)


def _assert_same_params(a: dict, b: dict):
  assert set(a) == set(b)
  bad = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not bad, f"differing params: {bad[:5]}"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """(torch Sam, numpy state dict, params converted via the official .pth path)."""
  sam = build_torch_sam(SAM_CONFIGS["vit_tiny_test"], seed=5)
  d = tmp_path_factory.mktemp("hf")
  pth = save_official_pth(sam, str(d / "sam_vit_t.pth"))
  cfg, flat, layout = convert_sam.convert_checkpoint(pth)
  assert layout == "official" and cfg == SAM_CONFIGS["vit_tiny_test"]
  return sam, state_dict_numpy(sam), flat


# --- renamed files (no transformers needed) ------------------------------------


def test_hf_named_files_convert_identically(official, tmp_path):
  _, sd, ref = official
  hf = official_to_hf(sd)
  assert not any(k.startswith("image_encoder.") for k in hf)
  variants = {
      "both_pe_copies.safetensors": hf,
      "only_shared_image_embedding.safetensors": {
          k: v for k, v in hf.items() if k != "prompt_encoder.shared_embedding.positional_embedding"},
      "only_prompt_encoder_pe.safetensors": {
          k: v for k, v in hf.items() if k != "shared_image_embedding.positional_embedding"},
  }
  stacked = {k: v for k, v in hf.items() if not k.startswith("prompt_encoder.point_embed.")}
  stacked["prompt_encoder.point_embed.weight"] = np.concatenate(
      [hf[f"prompt_encoder.point_embed.{i}.weight"] for i in range(4)])
  variants["stacked_point_embed.safetensors"] = stacked
  for name, d in variants.items():
    path = _save_st(d, tmp_path / name)
    out = tmp_path / ("conv_" + name)
    assert convert_sam.main(["-c", path, "-o", str(out), "-q"]) == 0, name
    cfg, flat, meta = P.read_converted(str(out))
    assert cfg == SAM_CONFIGS["vit_tiny_test"] and meta["source_layout"] == "hf", name
    _assert_same_params(flat, ref)
  # pytorch_model.bin with HF keys (a torch pickle, not safetensors).
  binf = tmp_path / "pytorch_model.bin"
  torch.save({k: torch.as_tensor(np.array(v)) for k, v in hf.items()}, binf)
  _assert_same_params(convert_sam.convert_checkpoint(str(binf))[1], ref)


def test_hf_tied_copies_must_agree(official, tmp_path):
  hf = official_to_hf(official[1])
  hf["shared_image_embedding.positional_embedding"] = hf[
      "shared_image_embedding.positional_embedding"] + 1.0
  path = _save_st(hf, tmp_path / "bad_tied.safetensors")
  with pytest.raises(CheckpointError, match="positional_encoding_gaussian_matrix"):
    convert_sam.convert_checkpoint(path)


def test_hf_missing_and_misshaped_keys_named(official, tmp_path):
  hf = official_to_hf(official[1])
  del hf["mask_decoder.iou_prediction_head.proj_out.bias"]
  hf["vision_encoder.neck.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  path = _save_st(hf, tmp_path / "bad.safetensors")
  with pytest.raises(CheckpointError) as e:
    convert_sam.convert_checkpoint(path)
  msg = str(e.value)
  assert path in msg and "mask_decoder.iou_prediction_head.layers.2.bias" in msg
  assert "image_encoder.neck.2.weight" in msg and "wrongly shaped" in msg


# --- a real transformers SamModel ------------------------------------------------


def _import_transformers():
  """`transformers` (skip when absent).  Imported with the torchvision stand-in
  (tests/torchvision_stub.py, which has no __spec__) hidden, so transformers'
  cached availability probe sees no torchvision instead of raising."""
  hidden = {k: sys.modules.pop(k) for k in list(sys.modules)
            if k == "torchvision" or k.startswith("torchvision.")}
  try:
    tr = pytest.importorskip("transformers")
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
    tr.SamModel, tr.SamConfig  # resolve the lazy imports now  # noqa: B018
  finally:
    sys.modules.update(hidden)
  return tr


def _hf_config(ln_eps: float):
  tr = _import_transformers()
  cfg = SAM_CONFIGS["vit_tiny_test"]
  vision = tr.SamVisionConfig(hidden_size=cfg.encoder_embed_dim,
                              num_hidden_layers=cfg.encoder_depth,
                              num_attention_heads=cfg.encoder_num_heads,
                              global_attn_indexes=list(cfg.encoder_global_attn_indexes))
  # transformers' mask decoder defaults to layer_norm_eps=1e-6 in the two-way
  # transformer LayerNorms, where the original (and we) use PyTorch's 1e-5.
  dec = tr.SamMaskDecoderConfig(layer_norm_eps=ln_eps)
  return tr, tr.SamConfig(vision_config=vision.to_dict(), mask_decoder_config=dec.to_dict())


def _random_hf_model(ln_eps: float = 1e-5, seed: int = 0):
  tr, config = _hf_config(ln_eps)
  torch.manual_seed(seed)
  model = tr.SamModel(config).eval()
  # Re-draw every tensor: transformers 5 leaves weight matrices at ~1e-10 here
  # (deferred init), which would make every output a constant.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "pos_embed" in name or "rel_pos" in name:
        p.normal_(0.0, 0.5)
      elif "positional_embedding" in name or p.shape[0] == 1 or "mask_tokens" in name:
        p.normal_(0.0, 1.0)  # Fourier matrix (official scale 1), embeddings, tokens
      elif p.dim() == 1:
        p.copy_((1.0 if "layer_norm" in name and name.endswith("weight") else 0.0)
                + torch.randn_like(p) * 0.1)
      else:
        p.normal_(0.0, float(p[0].numel()) ** -0.5)  # fan-in scaled
  return model


def test_renamer_matches_transformers(official):
  """The test's renamer produces exactly the key set and shapes of a real SamModel,
  and HF loads the renamed official weights strictly."""
  model = _random_hf_model()
  hf_sd = model.state_dict()
  renamed = official_to_hf(official[1])
  assert set(renamed) == set(hf_sd)
  assert all(tuple(hf_sd[k].shape) == tuple(np.shape(v)) for k, v in renamed.items())
  model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in renamed.items()},
                        strict=True)


def test_save_pretrained_converts_identically(official, tmp_path):
  """official weights -> HF SamModel -> save_pretrained (single file and sharded)
  -> our converter == the official-path conversion."""
  model = _random_hf_model()
  model.load_state_dict({k: torch.as_tensor(np.array(v))
                         for k, v in official_to_hf(official[1]).items()}, strict=True)
  single, sharded = tmp_path / "single", tmp_path / "sharded"
  model.save_pretrained(single)
  model.save_pretrained(sharded, max_shard_size="3MB")
  assert os.path.exists(single / "model.safetensors")
  assert os.path.exists(sharded / "model.safetensors.index.json")
  for src in (single, single / "model.safetensors", sharded,
              sharded / "model.safetensors.index.json"):
    out = tmp_path / "out.safetensors"
    assert convert_sam.main(["-c", str(src), "-o", str(out), "-q", "--overwrite"]) == 0, src
    _, flat, meta = P.read_converted(str(out))
    assert meta["source_layout"] == "hf"
    _assert_same_params(flat, official[2])


def _hf_forward(model, emb_nchw, pts=None, lbl=None, box=None, mask=None, multimask=True):
  kw = {}
  if pts is not None:
    kw["input_points"] = torch.as_tensor(pts, dtype=torch.float32)[:, None]    # (B, 1, N, 2)
    kw["input_labels"] = torch.as_tensor(lbl, dtype=torch.int64)[:, None]      # (B, 1, N)
  if box is not None:
    kw["input_boxes"] = torch.as_tensor(box, dtype=torch.float32)[:, None]     # (B, 1, 4)
  if mask is not None:
    kw["input_masks"] = torch.as_tensor(mask, dtype=torch.float32)[:, None]    # (B, 1, 256, 256)
  with torch.no_grad():
    out = model(image_embeddings=emb_nchw, multimask_output=multimask, **kw)
  return out.pred_masks[:, 0].numpy(), out.iou_scores[:, 0].numpy()


def test_transformers_model_parity(tmp_path):
  """A randomly initialised transformers SamModel (independent implementation,
  own init) -> save_pretrained -> convert -> our outputs match HF's."""
  hf = _random_hf_model(ln_eps=1e-5, seed=1)
  hf.save_pretrained(tmp_path / "hf")
  out = tmp_path / "hf.safetensors"
  assert convert_sam.main(["-c", str(tmp_path / "hf"), "-o", str(out), "-q"]) == 0
  model = P.load_sam(str(out))
  x = np.random.RandomState(2).randn(1, 1024, 1024, 3).astype(np.float32)
  with torch.no_grad():
    emb_t = hf.get_image_embeddings(torch.from_numpy(x).permute(0, 3, 1, 2))
  emb_j = nnx.jit(lambda m, v: m.encode_image(v))(model, jnp.asarray(x))
  # The reference must not be degenerate: the embedding varies over the image.
  assert float(emb_t.std(dim=(2, 3)).mean()) > 0.1 * float(emb_t.abs().mean())
  errs = {"embedding": rel_err(emb_j, emb_t.permute(0, 2, 3, 1).numpy())}
  emb_j = jnp.asarray(emb_t.permute(0, 2, 3, 1).numpy())  # same decoder input for both
  pts = np.array([[[300.0, 200.0], [800.0, 900.0]]], np.float32)
  lbl = np.array([[1, 0]])
  box = np.array([[100.0, 150.0, 700.0, 600.0]], np.float32)
  mask = np.random.RandomState(3).randn(1, 256, 256).astype(np.float32) * 4
  cases = {"points/multi": dict(pts=pts, lbl=lbl), "box+points/multi": dict(pts=pts, lbl=lbl, box=box),
           "points+mask/single": dict(pts=pts, lbl=lbl, mask=mask, multimask=False)}
  for name, c in cases.items():
    m_t, iou_t = _hf_forward(hf, emb_t, **c)
    assert m_t.std(axis=(-1, -2)).min() > 0.1 * np.abs(m_t).mean(), name
    coords, labels = prompts.build_sparse_prompts(c.get("pts"), c.get("lbl"), c.get("box"))
    mi = None if c.get("mask") is None else jnp.asarray(c["mask"])
    m_j, iou_j = model.decode(emb_j, jnp.asarray(coords), jnp.asarray(labels), mi,
                              c.get("multimask", True))
    errs[name + " masks"] = rel_err(m_j, m_t)
    errs[name + " iou"] = rel_err(iou_j, iou_t)
  bad = {k: v for k, v in errs.items() if not v <= REL_TOL}
  assert not bad, f"over {REL_TOL}: {bad} (all: {errs})"
  # The HF default (layer_norm_eps 1e-6 in the decoder) is a different model by a
  # small, measurable amount: same weights, eps 1e-6 vs ours.
  hf6 = _random_hf_model(ln_eps=1e-6, seed=1)
  hf6.load_state_dict(hf.state_dict())
  m6, _ = _hf_forward(hf6, emb_t, pts=pts, lbl=lbl)
  m5, _ = _hf_forward(hf, emb_t, pts=pts, lbl=lbl)
  print(f"HF decoder eps 1e-6 vs 1e-5: rel err {rel_err(m6, m5):.2e}; ours vs HF(1e-5): {errs}")
