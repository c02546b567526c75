"""Frame geometry: the maps invert the official `apply_coords` and agree on
numpy and jax inputs; the valid low-res region matches a brute-force count."""

import jax
import jax.numpy as jnp
import numpy as np

from aopsam_jax.sam import geometry
from aopsam_jax.sam.transforms import apply_coords, get_preprocess_shape


def test_round_trip_through_the_official_apply_coords():
  rng = np.random.default_rng(0)
  for h0, w0 in ((480, 640), (1000, 333), (17, 2048)):
    xy = rng.uniform(0, 1, (20, 2)) * [w0, h0]
    ihw = get_preprocess_shape(h0, w0, 1024)
    assert geometry.input_hw(h0, w0) == ihw
    xy_in = apply_coords(xy, (h0, w0), ihw)
    np.testing.assert_allclose(
        geometry.heatmap_to_original(xy_in / geometry.LOW_RES_STRIDE, h0, w0), xy, rtol=1e-9)
    back_np = geometry.input_to_original(xy_in, np.array(ihw), np.array([h0, w0]))
    back_jx = jax.jit(geometry.input_to_original)(jnp.asarray(xy_in, jnp.float32),
                                                  jnp.array(ihw), jnp.array([h0, w0]))
    np.testing.assert_allclose(back_np, xy, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(back_jx), xy, rtol=1e-5, atol=1e-3)


def test_low_res_grid():
  assert geometry.low_res_size(1024) == 256
  c = geometry.low_res_centres(256)
  assert c[0] == 2.0 and c[-1] == 1022.0
  for ih, iw in ((768, 1024), (1024, 5), (1, 1)):
    region = np.asarray(geometry.low_res_valid_region(jnp.array([ih, iw]), 256, 1024))
    # a low-res pixel is valid when its first input row / column is inside the image
    ref = np.zeros((256, 256), bool)
    ref[: -(-ih // 4), : -(-iw // 4)] = True
    np.testing.assert_array_equal(region, ref)
