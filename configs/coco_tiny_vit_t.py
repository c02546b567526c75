"""coco_tiny with MobileSAM (`vit_t`, TinyViT-5M encoder): the CPU / edge prompt predictor.

  python -m aopsam_jax.train --config configs/coco_tiny_vit_t.py --workdir /tmp/pp_tiny_vit_t \
      --config.sam.checkpoint=mobile_sam.safetensors

`sam.checkpoint` is MobileSAM's `mobile_sam.pt` converted with
`python -m conversion.convert_sam --checkpoint mobile_sam.pt --out mobile_sam.safetensors`
(the model type is detected).  Without it the encoder has RANDOM weights,
as in coco_tiny.py.  The embedding cache is keyed by the encoder's
fingerprint, so vit_t and vit_tiny_test caches never mix.  Encoding costs
~40 GFLOPs per image (ViT-B: ~490), so caching the two coco_tiny splits
on a 2-core CPU takes minutes, not an hour.
"""

from configs import coco_tiny


def get_config():
  c = coco_tiny.get_config()
  c.sam = dict(model="vit_t", checkpoint="", seed=0)
  return c
