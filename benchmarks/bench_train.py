"""Training-step throughput of the Prompt Predictor.

  python benchmarks/bench_train.py [--steps 10] [--batch 8] [--modes cache,online]

Times the jitted train step of `aopsam_jax.train` (same optimizer, loss,
Mesh/sharding code) on random batches, so no dataset is needed:
  cache   precomputed embeddings (the CPU path): predictor fwd+bwd only
  online  vit_tiny_test SAM encoder inside the step (the accelerator path; on a
          TPU/GPU use --sam vit_h)
Writes benchmarks/results/train_<backend>.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aopsam_jax.sam.config import get_sam_config  # noqa: E402
from aopsam_jax.sam.params import build_model  # noqa: E402
from aopsam_jax.aop.prompt_predictor import (PromptPredictor, PromptPredictorConfig,  # noqa: E402
                                         forward_flops)
from aopsam_jax.sam.flat_state import count_params  # noqa: E402
from aopsam_jax.trainer import steps  # noqa: E402
from configs import coco_tiny  # noqa: E402


def bench(mode, cfg, batch, n_steps, sam_name):
  mesh = steps.make_mesh()
  pp_cfg = PromptPredictorConfig.from_dict(cfg.model.to_dict())
  model = PromptPredictor(pp_cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx, _ = steps.make_optimizer(cfg.optim, 1000)
  sam = build_model(get_sam_config(sam_name)) if mode == "online" else None
  enc_g, enc_s = nnx.split(sam.image_encoder) if sam is not None else (None, None)
  enc_s = steps.replicate(enc_s, mesh) if enc_s is not None else None
  state = steps.replicate({"params": params, "opt_state": tx.init(params),
                           "step": jnp.zeros((), jnp.int32)}, mesh)
  train_step, _ = steps.build_steps(graphdef, tx, cfg.loss, mesh, enc_g)
  rng = np.random.default_rng(0)
  tgt = np.zeros((batch, 256, 256), np.float32)
  tgt[:, 100, 100] = 1.0
  b = {"target": tgt, "weight": np.ones((batch, 256, 256), np.float32)}
  if mode == "cache":
    b["embedding"] = rng.normal(size=(batch, 64, 64, 256)).astype(np.float32)
    b["image_small"] = rng.normal(size=(batch, 256, 256, 3)).astype(np.float32)
  else:
    b["image"] = rng.integers(0, 255, (batch, 1024, 1024, 3), dtype=np.uint8)
    b["input_hw"] = np.tile(np.array([[768, 1024]], np.int32), (batch, 1))
  gb = steps.to_global(mesh, b)
  t = time.perf_counter()
  state, m = train_step(state, gb, enc_s)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(n_steps):
    state, m = train_step(state, gb, enc_s)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / n_steps
  return {"mode": mode, "batch": batch, "step_s": dt, "steps_per_s": 1 / dt,
          "images_per_s": batch / dt, "compile_s": compile_s,
          "params": count_params(model), "gflops": forward_flops(model) / 1e9}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--modes", default="cache,online")
  ap.add_argument("--sam", default="vit_tiny_test")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  cfg = coco_tiny.get_config()
  rows = [bench(m, cfg, a.batch, a.steps, a.sam) for m in a.modes.split(",")]
  backend = jax.default_backend()
  out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              f"train_{backend}.md")
  lines = [f"# Prompt Predictor training throughput ({backend})", "",
           f"- devices: {jax.device_count()} x {jax.devices()[0].device_kind}; host: "
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
           f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())} (1/5/15 min) at the end",
           f"- jax {jax.__version__}; model: configs/coco_tiny.py predictor "
           f"({rows[0]['params']:,} params, {rows[0]['gflops']:.2f} GFLOPs/image forward); "
           f"online mode encoder: {a.sam} (random weights)",
           f"- {a.steps} timed steps after 1 compile step; random batches (no input pipeline)", "",
           "| mode | global batch | s/step | steps/s | images/s | compile s |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['mode']} | {r['batch']} | {r['step_s']:.3f} | {r['steps_per_s']:.3f} | "
                 f"{r['images_per_s']:.2f} | {r['compile_s']:.1f} |")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
