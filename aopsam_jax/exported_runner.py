"""Run an exported AoP-SAM program (`python -m aopsam_jax.export`) without the model code.

Needs only jax, numpy and (for `prepare`) Pillow: this file imports nothing
from aopsam_jax, so it can be copied next to the artefact and used alone:

    prog = load("prog.bin")
    padded, input_hw, original_hw = prepare(image_rgb_uint8, prog.img_size)
    out = prog(padded[None], input_hw[None], original_hw[None])   # batch of prog.batch
    out["valid"], out["low_res_logits"], out["boxes"], out["iou"], ...

    python exported_runner.py prog.bin photo.jpg     # prints the masks found

The artefact is a zip: `meta.json` (batch, padded size, platforms, output
names, ASF config, weights mode), `program.bin` (`jax.export` serialisation:
StableHLO plus calling convention) and, when the weights are arguments rather
than embedded constants, `weights.npz` (the flattened parameters in order).
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from typing import Dict, Tuple

import numpy as np

FORMAT = "aopsam_jax.exported"


def prepare(image: np.ndarray, img_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """RGB uint8 (H, W, 3) -> (padded (S, S, 3) uint8, input_hw (2,), original_hw (2,)), as
  the official SAM predictor resizes (longest side to S, round half up, PIL bilinear)."""
  from PIL import Image
  image = np.asarray(image)
  h, w = image.shape[:2]
  scale = img_size * 1.0 / max(h, w)
  nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  padded = np.zeros((img_size, img_size, 3), np.uint8)
  padded[:nh, :nw] = resized
  return padded, np.array([nh, nw], np.int32), np.array([h, w], np.int32)


class ExportedProgram:
  """A deserialised artefact; call it with one batch of prepared inputs."""

  def __init__(self, meta: Dict, exported, weights):
    self.meta = meta
    self.exported = exported
    self.weights = weights
    self.batch = int(meta["batch"])
    self.img_size = int(meta["img_size"])
    self._call = None

  def _compiled_call(self):
    # The CPU scheduler option of aopsam_jax.sam.compile_options (repeated
    # here: this file imports nothing from aopsam_jax): loops share scratch
    # memory instead of each holding its own.
    import jax
    if self._call is None:
      opts = ({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
              if jax.default_backend() == "cpu" else None)
      self._call = jax.jit(self.exported.call, compiler_options=opts)
    return self._call

  def __call__(self, padded, input_hw, original_hw) -> Dict[str, np.ndarray]:
    import jax
    args = (np.asarray(padded, np.uint8), np.asarray(input_hw, np.int32),
            np.asarray(original_hw, np.int32))
    if self.weights is not None:
      args = (self.weights,) + args
    return jax.device_get(self._compiled_call()(*args))


def load(path: str) -> ExportedProgram:
  """Read an artefact; ValueError when `path` is not one (OSError when unreadable)."""
  from jax import export
  try:
    z = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise ValueError(f"{path}: not an {FORMAT} artefact (not a zip file; make one with "
                     "python -m aopsam_jax.export)") from None
  with z:
    try:
      meta = json.loads(z.read("meta.json"))
    except (KeyError, ValueError):
      meta = {}
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path}: not an {FORMAT} artefact")
    exported = export.deserialize(bytearray(z.read("program.bin")))
    weights = None
    if meta["weights"] == "arguments":
      with np.load(io.BytesIO(z.read("weights.npz"))) as npz:
        weights = [npz[f"w{i:05d}"] for i in range(len(npz.files))]
  return ExportedProgram(meta, exported, weights)


def main(argv=None) -> int:
  """Exit status 0: masks printed; 1: the program or the image could not be
  read; 2: wrong arguments.  Each failure is one line."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    print("usage: python exported_runner.py PROGRAM.bin IMAGE", file=sys.stderr)
    return 2
  from PIL import Image
  try:
    prog = load(argv[0])
    with Image.open(argv[1]) as im:
      image = np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:  # missing file, not an artefact, not an image
    print(f"exported_runner: error: {e}", file=sys.stderr)
    return 1
  padded, ihw, ohw = prepare(image, prog.img_size)
  rep = lambda a: np.repeat(a[None], prog.batch, axis=0)
  out = prog(rep(padded), rep(ihw), rep(ohw))
  ok = np.asarray(out["valid"][0])
  if prog.meta.get("random_sam"):
    print("note: this program holds RANDOM-INIT SAM weights: its masks are meaningless",
          file=sys.stderr)
  ious = ", ".join(f"{v:.3f}" for v in np.asarray(out["iou"][0])[ok])
  print(f"{int(ok.sum())} masks; predicted IoU [{ious}]; "
        f"boxes XYXY {np.round(out['boxes'][0][ok]).astype(int).tolist()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
