"""The mask decoder's fast paths equal the official computation.

`DecoderAttention.tokens_to_image` / `image_to_tokens` fold the image-side
projections into the prompt tokens or compute them once for a shared image;
`MaskDecoder` decodes prompts in chunks and skips padding.  The attention
branches and the two-way transformer are checked against the official
segment-anything modules (same weights); chunking and padding against the
unchunked decoder, which test_parity.py checks against segment-anything.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import build_torch_sam, state_dict_numpy

import torch  # noqa: E402  (after tests.reference installed the torchvision stand-in)
from segment_anything.modeling.transformer import Attention  # noqa: E402

from aopsam_jax.sam import modeling  # noqa: E402
from aopsam_jax.sam.config import get_sam_config  # noqa: E402
from aopsam_jax.sam.params import build_model, convert_state_dict  # noqa: E402
from aopsam_jax.sam.prompts import single_point_prompts  # noqa: E402


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _attention_pair(seed=0):
  """The official `Attention(64, 4, downsample_rate=2)` with random weights and
  biases, and ours holding the same weights."""
  torch.manual_seed(seed)
  ref = Attention(64, 4, downsample_rate=2).eval()
  ours = modeling.DecoderAttention(64, 4, 2, nnx.Rngs(seed))
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    lt, lj = getattr(ref, name), getattr(ours, name)
    with torch.no_grad():
      lt.bias.normal_()
    lj.kernel[...] = jnp.asarray(lt.weight.detach().numpy().T)
    lj.bias[...] = jnp.asarray(lt.bias.detach().numpy())
  return ref, ours


def _official(ref, q, k, v):
  b = max(q.shape[0], k.shape[0])
  t = [torch.from_numpy(np.broadcast_to(np.asarray(x), (b,) + x.shape[1:]).copy())
       for x in (q, k, v)]
  with torch.no_grad():
    return ref(*t).numpy()


@pytest.mark.parametrize("n_tokens", [3, 12])  # 4 heads x 3 < 32 folds; 4 x 12 does not
@pytest.mark.parametrize("image_batch", [1, 5])
def test_tokens_to_image_equals_official(n_tokens, image_batch):
  ref, attn = _attention_pair()
  key = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(key[0], (5, n_tokens, 64))
  k = jax.random.normal(key[1], (image_batch, 300, 64)) * 2
  v = jax.random.normal(key[2], (image_batch, 300, 64))
  want = _official(ref, q, k, v)
  assert _rel(attn.tokens_to_image(q, k, v), want) < 1e-5
  if image_batch == 1:
    kv = attn.project(attn.k_proj, k), attn.project(attn.v_proj, v)
    assert _rel(attn.tokens_to_image(q, k, v, kv), want) < 1e-5
  # one prompt: the fold path
  assert _rel(attn.tokens_to_image(q[:1], k[:1], v[:1]), _official(ref, q[:1], k[:1], v[:1])) < 1e-5


@pytest.mark.parametrize("n_tokens", [3, 12])
@pytest.mark.parametrize("image_batch", [1, 5])
def test_image_to_tokens_equals_official(n_tokens, image_batch):
  ref, attn = _attention_pair(1)
  key = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(key[0], (image_batch, 300, 64)) * 2
  k = jax.random.normal(key[1], (5, n_tokens, 64))
  v = jax.random.normal(key[2], (5, n_tokens, 64))
  want = _official(ref, q, k, v)
  got = attn.image_to_tokens(q, k, v)
  assert got.shape == want.shape and _rel(got, want) < 1e-5
  if image_batch == 1:
    assert _rel(attn.image_to_tokens(q, k, v, attn.project(attn.q_proj, q)), want) < 1e-5


def test_transformer_equals_official():
  """Several prompts on one image: the shared-image and folded paths of every
  block against the official TwoWayTransformer (its repeated image)."""
  cfg = get_sam_config("vit_tiny_test")
  sam_t = build_torch_sam(cfg, seed=3)
  sam = build_model(*convert_state_dict(state_dict_numpy(sam_t), cfg))
  tr, pe = sam.mask_decoder.transformer, sam.prompt_encoder
  image = np.random.RandomState(4).randn(1, 64, 64, 256).astype(np.float32)
  tokens = np.random.RandomState(5).randn(6, 7, 256).astype(np.float32)
  q, k = tr(jnp.asarray(image), pe.get_dense_pe()[None], jnp.asarray(tokens))
  with torch.no_grad():
    img_t = torch.from_numpy(np.repeat(image, 6, 0)).permute(0, 3, 1, 2)
    ref_q, ref_k = sam_t.mask_decoder.transformer(img_t, sam_t.prompt_encoder.get_dense_pe(),
                                                  torch.from_numpy(tokens))
  assert _rel(q, ref_q.numpy()) < 1e-5 and _rel(k, ref_k.numpy()) < 1e-5


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
