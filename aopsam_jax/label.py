"""`python -m aopsam_jax.label INPUT... --out DIR`: label a whole image collection with AoP-SAM.

Every process (one per host; `--multihost` or `--coordinator_address / --num_processes
/ --process_id`, as in `train`) takes every process_count-th image, and runs
them in batches of `--batch` images per local device through the one-program
pipeline (`aop.pipeline.segment`, vmapped over the batch, `shard_map`ped over a
Mesh of the local devices).  Decoding, resizing and padding run on worker
threads ahead of the device; fetching the outputs, upsampling the masks and
RLE-encoding them run on other threads behind it.  Finished images go to
atomic shards (`label_store`), so a killed run resumes where it stopped;
process 0 merges them into DIR/results.json (COCO results), DIR/images.json
(a COCO dataset with the images, for `COCO(images.json).loadRes(results.json)`)
and DIR/errors.json (unreadable images; exit status 1 if any).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import dataclasses
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from aopsam_jax import cli, compile_cache
from aopsam_jax import label_store as store

AXIS = "data"
# Outputs the records do not need stay on the device.
NOT_FETCHED = ("heatmap", "prompt_points", "prompt_scores", "prompt_valid", "prompt_accepted")


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
      prog="python -m aopsam_jax.label",
      description="Label a whole image collection with AoP-SAM on every device of every "
                  "process; resumable.  Writes DIR/results.json (COCO results: image_id, "
                  "file_name, compressed RLE segmentation, bbox XYWH, area, score = "
                  "predicted_iou, stability_score, point_coords), DIR/images.json (COCO images) "
                  "and DIR/errors.json (unreadable images).",
      epilog=cli.EXIT_STATUS_HELP + " Any unreadable image makes the status 1.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("inputs", nargs="+", metavar="INPUT",
                 help="image files, folders (searched recursively), or a COCO json followed by "
                      "its image folder(s)")
  p.add_argument("--out", required=True, help="output folder (also holds the resumable state)")
  cli.add_bundle_arguments(p)
  p.add_argument("--batch", type=int, default=2, help="images per device per step")
  p.add_argument("--workers", type=int, default=4,
                 help="host threads decoding / resizing images ahead of the device")
  p.add_argument("--encoders", type=int, default=2,
                 help="host threads fetching outputs and RLE-encoding masks behind the device")
  p.add_argument("--flush-every", type=int, default=64,
                 help="write a resumable shard every N finished images (per process)")
  p.add_argument("--overlays", action="store_true", help="also write DIR/overlays/<id>_<name>.png")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  compile_cache.add_flag(p)
  cli.add_distributed_arguments(p)
  return p


def check_args(args) -> None:
  """Usage mistakes as `cli.UsageError`, before any model work."""
  cli.check_bundle_arguments(args)
  cli.check_distributed_arguments(args)
  for flag in ("batch", "workers", "encoders", "flush_every"):
    if getattr(args, flag) < 1:
      raise cli.UsageError(f"--{flag.replace('_', '-')} must be at least 1")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise cli.UsageError(f"--out {args.out} is a file; give a folder")


# --- host: decode / resize / pad ahead of the device ---------------------------


@dataclasses.dataclass
class Loaded:
  item: store.Item
  image: Optional[np.ndarray]   # kept only for overlays
  inputs: Any                   # pipeline.AopInputs, or None on error
  error: Optional[str]


def load_one(item: store.Item, img_size: int, keep_image: bool) -> Loaded:
  from aopsam_jax.aop import pipeline
  from aopsam_jax.segment import load_input
  try:
    image = load_input(item.path)
  except (OSError, ValueError) as e:  # an unreadable file is data, not a bug: record it, go on
    return Loaded(item, None, None, str(e))
  return Loaded(item, image if keep_image else None, pipeline.prepare(image, img_size), None)


def batches(items: Sequence[store.Item], size: int, pool, img_size: int, keep_image: bool,
            window: int) -> Iterator[Tuple[List[Loaded], List[Loaded]]]:
  """(images ready for the device, unreadable ones), `size` good images at a
  time, in item order, with up to `window` images decoding ahead."""
  it = iter(items)
  pending: collections.deque = collections.deque()

  def fill():
    while len(pending) < window:
      nxt = next(it, None)
      if nxt is None:
        return
      pending.append(pool.submit(load_one, nxt, img_size, keep_image))

  fill()
  good, bad = [], []
  while pending:
    got = pending.popleft().result()
    fill()
    (bad if got.error else good).append(got)
    if len(good) == size:
      yield good, bad
      good, bad = [], []
  if good or bad:
    yield good, bad


def stack(good: List[Loaded], size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Fixed-shape batch arrays; short batches repeat their first image (outputs dropped)."""
  fill = [good[i] if i < len(good) else good[0] for i in range(size)]
  return tuple(np.stack([getattr(g.inputs, k) for g in fill])
               for k in ("padded", "input_hw", "original_hw"))


