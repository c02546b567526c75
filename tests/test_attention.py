"""Encoder attention implementations agree with each other and with the official model.

The official PyTorch image encoder (random weights, perturbed rel-pos tables)
is the reference; every `EncoderAttention.impl` available on CPU must
reproduce its embedding, through windowed blocks (padded 16 -> 28, 14x14
windows) and a global block larger than the query chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.reference import build_torch_sam, rel_err, state_dict_numpy

from aopsam_jax.sam import cpu_kernels, modeling
from aopsam_jax.sam.config import SamConfig
from aopsam_jax.sam.params import build_model, convert_state_dict

CFG = SamConfig(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                encoder_global_attn_indexes=(1,), img_size=256)


# Every implementation this machine can run ("cpu_kernel" needs AVX-512 and a compiler).
IMPLS = ["chunked", "xla"] + (["cpu_kernel"] if cpu_kernels.enabled() else [])


@pytest.fixture(scope="module")
def models():
  tsam = build_torch_sam(CFG, seed=3)
  _, params = convert_state_dict(state_dict_numpy(tsam))
  return tsam, params


def _pixels(seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randn(1, CFG.img_size, CFG.img_size, 3).astype(np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_matches_official(models, impl):
  tsam, params = models
  x = _pixels(0)
  with torch.no_grad():
    ref = tsam.image_encoder(torch.as_tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  model = build_model(CFG, params)
  modeling.set_attention(model, impl)
  assert modeling.attention_impl(model) == impl
  ours = nnx.jit(lambda m, p: m.encode_image(p))(model, jnp.asarray(x))
  assert rel_err(ours, ref) < 1e-5


def test_fused_equals_chunked_on_one_block(models):
  """Global attention over 16x16 tokens (> one 64-row query chunk), batch 2."""
  _, params = models
  model = build_model(CFG, params)
  attn = model.image_encoder.blocks[1].attn
  x = jnp.asarray(np.random.RandomState(1).randn(2, 16, 16, 64).astype(np.float32))
  attn.impl = "chunked"
  a = attn(x)
  attn.impl = "xla"
  b = attn(x)
  assert rel_err(b, a) < 1e-6
  assert not np.allclose(np.asarray(a), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_windowed_block_matches_official(models, impl):
  """One windowed block (official `Block`) on batch 2 of 17x30 tokens: 2x3
  windows of 14, padded in rows and columns (the chunked path's row-of-windows
  loop and its bias-filled padding)."""
  tsam, params = models
  model = build_model(CFG, params)
  block = model.image_encoder.blocks[0]
  assert block.window_size == 14
  block.attn.impl = impl
  x = np.random.RandomState(2).randn(2, 17, 30, 64).astype(np.float32)
  with torch.no_grad():
    ref = tsam.image_encoder.blocks[0](torch.as_tensor(x)).numpy()
  ours = nnx.jit(lambda b, x: b(x))(block, jnp.asarray(x))
  assert rel_err(ours, ref) < 1e-6


def test_sam_constructor_and_bad_name():
  m = nnx.eval_shape(lambda: modeling.Sam(CFG, rngs=nnx.Rngs(0), attention="xla"))
  assert modeling.attention_impl(m) == "xla"
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    modeling.set_attention(m, "flash")


def test_predictor_split_keeps_attention(models):
  from aopsam_jax.sam.predictor import split_sam
  _, params = models
  model = modeling.set_attention(build_model(CFG, params), "xla")
  graphdef, state = split_sam(model, jnp.bfloat16)
  merged = nnx.merge(graphdef, state)
  assert modeling.attention_impl(merged) == "xla"
  assert merged.image_encoder.blocks[0].attn.qkv.dtype == jnp.bfloat16



def test_auto_is_the_default_and_resolves_per_backend():
  m = nnx.eval_shape(lambda: modeling.Sam(CFG, rngs=nnx.Rngs(0)))
  assert modeling.attention_impl(m) == "auto"
  if jax.default_backend() == "cpu":
    expected = "cpu_kernel" if cpu_kernels.enabled() else "chunked"
    assert modeling.resolve_attention("auto") == expected
  assert modeling.resolve_attention("cudnn") == "cudnn"
