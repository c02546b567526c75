"""AoP-SAM model bundle: SAM weights + prompt predictor + ASF config, one call.

Layout of a bundle directory:

    bundle.json         format, SAM source, encoder fingerprint, AsfConfig, notes
    sam.safetensors     converted SAM weights (`params.save_converted` format), or
                        absent when bundle.json says {"random_init": {...}}
    predictor/          `prompt_predictor.save_predictor` output

    b = load_bundle("path/to/bundle")            # -> Bundle(model, asf, sam_info, meta)
    b = load_bundle(path, sam_checkpoint="sam_vit_b.safetensors")  # override SAM weights

bundle.json records what the predictor consumes ("predictor_consumes":
"image" or "image+embedding").  An image-only predictor fits every SAM: pass
any checkpoint.  A predictor that reads SAM's image embedding only fits the
encoder it was trained with: the bundle stores that encoder's fingerprint
(`params.encoder_fingerprint`) and `load_bundle` refuses another encoder
with `EncoderMismatch` unless `force_encoder=True` (then it only warns).
A bundle whose SAM is random-init says so (`Bundle.random_sam`): its masks
carry no meaning, only prompt locations do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Dict, Optional

from flax import nnx

from aopsam_jax.aop.asf import AsfConfig
from aopsam_jax.sam.config import get_sam_config
from aopsam_jax.sam.checkpoints import load_sam
from aopsam_jax.sam.params import encoder_fingerprint
from aopsam_jax.sam.config import config_from_dict
from aopsam_jax.sam.flat_state import flat_params
from aopsam_jax.sam.params import build_model, load_converted, save_converted
from aopsam_jax.aop.pipeline import AopSam
from aopsam_jax.aop.prompt_predictor import (PromptPredictor, consumes, load_predictor,
                                             save_predictor)

FORMAT = "aopsam_jax.bundle"
FORMAT_VERSION = "1"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_BUNDLE = os.path.join(ASSETS, "bundles", "coco_image_only")


class EncoderMismatch(ValueError):
  """An embedding-consuming predictor paired with an encoder it was not trained on."""


def check_encoder(predictor: PromptPredictor, trained_fingerprint: Optional[str], sam, *,
                  force: bool = False, what: str = "the prompt predictor") -> None:
  """Refuse (or with `force`, warn about) `sam` when `predictor` reads the image
  embedding and `sam`'s encoder is not the one it was trained with."""
  if not predictor.config.use_embedding:
    return  # image-only: valid with every SAM
  if trained_fingerprint is None:
    msg = f"{what} reads SAM's image embedding but records no training encoder"
  elif encoder_fingerprint(sam) != trained_fingerprint:
    msg = (f"{what} reads SAM's image embedding and was trained with another image encoder "
           f"(fingerprint {trained_fingerprint[:12]}, this SAM's is "
           f"{encoder_fingerprint(sam)[:12]}); its prompts would be meaningless. Use the SAM "
           "it was trained with, an image-only bundle, or force it (--force-encoder)")
  else:
    return
  if not force:
    raise EncoderMismatch(msg)
  warnings.warn(msg + " [forced]", stacklevel=3)


@dataclasses.dataclass
class Bundle:
  model: AopSam
  asf: AsfConfig
  sam_info: Dict[str, Any]   # {"weights": file} or {"random_init": {"model", "seed"}}
  meta: Dict[str, Any]

  @property
  def random_sam(self) -> bool:
    return "random_init" in self.sam_info

  @property
  def sam(self):
    return self.model.sam

  @property
  def predictor(self) -> PromptPredictor:
    return self.model.predictor


def asf_from_dict(d: Dict[str, Any]) -> AsfConfig:
  return config_from_dict(AsfConfig, d)


def save_bundle(path: str, sam, predictor: PromptPredictor, asf_cfg: AsfConfig = AsfConfig(), *,
                random_init: Optional[Dict[str, Any]] = None,
                notes: str = "", metadata: Optional[Dict[str, Any]] = None,
                trained_fingerprint: Optional[str] = None) -> None:
  """Write a bundle.  With `random_init={"model": "vit_tiny_test", "seed": 0}` the SAM
  weights are NOT written (they are re-created from the seed on load, and the
  fingerprint check proves it); otherwise `sam.safetensors` holds them.

  `trained_fingerprint`: the encoder an embedding-consuming predictor was trained
  with (`python -m aopsam_jax.train` records it in predictor/config.json): when
  given, such a predictor is only bundled with that encoder (`EncoderMismatch`
  otherwise); None means the caller vouches for the pairing."""
  if predictor.config.use_embedding and trained_fingerprint is not None:
    check_encoder(predictor, trained_fingerprint, sam)
  os.makedirs(path, exist_ok=True)
  fp = encoder_fingerprint(sam)
  if random_init is not None:
    again = build_model(get_sam_config(random_init["model"]), seed=int(random_init["seed"]))
    if encoder_fingerprint(again) != fp:
      raise ValueError("random_init does not reproduce the given SAM's encoder; "
                       "save its weights instead")
    sam_info = {"random_init": {"model": random_init["model"], "seed": int(random_init["seed"])}}
  else:
    save_converted(os.path.join(path, "sam.safetensors"), sam.config, flat_params(sam))
    sam_info = {"weights": "sam.safetensors"}
  save_predictor(os.path.join(path, "predictor"), predictor)
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "sam": sam_info,
          "sam_encoder_fingerprint": fp, "predictor": "predictor",
          "predictor_consumes": consumes(predictor.config),
          "asf": dataclasses.asdict(asf_cfg), "notes": notes, "metadata": metadata or {}}
  with open(os.path.join(path, "bundle.json"), "w") as f:
    json.dump(meta, f, indent=1)