# --- device: one program, batch sharded over the local devices -----------------


def make_step(model, cfg, batch_per_device: int):
  """-> (step(padded, input_hw, original_hw) -> device outputs, global batch size)."""
  import jax
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from aopsam_jax.aop import pipeline
  from aopsam_jax.sam.compile_options import jit

  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), (AXIS,))
  graphdef, state = pipeline.split_model(model)

  def body(st, padded, input_hw, original_hw):
    out = pipeline.segment(nnx.merge(graphdef, st), padded, input_hw, original_hw, cfg)
    return {k: v for k, v in out.items() if k not in NOT_FETCHED}

  # shard_map: every device runs the very program a single device runs on its
  # `batch_per_device` images, so results do not depend on the device count.
  fn = jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                             out_specs=P(AXIS), check_vma=False))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  data = NamedSharding(mesh, P(AXIS))

  def step(padded, input_hw, original_hw):
    return fn(state, *jax.device_put((padded, input_hw, original_hw), data))

  return step, batch_per_device * len(devices)


# --- host: fetch, upsample, RLE-encode behind the device -----------------------


def image_results(out: Dict[str, np.ndarray], item: store.Item,
                  img_size: int) -> Tuple[List[Dict], List[Dict]]:
  """One image's pipeline outputs -> (COCO results with compressed RLE, the mask records)."""
  from aopsam_jax.aop import pipeline
  from aopsam_jax.sam.records import coco_results
  records = pipeline.to_records(out, "binary_mask", img_size)
  res = coco_results(records, item.image_id, file_name=item.file_name)
  return res, records


def finish_batch(dev_out, good: List[Loaded], bad: List[Loaded], img_size: int,
                 overlay_dir: Optional[str]) -> List[Dict[str, Any]]:
  """Device outputs of one batch -> shard entries (runs on an encoder thread)."""
  import jax
  host = jax.device_get(dev_out)
  entries = []
  for i, g in enumerate(good):
    one = {k: np.asarray(v[i]) for k, v in host.items()}
    res, records = image_results(one, g.item, img_size)
    h, w = (int(v) for v in one["original_hw"])
    entries.append({"id": g.item.image_id, "file_name": g.item.file_name, "path": g.item.path,
                    "width": w, "height": h, "results": res, "error": None})
    if overlay_dir:
      from aopsam_jax.sam.visualize import save_overlay
      stem = os.path.splitext(os.path.basename(g.item.file_name))[0]
      save_overlay(os.path.join(overlay_dir, f"{g.item.image_id}_{stem}.png"), g.image,
                   [r["segmentation"] for r in records],
                   title=f"{g.item.file_name}: {len(records)} masks")
  entries += [{"id": b.item.image_id, "file_name": b.item.file_name, "path": b.item.path,
               "error": b.error} for b in bad]
  return entries


# --- the loop --------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
  images: int = 0
  masks: int = 0
  errors: int = 0
  input_wait_s: float = 0.0   # main thread blocked on the host input pipeline
  compile_s: float = 0.0
  wall_s: float = 0.0


def run_share(todo, step, gbatch, img_size, args, shards, pidx, bar) -> Stats:
  """Label this process' remaining images; shards are flushed as they finish."""
  stats = Stats()
  seq = shards.next_seq(pidx)
  unflushed: List[Dict[str, Any]] = []
  overlay_dir = os.path.join(args.out, "overlays") if args.overlays else None
  if overlay_dir:
    os.makedirs(overlay_dir, exist_ok=True)
  inflight: collections.deque = collections.deque()

  def drain(keep: int):
    nonlocal seq, unflushed
    while len(inflight) > keep:
      entries = inflight.popleft().result()
      unflushed += entries
      for e in entries:
        stats.images += e["error"] is None
        stats.errors += e["error"] is not None
        stats.masks += len(e.get("results", ()))
      if bar is not None:
        bar.update(len(entries))
        bar.set_postfix(masks_per_img=f"{stats.masks / max(stats.images, 1):.1f}",
                        errors=stats.errors)
      if len(unflushed) >= args.flush_every or (keep == 0 and not inflight and unflushed):
        shards.write(pidx, seq, unflushed)
        seq, unflushed = seq + 1, []

  t0 = time.perf_counter()
  with futures.ThreadPoolExecutor(args.workers, "label-load") as loaders, \
       futures.ThreadPoolExecutor(args.encoders, "label-encode") as encoders:
    feed = batches(todo, gbatch, loaders, img_size, bool(overlay_dir), 2 * gbatch + args.workers)
    while True:
      tw = time.perf_counter()
      got = next(feed, None)
      stats.input_wait_s += time.perf_counter() - tw
      if got is None:
        break
      good, bad = got
      dev_out = None
      if good:
        first = stats.compile_s == 0.0
        if first and bar is not None:
          bar.write(compile_cache.notice(f"the pipeline (batch {gbatch}, {img_size}x{img_size})"))
        tc = time.perf_counter()
        dev_out = step(*stack(good, gbatch))
        if first:
          import jax
          jax.block_until_ready(dev_out)
          stats.compile_s = time.perf_counter() - tc
      inflight.append(encoders.submit(finish_batch, dev_out, good, bad, img_size, overlay_dir))
      drain(keep=2)   # at most two batches behind the device: bounded memory
    drain(keep=0)
  stats.wall_s = time.perf_counter() - t0
  return stats


