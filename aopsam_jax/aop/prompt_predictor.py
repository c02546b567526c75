"""AoP-SAM Prompt Predictor (Flax NNX): where should prompts go?

Inputs
  embedding    (B, 64, 64, 256) float32: SAM's frozen image embedding
               (`Sam.encode_image` of the preprocessed 1024 input).
  image_small  (B, 256, 256, 3) float32: the same preprocessed input
               (SAM mean/std normalised, zero padding) area-downsampled 4x,
               see `downsample_image`.
  Both come from `predictor_inputs(encoder, padded, input_hw)`, the one
  definition used by inference, the embedding cache and the train step.
Output
  logits (B, 256, 256): prompt-heatmap logits; heatmap pixel (i, j) covers
  input pixels [4i, 4i+4) x [4j, 4j+4) of the padded 1024 input frame (see
  `aopsam_jax.aop.peaks` for turning it into points).

Architecture (lightweight U-Net, ~0.3M params / ~2.3 GFLOPs per image at
the default widths): a 3-stage strided conv image branch (256 -> 128 -> 64),
a LayerNorm + 1x1 projection of the embedding, fusion at 64x64 with residual
conv blocks, and a decoder that upsamples 64 -> 128 -> 256 with skips from
the image branch; a 1x1 head whose bias starts at the focal-loss prior.

Save / load: `save_predictor(dir, model, cfg)` writes ``config.json`` and
``params.safetensors`` (flat NNX paths); `load_predictor(dir)` -> (model, cfg).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from aopsam_jax.sam.config import config_from_dict
from aopsam_jax.sam.flat_state import flat_params, load_flat_params
from aopsam_jax.sam.transforms import preprocess

FORMAT_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class PromptPredictorConfig:
  embed_dim: int = 256                    # SAM embedding channels
  img_channels: Tuple[int, int, int] = (16, 32, 64)   # image branch at 256 / 128 / 64
  embed_proj: int = 64                    # embedding projection width
  hidden: int = 64                        # fused width at 64x64
  num_blocks: int = 1                     # residual blocks at 64x64
  dec_channels: Tuple[int, int] = (32, 16)  # decoder width at 128 / 256
  norm_groups: int = 8
  head_bias: float = -4.6                 # sigmoid(-4.6) ~ 0.01 prior
  use_embedding: bool = True
  use_image: bool = True

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "PromptPredictorConfig":
    return config_from_dict(cls, d)


def downsample_image(preprocessed: jax.Array, factor: int = 4) -> jax.Array:
  """(B, S, S, C) preprocessed input -> (B, S/f, S/f, C) by f x f area mean."""
  b, h, w, c = preprocessed.shape
  x = preprocessed.astype(jnp.float32).reshape(b, h // factor, factor, w // factor, factor, c)
  return x.mean(axis=(2, 4))


def predictor_inputs(encoder: Callable[[jax.Array], jax.Array], padded: jax.Array,
                     input_hw: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Resized + padded uint8 images (B, S, S, 3) and their valid sizes (B, 2)
  -> the predictor's (embedding (B, S/16, S/16, 256) float32, image_small
  (B, S/4, S/4, 3)).  `encoder` maps preprocessed pixels to SAM's image
  embedding (`Sam.encode_image` or the `Sam.image_encoder` module); the
  predictor must see in inference exactly what it was trained on."""
  x = preprocess(padded, input_hw)
  return encoder(x).astype(jnp.float32), downsample_image(x)


