"""Data: COCO-format instance segmentation as TFDS array_record + grain.

* `coco`      -- annotation parsing/validation and the TFDS builder
                 (`CocoInstances`), COCO 2017 / LVIS / local subsets.
* `yolo`      -- YOLO-polygon (coco128-seg style) -> COCO json converter.
* `targets`   -- prompt heatmap targets (interior points, Gaussians, ignore).
* `pipeline`  -- grain input pipeline (per-process sharding of the global
                 batch, checkpointable iterators), SAM-exact resize/pad.
"""
