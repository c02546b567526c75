r"""Full COCO 2017 with a frozen vit_h SAM on a TPU pod / multi-GPU host.

Embeddings are computed online inside the jitted step; every host reads only
its slice of each global batch.  Point `data.sources.coco2017.dir` at a
directory with annotations/instances_{train,val}2017.json, train2017/,
val2017/ (the official layout) and `sam.checkpoint` at converted vit_h
weights (conversion/convert_sam.py).

TPU pod (same command on every host, e.g. via
`gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`):

  python -m aopsam_jax.train --multihost --config configs/coco2017_vit_h.py \
      --workdir gs://BUCKET/aopsam/pp_coco_vit_h \
      --config.data.sources.coco2017.dir=/data/coco \
      --config.data.dir=/mnt/shared/aopsam_records \
      --config.sam.checkpoint=/data/sam_vit_h.safetensors

Single multi-GPU host: drop --multihost.  LVIS: add a source with
annotations/lvis_v1_{train,val}.json (same format) and select it in
`data.train` / `data.val`.
"""


from configs import coco_tiny


def get_config():
  c = coco_tiny.get_config()
  c.data.sources = {"coco2017": {"format": "coco", "dir": "/data/coco", "splits": {
      "train": ["annotations/instances_train2017.json", "train2017"],
      "val": ["annotations/instances_val2017.json", "val2017"]}},
                    "lvis": {"format": "coco", "dir": "/data/coco", "splits": {
      "train": ["annotations/lvis_v1_train.json", "train2017"],
      "val": ["annotations/lvis_v1_val.json", "val2017"]}}}
  c.data.train = "coco2017:train"
  c.data.val = "coco2017:val"
  c.data.worker_count = 16
  # prepared records (~19 GB), written in parallel by all hosts: shared storage
  # (a gcsfuse / NFS / Filestore mount, or gs:// where array_record reads it)
  c.data.dir = "/data/aopsam_records"
  c.data.memo_targets = 0                # an epoch is 118k images: no memo
  c.data.augment.hflip = 0.5             # online mode encodes the flipped image itself
  c.sam = dict(model="vit_h", checkpoint="/data/sam_vit_h.safetensors", seed=0)
  c.embeddings = "online"
  c.model.hidden = 128
  c.model.num_blocks = 2
  c.model.embed_proj = 128
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 1000
  c.batch_size = 256                     # global: 8 per chip on a v4-64 (32 chips)
  c.total_steps = 40_000                 # ~87 epochs of 118k images
  c.log_every = 50
  c.eval_every = 2000
  c.eval_batch_size = 256
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  return c
