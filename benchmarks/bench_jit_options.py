"""Benchmark: the library's `jit` (CPU scheduler option) against plain `jax.jit`.

The same three programs (vit_b encoder, the AoP-SAM program on a 640x480
image, 64 point prompts -> masks at the original size), each compiled both
ways in ONE process and called alternately for --seconds, with three 2048^3
float32 matmuls after each round for the machine's rate.  Prints, per program and
jit: XLA's preallocated scratch (`memory_analysis().temp_size_in_bytes`),
the fastest call, minor page faults per call, and whether the outputs are
bit-identical.  Random weights (timing only).  Writes
results/jit_options_<backend>.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from aopsam_jax.aop import pipeline  # noqa: E402
from aopsam_jax.aop.bundle import random_bundle  # noqa: E402
from aopsam_jax.sam import predictor as P  # noqa: E402
from aopsam_jax.sam.compile_options import jit  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from benchmarks.bench_amg import machine  # noqa: E402
from benchmarks.device_check import encoder_flops  # noqa: E402
from benchmarks.tables import write_table  # noqa: E402


def programs(model_type: str):
  """name -> (raw function, jit kwargs, args, kwargs)."""
  b = random_bundle(model_type)
  img = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
  inp = pipeline.prepare(img)
  gd_a, st_a = nnx.split(b.model)
  gd_s, st_s = nnx.split(b.model.sam)
  padded, ihw = inp.padded[None], inp.input_hw[None]
  emb = P.embed_fn(gd_s, st_s, padded, ihw)
  coords = jnp.asarray(np.random.default_rng(1).random((64, 1, 2)) * 1024, jnp.float32)
  return {
      "encoder": (P._embed, dict(static_argnums=(0,)), (gd_s, st_s, padded, ihw), {}),
      "AoP-SAM program": (pipeline._segment_jit.__wrapped__,
                          dict(static_argnames=("graphdef", "cfg")), (),
                          dict(graphdef=gd_a, state=st_a, padded=inp.padded,
                               input_hw=inp.input_hw, original_hw=inp.original_hw, cfg=b.asf)),
      "64 prompts -> masks": (P._predict, dict(static_argnums=(0,), static_argnames=(
          "multimask_output", "out_hw", "return_logits")),
          (gd_s, st_s, emb, 0, ihw, jnp.asarray([[480, 640]]), coords,
           jnp.ones((64, 1), jnp.int32), None), dict(out_hw=(480, 640))),
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="vit_b")
  ap.add_argument("--seconds", type=float, default=240, help="alternating calls for this long")
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  rows = {}
  progs = programs(a.model)
  for name, (raw, kw, args, kwargs) in progs.items():
    fns = {"jax.jit": jax.jit(raw, **kw), "aopsam_jax.jit": jit(raw, **kw)}
    outs = []
    for k, f in fns.items():
      temp = f.lower(*args, **kwargs).compile().memory_analysis().temp_size_in_bytes
      outs.append(jax.block_until_ready(f(*args, **kwargs)))
      rows[name, k] = dict(f=f, temp=temp, best=float("inf"), faults=0, calls=0)
    same = all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))
    rows[name, "aopsam_jax.jit"]["same"] = same
    print(f"{name}: compiled both ways, outputs bit-identical: {same}", flush=True)
  m = jax.random.normal(jax.random.key(9), (2048, 2048))
  mm = jax.jit(lambda m: m @ m)
  mm(m).block_until_ready()
  best_mm = float("inf")
  end = time.time() + a.seconds
  while time.time() < end:
    for (name, _), r in rows.items():
      _, _, args, kwargs = progs[name]
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      jax.block_until_ready(r["f"](*args, **kwargs))
      r["best"] = min(r["best"], time.perf_counter() - t0)
      r["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
      r["calls"] += 1
    for _ in range(3):  # back to back: the first one after a program starts on a cold cache
      t0 = time.perf_counter()
      mm(m).block_until_ready()
      best_mm = min(best_mm, time.perf_counter() - t0)
  rate = 2 * 2048**3 / best_mm
  lines = [f"# `jit` with the CPU scheduler option vs plain `jax.jit` ({a.model}, random weights)", "",
           f"`python benchmarks/bench_jit_options.py --seconds {a.seconds:g}`; {machine()}; "
           f"same-run 2048³ float32 matmul {rate / 1e9:.0f} GFLOP/s.", "",
           "| program | jit | XLA scratch MB | fastest call s | minor page faults per call | calls | "
           "outputs bit-identical |", "|---|---|---|---|---|---|---|"]
  for (name, k), r in rows.items():
    share = ""
    if name == "encoder":
      share = f" ({encoder_flops(SAM_CONFIGS[a.model]) / r['best'] / rate:.1%} of the matmul rate)"
    same = {True: "yes", False: "NO"}.get(r.get("same"), "")
    lines.append(f"| {name} | {k} | {r['temp'] / 2**20:.0f} | {r['best']:.3f}{share} | "
                 f"{r['faults'] // max(r['calls'], 1)} | {r['calls']} | {same} |")
  out = a.out or os.path.join(ROOT, "benchmarks", "results",
                              f"jit_options_{jax.default_backend()}.md")
  write_table("\n".join(lines) + "\n", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
