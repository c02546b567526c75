"""The mask decoder's fast paths equal the official computation.

`DecoderAttention.tokens_to_image` / `image_to_tokens` fold the image-side
projections into the prompt tokens or compute them once for a shared image;
`MaskDecoder` decodes prompts in chunks.  Each is checked against the plain
official formula (`DecoderAttention.__call__`, itself parity-tested against
segment-anything in test_parity.py) on every branch, and the whole decoder
against the same decoder with the fast paths off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aopsam_jax.sam import modeling
from aopsam_jax.sam.config import get_sam_config
from aopsam_jax.sam.params import build_model
from aopsam_jax.sam.prompts import single_point_prompts


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _attention(seed=0):
  attn = modeling.DecoderAttention(64, 4, 2, nnx.Rngs(seed))
  for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):  # non-zero biases
    lin.bias[...] = jax.random.normal(jax.random.PRNGKey(seed + 7), lin.bias.shape)
  return attn


@pytest.mark.parametrize("n_tokens", [3, 12])  # 4 heads x 3 < 32 folds; 4 x 12 does not
@pytest.mark.parametrize("image_batch", [1, 5])
def test_tokens_to_image_equals_official(n_tokens, image_batch):
  attn = _attention()
  key = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(key[0], (5, n_tokens, 64))
  k = jax.random.normal(key[1], (image_batch, 300, 64)) * 2
  v = jax.random.normal(key[2], (image_batch, 300, 64))
  ref = attn(q, jnp.broadcast_to(k, (5, 300, 64)), jnp.broadcast_to(v, (5, 300, 64)))
  assert _rel(attn.tokens_to_image(q, k, v), ref) < 1e-5
  if image_batch == 1:
    kv = attn.project(attn.k_proj, k), attn.project(attn.v_proj, v)
    assert _rel(attn.tokens_to_image(q, k, v, kv), ref) < 1e-5
  # one prompt: the fold path
  assert _rel(attn.tokens_to_image(q[:1], k[:1], v[:1]), attn(q[:1], k[:1], v[:1])) < 1e-5


@pytest.mark.parametrize("n_tokens", [3, 12])
@pytest.mark.parametrize("image_batch", [1, 5])
def test_image_to_tokens_equals_official(n_tokens, image_batch):
  attn = _attention(1)
  key = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(key[0], (image_batch, 300, 64)) * 2
  k = jax.random.normal(key[1], (5, n_tokens, 64))
  v = jax.random.normal(key[2], (5, n_tokens, 64))
  ref = attn(jnp.broadcast_to(q, (5, 300, 64)), k, v)
  got = attn.image_to_tokens(q, k, v)
  assert got.shape == ref.shape and _rel(got, ref) < 1e-5
  if image_batch == 1:
    assert _rel(attn.image_to_tokens(q, k, v, attn.project(attn.q_proj, q)), ref) < 1e-5


def _official_transformer(tr, image, pe, tokens):
  """TwoWayTransformer with every attention through the official `__call__`."""
  b = tokens.shape[0]
  _, h, w, c = image.shape
  keys = jnp.broadcast_to(image.reshape(-1, h * w, c), (b, h * w, c))
  key_pe = pe.reshape(1, h * w, c)
  queries = tokens
  for layer in tr.layers:
    if layer.skip_first_layer_pe:
      queries = layer.self_attn(queries, queries, queries)
    else:
      qq = queries + tokens
      queries = queries + layer.self_attn(qq, qq, queries)
    queries = layer.norm1(queries)
    queries = layer.norm2(queries + layer.cross_attn_token_to_image(
        queries + tokens, keys + key_pe, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(keys + layer.cross_attn_image_to_token(
        keys + key_pe, queries + tokens, queries))
  queries = tr.norm_final_attn(queries + tr.final_attn_token_to_image(
      queries + tokens, keys + key_pe, keys))
  return queries, keys


def test_transformer_equals_official():
  sam = build_model(get_sam_config("vit_tiny_test"), seed=3)
  tr, pe = sam.mask_decoder.transformer, sam.prompt_encoder
  image = jax.random.normal(jax.random.PRNGKey(4), (1, 64, 64, 256))
  tokens = jax.random.normal(jax.random.PRNGKey(5), (6, 7, 256))
  ref_q, ref_k = _official_transformer(tr, image, pe.get_dense_pe(), tokens)
  q, k = tr(image, pe.get_dense_pe()[None], tokens)
  assert _rel(q, ref_q) < 1e-5 and _rel(k, ref_k) < 1e-5


def _decode(sam, chunk, emb, coords, labels, mask=None):
  sam.mask_decoder.prompt_chunk = chunk
  return jax.jit(lambda e, c, l, m: sam.decode(e, c, l, m, True))(emb, coords, labels, mask)


@pytest.mark.parametrize("chunk", [1, 3, "auto"])
def test_chunked_decode_equals_unchunked(chunk):
  sam = build_model(get_sam_config("vit_tiny_test"), seed=4)
  emb = jax.random.normal(jax.random.PRNGKey(6), (1, 64, 64, 256))
  pts = jnp.asarray(np.random.RandomState(0).uniform(0, 1000, (7, 2)), jnp.float32)
  coords, labels = single_point_prompts(pts)
  ref = _decode(sam, None, emb, coords, labels)
  got = _decode(sam, chunk, emb, coords, labels)
  assert got[0].shape == ref[0].shape == (7, 3, 256, 256)
  assert _rel(got[0], ref[0]) < 1e-5 and _rel(got[1], ref[1]) < 1e-5
  # per-prompt embeddings and mask inputs (no shared image): chunks of (src, tokens)
  masks = ref[0][:, 0]
  ref_m = _decode(sam, None, emb, coords, labels, masks)
  got_m = _decode(sam, chunk, emb, coords, labels, masks)
  assert _rel(got_m[0], ref_m[0]) < 1e-5


def test_prompt_chunk_setting_is_checked():
  with pytest.raises(ValueError, match="prompt_chunk"):
    modeling.resolve_prompt_chunk(0)
  assert modeling.resolve_prompt_chunk(None) is None


def test_padding_prompts_are_skipped():
  """num_valid: real prompts decode as before; chunks of padding only are zeros."""
  sam = build_model(get_sam_config("vit_tiny_test"), seed=5)
  emb = jax.random.normal(jax.random.PRNGKey(7), (1, 64, 64, 256))
  pts = jnp.asarray(np.random.RandomState(1).uniform(0, 1000, (8, 2)), jnp.float32)
  coords, labels = single_point_prompts(pts)
  sam.mask_decoder.prompt_chunk = 2
  ref = jax.jit(lambda e, c, l: sam.decode(e, c, l))(emb, coords, labels)
  got = jax.jit(lambda e, c, l, n: sam.decode(e, c, l, num_valid=n))(emb, coords, labels,
                                                                     np.int32(5))
  assert _rel(got[0][:5], ref[0][:5]) < 1e-6 and _rel(got[1][:5], ref[1][:5]) < 1e-6
  assert np.all(np.asarray(got[0][6:]) == 0) and np.all(np.asarray(got[1][6:]) == 0)
