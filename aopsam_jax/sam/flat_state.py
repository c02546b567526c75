"""Flat parameter dicts of NNX modules.

`{dotted NNX path: numpy array}` of a module's `nnx.Param` leaves is the
on-disk layout of converted SAM weights (`params.save_converted`) and of
prompt predictor weights (`prompt_predictor.save_predictor`); one reader
and one writer serve both, checking every name and shape.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

def variable_value(var):
  """The array of an nnx.Variable."""
  return var.get_value() if hasattr(var, "get_value") else var.value  # flax >= / < 0.12


def _key(path) -> str:
  return ".".join(str(p) for p in path)


def flat_params(module: nnx.Module) -> Dict[str, np.ndarray]:
  """{dotted NNX path: numpy array} of a module's nnx.Param leaves."""
  return {_key(path): np.asarray(variable_value(v))
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def load_flat_params(module: nnx.Module, params: Mapping[str, np.ndarray], *,
                     what: str = "weights file", error: Type[Exception] = ValueError,
                     dtype: Optional[Any] = None) -> nnx.Module:
  """Write flat params into `module` (in place).  Every parameter must be
  present with its shape and nothing else may be: otherwise `error` names
  the offending keys and `what` they came from.  `dtype` casts (None keeps
  the stored dtype)."""
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  names = {_key(path) for path, _ in flat}
  missing = sorted(names - set(params))
  if missing:
    raise error(f"{what} lacks parameter(s) {missing[:10]}")
  extra = sorted(set(params) - names)
  if extra:
    raise error(f"{what} has unknown parameters: {extra[:10]}")
  updated = []
  for path, var in flat:
    key = _key(path)
    value = np.asarray(params[key])
    if tuple(value.shape) != tuple(var.shape):
      raise error(f"parameter {key}: {what} has {value.shape}, model needs {tuple(var.shape)}")
    updated.append((path, var.replace(jnp.asarray(value, dtype))))
  nnx.update(module, nnx.from_flat_state(updated))
  return module


def count_params(module: nnx.Module) -> int:
  """Number of scalars in the module's nnx.Param leaves."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
