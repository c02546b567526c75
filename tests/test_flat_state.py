"""Flat parameter I/O and config-from-dict: the one reader every weights file
and config goes through."""

import dataclasses
from typing import Tuple

import numpy as np
import pytest
from flax import nnx

from aopsam_jax.sam.config import config_from_dict
from aopsam_jax.sam.flat_state import count_params, flat_params, load_flat_params


class Two(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.b = nnx.Linear(4, 2, use_bias=False, rngs=rngs)


def test_round_trip_and_every_mistake_named():
  src, dst = Two(nnx.Rngs(0)), Two(nnx.Rngs(1))
  flat = flat_params(src)
  assert sorted(flat) == ["a.bias", "a.kernel", "b.kernel"]
  assert count_params(src) == 3 * 4 + 4 + 4 * 2 == sum(v.size for v in flat.values())
  load_flat_params(dst, flat)
  for k, v in flat_params(dst).items():
    np.testing.assert_array_equal(v, flat[k])
  with pytest.raises(ValueError, match=r"w.st lacks parameter\(s\) \['b.kernel'\]"):
    load_flat_params(dst, {k: v for k, v in flat.items() if k != "b.kernel"}, what="w.st")
  with pytest.raises(ValueError, match="unknown parameters: \\['c'\\]"):
    load_flat_params(dst, {**flat, "c": np.zeros(1)})
  with pytest.raises(KeyError, match=r"a.bias: weights file has \(5,\), model needs \(4,\)"):
    load_flat_params(dst, {**flat, "a.bias": np.zeros(5)}, error=KeyError)


@dataclasses.dataclass(frozen=True)
class Cfg:
  n: int = 1
  sizes: Tuple[int, ...] = (2, 3)


def test_config_from_dict():
  c = config_from_dict(Cfg, {"sizes": [4, 5]})
  assert c == Cfg(1, (4, 5)) and hash(c)  # lists from JSON become tuples
  with pytest.raises(ValueError, match=r"bundle.json: unknown Cfg fields \['m', 'z'\]"):
    config_from_dict(Cfg, {"z": 1, "m": 2, "n": 3}, "bundle.json")
