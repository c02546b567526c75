"""The shipped default predictor: image-only (no SAM embedding), so it fits every SAM.

  python -m aopsam_jax.train --config configs/coco_image_only.py --workdir /tmp/pp_image
  python -m aopsam_jax.bundle --predictor /tmp/pp_image/predictor --sam-random vit_tiny_test:0 \\
      --out aopsam_jax/assets/bundles/coco_image_only

Training images: coco_tiny train, coco128_seg and both splits of coco_tiny_lizhogn (all
disjoint from coco_tiny val, which stays the validation split).  `model.use_embedding=False`
makes `train` run no SAM encoder at all (no embedding cache): the predictor reads only the
4x-downsampled, SAM-normalised image.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "coco_tiny_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "coco_tiny.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  c = _base.get_config()
  with c.unlocked():
    c.data.sources["lizhogn"] = {
        "format": "coco", "dir": f"{_base.SHARED}/coco_tiny_lizhogn", "splits": {
            "train": ["annotations/instances_train2017.json", "train2017"],
            "val": ["annotations/instances_val2017.json", "val2017"]}}
  c.data.train = "coco_tiny:train,coco128:train,lizhogn:train,lizhogn:val"
  c.model.use_embedding = False
  c.total_steps = 600
  c.eval_every = 100
  return c
