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
