"""MobileSAM (`vit_t`, TinyViT-5M) vs SAM ViT-B on this machine, one process, one run.

  python benchmarks/bench_tiny_vit.py                 # encoders + end to end, 1 image
  python benchmarks/bench_tiny_vit.py --skip-e2e --repeats 5
  python benchmarks/bench_tiny_vit.py --skip-e2e --baseline 21a90e4 --no-vit-b  # before / after

Part 1, image encoder (1024 x 1024 input, batch 1): this port's vit_t and
vit_b (jax.jit, float32) and MobileSAM's PyTorch TinyViT (the reference code,
`mobilesam-mirror`, torch CPU threads = cores).  The three run in
interleaved rounds so that a shared machine's load hits them alike; the table
gives the median and the minimum and the ratio to the JAX vit_t median.  FLOPs
are XLA's cost analysis of the compiled encoder (blank for an encoder
compiled with loops, whose bodies the analysis counts once).  --baseline REV
adds this port's TinyViT code as of git commit REV (its tiny_vit.py and
norm.py, loaded from git into this process) with the same weights, timed in
the same rounds, and says how far its embedding is from this tree's.

Part 2, end to end per image (image array -> mask records at the original
size, as benchmarks/bench_amg.py times it): AoP-SAM with vit_t (the shipped
bundle's prompt predictor on vit_t embeddings: the decoded prompt count is
fixed by the ASF config, so the cost is that of a matched one), and grid
AMG_S (16 x 16) / AMG_D (32 x 32) with vit_t and vit_b; random-init SAM
weights and the same random-init thresholds for all (so masks survive).
Median of --e2e-repeats calls after a warm-up (compile) call.

Writes benchmarks/results/tiny_vit_<backend>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.bench_amg import THRESH, machine  # noqa: E402


def _input():
  import jax
  return jax.random.normal(jax.random.key(0), (1, 1024, 1024, 3), jax.numpy.float32)


def _compiled(encoder, x):
  """(run(), GFLOPs, output) of jax.jit(encoder) on x.

  XLA's cost analysis counts a loop body (lax.map, lax.scan) once, not once
  per iteration: an encoder compiled with loops reports nan.
  """
  import jax
  from flax import nnx
  from aopsam_jax.sam.compile_options import jit
  graphdef, state = nnx.split(encoder)
  compiled = jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(state, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflops = float((cost or {}).get("flops", float("nan"))) / 1e9
  if " while(" in compiled.as_text():
    gflops = float("nan")
  out = jax.block_until_ready(compiled(state, x))
  return (lambda: jax.block_until_ready(compiled(state, x))), gflops, out


def _jax_encoder(model_type: str):
  """(run(), GFLOPs, output, model) for this port's encoder with random weights."""
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model
  model = build_model(get_sam_config(model_type), seed=0)
  return _compiled(model.image_encoder, _input()) + (model,)


def _baseline_encoder(rev: str, model):
  """`rev`'s TinyViT code (tiny_vit.py with its norm.py) holding `model`'s encoder weights."""
  from flax import nnx
  from benchmarks.baseline import module_at
  tv = module_at(rev, "aopsam_jax/sam/tiny_vit.py")
  enc = tv.TinyViT(model.config, nnx.Rngs(0))
  nnx.update(enc, nnx.state(model.image_encoder))
  return _compiled(enc, _input())


def _torch_encoder():
  import torch
  from tests.mobile_sam_reference import build_torch_mobile_sam
  torch.set_num_threads(os.cpu_count() or 1)
  enc = build_torch_mobile_sam(seed=0).image_encoder
  x = torch.zeros(1, 3, 1024, 1024)

  def run():
    with torch.no_grad():
      return enc(x)
  return run


def bench_encoders(repeats: int, baseline: str, vit_b: bool):
  import numpy as np
  run_t, gf_t, out_t, model_t = _jax_encoder("vit_t")
  runs = {"this port (JAX) vit_t": (run_t, gf_t)}
  notes = []
  if baseline:
    run_b, gf_b, out_b = _baseline_encoder(baseline, model_t)
    runs[f"this port (JAX) vit_t at {baseline} (before)"] = (run_b, gf_b)
    a, b = np.asarray(out_t, np.float64), np.asarray(out_b, np.float64)
    notes.append(f"Embedding of this tree vs {baseline}, same weights and input: relative L2 "
                 f"{np.linalg.norm(a - b) / np.linalg.norm(b):.1e}.")
  if vit_b:
    runs["this port (JAX) vit_b"] = _jax_encoder("vit_b")[:2]
  runs["MobileSAM PyTorch vit_t"] = (_torch_encoder(), float("nan"))
  times = {k: [] for k in runs}
  for run, _ in runs.values():  # warm-up
    run()
  for _ in range(repeats):
    for k, (run, _) in runs.items():
      t0 = time.perf_counter()
      run()
      times[k].append(time.perf_counter() - t0)
  base = statistics.median(times["this port (JAX) vit_t"])
  rows = []
  for k, (_, gf) in runs.items():
    med = statistics.median(times[k])
    rows.append(f"| {k} | {med:.3f} | {min(times[k]):.3f} | {med / base:.2f} | "
                + ("" if gf != gf else f"{gf:.0f}") + " |")
    print(rows[-1], flush=True)
  return rows + [""] * bool(notes) + notes


