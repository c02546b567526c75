"""The library's `jit`: the CPU scheduler option, applied per backend."""

import jax
import jax.numpy as jnp
import numpy as np

from aopsam_jax.sam import amg, compile_options, predictor
from aopsam_jax.aop import pipeline
from aopsam_jax.sam.compile_options import CPU_COMPILER_OPTIONS, compiler_options, jit


def _loops(x, w, n=6):
  """n sequential lax.maps over token slices: the pattern of the encoder's blocks."""
  for _ in range(n):
    x = jax.lax.map(lambda t: jnp.tanh(t @ w), x.reshape(4, -1, x.shape[-1])).reshape(x.shape) + 1
  return x


def _temp_bytes(fn, *args) -> int:
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_cpu_scheduler_lets_loops_share_scratch_memory():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1024, 256)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(256, 256)) / 16, jnp.float32)
  plain, ours = jax.jit(_loops), jit(_loops)
  # XLA's default CPU schedule gives every loop its own output buffer
  # (1 MB each here); the memory-optimised one reuses them.
  assert _temp_bytes(plain, x, w) >= 5 * x.nbytes
  assert _temp_bytes(ours, x, w) <= 0.5 * _temp_bytes(plain, x, w)
  np.testing.assert_array_equal(np.asarray(ours(x, w)), np.asarray(plain(x, w)))


def test_jit_forwards_arguments_and_attributes():
  def f(x, *, k):
    """doc of f"""
    return x * k

  g = jit(f, static_argnames=("k",))
  assert g.__doc__ == "doc of f" and g.__wrapped__ is f
  assert float(g(jnp.float32(2), k=3)) == 6.0
  assert "mul" in g.lower(jnp.float32(2), k=3).as_text()
  assert g._cache_size() == 1  # forwarded to the jax.jit of this backend


def test_options_only_for_cpu():
  want = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  assert compiler_options("cpu") == want
  assert compiler_options("cpu") is not CPU_COMPILER_OPTIONS  # a copy: callers may edit it
  assert compiler_options("gpu") is None and compiler_options("tpu") is None
  if jax.default_backend() == "cpu":  # the test machines
    assert compiler_options() == want


def test_library_programs_use_it():
  for fn in (predictor.embed_fn, predictor.decode_fn, predictor.predict_fn,
             pipeline._segment_jit, amg._generate_jit, amg._decode_masks_jit):
    assert isinstance(fn, compile_options.jit), fn


def test_nested_in_user_jit_and_vmap():
  """Inside the user's own jit (where jax.jit refuses compiler options) and
  under vmap, the library's jit is a plain one: same numbers."""
  f = jit(lambda x: jnp.sin(x) * 2)
  x = jnp.arange(6.0).reshape(2, 3)
  want = np.sin(np.arange(6.0).reshape(2, 3)) * 2
  np.testing.assert_allclose(np.asarray(jax.jit(lambda x: f(x) + 1)(x)), want + 1, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(f)(x)), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(lambda x: f(x).sum())(x)),
                             2 * np.cos(np.arange(6.0).reshape(2, 3)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(f(x)), want, rtol=1e-6)
