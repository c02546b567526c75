"""MobileSAM (`vit_t`, TinyViT-5M encoder): conversion and numerical parity, float32.

The reference is MobileSAM's own code (`mobilesam-mirror`): random weights
with perturbed BatchNorm statistics and attention biases, saved with
`torch.save(state_dict)` like `mobile_sam.pt`, converted by the converter CLI
with shape auto-detection, compared with MobileSAM's `SamPredictor` and,
stage by stage, with its TinyViT.  Bounds as in test_parity.py.

One reference model and one conversion for the module; the 1024 input is
what the architecture requires (TinyViT's neck reshapes to 64 x 64), so each
encoder pass costs a few seconds on a 2-core CPU.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.mobile_sam_reference import SamPredictor, build_torch_mobile_sam
from tests.reference import rel_err, state_dict_numpy
from tests.test_parity import (REL_TOL, OurPredictor, convert_torch_model, prompt_cases,
                               run_cases, sample_image)

import torch  # noqa: E402  (after the reference installed its stand-ins)

from aopsam_jax.sam import params as P  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS, SamConfig  # noqa: E402

KEYS_TXT = os.path.join(os.path.dirname(__file__), "fixtures", "mobile_sam_vit_t_keys.txt")


@pytest.fixture(scope="module")
def mobile_sam(tmp_path_factory):
  """(torch MobileSAM, converted .safetensors path, our predictor, MobileSAM's predictor).

  MobileSAM's predictor has the sample image set (its one encoder pass);
  forward hooks keep every encoder stage's input and output of that pass.
  """
  sam = build_torch_mobile_sam(seed=3)
  out = convert_torch_model(sam, tmp_path_factory.mktemp("mobile_sam"), "mobile_sam")
  ours = OurPredictor(P.load_sam(out))
  enc = sam.image_encoder
  stages = [enc.patch_embed] + list(enc.layers) + [enc.neck]
  io = []
  hooks = [m.register_forward_hook(lambda m, i, o: io.append((i[0], o))) for m in stages]
  pred = SamPredictor(sam)
  pred.set_image(sample_image())
  for h in hooks:
    h.remove()
  assert len(io) == len(stages)
  pred.stage_io = io
  return sam, out, ours, pred


def expected_keys():
  """(key, shape, dtype) of the released mobile_sam.pt."""
  rows = []
  with open(KEYS_TXT) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      key, rest = line.split(" ", 1)
      shape, dtype = rest.rsplit(" ", 1)
      rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip()),
                   dtype.strip()))
  return rows


def test_reference_state_dict_is_the_release_layout(mobile_sam):
  sam = mobile_sam[0]
  got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
         for k, v in sam.state_dict().items()]
  assert got == expected_keys()


def test_conversion_accounts_for_every_key(mobile_sam):
  sam, out = mobile_sam[:2]
  sd = state_dict_numpy(sam)
  cfg, flat = P.convert_state_dict(sd)
  assert cfg == SAM_CONFIGS["vit_t"] and cfg.encoder_kind == "tiny_vit"
  ignored = {k for k in sd if P.map_key(k) is None}
  # only the BatchNorm step counters and the unused classifier head carry nothing
  assert all(k.endswith("num_batches_tracked") or ".head." in k or ".norm_head." in k
             for k in ignored), sorted(ignored)[:5]
  assert len(ignored) == 27 + 4
  assert sum(v.size for v in flat.values()) == sum(
      v.size for k, v in sd.items() if k not in ignored)
  # BatchNorm statistics and attention biases arrive as saved (conv kernels as HWIO)
  np.testing.assert_array_equal(
      flat["image_encoder.layers.2.blocks.5.attn.attention_biases"],
      sd["image_encoder.layers.2.blocks.5.attn.attention_biases"])
  np.testing.assert_array_equal(flat["image_encoder.layers.0.downsample.conv2.var"],
                                sd["image_encoder.layers.0.downsample.conv2.bn.running_var"])
  cfg2, back, meta = P.read_converted(out)
  assert cfg2 == cfg and meta["model_type"] == "vit_t" and set(back) == set(flat)
  # a key the model does not have is refused by name
  with pytest.raises(P.CheckpointError, match="layers.1.blocks.0.attn.extra"):
    P.convert_state_dict({**sd, "image_encoder.layers.1.blocks.0.attn.extra": np.zeros(3)})
  # a missing BatchNorm statistic is reported as missing
  del sd["image_encoder.layers.3.blocks.1.local_conv.bn.running_mean"]
  with pytest.raises(P.CheckpointError, match=r"layers\.3\.blocks\.1\.local_conv\.mean"):
    P.convert_state_dict(sd)


def test_config_json_round_trip_and_vit_fingerprint_unchanged():
  cfg = SAM_CONFIGS["vit_t"]
  assert SamConfig.from_json(cfg.to_json()) == cfg
  # ViT configs serialise without the TinyViT field: converted files and
  # encoder fingerprints of existing models stay the same.
  assert "tiny_vit" not in SAM_CONFIGS["vit_b"].to_json()
  assert SamConfig.from_json(SAM_CONFIGS["vit_b"].to_json()) == SAM_CONFIGS["vit_b"]


def _nhwc(t: torch.Tensor, hw: int) -> np.ndarray:
  """A reference activation ((B, C, H, W) or TinyViT's flat (B, H*W, C)) as NHWC."""
  t = t.detach().numpy()
  return t.reshape(t.shape[0], hw, hw, -1) if t.ndim == 3 else t.transpose(0, 2, 3, 1)


def test_encoder_stage_by_stage(mobile_sam):
  """Each TinyViT stage on the reference's own input to it (no error carry-over)."""
  _, _, ours, pred = mobile_sam
  enc = ours.model.image_encoder
  neck = lambda e, h: e.neck_ln2(e.neck_conv2(e.neck_ln1(e.neck_conv1(h))))  # noqa: E731
  stages = [lambda e, h: e.patch_embed(h)] + [
      (lambda e, h, i=i: e.layers[i](h)) for i in range(len(enc.layers))] + [neck]
  sizes_in, sizes_out = (1024, 256, 128, 64, 64, 64), (256, 128, 64, 64, 64, 64)
  for i, (fn, (x, y)) in enumerate(zip(stages, pred.stage_io)):
    # the reference's last stage and neck see (B, 4096, C) viewed as 64 x 64
    got = np.asarray(nnx.jit(fn)(enc, jnp.asarray(_nhwc(x, sizes_in[i]))))
    want = _nhwc(y, sizes_out[i])
    assert got.shape == want.shape, (i, got.shape, want.shape)
    err = rel_err(got, want)
    assert err <= REL_TOL, f"stage {i}: rel err {err:.2e}"


def test_predictor_parity(mobile_sam):
  """Embedding, low-res logits, IoU and masks against MobileSAM's SamPredictor."""
  _, _, ours, pred = mobile_sam
  image = sample_image()
  emb = ours.set_image(image)
  e = rel_err(emb, pred.features.numpy().transpose(0, 2, 3, 1))
  assert e <= REL_TOL, f"embedding rel err {e:.2e}"
  h, w = image.shape[:2]
  # the decoder is SAM's (test_parity.py covers every prompt kind): three kinds here
  cases = [c for c in prompt_cases(h, w, seed=5)
           if c[0] in ("point/multi", "point+mask/single", "box+point/multi")]
  run_cases(ours, pred, cases, "vit_t sample.jpg")


def test_segment_loads_mobile_sam_pth_without_model_type(mobile_sam):
  """`segment --checkpoint mobile_sam.pt` needs no --model-type: the shapes say vit_t."""
  from aopsam_jax import segment
  out = mobile_sam[1]
  pth = os.path.splitext(out)[0] + ".pth"
  args = segment.build_parser().parse_args(["--checkpoint", pth])
  assert args.model_type is None
  model, weights = segment.load_model(args.checkpoint, args.model_type)
  assert model.config == SAM_CONFIGS["vit_t"] and weights == os.path.basename(pth)
  ref = P.flat_params(P.load_sam(out))
  got = P.flat_params(model)
  assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
  assert "vit_t" in segment.build_parser().parse_args(["--model-type", "vit_t"]).model_type


@pytest.mark.slow
def test_segment_cli_aop_and_amg_with_mobile_sam_pth(mobile_sam, tmp_path):
  """End to end: the CLI on the MobileSAM-format file, AoP-SAM and grid AMG."""
  from aopsam_jax import segment
  from aopsam_jax.sam.image_io import sample_image_path
  pth = os.path.splitext(mobile_sam[1])[0] + ".pth"
  for mode, extra in (("aop", []), ("amg", ["--points-per-side", "4"])):
    # permissive thresholds: random weights give no mask past the official ones (exit 1)
    rc = segment.main([sample_image_path(), "--checkpoint", pth, "--mode", mode,
                       "--out", str(tmp_path / mode), "--pred-iou-thresh", "-1",
                       "--stability-score-thresh", "0"] + extra)
    assert rc == 0
    with open(tmp_path / mode / "sample.json") as f:
      assert json.load(f), mode
