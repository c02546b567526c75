"""SAM architecture configurations (values from the official `build_sam.py`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """Hyper-parameters of one SAM variant.

  The defaults are the shared values of the official `build_sam.py`; the
  encoder fields differ between vit_b / vit_l / vit_h.
  """

  encoder_embed_dim: int = 768
  encoder_depth: int = 12
  encoder_num_heads: int = 12
  encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
  img_size: int = 1024
  patch_size: int = 16
  window_size: int = 14
  mlp_ratio: float = 4.0
  prompt_embed_dim: int = 256
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_mlp_dim: int = 2048
  decoder_num_heads: int = 8
  num_multimask_outputs: int = 3
  iou_head_hidden_dim: int = 256
  iou_head_depth: int = 3
  mask_threshold: float = 0.0

  @property
  def embed_size(self) -> int:
    """Side of the square image embedding (64 for a 1024 input)."""
    return self.img_size // self.patch_size

  @property
  def low_res_size(self) -> int:
    """Side of the low-resolution mask logits (256 for a 1024 input)."""
    return 4 * self.embed_size

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "SamConfig":
    d = json.loads(text)
    d["encoder_global_attn_indexes"] = tuple(d["encoder_global_attn_indexes"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown SamConfig fields {sorted(unknown)}")
    return cls(**d)


SAM_CONFIGS = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    # Small variants for tests and CPU experiments.  `vit_tiny_test` keeps the 1024
    # input (so the prompt / mask geometry is the real one) but has a thin,
    # shallow encoder.
    "vit_tiny_test": SamConfig(64, 2, 2, (1,)),
}


def get_sam_config(name: str) -> SamConfig:
  try:
    return SAM_CONFIGS[name]
  except KeyError:
    raise ValueError(f"unknown SAM model type {name!r}; expected one of {sorted(SAM_CONFIGS)}") from None
