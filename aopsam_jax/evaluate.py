r"""AoP-SAM vs grid AMG (AMG_S 16x16, AMG_D 32x32) on a COCO-format split.

  python -m aopsam_jax.evaluate --data ../shared/data/coco_tiny --split val \
      --bundle BUNDLE_DIR --out benchmarks/results/eval_coco_tiny [--overwrite]

Metrics per method (ground truth: non-crowd instances with area >= 64 px in
the 1024 input frame, as in training, `trainer.evaluation.ImageGT`):
  * prompt recall: share of GT instances containing at least one DECODED
    prompt point (AMG: every grid point; AoP: every coarse + fine prompt);
    prompts decoded per image.  Meaningful with any SAM weights.
  * mask mIoU: each GT instance's best IoU with any output mask (original
    resolution), averaged, also by COCO size (small < 32^2 <= medium < 96^2
    <= large, original pixels); recall at IoU 0.5; output masks per image.
    Needs real SAM weights: with random weights the output says so.
  * COCO AP / AP50 / AR@100: class-agnostic (`useCats=0`) pycocotools
    `COCOeval` of the output masks scored by predicted IoU, against every
    annotation of the evaluated images (the standard COCO ground truth).
    Also needs real SAM weights.
  * latency: median over images of the jitted program (prepared image on the
    device -> fixed-size outputs, `jax.block_until_ready`; grid AMG adds the
    second decoding of its surviving prompts for their masks), compilation
    excluded (reported separately; grid AMG compiles once per image-size
    bucket); memory: XLA's buffer analysis of the
    compiled program (arguments + outputs + temporaries) and the process'
    peak RSS.
Grid AMG is slow on a CPU (AMG_D decodes 1024 prompts): its mask metrics and
latency use the first `--amg-images` images; its prompt metrics are exact
on every image (the grid is fixed, no decoding needed).
Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from aopsam_jax.sam import rle
from aopsam_jax.sysinfo import peak_rss_kb

SIZE_EDGES = (32 ** 2, 96 ** 2)


def size_class(area: float) -> str:
  return "small" if area < SIZE_EDGES[0] else ("medium" if area < SIZE_EDGES[1] else "large")


def best_ious(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """gt (G, H, W), pred (N, H, W) bool -> (G,) best IoU of each GT with any pred."""
  if len(gt) == 0:
    return np.zeros((0,), np.float64)
  if len(pred) == 0:
    return np.zeros((len(gt),), np.float64)
  g = gt.reshape(len(gt), -1).astype(np.float32)
  p = pred.reshape(len(pred), -1).astype(np.float32)
  inter = g @ p.T
  union = g.sum(1)[:, None] + p.sum(1)[None, :] - inter
  iou = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
  return iou.max(1)


class MethodStats:
  """Accumulates per-image results of one method."""

  def __init__(self):
    self.prompt = collections.Counter()
    self.mask_ious: List[float] = []
    self.mask_sizes: List[str] = []
    self.n_masks: List[int] = []
    self.n_prompts: List[float] = []
    self.latency: List[float] = []
    self.coco_dets: List[dict] = []
    self.coco_images: List[int] = []
    self.first_call_s: Optional[float] = None
    self.memory: Dict[str, float] = {}

  def add_prompts(self, counts: Dict[str, float]):
    self.prompt.update(counts)
    self.n_prompts.append(counts["points"])

  def add_masks(self, gt_masks, areas, pred_masks, scores=None, image_id=None):
    if image_id is not None:
      self.coco_images.append(image_id)
      self.coco_dets.extend(
          {"image_id": image_id, "category_id": 1, "segmentation": r, "score": float(sc)}
          for r, sc in zip(rle.encode(np.asarray(pred_masks)), scores))
    ious = best_ious(gt_masks, pred_masks)
    self.mask_ious.extend(ious.tolist())
    self.mask_sizes.extend(size_class(a) for a in areas)
    self.n_masks.append(int(len(pred_masks)))

  def summary(self) -> Dict[str, float]:
    c = self.prompt
    out = {"prompt_recall": c["hit"] / max(c["gt"], 1.0),
           "prompts_per_image": float(np.mean(self.n_prompts)) if self.n_prompts else float("nan"),
           "prompt_images": len(self.n_prompts), "gt_instances": int(c["gt"])}
    if self.mask_ious:
      ious = np.asarray(self.mask_ious)
      sizes = np.asarray(self.mask_sizes)
      out.update(miou=float(ious.mean()), recall_50=float((ious >= 0.5).mean()),
                 masks_per_image=float(np.mean(self.n_masks)), mask_images=len(self.n_masks),
                 mask_instances=int(len(ious)))
      for s in ("small", "medium", "large"):
        sel = sizes == s
        out[f"miou_{s}"] = float(ious[sel].mean()) if sel.any() else float("nan")
        out[f"n_{s}"] = int(sel.sum())
    if self.latency:
      out.update(latency_median_s=float(np.median(self.latency)),
                 latency_images=len(self.latency))
    if self.first_call_s is not None:
      out["first_call_s"] = self.first_call_s
    out.update(self.memory)
    return out


def coco_metrics(ann_path: str, stats: MethodStats) -> Dict[str, float]:
  """Class-agnostic COCO mask AP, AP50 and AR@100 of one method's detections."""
  import contextlib
  import io

  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  if not stats.coco_images:
    return {}
  if not stats.coco_dets:
    return {"coco_ap": 0.0, "coco_ap50": 0.0, "coco_ar100": 0.0}
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
    gt = COCO(ann_path)
    e = COCOeval(gt, gt.loadRes(stats.coco_dets), "segm")
    e.params.useCats = 0
    e.params.imgIds = sorted(stats.coco_images)
    e.evaluate()
    e.accumulate()
    e.summarize()
  return {"coco_ap": float(e.stats[0]), "coco_ap50": float(e.stats[1]),
          "coco_ar100": float(e.stats[8])}


