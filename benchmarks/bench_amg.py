"""Grid AMG benchmark: this JAX port vs the official PyTorch SamAutomaticMaskGenerator.

  python benchmarks/bench_amg.py                      # vit_tiny_test, AMG_S + AMG_D (official: AMG_S)
  python benchmarks/bench_amg.py --official S,D --model-type vit_b --repeats 3

Each (implementation, setting) runs in its own subprocess so peak memory is
its own: process peak RSS (VmHWM, `aopsam_jax.sysinfo`) and, on a GPU, JAX's peak device bytes.
Timing: end to end per image (image array -> mask records with binary masks
at the original resolution), after one warm-up call (= compilation for JAX),
median of --repeats.  Both use the same random-init weights (the official
model with tests/reference.py's init, converted) and random-init thresholds
(pred_iou -1, stability 0.25 @ offset 0.05, NMS 0.7) so masks survive.
The port runs twice: the default (stability and boxes at the original size,
as the official generator) and stability_at="input" (the padded-resolution
speed option).
Writes the table to benchmarks/results/amg_<backend>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from aopsam_jax.sysinfo import cpu_model, peak_rss_kb  # noqa: E402

THRESH = dict(pred_iou_thresh=-1.0, stability_score_thresh=0.25, stability_score_offset=0.05,
              box_nms_thresh=0.7)
SETTINGS = {"S": 16, "D": 32}
IMPL_NAMES = {"jax": "this port (JAX)", "jax-input": "this port, stability_at='input'",
              "official": "official (PyTorch)"}


def _image():
  from aopsam_jax.sam.image_io import load_image, sample_image_path
  return load_image(sample_image_path())


def write_weights(model_type: str, path: str) -> None:
  """The official model with tests/reference.py's random init, converted once."""
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import convert_state_dict, save_converted
  from tests.reference import build_torch_sam, state_dict_numpy
  cfg = get_sam_config(model_type)
  _, params = convert_state_dict(state_dict_numpy(build_torch_sam(cfg, seed=0)), cfg)
  save_converted(path, cfg, params)


def worker(impl: str, setting: str, model_type: str, repeats: int, weights: str,
           points_per_batch: int = 64) -> dict:
  """One (implementation, setting) in its own process: the official worker
  builds only the torch model (same seed = same weights), the JAX worker
  loads the converted file and never imports torch, so each peak RSS is the
  implementation's own."""
  import numpy as np
  from aopsam_jax.sam.config import get_sam_config
  cfg = get_sam_config(model_type)
  image = _image()
  n = SETTINGS[setting]
  kw = dict(points_per_side=n, points_per_batch=points_per_batch, **THRESH)
  if impl == "official":
    from tests.reference import build_torch_sam
    from segment_anything import SamAutomaticMaskGenerator
    gen = SamAutomaticMaskGenerator(build_torch_sam(cfg, seed=0), **kw)
    run = lambda: gen.generate(image)
    prompts = lambda res: n * n
  else:
    from aopsam_jax.sam import amg
    from aopsam_jax.sam.params import load_sam
    model = load_sam(weights)
    assert model.config == cfg and "torch" not in sys.modules
    gen = amg.SamAutomaticMaskGenerator(
        model, stability_at="input" if impl == "jax-input" else "original", **kw)
    state = {}

    def run():
      inputs, out = gen.generate_arrays(image)
      state["out"] = out
      return amg.to_records((gen.graphdef, gen.state), inputs, out, gen.cfg)

    def prompts(res):
      import jax
      out = jax.device_get({k: v for k, v in state["out"].items() if k != "embeddings"})
      ok = np.asarray(out["valid"])
      pts = {tuple(p) for p in np.asarray(out["points"])[ok].tolist()}
      return n * n + len(pts)  # grid + re-decoded unique prompts
  t0 = time.perf_counter()
  res = run()
  warm = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    res = run()
    times.append(time.perf_counter() - t0)
  out = {"impl": impl, "setting": f"AMG_{setting}", "points": n * n, "masks": len(res),
         "first_call_s": warm, "s_per_image": float(np.median(times)),
         "prompts_decoded": prompts(res),
         "peak_rss_mib": peak_rss_kb() / 1024}
  if impl != "official":
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["peak_device_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
  return out


def machine() -> str:
  import jax
  d = jax.devices()[0]
  return (f"{platform.node()} | {os.cpu_count()} CPU threads ({cpu_model()}) | JAX {jax.__version__} "
          f"{d.platform}:{d.device_kind} | load avg {os.getloadavg()[0]:.1f}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model-type", default="vit_tiny_test",
                 help="vit_tiny_test (default, fast) / vit_b / vit_l / vit_h")
  p.add_argument("--settings", default="S,D", help="AMG settings to run: S (16x16), D (32x32)")
  p.add_argument("--official", default="S",
                 help="settings also run with the official PyTorch generator ('S,D', 'none'); "
                      "the default skips official AMG_D to keep the run short on a CPU")
  p.add_argument("--repeats", type=int, default=1, help="timed calls after the warm-up")
  p.add_argument("--points-per-batch", type=int, default=64,
                 help="prompts decoded per chunk, both implementations (their default 64); "
                      "bounds the decoder's intermediate memory")
  p.add_argument("--out", default=None, help="markdown path (default results/amg_<backend>.md)")
  p.add_argument("--worker", nargs=2, metavar=("IMPL", "SETTING"), help=argparse.SUPPRESS)
  p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print("RESULT " + json.dumps(worker(*args.worker, args.model_type, args.repeats,
                                        args.weights, args.points_per_batch)))
    return 0
  import jax
  backend = jax.default_backend()
  mach = machine()
  print(mach, flush=True)
  official = [] if args.official == "none" else args.official.split(",")
  rows = []
  tmp = tempfile.TemporaryDirectory(prefix="bench_amg_")  # removed even if a worker fails
  weights = os.path.join(tmp.name, f"sam_{args.model_type}.safetensors")
  write_weights(args.model_type, weights)
  for s in args.settings.split(","):
    for impl in (["jax", "jax-input"] + (["official"] if s in official else [])):
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, s,
             "--model-type", args.model_type, "--repeats", str(args.repeats),
             "--weights", weights, "--points-per-batch", str(args.points_per_batch)]
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
      line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not line:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker {impl} {s} failed")
      r = json.loads(line[0][7:])
      print(r, flush=True)
      rows.append(r)
  tmp.cleanup()
  lines = [f"# Grid AMG: JAX port vs official PyTorch ({args.model_type}, random-init weights)",
           "", f"Machine: {mach}", "",
           f"Image: bundled sample (640x428); thresholds {THRESH}; points_per_batch "
           f"{args.points_per_batch}; median of {args.repeats} call(s) after a warm-up/compile call.",
           "",
           "| setting | implementation | s / image | first call s | prompts decoded | masks | "
           "peak RSS MiB | peak device MiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['setting']} | {IMPL_NAMES[r['impl']]}"
                 f" | {r['s_per_image']:.2f} | {r['first_call_s']:.2f} | {r['prompts_decoded']} | "
                 f"{r['masks']} | {r['peak_rss_mib']:.0f} | "
                 f"{r.get('peak_device_mib', float('nan')):.0f} |")
  text = "\n".join(lines) + "\n"
  path = args.out or os.path.join(HERE, "results", f"amg_{backend}.md")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  print(text)
  print("wrote", path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
