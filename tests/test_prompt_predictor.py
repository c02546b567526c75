"""Prompt Predictor, peaks and loss against numpy references."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from aopsam_jax.aop.peaks import extract_peaks
from aopsam_jax.sam.flat_state import count_params
from aopsam_jax.aop.prompt_predictor import (PromptPredictor, PromptPredictorConfig,
                                         downsample_image, forward_flops, load_predictor,
                                         predictor_inputs, save_predictor)
from aopsam_jax.trainer.losses import focal_loss

SMALL = PromptPredictorConfig(img_channels=(4, 8, 8), embed_proj=8, hidden=8, dec_channels=(8, 4),
                              norm_groups=4)


def test_shapes_params_flops():
  m = PromptPredictor(rngs=nnx.Rngs(0))
  n = count_params(m)
  assert 50_000 < n < 5_000_000
  flops = forward_flops(m)
  assert 1e8 < flops < 2e10
  e = jax.random.normal(jax.random.key(0), (2, 64, 64, 256))
  im = jax.random.normal(jax.random.key(1), (2, 256, 256, 3))
  out = m(e, im)
  assert out.shape == (2, 256, 256) and out.dtype == jnp.float32
  # head starts at the focal prior
  np.testing.assert_allclose(float(out.mean()), -4.6, atol=0.05)
  # both branches influence the output
  assert float(jnp.abs(m(e * 0, im) - out).max()) > 0
  assert float(jnp.abs(m(e, im * 0) - out).max()) > 0


def test_downsample_image():
  x = np.random.default_rng(0).normal(size=(2, 1024, 1024, 3)).astype(np.float32)
  ref = x.reshape(2, 256, 4, 256, 4, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(downsample_image(x)), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(downsample_image(x))[1, 7, 9],
                             x[1, 28:32, 36:40].mean(axis=(0, 1)), rtol=1e-5)


def test_predictor_inputs_against_numpy():
  """Normalise with SAM's pixel mean/std, zero outside the valid size, then the
  encoder on that and a 4x area mean of it."""
  rng = np.random.default_rng(0)
  padded = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  hw = np.array([[40, 64], [64, 24]], np.int32)
  mean = np.array([123.675, 116.28, 103.53])
  std = np.array([58.395, 57.12, 57.375])
  x = (padded - mean) / std
  for b, (h, w) in enumerate(hw):
    x[b, h:] = 0
    x[b, :, w:] = 0
  encoder = lambda p: p[:, ::16, ::16, :2] * 2.0  # any function of the preprocessed pixels
  emb, small = predictor_inputs(encoder, jnp.asarray(padded), jnp.asarray(hw))
  assert emb.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(emb), x[:, ::16, ::16, :2] * 2.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(small), x.reshape(2, 16, 4, 16, 4, 3).mean(axis=(2, 4)),
                             rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tmp_path):
  m = PromptPredictor(SMALL, rngs=nnx.Rngs(3))
  save_predictor(str(tmp_path / "p"), m, metadata={"note": "x"})
  m2, cfg = load_predictor(str(tmp_path / "p"))
  assert cfg == SMALL
  e = jnp.ones((1, 64, 64, 256)); im = jnp.ones((1, 256, 256, 3))
  np.testing.assert_array_equal(np.asarray(m(e, im)), np.asarray(m2(e, im)))


def _ref_peaks(h, k, kernel, threshold):
  """Brute force: a pixel is a peak if no neighbour in the window beats it
  (greater, or equal with a smaller row-major index); sort by (-score, index)."""
  b, H, W = h.shape
  r = kernel // 2
  out = []
  for bi in range(b):
    cand = []
    for i in range(H):
      for j in range(W):
        v = h[bi, i, j]
        ok = np.isfinite(v) and (threshold is None or v > threshold)
        for di in range(-r, r + 1):
          for dj in range(-r, r + 1):
            ii, jj = i + di, j + dj
            if (di or dj) and 0 <= ii < H and 0 <= jj < W:
              u = h[bi, ii, jj]
              if u > v or (u == v and ii * W + jj < i * W + j):
                ok = False
        if ok:
          cand.append((-v, i * W + j))
    cand.sort()
    out.append(cand[:k])
  return out


@pytest.mark.parametrize("kernel,threshold,quant,special", [
    (3, None, None, False), (5, None, None, False), (3, 0.3, None, False), (3, None, 4, False),
    (11, None, None, False), (11, None, 4, True), (1, None, 4, True), (7, 0.2, 8, True)])
def test_extract_peaks_matches_bruteforce(kernel, threshold, quant, special):
  rng = np.random.default_rng(kernel)
  h = rng.random((2, 12, 15)).astype(np.float32)
  if quant:  # many ties / plateaus
    h = np.round(h * quant) / quant
  if special:  # NaN is never a peak nor beats one; -inf never a peak; +inf beats all
    flat = h.reshape(-1)
    flat[rng.choice(flat.size, 12, replace=False)] = [np.nan] * 4 + [-np.inf] * 4 + [np.inf] * 4
  k = 40
  coords, scores, valid = jax.jit(extract_peaks, static_argnums=(1, 2, 3))(h, k, kernel, threshold)
  ref = _ref_peaks(h, k, kernel, threshold)
  for bi in range(2):
    n = len(ref[bi])
    assert int(valid[bi].sum()) == n and bool(valid[bi, :n].all())
    idx = np.array([p for _, p in ref[bi]])
    np.testing.assert_array_equal(np.asarray(coords[bi, :n, 0]), idx % 15 + 0.5)
    np.testing.assert_array_equal(np.asarray(coords[bi, :n, 1]), idx // 15 + 0.5)
    np.testing.assert_array_equal(np.asarray(scores[bi, :n]), [-s for s, _ in ref[bi]])
    assert np.all(np.isneginf(np.asarray(scores[bi, n:])))
    assert np.all(np.asarray(coords[bi, n:]) == 0)


def test_plateau_gives_one_peak():
  h = np.zeros((1, 8, 8), np.float32)
  h[0, 2:5, 3:6] = 1.0
  coords, scores, valid = extract_peaks(h, 3, threshold=0.5)
  assert valid.tolist() == [[True, False, False]]
  assert coords[0, 0].tolist() == [3.5, 2.5]  # first pixel of the plateau, centre convention


def _np_focal(logits, target, weight, a=2.0, b=4.0):
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  pos = (target >= 1 - 1e-4) & (weight > 0)
  l = np.where(pos, -(1 - p) ** a * np.log(p),
               -(1 - target) ** b * p ** a * np.log(1 - p) * weight)
  return l.sum() / max(pos.sum(), 1)


def test_focal_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 16, 16)).astype(np.float32)
  target = rng.random((2, 16, 16)).astype(np.float32) * 0.9
  target[0, 3, 4] = target[1, 8, 8] = target[1, 0, 0] = 1.0
  weight = (rng.random((2, 16, 16)) > 0.2).astype(np.float32)
  weight[1, 0, 0] = 0.0  # an ignored positive does not count
  loss, npos = focal_loss(jnp.asarray(logits), jnp.asarray(target), jnp.asarray(weight))
  assert float(npos) == 2
  np.testing.assert_allclose(float(loss), _np_focal(logits, target, weight), rtol=1e-5)
