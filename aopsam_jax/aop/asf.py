"""Adaptive Sampling and Filtering (ASF) for AoP-SAM, with static shapes.

Turns a prompt heatmap into a small set of point prompts and de-duplicated
masks, inside one `jax.jit`, for one image (vmap it for batches):

  1. Coarse stage.  Local maxima of the heatmap probability (max-pool NMS,
     `peaks.local_maxima`) inside the real image region, above the adaptive
     threshold ``max(abs_threshold, rel_threshold * image maximum)``; the
     best `k_coarse` fill fixed slots (unused slots are masked, not
     removed).  All coarse prompts are decoded in ONE batch.
  2. Filtering.  A candidate mask (each prompt gives `M` multimask outputs)
     survives when predicted IoU > `pred_iou_thresh` and stability >=
     `stability_score_thresh` (official AMG semantics, `mask_ops`).  A
     prompt's representative mask is its best surviving candidate (by
     predicted IoU).  Instance-level redundancy: prompts are visited by
     descending score; a prompt whose point falls inside the representative
     mask of an already accepted prompt is dropped.
  3. Fine stage.  Heatmap peaks not used by the coarse stage, outside the
     union of the accepted masks and above the (lower) fine threshold give
     up to `k_fine` more prompts, decoded and filtered the same way.
  4. Mask NMS on the low-res masks (mask IoU > `nms_thresh`, by predicted
     IoU) over the candidates of all accepted prompts; the best `max_masks`
     are returned, with validity flags.

The decoder is a pluggable function ``decode_fn(points_in (K, 2), valid (K,))
-> (low_res_logits (K, M, L, L), iou (K, M))`` with points in the padded
input frame (`img_size` pixels, e.g. 1024) and L the low-res mask size,
which must equal the heatmap size (both are the 1/4 grid of the input:
heatmap pixel (i, j) and low-res pixel (i, j) cover the same 4 x 4 input
pixels).  The valid slots always come first (peaks by descending score), so
a decoder may skip the slots from ``sum(valid)`` on; their outputs are
ignored.  Tests pass a fake decoder returning known masks.  A stage whose
slots are all invalid skips its decoder call (`lax.cond`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from aopsam_jax.sam import geometry, mask_ops
from aopsam_jax.sam.modeling import run_if
from aopsam_jax.aop import peaks

Array = jax.Array
DecodeFn = Callable[[Array, Array], Tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class AsfConfig:
  """ASF settings (hashable: a static argument of the jitted pipeline).

  Prompt budget: k_coarse + k_fine = 32 = 1/8 of AMG_S's 256 prompts (the
  AoP-SAM efficiency target).  `peak_kernel` was chosen by measurement
  (`benchmarks/sweep_asf.py`, shipped predictor, coco_tiny val, results in
  BENCHMARKS.md): prompt recall at 32 prompts/image was 0.416 / 0.447 /
  0.472 / 0.474 / 0.479 for windows 3 / 7 / 11 / 15 / 21 (precision falling
  0.54 -> 0.48); 11 is the knee.  The heatmap thresholds (abs/rel) did not
  bind in that sweep (almost every image fills all 32 slots with any of
  0.02 / 0.05 x 0.0 / 0.1), so they only matter for near-empty heatmaps.
  The split k_coarse / k_fine cannot be tuned without real SAM weights: with
  random weights no mask passes the filters, so the fine stage just takes
  the next peaks.  The mask-quality thresholds (`pred_iou_thresh`,
  `stability_score_thresh`, `nms_thresh`) are the official SAM AMG defaults:
  they too can only be tuned with real SAM weights.
  """

  k_coarse: int = 24               # coarse prompt slots
  k_fine: int = 8                  # fine prompt slots (uncovered regions)
  peak_kernel: int = 11            # max-pool NMS window on the 256x256 heatmap (measured)
  abs_threshold: float = 0.05      # coarse: probability > max(abs, rel * image max)
  rel_threshold: float = 0.1
  fine_abs_threshold: float = 0.02  # fine stage: lower bar, only where uncovered
  fine_rel_threshold: float = 0.05
  pred_iou_thresh: float = 0.88    # official AMG defaults
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  mask_threshold: float = 0.0
  masks_per_prompt: int = 1        # candidates kept per accepted prompt (1..M)
  nms_thresh: float = 0.7          # mask IoU (low-res) for the final NMS
  max_masks: int = 32              # output slots (<= (k_coarse + k_fine) * masks_per_prompt)
  img_size: int = 1024             # padded input side (heatmap stride = img_size / L)

  def __post_init__(self):
    if self.k_coarse < 1 or self.k_fine < 0:
      raise ValueError(f"need k_coarse >= 1 and k_fine >= 0, got {self.k_coarse}, {self.k_fine}")
    if self.masks_per_prompt < 1:
      raise ValueError("masks_per_prompt must be >= 1")
    if self.max_masks < 1:
      raise ValueError("max_masks must be >= 1")

  @property
  def max_prompts(self) -> int:
    return self.k_coarse + self.k_fine


def greedy_suppress(scores: Array, valid: Array, suppress: Array) -> Array:
  """Greedy selection with a precomputed relation.

  Visits the valid entries by descending score (ties: lower index first);
  a visited entry that is still kept removes every later entry j with
  ``suppress[i, j]``.  scores (N,), valid (N,) bool, suppress (N, N) bool.
  Returns keep (N,) bool in the input order.  (Mask NMS: suppress = mask
  IoU > t.  Prompt redundancy: suppress[i, j] = point j inside mask i.)
  """
  n = scores.shape[0]
  order = mask_ops.sort_valid_first(scores, valid)
  rel = suppress[order][:, order]
  later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
  rel = rel & later

  def body(r, keep):
    return keep & ~(rel[r] & keep[r])

  keep_sorted = jax.lax.fori_loop(0, n, body, valid[order])
  return jnp.zeros((n,), bool).at[order].set(keep_sorted)


def _points_inside(masks: Array, pix: Array) -> Array:
  """masks (N, L, L) bool, pix (K, 2) int (col, row) -> (N, K): point k in mask n."""
  return masks[:, pix[:, 1], pix[:, 0]]


def _decode_stage(decode_fn: DecodeFn, pts_hm: Array, ok: Array, stride: float):
  pts_in = pts_hm * stride
  logits, iou = run_if(jnp.any(ok), decode_fn, pts_in, ok)
  return logits.astype(jnp.float32), iou.astype(jnp.float32), pts_in


def _filter_stage(logits: Array, iou: Array, ok: Array, pts_hm: Array, region: Array,
                  cfg: AsfConfig):
  """Candidate filtering + instance-level redundancy for one stage."""
  k, m, l, _ = logits.shape
  stab = mask_ops.stability_score(logits, cfg.mask_threshold, cfg.stability_score_offset,
                                  region)
  cand_ok = ok[:, None]
  if cfg.pred_iou_thresh > 0.0:
    cand_ok = cand_ok & (iou > cfg.pred_iou_thresh)
  if cfg.stability_score_thresh > 0.0:
    cand_ok = cand_ok & (stab >= cfg.stability_score_thresh)
  masked_iou = jnp.where(cand_ok, iou, -jnp.inf)
  best = jnp.argmax(masked_iou, axis=1)
  prompt_ok = jnp.any(cand_ok, axis=1)
  prompt_score = jnp.take_along_axis(iou, best[:, None], 1)[:, 0]
  best_mask = (jnp.take_along_axis(logits, best[:, None, None, None], 1)[:, 0]
               > cfg.mask_threshold) & region
  pix = jnp.clip(jnp.floor(pts_hm).astype(jnp.int32), 0, l - 1)
  inside = _points_inside(best_mask, pix)  # (K, K): point j inside mask i
  accepted = greedy_suppress(prompt_score, prompt_ok, inside)
  return dict(stab=stab, cand_ok=cand_ok, prompt_ok=prompt_ok, accepted=accepted,
              best_mask=best_mask)


def _prompt_heatmap(heatmap_logits: Array, region: Array) -> Tuple[Array, Array]:
  prob = jax.nn.sigmoid(heatmap_logits.astype(jnp.float32))
  prob = jnp.where(region, prob, -1.0)
  return prob, jnp.maximum(jnp.max(prob), 0.0)


def _top_peaks(cand: Array, prob: Array, k: int):
  """Top-k of the pixels flagged in `cand` (already local maxima) by probability."""
  scores = jnp.where(cand, prob, -jnp.inf)
  return peaks.extract_peaks(scores[None], k, kernel=1)  # kernel 1: every finite pixel


def filter_counts(p_ok: Array, iou: Array, stab: Array, cand_ok: Array, cand: Array,
                  kept: Array, cfg: AsfConfig) -> Dict[str, Array]:
  """How many of the decoded (P, M) candidates each filter removed, applied in
  order (IoU, stability, prompt redundancy, mask NMS): the numbers the CLI
  prints when nothing survives."""
  n = lambda x: jnp.sum(x.astype(jnp.int32))
  dec = jnp.broadcast_to(p_ok[:, None], iou.shape)
  pass_iou = iou > cfg.pred_iou_thresh if cfg.pred_iou_thresh > 0.0 else jnp.ones_like(dec)
  pass_stab = (stab >= cfg.stability_score_thresh if cfg.stability_score_thresh > 0.0
               else jnp.ones_like(dec))
  return dict(num_candidates=n(dec), removed_iou=n(dec & ~pass_iou),
              removed_stability=n(dec & pass_iou & ~pass_stab),
              removed_redundant=n(cand_ok) - n(cand), removed_nms=n(cand) - n(kept))


def run(heatmap_logits: Array, input_hw: Array, decode_fn: DecodeFn,
        cfg: AsfConfig = AsfConfig(), stage_loop: bool = False) -> Dict[str, Array]:
  """ASF on one image.

  heatmap_logits (L, L) prompt-heatmap logits; input_hw (2,) int: size of
  the resized image inside the padded input (the rest is padding).
  Returns a dict of fixed-size arrays (N = max_masks, K1 = k_coarse,
  K2 = k_fine, P = K1 + K2):
    low_res_logits (N, L, L), iou (N,), stability (N,), mask_index (N,),
    prompt_index (N,) (0..P-1, coarse first), points_in (N, 2) the prompt
    of each mask in the input frame, stage (N,) 0 coarse / 1 fine,
    valid (N,) (valid slots first, by descending predicted IoU);
    prompts_in (P, 2), prompt_scores (P,) heatmap probability,
    prompt_valid (P,) decoded prompts, prompt_accepted (P,) prompts that
    survived filtering and redundancy; num_prompts (decoded),
    num_filtered (candidates passing the IoU/stability filters),
    num_kept (masks surviving NMS; > N means overflow), threshold (coarse);
    `filter_counts(...)`: the decoded candidates (num_candidates) and how many
    each filter removed, in order: removed_iou, removed_stability,
    removed_redundant (prompt inside an accepted mask, or beyond
    masks_per_prompt), removed_nms.

  `stage_loop`: run the two stages as two steps of one `lax.scan`, each with
  max(k_coarse, k_fine) slots of which only the stage's own first k are
  used, so the decoder, the filters and the peak selection are traced and
  compiled once instead of twice (same outputs).  Only for a decoder that
  skips the slots past ``sum(valid)``, as the chunked CPU decoder does; any
  other decoder would decode all those slots in the fine stage too.
  """
  l = heatmap_logits.shape[-1]
  if heatmap_logits.shape != (l, l):
    raise ValueError(f"heatmap must be square (L, L), got {heatmap_logits.shape}")
  stride = cfg.img_size / l
  input_hw = jnp.asarray(input_hw, jnp.int32)
  region = geometry.low_res_valid_region(input_hw, l, cfg.img_size)
  prob, pmax = _prompt_heatmap(heatmap_logits, region)
  is_peak = peaks.local_maxima(prob[None], cfg.peak_kernel)[0] & region
  stage = functools.partial(_stage, is_peak=is_peak, prob=prob, decode_fn=decode_fn,
                            region=region, stride=stride, cfg=cfg)
  t_coarse = jnp.maximum(cfg.abs_threshold, cfg.rel_threshold * pmax)
  t_fine = jnp.maximum(cfg.fine_abs_threshold, cfg.fine_rel_threshold * pmax)
  free = jnp.ones((l, l), bool)
  if cfg.k_fine > 0 and stage_loop:
    stages = _looped_stages(stage, free, t_coarse, t_fine, cfg)
  else:
    stages = [stage(free, t_coarse, cfg.k_coarse)]
    if cfg.k_fine > 0:  # peaks not used yet, outside the accepted masks
      stages.append(stage(~_claimed(stages[0]), t_fine, cfg.k_fine))
  if stages[0]["logits"].shape[-2:] != (l, l):
    raise ValueError(f"decoder masks {stages[0]['logits'].shape[-2:]} must match the heatmap "
                     f"({l}, {l})")
  both = {k: jnp.concatenate([st[k] for st in stages], 0) for k in _STAGE_OUTPUTS}
  return dict(_select_masks(both, region, cfg), threshold=t_coarse)


def _looped_stages(stage: Callable, free: Array, t_coarse: Array, t_fine: Array,
                   cfg: AsfConfig) -> list:
  """Both stages as two steps of one `lax.scan` over max(k_coarse, k_fine)
  slots (see `run`'s `stage_loop`)."""
  def step(free, t_n):
    s = stage(free, t_n[0], max(cfg.k_coarse, cfg.k_fine), t_n[1])
    return free & ~_claimed(s), {k: s[k] for k in _STAGE_OUTPUTS}  # only what is stacked

  limits = jnp.array([cfg.k_coarse, cfg.k_fine], jnp.int32)
  _, s = jax.lax.scan(step, free, (jnp.stack([t_coarse, t_fine]), limits))
  return [{key: v[0, :cfg.k_coarse] for key, v in s.items()},
          {key: v[1, :cfg.k_fine] for key, v in s.items()}]


def _claimed(s: Dict[str, Array]) -> Array:
  """(L, L): pixels a stage has used up: inside its accepted masks, or its
  decoded peaks.  The fine stage looks only outside them."""
  covered = jnp.any(s["best_mask"] & s["accepted"][:, None, None], axis=0)
  l = covered.shape[-1]
  pix = jnp.clip(jnp.floor(s["pts"]).astype(jnp.int32), 0, l - 1)
  return covered | jnp.zeros((l, l), bool).at[pix[:, 1], pix[:, 0]].max(s["ok"])


_STAGE_OUTPUTS = ("logits", "iou", "pts_in", "stab", "cand_ok", "accepted", "ok", "score")


def _stage(free: Array, threshold: Array, k: int, limit: Array | None = None, *,
           is_peak: Array, prob: Array, decode_fn: DecodeFn, region: Array, stride: float,
           cfg: AsfConfig) -> Dict[str, Array]:
  """One ASF stage: the best `k` peaks above `threshold` where `free`
  (only the first `limit` of them if given), decoded in one batch,
  filtered, redundant prompts dropped."""
  pts, score, ok = (a[0] for a in _top_peaks(is_peak & (prob > threshold) & free, prob, k))
  if limit is not None:  # the peaks are sorted: the first `limit` slots are the best
    ok = ok & (jnp.arange(k) < limit)
  logits, iou, pts_in = _decode_stage(decode_fn, pts, ok, stride)
  out = _filter_stage(logits, iou, ok, pts, region, cfg)
  return dict(out, pts=pts, score=score, ok=ok, logits=logits, iou=iou, pts_in=pts_in)


def _select_masks(s: Dict[str, Array], region: Array, cfg: AsfConfig) -> Dict[str, Array]:
  """The best `masks_per_prompt` candidates of each accepted prompt, mask
  NMS over them, the best `max_masks` in fixed slots."""
  logits, iou, cand_ok, accepted = s["logits"], s["iou"], s["cand_ok"], s["accepted"]
  p, m, l, _ = logits.shape
  keep_n = min(cfg.masks_per_prompt, m)
  rank = jnp.argsort(jnp.argsort(-jnp.where(cand_ok, iou, -jnp.inf), axis=1, stable=True),
                     axis=1, stable=True)
  cand = cand_ok & accepted[:, None] & (rank < keep_n)  # (P, M)
  flat_iou = iou.reshape(-1)
  flat_masks = (logits > cfg.mask_threshold).reshape(p * m, l, l) & region
  # Mask NMS over at most P * M candidates (only the chosen ones are valid).
  ious = mask_ops.mask_iou(flat_masks, flat_masks)
  kept = greedy_suppress(flat_iou, cand.reshape(-1), ious > cfg.nms_thresh)
  sel, sel_ok = mask_ops.top_k_valid(flat_iou, kept, min(cfg.max_masks, p * m))
  prompt_idx = sel // m
  p_ok = s["ok"]
  counts = filter_counts(p_ok, iou, s["stab"], cand_ok, cand, kept, cfg)
  return dict(
      **counts,
      low_res_logits=logits.reshape(p * m, l, l)[sel],
      iou=flat_iou[sel], stability=s["stab"].reshape(-1)[sel], mask_index=sel % m,
      prompt_index=prompt_idx, points_in=s["pts_in"][prompt_idx],
      stage=(prompt_idx >= cfg.k_coarse).astype(jnp.int32), valid=sel_ok,
      prompts_in=s["pts_in"], prompt_scores=jnp.where(p_ok, s["score"], 0.0), prompt_valid=p_ok,
      prompt_accepted=accepted, num_prompts=jnp.sum(p_ok.astype(jnp.int32)),
      num_filtered=jnp.sum(cand_ok.astype(jnp.int32)),
      num_kept=jnp.sum(kept.astype(jnp.int32)))