def _image():
  from aopsam_jax.sam.image_io import load_image, sample_image_path
  return load_image(sample_image_path())


def _timed(run, repeats: int):
  t0 = time.perf_counter()
  res = run()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    res = run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), first, len(res)


def bench_e2e(repeats: int, model_types, settings, write):
  from aopsam_jax.aop import bundle, pipeline
  from aopsam_jax.sam import amg
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model
  image = _image()
  sam_t = build_model(get_sam_config("vit_t"), seed=0)
  asf_thresh = dict(pred_iou_thresh=THRESH["pred_iou_thresh"], nms_thresh=THRESH["box_nms_thresh"],
                    stability_score_thresh=THRESH["stability_score_thresh"],
                    stability_score_offset=THRESH["stability_score_offset"])
  # vit_tiny_test's encoder costs ~nothing: that row is AoP-SAM without the encoder
  for name, sam in (("vit_t", sam_t), ("vit_tiny_test", None)):
    b = bundle.load_bundle(sam=sam, asf_overrides=asf_thresh, quiet=True)
    gen = pipeline.AopMaskGenerator(b)
    med, first, n = _timed(lambda gen=gen: gen.generate(image), repeats)
    k = gen.cfg.k_coarse + gen.cfg.k_fine
    row = f"| AoP-SAM | {name} | {med:.2f} | {first:.1f} | {k} (coarse + fine) | {n} |"
    print(row, flush=True)
    write([row])
  models = {mt: sam_t if mt == "vit_t" else build_model(get_sam_config(mt), seed=0)
            for mt in model_types}
  for s in settings:  # every model's AMG_S before any AMG_D: a cut-short run keeps pairs
    for mt, model in models.items():
      side = {"S": 16, "D": 32}[s]
      gen = amg.SamAutomaticMaskGenerator(model, points_per_side=side, **THRESH)
      med, first, n = _timed(lambda gen=gen: gen.generate(image), repeats)
      row = f"| AMG_{s} | {mt} | {med:.2f} | {first:.1f} | {side * side} grid + re-decode | {n} |"
      print(row, flush=True)
      write([row])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--repeats", type=int, default=3, help="timed rounds / calls after a warm-up")
  p.add_argument("--e2e-repeats", type=int, default=1, help="timed end-to-end calls per method")
  p.add_argument("--skip-e2e", action="store_true", help="encoders only")
  p.add_argument("--skip-encoders", action="store_true", help="end to end only")
  p.add_argument("--baseline", default="",
                 help="git commit whose TinyViT code to time too (same weights, same rounds)")
  p.add_argument("--no-vit-b", action="store_true", help="leave the vit_b encoder out")
  p.add_argument("--e2e-models", default="vit_t,vit_b", help="SAMs for the grid AMG rows")
  p.add_argument("--settings", default="S,D",
                 help="grid AMG settings: S (16x16), D (32x32); '' = AoP-SAM rows only")
  p.add_argument("--out", default=None, help="markdown path (default results/tiny_vit_<backend>.md)")
  args = p.parse_args(argv)
  import jax
  mach = machine()
  print(mach, flush=True)
  path = args.out or os.path.join(HERE, "results", f"tiny_vit_{jax.default_backend()}.md")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lines = ["# MobileSAM vit_t (TinyViT-5M) vs SAM vit_b, random-init weights", "",
           f"Machine: {mach}", "",
           f"## Image encoder, 1024 x 1024, batch 1 (interleaved rounds, {args.repeats} each)", "",
           "| encoder | median s | min s | / JAX vit_t | XLA GFLOPs |", "|---|---|---|---|---|"]

  def write(rows):  # after every row: a long run cut short keeps what it measured
    lines.extend(rows)
    with open(path, "w") as f:
      f.write("\n".join(lines + ["", f"Load average when written: {os.getloadavg()[0]:.1f}"])
              + "\n")

  write(["(skipped)"] if args.skip_encoders else bench_encoders(args.repeats, args.baseline,
                                                               not args.no_vit_b))
  if not args.skip_e2e:
    write(["", "## End to end per image (sample.jpg 640x428 -> mask records), median of "
           f"{args.e2e_repeats} call(s) after the compile call", "",
           f"Grid AMG thresholds (random init): {THRESH}.", "",
           "| method | SAM | s / image | first call s | prompts | masks |",
           "|---|---|---|---|---|---|"])
    bench_e2e(args.e2e_repeats, [m for m in args.e2e_models.split(",") if m],
              [s for s in args.settings.split(",") if s], write)
  print("\n".join(lines))
  print("wrote", path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