def memory_of(compiled) -> Dict[str, float]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # backend without the analysis
    return {}
  if m is None:
    return {}
  get = lambda k: float(getattr(m, k, 0) or 0)
  total = (get("argument_size_in_bytes") + get("output_size_in_bytes")
           + get("temp_size_in_bytes") - get("alias_size_in_bytes"))
  return {"xla_temp_mib": get("temp_size_in_bytes") / 2 ** 20, "xla_total_mib": total / 2 ** 20}


def _timed(fn, *args):
  import jax
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


class Method:
  """One method's compiled program: compiled on the first image (that call's
  time, compilation included, is `first_call_s`), later calls timed."""

  def __init__(self, lower, state, stats: MethodStats, name: str = "the program", model=None):
    self.lower, self.state, self.stats, self.model = lower, state, stats, model
    self.compiled, self.warm = {}, set()
    self.name = name

  def __call__(self, dev_inputs, key=None):
    """`key` names the compiled program (e.g. grid AMG's size bucket); a
    call that compiles is followed by a timed one."""
    import jax
    s = self.stats
    if key not in self.compiled:
      from aopsam_jax import compile_cache
      compile_cache.announce(self.name)
      t0 = time.perf_counter()
      self.compiled[key] = self.lower(*dev_inputs).compile()
      s.memory = s.memory or memory_of(self.compiled[key])
      _timed(self.compiled[key], self.state, *dev_inputs)
      if s.first_call_s is None:
        s.first_call_s = time.perf_counter() - t0
    out, dt = _timed(self.compiled[key], self.state, *dev_inputs)
    s.latency.append(dt)
    return jax.device_get(out)


def _device_inputs(inputs) -> list:
  import jax
  return [jax.device_put(np.asarray(x)) for x in inputs]


