"""The official PyTorch SAM (segment-anything 1.0) as an independent reference.

Builds the official model with random weights -- perturbing the tables the
official code zero-initialises (pos_embed, rel_pos_*) and the LayerNorm
affine parameters, so that every tensor matters -- and saves its
`state_dict()` with `torch.save` exactly as the released `.pth` files are.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from tests import torchvision_stub

torchvision_stub.install()

import torch  # noqa: E402
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder,  # noqa: E402
                                       Sam, TwoWayTransformer)

from aopsam_jax.sam.config import SamConfig  # noqa: E402


def build_torch_sam(cfg: SamConfig, seed: int = 0) -> Sam:
  """Official architecture (as `build_sam._build_sam`) with perturbed random weights."""
  torch.manual_seed(seed)
  s = cfg.embed_size
  sam = Sam(
      image_encoder=ImageEncoderViT(
          depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.img_size,
          mlp_ratio=cfg.mlp_ratio, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
          num_heads=cfg.encoder_num_heads, patch_size=cfg.patch_size, qkv_bias=True,
          use_rel_pos=True, global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
          window_size=cfg.window_size, out_chans=cfg.prompt_embed_dim),
      prompt_encoder=PromptEncoder(
          embed_dim=cfg.prompt_embed_dim, image_embedding_size=(s, s),
          input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=cfg.num_multimask_outputs,
          transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                        mlp_dim=cfg.decoder_mlp_dim,
                                        num_heads=cfg.decoder_num_heads),
          transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
          iou_head_hidden_dim=cfg.iou_head_hidden_dim),
      pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
  with torch.no_grad():
    for name, p in sam.named_parameters():
      if "pos_embed" in name or "rel_pos" in name:
        p.normal_(0.0, 0.5)
      elif p.dim() == 1:
        p.add_(torch.randn_like(p) * 0.1)
  return sam.eval()


def save_official_pth(sam: Sam, path: str) -> str:
  """Save like the released checkpoints: a plain `torch.save(state_dict)`."""
  torch.save(sam.state_dict(), path)
  return path


def state_dict_numpy(sam: Sam) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in sam.state_dict().items()}


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def shared_data_dir() -> str:
  """`../shared/data` next to the checkout (may not exist)."""
  here = os.path.dirname(os.path.abspath(__file__))
  return os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
