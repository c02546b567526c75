"""Data: COCO-format instance segmentation as array_record files + grain.

* `json_stream`     -- incremental JSON reading (large annotation files).
* `coco`            -- streaming annotation parse/validation, source
                       fingerprints; COCO 2017 / LVIS / local subsets.
* `records`         -- prepared splits: array_record shards written directly
                       (no TensorFlow), in parallel by all processes;
                       `RecordSource` reads them.
* `yolo`            -- YOLO-polygon (coco128-seg style) -> COCO json converter.
* `targets`         -- prompt heatmap targets (interior points, Gaussians, ignore).
* `embedding_cache` -- reading the bfloat16 embedding cache (built in trainer/).
* `pipeline`        -- grain input pipeline (per-process sharding of the global
                       batch, checkpointable iterators), SAM-exact resize/pad,
                       bounded target memo.
"""
