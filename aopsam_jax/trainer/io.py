"""Metrics output: JSON lines, optional TensorBoard, PNG plots."""

from __future__ import annotations

import json
import os
from typing import Dict, List


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
