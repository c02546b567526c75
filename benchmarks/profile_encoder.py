"""Where the SAM ViT encoder's CPU time goes: its parts jitted alone at the real shapes.

  python benchmarks/profile_encoder.py [--model vit_b] [--repeats 3] [--encoder-only]
  taskset -c 0 python benchmarks/profile_encoder.py ...   # the same on one core

Times (min of --repeats, wall and process CPU) each part of one windowed and
one global block at a 1024 input, batch 1, float32, with its FLOPs and
GFLOP per CPU second (robust to other processes on a shared machine) beside
a 2048^3 float32 matmul measured in the same run, and the whole encoder.
Parts jitted alone lose the fusion with their neighbours, so they add
up to a little more than a block.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aopsam_jax.sam.compile_options import jit  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from aopsam_jax.sam.modeling import (EncoderBlock, ImageEncoderViT, resolve_token_tile,  # noqa: E402
                                     token_map)
from aopsam_jax.sam.norm import gelu  # noqa: E402


def timed(fn, *args, repeats: int = 3):
  """(min wall s, min CPU s) of jitted fn(*args) after one compile call."""
  f = jit(fn)
  jax.block_until_ready(f(*args))
  best_w = best_c = float("inf")
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(f(*args))
    best_w = min(best_w, time.perf_counter() - t0)
    best_c = min(best_c, time.process_time() - c0)
  return best_w, best_c


def perturbed(module: nnx.Module, seed: int = 0) -> nnx.Module:
  """Non-zero biases / rel-pos tables (zero-initialised ones would hide work)."""
  state = nnx.state(module, nnx.Param)
  leaves, tdef = jax.tree.flatten(state)
  key = jax.random.key(seed)
  leaves = [x + 0.02 * jax.random.normal(jax.random.fold_in(key, i), x.shape)
            for i, x in enumerate(leaves)]
  nnx.update(module, jax.tree.unflatten(tdef, leaves))
  return module


def block_parts(blk: EncoderBlock, x: jax.Array):
  """(name, fn, args, flops) for the parts of one block on x (B, H, W, C), as
  the block computes them (token slices, windows on the padded grid)."""
  b, gh, gw, d = x.shape
  t = b * gh * gw
  hid = blk.mlp.lin1.out_features
  ws = blk.window_size
  a = blk.attn
  nh = a.num_heads
  side = ws or gh
  n = side * side
  z = b * nh * (-(-gh // ws)) * (-(-gw // ws)) if ws else b * nh
  ta = z // nh * n  # attention tokens (padded grid for windows)
  qkv = [jax.random.normal(jax.random.key(i), (z, n, d // nh)) for i in range(3)]
  tile = resolve_token_tile(a.token_tile)
  attention = (lambda x: a.windowed(x, ws)) if ws else a
  core = 4 * ta * n * d + 4 * ta * side * d
  return [
      ("norm1 (LayerNorm)", lambda x: blk.norm1(x), (x,), 0),
      ("qkv matmul", lambda x: a._tokenwise(a.qkv, x), (x,), 2 * t * d * 3 * d),
      ("attention core (q k^T, rel-pos, softmax, p v)",
       lambda q, k, v: a._attend(q, k, v, *a.rel_tables(side, side, q.dtype)), qkv, core),
      ("proj matmul", lambda x: a._tokenwise(a.proj, x), (x,), 2 * t * d * d),
      ("attention (qkv .. proj)", attention, (x,), 2 * t * d * 4 * d + core),
      ("exact GELU (B, H, W, 4C)", gelu, (jnp.full((b, gh, gw, hid), 0.3),), 0),
      ("norm2 + MLP + residual", lambda x: token_map(lambda u: u + blk.mlp(blk.norm2(u)), x, tile),
       (x,), 4 * t * d * hid),
      ("whole block", blk, (x,), 2 * t * d * 4 * d + core + 4 * t * d * hid),
  ]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="vit_b")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-encoder", action="store_true", help="skip the whole-encoder timing")
  ap.add_argument("--encoder-only", action="store_true",
                  help="time only the matmul and the whole encoder (--repeats calls each)")
  a = ap.parse_args(argv)
  cfg = SAM_CONFIGS[a.model]
  g, d = cfg.embed_size, cfg.encoder_embed_dim
  rngs = nnx.Rngs(0)
  x = jax.random.normal(jax.random.key(1), (1, g, g, d), jnp.float32)
  m = jax.random.normal(jax.random.key(2), (2048, 2048), jnp.float32)
  rows = []
  w, c = timed(lambda m: m @ m, m, repeats=a.repeats)
  rows.append(("float32 matmul 2048^3", w, c, 2 * 2048**3))
  ws = cfg.window_size
  for kind, win in () if a.encoder_only else (("window", ws), ("global", 0)):
    blk = perturbed(EncoderBlock(d, cfg.encoder_num_heads, cfg.mlp_ratio, win, (g, g), rngs))
    for name, fn, args, flops in block_parts(blk, x):
      w, c = timed(fn, *args, repeats=a.repeats)
      rows.append((f"{kind}: {name}", w, c, flops))
      print(f"{rows[-1][0]:40s} {w * 1e3:9.1f} ms wall {c * 1e3:9.1f} ms cpu", flush=True)
  if not a.no_encoder:
    from benchmarks.device_check import encoder_flops
    enc = perturbed(ImageEncoderViT(cfg, rngs))
    img = jax.random.normal(jax.random.key(3), (1, cfg.img_size, cfg.img_size, 3))
    w, c = timed(lambda i: enc(i), img, repeats=a.repeats)
    rows.append((f"whole encoder {a.model}", w, c, encoder_flops(cfg)))
  peak, peak_wall = rows[0][3] / rows[0][2], rows[0][3] / rows[0][1]
  load = "/".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"\n{os.cpu_count()} CPUs, load average {load}, jax {jax.__version__}\n")
  print("| part | wall ms | CPU ms | GFLOP | GFLOP per CPU s | share of the matmul's | "
        "share per wall s |")
  print("|---|---|---|---|---|---|---|")
  for name, w, c, flops in rows:
    rate = f"{flops / c / 1e9:.0f}" if flops else "-"
    share = f"{flops / c / peak:.0%}" if flops else "-"
    gf = f"{flops / 1e9:.1f}" if flops else "-"
    share_wall = f"{flops / w / peak_wall:.0%}" if flops else "-"
    print(f"| {name} | {w * 1e3:.1f} | {c * 1e3:.1f} | {gf} | {rate} | {share} | {share_wall} |")


if __name__ == "__main__":
  main()