def load_split(data_dir: str, split: str, limit: Optional[int]):
  """(images sorted by id, first `limit`; annotations by image id; image dir).

  A missing annotation file or an empty selection raises `UsageError`
  (before any model work: nothing to evaluate is a mistake, not a result).
  """
  from aopsam_jax.cli import UsageError
  from aopsam_jax.data.coco import load_annotations
  ann = os.path.join(data_dir, "annotations", f"instances_{split}2017.json")
  if not os.path.isdir(data_dir):
    raise UsageError(f"--data {data_dir}: no such directory")
  if not os.path.isfile(ann):
    raise UsageError(f"--split {split}: {ann} does not exist (--data needs "
                     "annotations/instances_<split>2017.json and <split>2017/)")
  try:
    images, anns_by = load_annotations(ann)
  except ValueError as e:  # a malformed annotation file
    from aopsam_jax.cli import WorkError
    raise WorkError(str(e)) from None
  images = sorted(images, key=lambda im: im["id"])[:limit]
  if not images:
    raise UsageError(f"--limit {limit} selects no images" if limit is not None and limit < 1
                     else f"--split {split}: {ann} lists no images; nothing to evaluate")
  return images, anns_by, os.path.join(data_dir, f"{split}2017")


def build_methods(b, methods, stats: Dict[str, MethodStats]) -> Dict[str, Method]:
  """{method: Method} over the bundle's AoP-SAM model and its SAM."""
  from flax import nnx

  from aopsam_jax.aop import pipeline
  from aopsam_jax.sam import amg
  cfg = b.asf
  gd, st = nnx.split(b.model)
  sam_gd, sam_st = nnx.split(b.sam)
  out = {}
  for m in methods:
    if m == "aop":
      out[m] = Method(lambda *d: pipeline.lower((gd, st), *d, cfg=cfg), st, stats[m],
                      "the AoP-SAM program")
    else:
      acfg = amg_config(m)
      out[m] = Method(lambda inputs, _th, acfg=acfg: amg.lower((sam_gd, sam_st), inputs, acfg),
                      sam_st, stats[m], f"the {m.upper()} program", model=(sam_gd, sam_st))
  return out


def eval_aop_image(run: Method, g, areas, image, cfg, image_id=None) -> None:
  from aopsam_jax.aop import pipeline
  out = run(_device_inputs(pipeline.prepare(image, cfg.img_size)))
  run.stats.add_prompts(g.counts(np.asarray(out["prompt_points"]),
                                 np.asarray(out["prompt_valid"])))
  run.stats.add_masks(g.gt, areas, pipeline.masks_at_original(out, cfg.img_size),
                      np.asarray(out["iou"])[np.asarray(out["valid"])], image_id)


def eval_amg_image(run: Method, acfg, g, areas, image, img_size: int, with_masks: bool,
                   image_id=None) -> None:
  """Prompt metrics on every image (the grid needs no decoding); masks and
  latency only when `with_masks`."""
  from aopsam_jax.sam import amg
  from aopsam_jax.trainer.evaluation import grid_points
  h0, w0 = image.shape[:2]
  pts = grid_points(acfg.points_per_side, h0, w0)
  run.stats.add_prompts(g.counts(pts, np.ones(len(pts), bool)))
  if with_masks:
    inputs = amg.prepare(image, acfg, img_size)
    key = amg.out_bucket(inputs)
    out = run(amg.device_inputs(inputs, acfg), key=key)
    if key not in run.warm:  # the mask decoder compiles once per bucket too: not latency
      amg.decode_masks(run.model, inputs, out, acfg)
      run.warm.add(key)
    t0 = time.perf_counter()
    masks = amg.decode_masks(run.model, inputs, out, acfg)
    run.stats.latency[-1] += time.perf_counter() - t0  # the survivors' masks are part of the work
    run.stats.add_masks(g.gt, areas, masks, out["iou"][out["valid"]], image_id)


AMG_METHODS = {"amg_s": "AMG_S", "amg_d": "AMG_D"}  # method -> `amg` config constant


def amg_config(method: str):
  from aopsam_jax.sam import amg
  return getattr(amg, AMG_METHODS[method])


