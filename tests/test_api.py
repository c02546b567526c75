"""The public API at the package top: names, laziness, no torch needed."""

import importlib
import subprocess
import sys

import aopsam_jax


def test_public_names_are_the_library_objects():
  for name, (module, attr) in aopsam_jax._EXPORTS.items():
    assert getattr(aopsam_jax, name) is getattr(importlib.import_module(module), attr), name
  assert sorted(aopsam_jax.__all__) == sorted(aopsam_jax._EXPORTS)
  assert set(aopsam_jax.__all__) >= {"load_sam", "SamPredictor", "SamAutomaticMaskGenerator",
                                     "AopMaskGenerator", "load_bundle"}
  assert "SamPredictor" in dir(aopsam_jax)


def test_import_is_lazy_and_torch_free():
  """`import aopsam_jax` loads no JAX; every public name then resolves in a
  process where importing torch fails."""
  code = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Block())
import aopsam_jax
assert "jax" not in sys.modules, "import aopsam_jax imported jax"
for name in aopsam_jax.__all__:
  getattr(aopsam_jax, name)
assert "torch" not in sys.modules
try:
  aopsam_jax.no_such_name
except AttributeError as e:
  assert "no_such_name" in str(e)
else:
  raise AssertionError("unknown name resolved")
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_build_model_takes_a_model_type_name():
  """build_model("vit_tiny_test") is build_model(get_sam_config("vit_tiny_test"))
  (same seed, same weights); an unknown name or a wrong type is a clear error."""
  import numpy as np
  import pytest
  from flax import nnx

  by_name = aopsam_jax.build_model("vit_tiny_test", seed=3)
  by_cfg = aopsam_jax.build_model(aopsam_jax.get_sam_config("vit_tiny_test"), seed=3)
  a, b = nnx.to_flat_state(nnx.state(by_name)), nnx.to_flat_state(nnx.state(by_cfg))
  assert [p for p, _ in a] == [p for p, _ in b] and len(a) > 50
  for (_, va), (_, vb) in zip(a, b):
    np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]))
  with pytest.raises(ValueError, match="vit_x.*vit_b"):
    aopsam_jax.build_model("vit_x")
  with pytest.raises(TypeError, match="SamConfig or a model type"):
    aopsam_jax.build_model(3)
