"""SAM architecture configurations (values from the official `build_sam.py`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Tuple, Type, TypeVar

C = TypeVar("C")


def config_from_dict(cls: Type[C], d: Mapping[str, Any], what: str = "") -> C:
  """Dataclass `cls` from a (JSON) dict: unknown keys raise ValueError naming
  them; lists become tuples (JSON has no tuples, frozen configs need them
  hashable).  Missing keys take the dataclass defaults."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{what + ': ' if what else ''}unknown {cls.__name__} fields {unknown}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class TinyViTConfig:
  """MobileSAM's TinyViT image encoder (`tiny_vit_sam.py`, values of `build_sam_vit_t`).

  Stage 0 is MBConv blocks, stages 1.. windowed attention; a patch merging
  follows every stage but the last.  The patch embedding divides the input by
  4 and every merging but the last by 2 (the last keeps the resolution), so
  the embedding grid is img_size / 16 as for the ViT.
  """

  embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
  depths: Tuple[int, ...] = (2, 2, 6, 2)
  num_heads: Tuple[int, ...] = (2, 4, 5, 10)
  window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
  mlp_ratio: float = 4.0
  mbconv_expand_ratio: float = 4.0
  local_conv_size: int = 3


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
  # None: the SAM ViT above; else MobileSAM's TinyViT (the encoder_* ViT
  # fields are then unused).
  tiny_vit: Optional[TinyViTConfig] = None

  @property
  def encoder_kind(self) -> str:
    """'vit' (SAM ViT-B/L/H) or 'tiny_vit' (MobileSAM)."""
    return "vit" if self.tiny_vit is None else "tiny_vit"

  def encoder_summary(self) -> str:
    """The encoder's shape in words, for logs and error messages."""
    t = self.tiny_vit
    if t is None:
      return (f"ViT embed {self.encoder_embed_dim}, depth {self.encoder_depth}, global "
              f"{list(self.encoder_global_attn_indexes)}, input {self.img_size}")
    return (f"TinyViT dims {list(t.embed_dims)}, depths {list(t.depths)}, heads "
            f"{list(t.num_heads)}, windows {list(t.window_sizes)}, input {self.img_size}")

  @property
  def embed_size(self) -> int:
    """Side of the square image embedding (64 for a 1024 input)."""
    return self.img_size // self.patch_size

  @property
  def low_res_size(self) -> int:
    """Side of the low-resolution mask logits (256 for a 1024 input)."""
    return 4 * self.embed_size

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    if d["tiny_vit"] is None:  # ViT configs carry no tiny_vit key: stored fingerprints stay valid
      del d["tiny_vit"]
    return json.dumps(d, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "SamConfig":
    d = json.loads(text)
    if d.get("tiny_vit") is not None:
      d["tiny_vit"] = config_from_dict(TinyViTConfig, d["tiny_vit"])
    return config_from_dict(cls, d)


SAM_CONFIGS = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    # Small variants for tests and CPU experiments.  `vit_tiny_test` keeps the 1024
    # input (so the prompt / mask geometry is the real one) but has a thin,
    # shallow encoder.
    "vit_tiny_test": SamConfig(64, 2, 2, (1,)),
    # MobileSAM (TinyViT-5M encoder distilled from ViT-H; same prompt encoder
    # and mask decoder as SAM).
    "vit_t": SamConfig(tiny_vit=TinyViTConfig()),
}


# Released checkpoints that `checkpoints.load_sam` fetches by name: the official
# files (segment-anything README) and the Hugging Face hub copies, by architecture.
OFFICIAL_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth",
                        "vit_h": "sam_vit_h_4b8939.pth"}
HF_CHECKPOINTS = {"facebook/sam-vit-base": "vit_b", "facebook/sam-vit-large": "vit_l",
                  "facebook/sam-vit-huge": "vit_h"}
CHECKPOINT_NAMES = tuple(OFFICIAL_CHECKPOINTS) + tuple(HF_CHECKPOINTS)


def get_sam_config(name: str) -> SamConfig:
  try:
    return SAM_CONFIGS[name]
  except KeyError:
    raise ValueError(f"unknown SAM model type {name!r}; expected one of {sorted(SAM_CONFIGS)}") from None
