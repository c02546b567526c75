"""SAM ViT encoder: this checkout vs an earlier revision, interleaved in one process.

  python benchmarks/bench_encoder_cpu.py --baseline 21a90e4 [--model vit_b] [--repeats 3]

Builds the image encoder of `aopsam_jax/sam/modeling.py` at `--baseline`
(with its own norm.py, `benchmarks/baseline.py`) and of this checkout with the same random weights
(perturbed, so biases and rel-pos tables matter), checks they agree, then
times them alternately (A B B A ...) with a float32 2048^3 matmul between
runs: on a shared machine both see the same load.  Reports wall and process
CPU seconds (min and median), GFLOP/s on the official algorithm's FLOP count
(`device_check.encoder_flops`) and the share of the same-run matmul rate,
both per wall second and per CPU second (the latter is robust to other
processes taking cores).  `--scan` adds this checkout with the ViT blocks
run through `lax.scan` (`ImageEncoderViT.scan_blocks`).  `--parts` adds the
attention (qkv .. proj) of one windowed and one global block, baseline vs
this checkout, timed the same way.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aopsam_jax.sam import cpu_kernels, modeling  # noqa: E402
from aopsam_jax.sam.compile_options import jit  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from benchmarks.device_check import encoder_flops  # noqa: E402
from benchmarks.baseline import module_at  # noqa: E402
from benchmarks.profile_encoder import perturbed  # noqa: E402


def jitted(encoder):
  graphdef, state = nnx.split(encoder)
  f = jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return lambda x: f(state, x)


def clock(fn, *args):
  c0, t0 = time.process_time(), time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, time.process_time() - c0


def attention_parts(old_mod, cfg, repeats: int):
  """Table rows: the attention (qkv .. proj) of one windowed and one global
  block at `cfg`'s grid, baseline vs this checkout, same weights, timed
  alternately in CPU seconds (min) beside a 2048^3 matmul's."""
  g, d, nh, ws = cfg.embed_size, cfg.encoder_embed_dim, cfg.encoder_num_heads, cfg.window_size
  x = jax.random.normal(jax.random.key(5), (1, g, g, d))
  m = jax.random.normal(jax.random.key(4), (2048, 2048))
  mm = jax.jit(lambda m: m @ m)
  rows = []
  for kind, size in (("windowed", (ws, ws)), ("global", (g, g))):
    new = perturbed(modeling.EncoderAttention(d, nh, size, nnx.Rngs(0)))
    old = old_mod.EncoderAttention(d, nh, size, nnx.Rngs(0))
    nnx.update(old, nnx.state(new, nnx.Param))
    call = (lambda a: jax.jit(lambda x: a.windowed(x, ws))) if kind == "windowed" else jax.jit
    fns = {"baseline": call(old), "this checkout": call(new)}
    err = float(jnp.linalg.norm(fns["this checkout"](x) - fns["baseline"](x))
                / jnp.linalg.norm(fns["baseline"](x)))
    cpu = {k: [] for k in fns}
    mm_cpu = [clock(mm, m)[1] for _ in range(2)]
    for r in range(repeats):
      for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        cpu[k].append(clock(fns[k], x)[1])
        mm_cpu.append(clock(mm, m)[1])
    rows.append(f"| {kind} attention (qkv .. proj) | {min(cpu['baseline']) * 1e3:.1f} | "
                f"{min(cpu['this checkout']) * 1e3:.1f} | {min(mm_cpu) * 1e3:.1f} | {err:.1e} |")
  return ["", "| part (CPU ms, min) | baseline | this checkout | 2048^3 matmul | rel. L2 |",
          "|---|---|---|---|---|"] + rows


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--baseline", required=True, help="git revision to compare against")
  ap.add_argument("--model", default="vit_b")
  ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
  ap.add_argument("--scan", action="store_true", help="also time this checkout with scan_blocks")
  ap.add_argument("--parts", action="store_true",
                  help="also time one windowed and one global attention, baseline vs this checkout")
  ap.add_argument("--out", default=None, help="markdown output path")
  a = ap.parse_args(argv)
  cfg = SAM_CONFIGS[a.model]
  new = perturbed(modeling.ImageEncoderViT(cfg, nnx.Rngs(0)))
  modeling.set_scan_blocks(new, False)
  old_mod = module_at(a.baseline, "aopsam_jax/sam/modeling.py")
  old = old_mod.ImageEncoderViT(cfg, nnx.Rngs(0))
  nnx.update(old, nnx.state(new, nnx.Param))
  variants = {f"baseline {a.baseline}": jitted(old), "this checkout": jitted(new)}
  if a.scan:
    scanned = modeling.ImageEncoderViT(cfg, nnx.Rngs(0), scan_blocks=True)
    nnx.update(scanned, nnx.state(new, nnx.Param))
    variants["this checkout, scan_blocks"] = jitted(scanned)
  x = jax.random.normal(jax.random.key(3), (1, cfg.img_size, cfg.img_size, 3))
  outs = {k: f(x) for k, f in variants.items()}  # compile
  ref = outs[f"baseline {a.baseline}"]
  errs = {k: float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref)) for k, o in outs.items()}
  m = jax.random.normal(jax.random.key(4), (2048, 2048))
  mm = jax.jit(lambda m: m @ m)
  jax.block_until_ready(mm(m))
  times = {k: [] for k in variants}
  mm_times = []
  load0 = os.getloadavg()
  names = list(variants)
  for r in range(a.repeats):
    for k in (names if r % 2 == 0 else names[::-1]):
      times[k].append(clock(variants[k], x))
      mm_times.extend(clock(mm, m) for _ in range(3))
      print(f"  {k}: {times[k][-1][0]:.2f}s wall {times[k][-1][1]:.2f}s CPU", flush=True)
  load1 = os.getloadavg()
  flops = encoder_flops(cfg)
  mm_flops = 2 * 2048**3
  peak_w = mm_flops / min(t for t, _ in mm_times)
  peak_c = mm_flops / min(c for _, c in mm_times)
  lines = [
      f"# SAM {a.model} image encoder on CPU: this checkout vs {a.baseline} (same process)", "",
      f"Generated by `python benchmarks/bench_encoder_cpu.py {' '.join(sys.argv[1:])}`.", "",
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax "
      f"{jax.__version__}; load average {'/'.join(f'{v:.1f}' for v in load0)} at the start, "
      f"{'/'.join(f'{v:.1f}' for v in load1)} at the end.  Batch 1, float32, "
      f"{flops / 1e12:.3f} TFLOP per image (official algorithm).  Same-run float32 2048^3 matmul: "
      f"{peak_w / 1e9:.0f} GFLOP/s per wall second, {peak_c / 1e9:.0f} per CPU second (best of "
      f"{len(mm_times)}).  This checkout's CPU attention: {cpu_kernels.describe()}.", "",
      "| variant | wall s, min / median | CPU s, min / median | GFLOP/s (wall, min) | "
      "share of matmul rate (wall) | share of matmul rate (CPU) | rel. L2 vs baseline |",
      "|---|---|---|---|---|---|---|"]
  for k, ts in times.items():
    w = [t for t, _ in ts]
    c = [t for _, t in ts]
    lines.append(
        f"| {k} | {min(w):.2f} / {statistics.median(w):.2f} | {min(c):.2f} / "
        f"{statistics.median(c):.2f} | {flops / min(w) / 1e9:.0f} | {flops / min(w) / peak_w:.0%} | "
        f"{flops / min(c) / peak_c:.0%} | {errs[k]:.1e} |")
  if a.parts:
    lines += attention_parts(old_mod, cfg, a.repeats)
  text = "\n".join(lines) + "\n"
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main()