def evaluate(data_dir: str, split: str = "val", bundle_path: Optional[str] = None,
             sam_checkpoint: Optional[str] = None, methods=("aop", "amg_s", "amg_d"),
             limit: Optional[int] = None, amg_images: int = 5,
             asf_overrides: Optional[dict] = None, progress: bool = True,
             force_encoder: bool = False) -> dict:
  from aopsam_jax.aop import bundle as bundle_lib
  from aopsam_jax.data.targets import TargetConfig
  from aopsam_jax.sam.image_io import load_image
  from aopsam_jax.trainer.evaluation import ImageGT

  images, anns_by, img_dir = load_split(data_dir, split, limit)
  try:
    b = bundle_lib.load_bundle(bundle_path, sam_checkpoint=sam_checkpoint,
                               asf_overrides=asf_overrides, force_encoder=force_encoder)
  except (OSError, ValueError) as e:  # CheckpointError, EncoderMismatch are ValueErrors
    from aopsam_jax.cli import WorkError
    raise WorkError(f"cannot load {sam_checkpoint or bundle_path or 'the shipped bundle'}: "
                    f"{e}") from None
  cfg = b.asf
  tcfg = TargetConfig(img_size=cfg.img_size)
  stats = {m: MethodStats() for m in methods}
  runs = build_methods(b, methods, stats)
  it, warn = images, lambda msg: print(msg, file=sys.stderr)
  if progress:
    from tqdm import tqdm
    it = tqdm(images, desc="evaluate", dynamic_ncols=True)
    warn = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731  (on its own line, not in the bar)
  n_img, skipped = 0, []
  for im in it:
    path = os.path.join(img_dir, im["file_name"])
    try:
      image = load_image(path)
    except (OSError, ValueError) as e:  # missing or undecodable: skipped, as in training
      reason = str(e) if path in str(e) else f"{path}: {e}"
      warn(f"warning: skipped image {im['id']}: {reason}")
      skipped.append({"image_id": im["id"], "file": path, "reason": reason})
      continue
    g = ImageGT(anns_by[im["id"]], image.shape[0], image.shape[1], tcfg)
    areas = g.gt.reshape(len(g.gt), -1).sum(1).astype(float)
    for m in methods:
      if m == "aop":
        eval_aop_image(runs[m], g, areas, image, cfg, im["id"])
      else:
        eval_amg_image(runs[m], amg_config(m), g, areas, image, cfg.img_size,
                       n_img < amg_images, im["id"])
    n_img += 1
  if not n_img:
    from aopsam_jax.cli import WorkError
    raise WorkError(f"none of the {len(images)} selected images could be read (e.g. "
                    f"{skipped[0]['reason']}); nothing was evaluated")
  res = summarize(b, stats, methods, data_dir, split, n_img, amg_images, bundle_path)
  res["dataset"].update(listed_images=len(images), skipped_images=skipped)
  return res


def summarize(b, stats: Dict[str, MethodStats], methods, data_dir: str, split: str,
              n_images: int, amg_images: int, bundle_path: Optional[str]) -> dict:
  """The result dict: dataset, SAM, configs, per-method summaries, machine, notes."""
  import jax

  from aopsam_jax.aop import bundle as bundle_lib
  from aopsam_jax.sam.config import SAM_CONFIGS
  cfg = b.asf
  amg_cfgs = {m: amg_config(m) for m in methods if m in AMG_METHODS}
  sam_desc = next((k for k, v in SAM_CONFIGS.items() if v == b.sam.config), "custom")
  result = {
      "dataset": {"dir": os.path.abspath(data_dir), "split": split, "images": n_images,
                  "amg_mask_images": min(amg_images, n_images)},
      "sam": {"model": sam_desc, "random_weights": b.random_sam, "source": b.sam_info},
      "bundle": os.path.abspath(bundle_path or bundle_lib.DEFAULT_BUNDLE),
      "asf": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
      "amg": {m: {"points_per_side": c.points_per_side,
                  "pred_iou_thresh": c.pred_iou_thresh,
                  "stability_score_thresh": c.stability_score_thresh,
                  "max_masks": c.max_masks} for m, c in amg_cfgs.items()},
      "methods": {m: {**stats[m].summary(), **coco_metrics(
          os.path.join(data_dir, "annotations", f"instances_{split}2017.json"), stats[m])}
          for m in methods},
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "load_avg_1_5_15": [round(v, 1) for v in os.getloadavg()],
                  "jax": jax.__version__, "backend": jax.default_backend(),
                  "process_peak_rss_mib": peak_rss_kb() / 1024},
      "notes": [],
  }
  if b.random_sam:
    result["notes"].append(
        "SAM weights are RANDOM (no official weights can be downloaded here): predicted masks, "
        "mIoU, recall@0.5 and mask counts are meaningless; the prompt metrics (prompt recall, "
        "prompts/image) and latencies are meaningful.")
  result.update(comparisons(result["methods"]))
  return result


