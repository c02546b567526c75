"""Tiny CPU config: coco_tiny (80 train / 80 val COCO images), vit_tiny_test SAM.

  python -m aopsam_jax.train --config configs/coco_tiny.py --workdir /tmp/pp_tiny

The SAM encoder is the thin `vit_tiny_test` with RANDOM weights (no official weights
can be downloaded here), so its embedding is uninformative and the
predictor learns from its image branch.  Embeddings are cached on disk.
"""

import os

import ml_collections

# `../shared/data` beside the checkout; AOPSAM_DATA overrides it.
SHARED = os.environ.get("AOPSAM_DATA", os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")))


def sources():
  return {
      "coco_tiny": {"format": "coco", "dir": f"{SHARED}/coco_tiny", "splits": {
          "train": ["annotations/instances_train2017.json", "train2017"],
          "val": ["annotations/instances_val2017.json", "val2017"]}},
      "coco128": {"format": "yolo", "dir": f"{SHARED}/coco128_seg", "splits": {
          "train": ["labels/train2017", "images/train2017"]}},
  }


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      sources=sources(),
      train="coco_tiny:train,coco128:train",
      val="coco_tiny:val",
      # prepared array_record files (data.records); on a pod: storage every host sees
      dir="~/aopsam_data/records",
      cache_dir="~/.cache/aopsam_jax/embeddings",   # bfloat16, ~2.4 MiB per image
      seed=0,
      worker_count=0,
      memo_targets=512,                  # LRU of 512 targets (~256 MiB); 0 = off
      # see aopsam_jax/data/augment.py (cache mode flips the cached embedding too)
      augment=dict(hflip=0.0, brightness=0.0, contrast=0.0, saturation=0.0),
  )
  c.sam = dict(model="vit_tiny_test", checkpoint="", seed=0)
  c.embeddings = "cache"                 # 'cache' (CPU) | 'online' (accelerators)
  c.targets = dict(min_area=64.0, sigma_scale=0.08, min_sigma=1.0, max_sigma=8.0)
  # ~42k params, 0.81 GFLOPs/image (the library default is 149k / 2.7 GFLOPs)
  c.model = dict(embed_dim=256, img_channels=(8, 16, 32), embed_proj=32, hidden=32,
                 num_blocks=1, dec_channels=(16, 8), norm_groups=8, head_bias=-4.6,
                 use_embedding=True, use_image=True)
  c.loss = dict(kind="focal", kwargs=dict(alpha=2.0, beta=4.0))
  c.optim = dict(lr=3e-3, warmup_steps=20, end_lr_factor=0.01, weight_decay=1e-4,
                 grad_clip=1.0, b1=0.9, b2=0.999)
  c.batch_size = 8                        # global
  c.total_steps = 400                     # val recall peaks here; longer overfits (BENCHMARKS.md)
  c.log_every = 5
  c.eval_every = 100
  c.eval_batch_size = 8
  c.eval_ks = (32, 64)
  c.nms_kernel = 11                       # as AsfConfig.peak_kernel
  c.grid_baselines = (16, 32)
  c.ckpt_every = 50
  c.keep_ckpts = 2
  c.tensorboard = True
  return c
