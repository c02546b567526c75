"""Metrics output: JSON lines, optional TensorBoard, PNG plots."""

from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np


class MetricWriter:
  """Writes `<workdir>/metrics.jsonl` (and TensorBoard if tensorboardX is
  installed).  Only process 0 writes.  A resumed run appends; readers keep
  the last record per (kind, step)."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        pass

  def write(self, kind: str, step: int, values: Dict[str, float]) -> None:
    if not self.enabled:
      return
    rec = {"kind": kind, "step": int(step), **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(f"{kind}/{k}", float(v), int(step))

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_metrics(path: str) -> Dict[str, List[dict]]:
  """kind -> records sorted by step, last record per step wins."""
  out: Dict[str, Dict[int, dict]] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          r = json.loads(line)
          out.setdefault(r["kind"], {})[r["step"]] = r
  return {k: [v[s] for s in sorted(v)] for k, v in out.items()}


def plot_curves(workdir: str) -> List[str]:
  """Loss and prompt-metric curves -> `<workdir>/plots/*.png`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  m = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  paths = []
  tr, ev = m.get("train", []), m.get("eval", [])
  if tr:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    if ev and "loss" in ev[0]:
      ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="val")
    ax.set_xlabel("step"); ax.set_ylabel("focal loss"); ax.set_yscale("log"); ax.legend()
    p = os.path.join(workdir, "plots", "loss.png"); fig.tight_layout(); fig.savefig(p, dpi=100)
    plt.close(fig); paths.append(p)
  if ev:
    keys = sorted(k for k in ev[-1] if k.endswith("/recall") or k.endswith("/precision"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
      ax.plot([r["step"] for r in ev], [r.get(k, float("nan")) for r in ev], "o-", label=k)
    ax.set_xlabel("step"); ax.set_ylim(0, 1); ax.legend(fontsize=7)
    p = os.path.join(workdir, "plots", "prompt_metrics.png"); fig.tight_layout(); fig.savefig(p, dpi=100)
    plt.close(fig); paths.append(p)
  return paths


def plot_prompt_examples(path: str, examples, cols: int = 3) -> str:
  """Validation images with the predicted prompts, one panel each -> PNG.

  `examples`: list of (image (H, W, 3) uint8, points (K, 2) xy in the image
  frame, gt (N, H, W) bool instance masks, inside (N, K) bool: point k in
  instance n, title).  A point is green when it falls inside a ground-truth
  instance and red otherwise; every instance no point reached is outlined in
  yellow with an x at its most interior point.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from aopsam_jax.data.targets import interior_point
  n = len(examples)
  if n == 0:
    raise ValueError("no examples to plot")
  cols = min(cols, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, (image, points, gt, inside, title) in zip(axes.ravel(), examples):
    h, w = image.shape[:2]
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    ax.imshow(image)
    for m in gt[~inside.any(1)]:
      ax.contour(m, levels=[0.5], colors="yellow", linewidths=1.0)
      x, y, _ = interior_point(m)
      ax.plot(x - 0.5, y - 0.5, "x", color="yellow", ms=8, mew=2)
    hit = inside.any(0)
    ax.scatter(pts[hit, 0], pts[hit, 1], s=22, c="lime", edgecolors="black", linewidths=0.5)
    ax.scatter(pts[~hit, 0], pts[~hit, 1], s=22, c="red", edgecolors="black", linewidths=0.5)
    ax.set_xlim(0, w); ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=9)
  fig.suptitle("prompts: green inside a GT instance, red elsewhere; yellow: missed instances",
               fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