def read_meta(path: Optional[str] = None) -> Dict[str, Any]:
  """A bundle's bundle.json (default: the shipped bundle), format checked."""
  path = path or DEFAULT_BUNDLE
  meta_path = os.path.join(path, "bundle.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{path} is not an AoP-SAM bundle (no bundle.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: not an {FORMAT} file")
  return meta


def load_bundle(path: Optional[str] = None, *, sam_checkpoint: Optional[str] = None,
                sam=None, asf_overrides: Optional[Dict[str, Any]] = None,
                quiet: bool = False, force_encoder: bool = False) -> Bundle:
  """Load a bundle directory (default: the shipped image-only one).

  `sam_checkpoint` (any SAM source, `checkpoints.load_sam`: a file, an HF
  folder, a name) or `sam` (a built SAM model) replaces the bundle's SAM.  A
  predictor that reads the image embedding refuses a SAM whose encoder it was
  not trained with (`EncoderMismatch`) unless `force_encoder` (then it warns);
  an image-only predictor fits every SAM.  `asf_overrides` changes fields of
  the bundle's ASF config (unknown fields raise ValueError).  `quiet`
  silences the random-weights warning.
  """
  if sam_checkpoint is not None and sam is not None:
    raise ValueError("give sam_checkpoint or sam, not both")
  path = path or DEFAULT_BUNDLE
  meta = read_meta(path)
  sam_info = dict(meta["sam"])
  predictor, _ = load_predictor(os.path.join(path, meta.get("predictor", "predictor")))
  if sam is not None:
    sam_info = {"weights": "(given model)"}
  elif sam_checkpoint:
    sam = load_sam(sam_checkpoint)
    sam_info = {"weights": sam_checkpoint}
  elif "weights" in sam_info:
    sam = load_converted(os.path.join(path, sam_info["weights"]))
  else:
    ri = sam_info["random_init"]
    sam = build_model(get_sam_config(ri["model"]), seed=int(ri["seed"]))
    if not quiet:
      warnings.warn(f"AoP-SAM bundle {path}: SAM {ri['model']} has RANDOM weights (seed "
                    f"{ri['seed']}); its masks are meaningless. Pass SAM weights for real "
                    "masks (sam_checkpoint / segment --checkpoint).", stacklevel=2)
  check_encoder(predictor, meta.get("sam_encoder_fingerprint"), sam, force=force_encoder,
                what=f"the prompt predictor of bundle {path}")
  asf_d = dict(meta.get("asf", {}))
  asf_d.update(asf_overrides or {})
  return Bundle(AopSam(sam, predictor), asf_from_dict(asf_d), sam_info, meta)


def random_bundle(sam_model: str = "vit_tiny_test", seed: int = 0, predictor_cfg=None,
                  asf_cfg: AsfConfig = AsfConfig()) -> Bundle:
  """UNTRAINED predictor + random SAM: for tests and smoke runs only."""
  from aopsam_jax.aop.prompt_predictor import PromptPredictorConfig
  sam = build_model(get_sam_config(sam_model), seed=seed)
  predictor = PromptPredictor(predictor_cfg or PromptPredictorConfig(), rngs=nnx.Rngs(seed))
  return Bundle(AopSam(sam, predictor), asf_cfg,
                {"random_init": {"model": sam_model, "seed": seed}},
                {"notes": "random-init SAM and UNTRAINED prompt predictor"})


# --- KEY=VALUE overrides, shared by the CLIs ----------------------------------


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_overrides(items, flag: str) -> Dict[str, Any]:
  """["k=v", ...] from a repeatable CLI flag -> {k: int | float | str}."""
  out = {}
  for kv in items:
    k, sep, v = kv.partition("=")
    if not sep or not k:
      raise ValueError(f"{flag} needs KEY=VALUE, got {kv!r}")
    out[k] = _parse_value(v)
  return out
