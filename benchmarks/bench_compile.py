"""Cold compile vs the persistent compilation cache, for the programs the CLIs run.

  python benchmarks/bench_compile.py [--model vit_b] [--programs aop,amg_s,predict1]
  python benchmarks/bench_compile.py --compare REV [--repeats 2] [--programs ...]

Each program is run in a fresh child process three times: (1) cache off,
(2) cache on, empty directory (the cold first run of a user), (3) cache on,
same directory (every later run).  A child times the first call (compile +
run) and a second call (run only); first - second is the compile (or cache
load) time.  Writes benchmarks/results/compile_<backend>.md.

`--compare REV`: cold compile only (cache off), of the library at git
revision REV (extracted with `git archive`), of this checkout, and of this
checkout with the ViT blocks under `lax.scan` (`scan_blocks`), children
interleaved; compile time in wall and process-CPU seconds (CPU seconds are
robust to other processes on a shared machine).  Writes
benchmarks/results/compile_compare_<backend>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.baseline import package_at  # noqa: E402
from benchmarks.tables import write_table  # noqa: E402

PROGRAMS = {"aop": "AoP-SAM program (segment --mode aop)",
            "amg_s": "grid AMG_S program (segment --mode amg, 16x16)",
            "amg8": "grid AMG program, 8x8 grid (one decode chunk; the same program structure)",
            "predict1": "1-prompt predictor (set_image + predict)"}


def child(program: str, model: str) -> dict:
  """Runs in the child: build, first call, second call; print JSON."""
  import numpy as np
  import jax
  from flax import nnx
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
  sam = build_model(get_sam_config(model))
  if os.environ.get("AOPSAM_BENCH_SCAN_BLOCKS") == "1":
    from aopsam_jax.sam.modeling import set_scan_blocks
    set_scan_blocks(sam, True)
  if program == "aop":
    from aopsam_jax.aop import pipeline
    from aopsam_jax.aop.prompt_predictor import PromptPredictor, PromptPredictorConfig
    split = nnx.split(pipeline.AopSam(sam, PromptPredictor(PromptPredictorConfig(),
                                                           rngs=nnx.Rngs(0))))
    inp = pipeline.prepare(image)
    call = lambda: pipeline.segment_jit(split, inp.padded, inp.input_hw, inp.original_hw)
  elif program in ("amg_s", "amg8"):
    from aopsam_jax.sam import amg
    cfg = amg.AMG_S if program == "amg_s" else amg.AmgConfig(points_per_side=8)
    split = nnx.split(sam)
    inputs = amg.prepare(image, cfg)
    call = lambda: amg.generate(split, inputs, cfg)
  else:
    from aopsam_jax.sam.predictor import SamPredictor
    pred = SamPredictor(sam)

    def call():
      pred.set_image(image)
      return pred.predict(np.array([[320, 240]]), np.array([1]))
  times, cpu = [], []
  for _ in range(2):
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  import aopsam_jax
  return {"first_s": times[0], "run_s": times[1], "first_cpu_s": cpu[0], "run_cpu_s": cpu[1],
          "library": os.path.dirname(aopsam_jax.__file__)}


def run_child(program: str, model: str, cache, src: str = ROOT, scan: bool = False) -> dict:
  """One fresh process running `child` against the library under `src`."""
  env = dict(os.environ, AOPSAM_COMPILE_CACHE=cache or "off", PYTHONPATH=src,
             TF_CPP_MIN_LOG_LEVEL="3", AOPSAM_BENCH_SCAN_BLOCKS="1" if scan else "0")
  # `src` goes first on sys.path after this module is loaded (it puts ROOT there)
  code = ("import json, sys, importlib.util; "
          "spec = importlib.util.spec_from_file_location('bench_compile_child', %r); "
          "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); "
          "sys.path.insert(0, %r); "
          "from aopsam_jax import compile_cache; compile_cache.setup(); "
          "print(json.dumps(b.child(%r, %r)))" % (os.path.abspath(__file__), src, program, model))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT)
  if out.returncode != 0:
    raise SystemExit(out.stderr[-2000:])
  res = json.loads(out.stdout.strip().splitlines()[-1])
  if os.path.realpath(res["library"]) != os.path.realpath(os.path.join(src, "aopsam_jax")):
    raise SystemExit(f"child imported {res['library']}, not the library under {src}")
  return res


def compare(a) -> str:
  """Cold compile (cache off) at revision a.compare vs this checkout (+ scan)."""
  import jax
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    old = package_at(a.compare, tmp)
    variants = [(f"{a.compare}", old, False), ("this checkout", ROOT, False),
                ("this checkout, scan_blocks", ROOT, True)]
    for prog in a.programs.split(","):
      res = {name: [] for name, _, _ in variants}
      for r in range(a.repeats):
        for name, src, scan in (variants if r % 2 == 0 else variants[::-1]):
          res[name].append(run_child(prog, a.model, None, src, scan))
          print(prog, name, json.dumps(res[name][-1]), flush=True)
      rows.append((prog, res))
  load = "/".join(f"{x:.1f}" for x in os.getloadavg())
  lines = [f"# Cold compile: {a.compare} vs this checkout ({jax.default_backend()}, {a.model})", "",
           f"Generated by `python benchmarks/bench_compile.py {' '.join(sys.argv[1:])}`. "
           f"{os.cpu_count()} CPUs, load average {load} at the end.  Persistent cache off; "
           f"every cell a fresh process, {a.repeats} per variant interleaved; compile = first "
           "call - second call, median (min-max).  Random weights; a 640x480 image.", "",
           "| program | variant | compile, wall s | compile, CPU s | steady call, wall s |",
           "|---|---|---|---|---|"]
  fmt = lambda xs: (f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"
                    if len(xs) > 1 else f"{xs[0]:.1f}")
  for prog, res in rows:
    for name, rs in res.items():
      wall = [max(r["first_s"] - r["run_s"], 0) for r in rs]
      cpu = [max(r["first_cpu_s"] - r["run_cpu_s"], 0) for r in rs]
      lines.append(f"| {PROGRAMS[prog]} | {name} | {fmt(wall)} | {fmt(cpu)} | "
                   f"{min(r['run_s'] for r in rs):.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="vit_b")
  ap.add_argument("--programs", default="aop,amg_s,predict1")
  ap.add_argument("--compare", default=None, metavar="REV",
                  help="cold compile of git revision REV vs this checkout (and + scan_blocks)")
  ap.add_argument("--repeats", type=int, default=1, help="--compare: processes per variant")
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  import jax
  if a.compare:
    text = compare(a)
    out = a.out or os.path.join(ROOT, "benchmarks", "results",
                                f"compile_compare_{jax.default_backend()}.md")
    write_table(text, out)
    return
  rows = []
  for prog in a.programs.split(","):
    with tempfile.TemporaryDirectory() as cache:
      r = {"off": run_child(prog, a.model, None), "cold": run_child(prog, a.model, cache),
           "warm": run_child(prog, a.model, cache)}
    rows.append((prog, r))
    print(prog, json.dumps(r), flush=True)
  load = "/".join(f"{x:.1f}" for x in os.getloadavg())
  lines = [f"# Compile time vs the persistent compilation cache ({jax.default_backend()}, {a.model})",
           "", f"Generated by `python benchmarks/bench_compile.py {' '.join(sys.argv[1:])}`."
           f" {os.cpu_count()} CPUs, load average {load} at the end (shared machine: compare "
           "the columns of one row, measured minutes apart).  Random weights; a 640x480 image.",
           "", "| program | first call, cache off (s) | first call, empty cache (s) | "
           "first call, cache filled by an earlier process (s) | steady call (s) | "
           "compile s: cold -> cached |", "|---|---|---|---|---|---|"]
  for prog, r in rows:
    run = min(x["run_s"] for x in r.values())
    lines.append(f"| {PROGRAMS[prog]} | {r['off']['first_s']:.1f} | {r['cold']['first_s']:.1f} | "
                 f"{r['warm']['first_s']:.1f} | {run:.2f} | "
                 f"{r['cold']['first_s'] - run:.1f} -> {max(r['warm']['first_s'] - run, 0):.1f} |")
  text = "\n".join(lines) + "\n"
  out = a.out or os.path.join(ROOT, "benchmarks", "results", f"compile_{jax.default_backend()}.md")
  write_table(text, out)


if __name__ == "__main__":
  main()
