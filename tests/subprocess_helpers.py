"""Shared pieces of the tests that start child Python processes."""

import socket

# Prepended to a child's code: behave as if torch (and what needs it) were not installed.
BLOCK_TORCH = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "torchvision", "segment_anything", "transformers"):
      raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def free_port() -> int:
  """A localhost TCP port nobody listens on (for jax.distributed coordinators)."""
  s = socket.socket()
  s.bind(("localhost", 0))
  port = s.getsockname()[1]
  s.close()
  return port