def comparisons(ms: Dict[str, dict]) -> dict:
  """AoP-SAM against the grids: prompt budget vs AMG_S, speed-up vs AMG_D."""
  out = {}
  if "aop" in ms and "amg_s" in ms:
    out["aop_vs_amg_s"] = {
        "prompt_ratio": ms["aop"]["prompts_per_image"] / ms["amg_s"]["prompts_per_image"],
        "target_prompt_ratio_max": 1 / 8,
        "prompt_recall_delta": ms["aop"]["prompt_recall"] - ms["amg_s"]["prompt_recall"]}
  if "aop" in ms and "amg_d" in ms and "latency_median_s" in ms.get("amg_d", {}) \
      and "latency_median_s" in ms["aop"]:
    out["aop_vs_amg_d"] = {
        "speedup": ms["amg_d"]["latency_median_s"] / ms["aop"]["latency_median_s"],
        "target_speedup_min": 5.0}
  return out


NAMES = {"aop": "AoP-SAM", "amg_s": "AMG_S (16x16)", "amg_d": "AMG_D (32x32)"}


def _f(v, fmt="{:.3f}"):
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "n/a"
  return fmt.format(v)


def to_markdown(res: dict) -> str:
  ms = res["methods"]
  rnd = res["sam"]["random_weights"]
  star = " *" if rnd else ""
  lines = [f"# AoP-SAM vs grid AMG on {os.path.basename(res['dataset']['dir'])} "
           f"{res['dataset']['split']}",
           "",
           f"SAM `{res['sam']['model']}` ({'RANDOM weights' if rnd else 'trained weights'}); "
           f"{res['dataset']['images']} images (grid AMG masks/latency on the first "
           f"{res['dataset']['amg_mask_images']}); backend {res['machine']['backend']}, "
           f"{res['machine']['cpu_count']} CPUs (load average at the end "
           f"{'/'.join(str(v) for v in res['machine'].get('load_avg_1_5_15', []))}), "
           f"jax {res['machine']['jax']}.",
           "",
           f"| method | prompts/image | prompt recall | mIoU{star} | mIoU S/M/L{star} | "
           f"recall@0.5{star} | COCO AP / AP50 / AR@100{star} | masks/image{star} | "
           f"median latency (s) | first call (s) | XLA mem (MiB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for m, s in ms.items():
    sml = "/".join(_f(s.get(f"miou_{k}"), "{:.2f}") for k in ("small", "medium", "large"))
    lines.append(
        f"| {NAMES.get(m, m)} | {_f(s.get('prompts_per_image'), '{:.1f}')} | "
        f"{_f(s.get('prompt_recall'))} | {_f(s.get('miou'))} | {sml} | {_f(s.get('recall_50'))} | "
        f"{' / '.join(_f(s.get(k)) for k in ('coco_ap', 'coco_ap50', 'coco_ar100'))} | "
        f"{_f(s.get('masks_per_image'), '{:.1f}')} | {_f(s.get('latency_median_s'), '{:.3f}')} | "
        f"{_f(s.get('first_call_s'), '{:.1f}')} | {_f(s.get('xla_total_mib'), '{:.0f}')} |")
  lines.append("")
  if "aop_vs_amg_s" in res:
    r = res["aop_vs_amg_s"]
    lines.append(f"- AoP-SAM decodes {r['prompt_ratio']:.3f}x the prompts of AMG_S (target <= "
                 f"{r['target_prompt_ratio_max']:.3f}); prompt recall difference "
                 f"{r['prompt_recall_delta']:+.3f} (target >= 0).")
  if "aop_vs_amg_d" in res:
    r = res["aop_vs_amg_d"]
    lines.append(f"- End-to-end latency: AoP-SAM is {r['speedup']:.1f}x faster than AMG_D "
                 f"(target >= {r['target_speedup_min']:.0f}x).")
  skipped = res["dataset"].get("skipped_images") or []
  if skipped:
    lines.append(f"- {len(skipped)} of {res['dataset']['listed_images']} listed images could not "
                 f"be read and were skipped (e.g. {skipped[0]['reason']}); the metrics cover the "
                 f"other {res['dataset']['images']}.")
  for n in res["notes"]:
    lines.append(f"- {'* ' if rnd else ''}{n}")
  lines.append(f"- Process peak RSS {res['machine']['process_peak_rss_mib']:.0f} MiB (all methods).")
  return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ms = res["methods"]
  names = [NAMES.get(m, m) for m in ms]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  panels = [("prompts_per_image", "prompts decoded / image", True),
            ("prompt_recall", "prompt recall (GT instances hit)", False),
            ("latency_median_s", "median latency (s, log)", True)]
  colors = ["tab:green", "tab:blue", "tab:orange", "tab:gray"]
  for ax, (key, title, log) in zip(axes, panels):
    vals = [ms[m].get(key, np.nan) for m in ms]
    ax.bar(names, vals, color=colors[:len(vals)])
    for i, v in enumerate(vals):
      if np.isfinite(v):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    if log:
      ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
  sam = res["sam"]
  fig.suptitle(f"{os.path.basename(res['dataset']['dir'])} {res['dataset']['split']}: SAM "
               f"{sam['model']}{' (RANDOM weights)' if sam['random_weights'] else ''}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")  # by content: `path` may be a temporary name
  plt.close(fig)


OUT_SUFFIXES = (".json", ".md", ".png")


def default_out(data_dir: str, split: str) -> str:
  """eval_<data folder>_<split>, in the current directory."""
  name = os.path.basename(os.path.normpath(os.path.abspath(data_dir))) or "data"
  return f"eval_{name}_{split}"


def write_outputs(res: dict, out_prefix: str) -> None:
  """<out>.json (every number), .md (the table), .png (the chart); each file
  appears whole or not at all (`cli.write_atomic`)."""
  from aopsam_jax.cli import write_atomic

  def text(body: str):
    def write(tmp):
      with open(tmp, "w") as f:
        f.write(body)
    return write
  write_atomic(out_prefix + ".json", text(json.dumps(res, indent=1, default=str)))
  write_atomic(out_prefix + ".md", text(to_markdown(res)))
  write_atomic(out_prefix + ".png", lambda tmp: plot(res, tmp))


def _positive_int(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    v = 0
  if v < 1:
    raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
  return v


def _count(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    v = -1
  if v < 0:
    raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
  return v


METHODS = ("aop", "amg_s", "amg_d")


def parse_methods(text: str) -> tuple:
  """'aop,amg_s' -> ('aop', 'amg_s'); unknown or repeated names are a usage error."""
  from aopsam_jax.cli import UsageError
  names = tuple(m.strip() for m in text.split(",") if m.strip())
  unknown = [m for m in names if m not in METHODS]
  if unknown or not names:
    raise UsageError(f"--methods {text!r}: unknown method(s) {unknown}; choose from "
                     f"{', '.join(METHODS)} (comma-separated)" if unknown else
                     f"--methods {text!r} names no method; choose from {', '.join(METHODS)}")
  if len(set(names)) != len(names):
    raise UsageError(f"--methods {text!r} names a method twice")
  return names


def build_parser() -> argparse.ArgumentParser:
  from aopsam_jax.cli import EXIT_STATUS_HELP, ArgumentParser
  p = ArgumentParser(prog="python -m aopsam_jax.evaluate", description=__doc__.split("\n\n")[0],
                     epilog="Images listed in the annotations but missing or unreadable are "
                            "skipped with a warning and counted in the report (exit status 1). "
                            + EXIT_STATUS_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="COCO-format dir (annotations/, <split>2017/)")
  p.add_argument("--split", default="val")
  p.add_argument("--bundle", default=None, help="AoP-SAM bundle dir (default: shipped one)")
  p.add_argument("--sam-checkpoint", "--checkpoint", default=None,
                 help="SAM weights replacing the bundle's: converted .safetensors, official .pth "
                      "(any size), HF folder, or a name (vit_b, vit_l, vit_h, facebook/sam-vit-*)")
  p.add_argument("--force-encoder", action="store_true",
                 help="run a predictor that reads SAM's embedding with a SAM it was not trained "
                      "with (refused otherwise; image-only predictors fit every SAM)")
  p.add_argument("--methods", default="aop,amg_s,amg_d",
                 help=f"comma-separated, from {', '.join(METHODS)}")
  p.add_argument("--limit", type=_positive_int, default=None, help="first N images (by id)")
  p.add_argument("--amg-images", type=_count, default=5,
                 help="images on which grid AMG is run (masks, latency; first one compiles)")
  p.add_argument("--asf", action="append", default=[],
                 help="AsfConfig override, e.g. --asf k_coarse=16 (repeatable)")
  p.add_argument("--out", default=None,
                 help="path prefix of the report: writes OUT.json (every number), OUT.md (the "
                      "table) and OUT.png (the chart); default eval_<data folder>_<split> in the "
                      "current directory")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing report at --out (without it, one stops the run before "
                      "any work)")
  from aopsam_jax import compile_cache
  compile_cache.add_flag(p)
  return p


def check_out(out: str, overwrite: bool) -> None:
  """--out is a path prefix whose report files do not exist yet (unless --overwrite)."""
  from aopsam_jax.cli import UsageError
  if os.path.isdir(out):
    raise UsageError(f"--out {out} is a directory; give a path prefix (writes <out>.json, "
                     "<out>.md, <out>.png)")
  existing = [out + s for s in OUT_SUFFIXES if os.path.exists(out + s)]
  if existing and not overwrite:
    raise UsageError(f"--out {out}: {existing[0]} exists (an earlier report); pass --overwrite to "
                     "replace it or choose another --out")


def main(argv=None) -> int:
  from aopsam_jax.cli import run_main
  return run_main(_main, argv, "evaluate")


def _main(argv) -> int:
  from aopsam_jax.cli import UsageError
  p = build_parser()
  a = p.parse_args(argv)
  methods = parse_methods(a.methods)
  from aopsam_jax.sam.config import CHECKPOINT_NAMES
  for flag, path in (("--bundle", a.bundle), ("--sam-checkpoint", a.sam_checkpoint)):
    if path is not None and not os.path.exists(path) and \
        not (flag == "--sam-checkpoint" and path in CHECKPOINT_NAMES):
      raise UsageError(f"{flag} {path}: no such file or directory")
  a.out = a.out or default_out(a.data, a.split)
  check_out(a.out, a.overwrite)
  load_split(a.data, a.split, a.limit)  # a usage error here comes before any model work
  from aopsam_jax import compile_cache
  compile_cache.setup(a.no_compile_cache)
  from aopsam_jax.aop.bundle import parse_overrides
  try:
    over = parse_overrides(a.asf, "--asf")
  except ValueError as e:
    p.error(str(e))
  res = evaluate(a.data, a.split, a.bundle, a.sam_checkpoint, methods, a.limit, a.amg_images,
                 over or None, force_encoder=a.force_encoder)
  write_outputs(res, a.out)
  print(to_markdown(res))
  print(f"evaluate: report written to {a.out}{{{','.join(OUT_SUFFIXES)}}}", file=sys.stderr)
  return 1 if res["dataset"]["skipped_images"] else 0


if __name__ == "__main__":
  sys.exit(main())