def _up2(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ConvNormAct(nnx.Module):

  def __init__(self, din: int, dout: int, *, kernel: int = 3, stride: int = 1, groups: int = 8,
               act: bool = True, rngs: nnx.Rngs):
    self.conv = nnx.Conv(din, dout, (kernel, kernel), strides=(stride, stride), padding="SAME",
                         use_bias=False, rngs=rngs)
    self.norm = nnx.GroupNorm(dout, num_groups=min(groups, dout), rngs=rngs)
    self.act = act

  def __call__(self, x):
    x = self.norm(self.conv(x))
    return jax.nn.gelu(x, approximate=False) if self.act else x


class ResBlock(nnx.Module):

  def __init__(self, dim: int, groups: int, rngs: nnx.Rngs):
    self.a = ConvNormAct(dim, dim, groups=groups, rngs=rngs)
    self.b = ConvNormAct(dim, dim, groups=groups, act=False, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(x + self.b(self.a(x)), approximate=False)


class PromptPredictor(nnx.Module):
  """See module docstring.  `__call__(embedding, image_small) -> (B, 256, 256) logits`."""

  def __init__(self, cfg: PromptPredictorConfig = PromptPredictorConfig(), *, rngs: nnx.Rngs):
    if not (cfg.use_embedding or cfg.use_image):
      raise ValueError("PromptPredictor needs the embedding and/or the image branch")
    self.config = cfg
    c0, c1, c2 = cfg.img_channels
    d0, d1 = cfg.dec_channels
    g = cfg.norm_groups
    self.stem0 = ConvNormAct(3, c0, groups=g, rngs=rngs)
    self.stem1 = ConvNormAct(c0, c1, stride=2, groups=g, rngs=rngs)
    self.stem2 = ConvNormAct(c1, c2, stride=2, groups=g, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(cfg.embed_dim, epsilon=1e-6, rngs=rngs)
    self.embed_proj = nnx.Conv(cfg.embed_dim, cfg.embed_proj, (1, 1), rngs=rngs)
    fuse_in = (c2 if cfg.use_image else 0) + (cfg.embed_proj if cfg.use_embedding else 0)
    self.fuse = ConvNormAct(fuse_in, cfg.hidden, kernel=1, groups=g, rngs=rngs)
    self.blocks = nnx.List([ResBlock(cfg.hidden, g, rngs) for _ in range(cfg.num_blocks)])
    self.reduce1 = nnx.Conv(cfg.hidden, d0, (1, 1), rngs=rngs)
    self.dec1 = ConvNormAct(d0 + c1, d0, groups=g, rngs=rngs)
    self.reduce2 = nnx.Conv(d0, d1, (1, 1), rngs=rngs)
    self.dec2 = ConvNormAct(d1 + c0, d1, groups=g, rngs=rngs)
    self.head = nnx.Conv(d1, 1, (1, 1), kernel_init=nnx.initializers.normal(1e-3),
                         bias_init=nnx.initializers.constant(cfg.head_bias), rngs=rngs)

  def __call__(self, embedding: jax.Array, image_small: jax.Array) -> jax.Array:
    cfg = self.config
    img = image_small.astype(jnp.float32)
    if not cfg.use_image:
      img = jnp.zeros_like(img)  # keep the skip shapes; no image information
    f256 = self.stem0(img)
    f128 = self.stem1(f256)
    feats = []
    if cfg.use_image:
      feats.append(self.stem2(f128))
    if cfg.use_embedding:
      e = self.embed_norm(embedding.astype(jnp.float32))
      feats.append(jax.nn.gelu(self.embed_proj(e), approximate=False))
    x = self.fuse(jnp.concatenate(feats, -1))
    for blk in self.blocks:
      x = blk(x)
    x = _up2(self.reduce1(x))
    x = self.dec1(jnp.concatenate([x, f128], -1))
    x = _up2(self.reduce2(x))
    x = self.dec2(jnp.concatenate([x, f256], -1))
    return self.head(x)[..., 0]


def consumes(cfg: PromptPredictorConfig) -> str:
  """What the predictor reads: "image", "embedding" or "image+embedding"."""
  return "+".join(n for n, used in (("image", cfg.use_image), ("embedding", cfg.use_embedding))
                  if used)


def forward_flops(model: PromptPredictor, batch: int = 1, embed_hw: int = 64) -> float:
  """FLOPs of one forward pass (XLA cost analysis of the compiled program)."""
  graphdef, state = nnx.split(model)

  def f(state, e, im):
    return nnx.merge(graphdef, state)(e, im)

  e = jax.ShapeDtypeStruct((batch, embed_hw, embed_hw, model.config.embed_dim), jnp.float32)
  im = jax.ShapeDtypeStruct((batch, 4 * embed_hw, 4 * embed_hw, 3), jnp.float32)
  cost = jax.jit(f).lower(state, e, im).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def save_predictor(path: str, model: PromptPredictor, cfg: Optional[PromptPredictorConfig] = None,
                   metadata: Optional[dict] = None) -> None:
  """Write ``<path>/config.json`` and ``<path>/params.safetensors``."""
  from safetensors.numpy import save_file
  cfg = cfg or model.config
  os.makedirs(path, exist_ok=True)
  save_file(flat_params(model), os.path.join(path, "params.safetensors"),
            metadata={"format_version": FORMAT_VERSION})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"format_version": FORMAT_VERSION, "prompt_predictor": cfg.to_dict(),
               "metadata": metadata or {}}, f, indent=1)


def predictor_metadata(path: str) -> dict:
  """The "metadata" of a saved predictor (what `train` recorded: steps, the
  training encoder's fingerprint for an embedding-consuming predictor, ...)."""
  with open(os.path.join(path, "config.json")) as f:
    return dict(json.load(f).get("metadata") or {})


def load_predictor(path: str) -> Tuple[PromptPredictor, PromptPredictorConfig]:
  """Inverse of `save_predictor`; checks every parameter name and shape."""
  from safetensors.numpy import load_file
  with open(os.path.join(path, "config.json")) as f:
    meta = json.load(f)
  cfg = PromptPredictorConfig.from_dict(meta["prompt_predictor"])
  model = PromptPredictor(cfg, rngs=nnx.Rngs(0))
  weights = os.path.join(path, "params.safetensors")
  load_flat_params(model, load_file(weights), what=weights)
  return model, cfg