def _report(stats: Stats, counts: Dict[str, int], pcount: int, out: str, weights: str) -> None:
  per = counts["masks"] / max(counts["images"], 1)
  rate = stats.images / max(stats.wall_s - stats.compile_s, 1e-9)
  this_run = (f"{stats.images} images in {stats.wall_s:.1f}s ({stats.compile_s:.1f}s compiling; "
              f"{rate:.2f} images/s after it; input wait "
              f"{100 * stats.input_wait_s / max(stats.wall_s, 1e-9):.0f}% of the time)"
              if stats.images else "no image left to label (earlier runs did them all)")
  print(f"labelled {counts['images']} images, {counts['masks']} masks ({per:.1f} per image), "
        f"{counts['errors']} unreadable (errors.json); weights: {weights}.\n"
        f"this run, process 0 of {pcount}: {this_run}\n"
        f"-> {os.path.join(out, 'results.json')}, images.json, errors.json")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(_main, argv, "python -m aopsam_jax.label",
                      "run the same command again to resume")


def _setup(args):
  """-> (items, AopModel, ShardStore, entries already done)."""
  from aopsam_jax import segment
  items = store.collect_items(args.inputs, args.out)
  cli.init_distributed(args)
  compile_cache.setup(args.no_compile_cache)
  try:
    aop = segment.load_aop(args)
  except (OSError, ValueError) as e:
    raise cli.WorkError(f"cannot load {args.checkpoint or args.bundle or 'the shipped bundle'}: "
                        f"{e}") from None
  settings = {"bundle": os.path.abspath(args.bundle) if args.bundle else "default",
              "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
              "asf": dataclasses.asdict(aop.cfg), "batch_per_device": args.batch}
  os.makedirs(args.out, exist_ok=True)
  shards = store.ShardStore(args.out, store.signature(items, settings))
  return items, aop, shards, shards.read()


def _write_stats(args, stats: Stats, pidx: int, pcount: int) -> None:
  import jax
  from aopsam_jax.sysinfo import peak_rss_kb
  mem = jax.local_devices()[0].memory_stats() or {}
  store.write_json_atomic(os.path.join(args.out, f"stats_p{pidx:05d}.json"),
                          {**dataclasses.asdict(stats), "process": pidx, "processes": pcount,
                           "local_devices": jax.local_device_count(),
                           "peak_rss_mib": peak_rss_kb() / 1024,
                           "device_peak_mib": mem.get("peak_bytes_in_use", 0) / 2 ** 20 or None,
                           "platform": jax.devices()[0].platform})


def _main(argv: Optional[Sequence[str]]) -> int:
  from aopsam_jax.segment import describe_thresholds, random_init_banner
  args = build_parser().parse_args(argv)
  check_args(args)
  items, aop, shards, done = _setup(args)
  import jax
  pidx, pcount = jax.process_index(), jax.process_count()
  todo = [it for it in store.assigned(items, pidx, pcount) if it.image_id not in done]
  bar = None
  if pidx == 0:
    if aop.random_sam:
      print(random_init_banner("aop", None), file=sys.stderr)
    print(f"{len(items)} images, {len(done)} already done; thresholds: "
          f"{describe_thresholds(aop.thresholds)}", file=sys.stderr)
    if not args.no_progress:
      from tqdm import tqdm
      bar = tqdm(total=len(todo), unit="img", smoothing=0.1, desc=f"label (process 0 of "
                 f"{pcount}, {jax.local_device_count()} devices)")
  stats = Stats()
  if todo:
    step, gbatch = make_step(aop.bundle.model, aop.cfg, args.batch)
    stats = run_share(todo, step, gbatch, aop.cfg.img_size, args, shards, pidx, bar)
  if bar is not None:
    bar.close()
  _write_stats(args, stats, pidx, pcount)
  cli.barrier("aopsam_label_shares_done")
  if pidx != 0:
    cli.barrier("aopsam_label_merged")  # exit together: jax's shutdown waits only minutes
    return 1 if stats.errors else 0
  info = {"description": "AoP-SAM labels (aopsam_jax.label)", "weights": aop.weights,
          "random_sam": aop.random_sam, "asf": dataclasses.asdict(aop.cfg)}
  try:
    counts = shards.merge(args.out, items, info)
  finally:
    cli.barrier("aopsam_label_merged")
  _report(stats, counts, pcount, args.out, aop.weights)
  if counts["masks"] == 0:
    raise cli.WorkError(f"no masks at all: every mask was filtered out "
                        f"({describe_thresholds(aop.thresholds)})")
  return 1 if counts["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
