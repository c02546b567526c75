"""The ViT encoder's CPU code paths compute the official encoder.

Scanned blocks (`lax.scan` over the repeating window/global group), token
slices for the per-token matmuls and blocked attention must all give the
official PyTorch image encoder's embedding (random weights, perturbed
rel-pos tables), and the same numbers as the plain unrolled / unsliced
computation, with the parameter layout unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.reference import build_torch_sam, rel_err, state_dict_numpy

from aopsam_jax.sam import modeling
from aopsam_jax.sam.config import SAM_CONFIGS, SamConfig
from aopsam_jax.sam.params import build_model, convert_state_dict, encoder_fingerprint, flat_params

# Period 2 repeated twice (window, global, window, global); 16x16 tokens,
# padded to 28x28 for the 14-wide windows.
CFG = SamConfig(encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=4,
                encoder_global_attn_indexes=(1, 3), img_size=256)


@pytest.fixture(scope="module")
def setup():
  tsam = build_torch_sam(CFG, seed=5)
  _, params = convert_state_dict(state_dict_numpy(tsam))
  x = np.random.RandomState(0).randn(1, CFG.img_size, CFG.img_size, 3).astype(np.float32)
  with torch.no_grad():
    ref = tsam.image_encoder(torch.as_tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  return params, jnp.asarray(x), ref


def _encode(model, x):
  graphdef, state = nnx.split(model.image_encoder)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _set_logits_block(model, block: int):
  for _, m in nnx.iter_graph(model):
    if isinstance(m, modeling.EncoderAttention):
      m.logits_block = block


def test_block_period():
  period = lambda cfg: modeling.block_period(
      [0 if i in cfg.encoder_global_attn_indexes else 14 for i in range(cfg.encoder_depth)])
  assert [period(SAM_CONFIGS[k]) for k in ("vit_b", "vit_l", "vit_h")] == [3, 6, 8]
  assert period(CFG) == 2
  assert modeling.block_period([14, 0, 14, 14, 0]) == 5  # not periodic: one group
  assert modeling.attention_blocks(300, 196, 1 << 19) == (12, 196)  # vit_b windows
  assert modeling.attention_blocks(12, 4096, 1 << 19) == (1, 128)   # vit_b global


@pytest.mark.parametrize("token_tile,logits_block", [(None, 1 << 19), (64, 4096)],
                         ids=["default", "small-slices"])
def test_scanned_equals_unrolled_and_official(setup, token_tile, logits_block):
  params, x, ref = setup
  model = build_model(CFG, params)
  modeling.set_attention(model, "chunked")
  modeling.set_token_tile(model, token_tile)
  _set_logits_block(model, logits_block)
  enc = model.image_encoder
  modeling.set_scan_blocks(model, False)
  assert enc._scan_period() == 0
  unrolled = _encode(model, x)
  modeling.set_scan_blocks(model, True)
  assert enc._scan_period() == 2
  scanned = _encode(model, x)
  assert rel_err(scanned, unrolled) < 1e-6
  assert rel_err(unrolled, ref) < 1e-5 and rel_err(scanned, ref) < 1e-5


def test_token_slices_do_not_change_numbers(setup):
  """Slices of 64 tokens vs none, through windowed (padded) and global blocks."""
  params, x, _ = setup
  model = modeling.set_scan_blocks(build_model(CFG, params), False)
  modeling.set_attention(model, "chunked")
  modeling.set_token_tile(model, 0)
  whole = _encode(model, x)
  modeling.set_token_tile(model, 64)
  sliced = _encode(model, x)
  assert rel_err(sliced, whole) < 1e-6
  assert not np.allclose(whole, 0.0)


def test_switches_keep_the_parameter_layout(setup):
  params, _, _ = setup
  model = build_model(CFG, params)
  before = (sorted(flat_params(model)), encoder_fingerprint(model))
  modeling.set_scan_blocks(model, False)
  modeling.set_token_tile(model, 0)
  assert (sorted(flat_params(model)), encoder_fingerprint(model)) == before
  assert "image_encoder.blocks.3.attn.qkv.kernel" in before[0]


def test_attention_steps_do_not_change_numbers():
  """`_attend` in groups of heads, in blocks of queries and all at once: the
  same softmax(q k^T + rel-pos) v (a row of windows uses the last form, the
  global heads the second)."""
  att = modeling.EncoderAttention(32, 4, (4, 4), nnx.Rngs(0))
  rng = np.random.RandomState(1)
  att.rel_pos_h[...] = jnp.asarray(rng.randn(7, 8), jnp.float32)
  att.rel_pos_w[...] = jnp.asarray(rng.randn(7, 8), jnp.float32)
  q, k, v = (jnp.asarray(rng.randn(6, 16, 8), jnp.float32) for _ in range(3))
  rel = att.rel_tables(4, 4, jnp.float32)
  whole = att._attend(q, k, v, *rel, block=6 * 16 * 16)
  assert modeling.attention_blocks(6, 16, 6 * 16 * 16) == (6, 16)
  assert modeling.attention_blocks(6, 16, 2 * 16 * 16) == (2, 16)
  assert modeling.attention_blocks(6, 16, 4 * 16) == (1, 4)
  for block in (2 * 16 * 16, 4 * 16):
    np.testing.assert_allclose(att._attend(q, k, v, *rel, block=block), whole, rtol=1e-5, atol=1e-6)
  # the official formula, written out
  qs = np.asarray(q).reshape(6, 4, 4, 8)
  rh, rw = (np.asarray(t) for t in rel)
  logits = np.einsum("zqd,zkd->zqk", np.asarray(q) * att.scale, np.asarray(k))
  bias = (np.einsum("zhwd,hkd->zhwk", qs, rh)[..., :, None]
          + np.einsum("zhwd,wkd->zhwk", qs, rw)[..., None, :]).reshape(6, 16, 16)
  p = np.exp(logits + bias - (logits + bias).max(-1, keepdims=True))
  want = (p / p.sum(-1, keepdims=True)) @ np.asarray(v)
  np.testing.assert_allclose(np.asarray(whole), want, rtol=1e-5, atol=1e-5)
