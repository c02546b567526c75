"""Benchmark: aopsam-jax SAM vs the official PyTorch SAM on the same machine.

Both run the *same* random weights (the official architecture with random
init, converted with `aopsam_jax.sam.params.convert_state_dict`), on the bundled
sample image.  Measured:

  * image encoder latency (median of --repeats runs after compilation), JAX
    and PyTorch runs *alternating* so that background load hits both alike;
  * JAX compile time (first call minus a steady-state call) of the encoder
    and of the predictor per prompt bucket;
  * prompt -> masks latency for 1, 64 and 256 prompts: the official
    `SamPredictor.predict_torch` (prompt encoder + mask decoder + upscaling
    to the original size + threshold) against `SamPredictor.predict`
    (same work, results copied to host numpy).  Both split 256 prompts into
    batches of 64 (the official automatic mask generator's points_per_batch);
  * peak memory: RSS high-water of a separate process per framework that
    embeds one image and decodes 64 prompts (CPU), or
    `peak_bytes_in_use` of the accelerator (GPU/TPU);
  * the numerical agreement of the two (relative L2 of the embedding).

With --bf16 it also measures bfloat16 compute against float32 (errors of
embedding / logits / IoU, mask agreement) and writes results/sam_bf16.md.

Writes a markdown table to benchmarks/results/sam_<backend>.md (cpu / gpu /
tpu) and prints it.  Default run: vit_b, 3 encoder repeats, < ~5 min on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from aopsam_jax.sysinfo import cpu_model  # noqa: E402
from benchmarks.tables import write_table  # noqa: E402


def _attention() -> str:
  from aopsam_jax.sam import cpu_kernels, modeling
  return f"{modeling.resolve_attention('auto')} ({cpu_kernels.describe()})"


def _load() -> str:
  try:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def _build(model_type: str, seed: int = 0):
  """(official torch Sam, converted jax Sam) sharing random weights."""
  from tests import reference  # installs the torchvision stand-in if needed
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model, convert_state_dict
  cfg = get_sam_config(model_type)
  tsam = reference.build_torch_sam(cfg, seed)
  _, params = convert_state_dict(reference.state_dict_numpy(tsam))
  return cfg, tsam, build_model(cfg, params)


def _prompts(n: int, h: int, w: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  pts = rng.uniform([0, 0], [w, h], size=(n, 1, 2))
  lab = np.ones((n, 1), np.int64)
  return pts, lab


def _rel(a, b) -> float:
  import numpy as np
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _torch_predict(tp, pts, lab, batch: int, multimask: bool = True):
  import torch
  outs = []
  with torch.no_grad():
    for i in range(0, len(pts), batch):
      c = torch.as_tensor(tp.transform.apply_coords(pts[i:i + batch], tp.original_size),
                          dtype=torch.float)
      l = torch.as_tensor(lab[i:i + batch], dtype=torch.int)
      outs.append(tp.predict_torch(c, l, multimask_output=multimask))
  return outs


def _enc_flops(cfg) -> float:
  from benchmarks.device_check import encoder_flops
  return encoder_flops(cfg)


def matmul_peak(n: int = 2048, repeats: int = 5):
  """(JAX, torch) float32 matmul GFLOP/s on this machine: best of `repeats`."""
  import numpy as np
  import torch
  import jax
  import jax.numpy as jnp
  a = np.random.default_rng(0).standard_normal((2, n, n)).astype(np.float32)
  f = jax.jit(lambda x, y: x @ y)
  x, y = jnp.asarray(a[0]), jnp.asarray(a[1])
  f(x, y).block_until_ready()
  tj = min(_timed(lambda: f(x, y).block_until_ready())[0] for _ in range(repeats))
  xt, yt = torch.as_tensor(a[0]), torch.as_tensor(a[1])
  tt = min(_timed(lambda: xt @ yt)[0] for _ in range(repeats))
  return 2 * n ** 3 / tj / 1e9, 2 * n ** 3 / tt / 1e9


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def _memory_child(framework: str, model_type: str, weights: str) -> None:
  """Child process: embed + 64 prompts with ONE framework, print peak memory (JSON).

  The torch child builds only the official model (same seed = same weights);
  the JAX child never imports torch and loads the converted safetensors the
  parent wrote, so each peak is that framework's own."""
  from aopsam_jax.sam.image_io import load_image, sample_image_path
  image = load_image(sample_image_path())
  pts, lab = _prompts(64, *image.shape[:2])
  if framework == "torch":
    from tests import reference
    from aopsam_jax.sam.config import get_sam_config
    from segment_anything import SamPredictor as TP
    tp = TP(reference.build_torch_sam(get_sam_config(model_type), 0))
    tp.set_image(image)
    _torch_predict(tp, pts, lab, 64)
  else:
    import jax
    from aopsam_jax.sam.params import load_sam
    from aopsam_jax.sam.predictor import SamPredictor
    p = SamPredictor(load_sam(weights))
    p.set_image(image)
    p.predict(pts, lab)
    assert "torch" not in sys.modules
    dev = jax.devices()[0]
    if dev.platform != "cpu":
      stats = dev.memory_stats() or {}
      print(json.dumps({"peak_device_bytes": stats.get("peak_bytes_in_use")}))
      return
  from aopsam_jax.sysinfo import peak_rss_kb
  print(json.dumps({"peak_rss_kb": peak_rss_kb()}))


def _memory(framework: str, model_type: str, weights: str):
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--model", model_type,
                        "--_memory-child", framework, "--_weights", weights],
                       capture_output=True, text=True)
  if out.returncode != 0:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def bench(args) -> str:
  import numpy as np
  import torch
  import jax
  import flax
  from tests import reference  # noqa: F401  (installs the torchvision stand-in if needed)
  from segment_anything import SamPredictor as TorchPredictor
  from aopsam_jax.sam.image_io import load_image, sample_image_path
  from aopsam_jax.sam.predictor import SamPredictor, embed_fn

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  load_start = _load()
  image = load_image(args.image or sample_image_path())
  h, w = image.shape[:2]
  t_build, (cfg, tsam, jsam) = _timed(lambda: _build(args.model))
  dtype = {"float32": None, "bfloat16": jax.numpy.bfloat16}[args.dtype]
  p = SamPredictor(jsam, dtype=dtype)
  tp = TorchPredictor(tsam)
  tp.set_image(image)  # torch warm-up + the official preprocessing
  x_torch = tp.transform.apply_image(image)

  # --- encoder -------------------------------------------------------------
  from aopsam_jax.sam.transforms import prepare_image
  padded, ihw, _ = prepare_image(image, cfg.img_size)
  padded, ihw = padded[None], ihw[None]
  t_first, _ = _timed(lambda: embed_fn(p.graphdef, p.state, padded, ihw).block_until_ready())
  t_jax, t_torch = [], []
  for _ in range(args.repeats):
    dt, emb = _timed(lambda: embed_fn(p.graphdef, p.state, padded, ihw).block_until_ready())
    t_jax.append(dt)
    with torch.no_grad():
      xt = torch.as_tensor(x_torch).permute(2, 0, 1).contiguous()[None]
      dt, _ = _timed(lambda: tsam.image_encoder(tsam.preprocess(xt)))
    t_torch.append(dt)
    print(f"  encoder  jax {t_jax[-1]:.3f}s  torch {t_torch[-1]:.3f}s", flush=True)
  enc_jax, enc_torch = statistics.median(t_jax), statistics.median(t_torch)
  peak_jax, peak_torch = matmul_peak()
  emb_err = _rel(np.asarray(emb[0]), tp.features[0].permute(1, 2, 0).numpy())
  p.set_image(image)

  # --- prompts -> masks ----------------------------------------------------
  rows = []
  for n in args.prompts:
    pts, lab = _prompts(n, h, w, seed=n)
    t_c, (m, iou, low) = _timed(lambda: p.predict(pts, lab))  # compile (per bucket)
    tj, tt = [], []
    for _ in range(args.decoder_repeats):
      tj.append(_timed(lambda: p.predict(pts, lab))[0])
      tt.append(_timed(lambda: _torch_predict(tp, pts, lab, 64))[0])
    outs = _torch_predict(tp, pts, lab, 64)
    tl = np.concatenate([o[2].numpy() for o in outs])
    tm = np.concatenate([o[0].numpy() for o in outs])
    rows.append(dict(n=n, jax=statistics.median(tj), torch=statistics.median(tt),
                     compile=max(t_c - statistics.median(tj), 0.0), low_err=_rel(low, tl),
                     agree=float(np.mean(m == tm))))
    print(f"  {n:4d} prompts  jax {rows[-1]['jax']:.3f}s  torch {rows[-1]['torch']:.3f}s",
          flush=True)

  # --- memory --------------------------------------------------------------
  mem = {}
  if not args.no_memory:
    import tempfile
    from aopsam_jax.sam.params import flat_params, save_converted
    with tempfile.TemporaryDirectory() as tmp:
      weights = os.path.join(tmp, "sam.safetensors")
      save_converted(weights, jsam.config, flat_params(jsam))
      mem = {"jax": _memory("jax", args.model, weights),
             "torch": _memory("torch", args.model, weights)}

  backend = jax.default_backend()
  dev = jax.devices()[0]
  lines = [
      f"# SAM {args.model} benchmark: aopsam-jax vs official PyTorch ({backend})",
      "",
      f"Generated by `python benchmarks/bench_sam.py {' '.join(sys.argv[1:])}`".rstrip() + ".",
      "",
      "| machine | |",
      "|---|---|",
      f"| CPU | {cpu_model()}, {os.cpu_count()} cores visible |",
      f"| JAX backend | {backend} ({dev.device_kind}) |",
      f"| versions | jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
      f"numpy {np.__version__}, python {platform.python_version()} |",
      f"| torch threads | {torch.get_num_threads()} |",
      f"| JAX compute dtype | {args.dtype} (PyTorch: float32) |",
      f"| JAX encoder attention | {_attention()} |",
      f"| load average (1/5/15 min) | start {load_start}; end {_load()} |",
      f"| image | {args.image or 'bundled sample.jpg'} ({w}x{h}) |",
      "",
      "| measurement | aopsam-jax | official PyTorch | JAX / PyTorch |",
      "|---|---|---|---|",
      f"| image encoder, median of {args.repeats} (s) | {enc_jax:.3f} | {enc_torch:.3f} | "
      f"{enc_jax / enc_torch:.2f} |",
      f"| image encoder, min (s) | {min(t_jax):.3f} | {min(t_torch):.3f} | "
      f"{min(t_jax) / min(t_torch):.2f} |",
      f"| encoder compile (s) | {max(t_first - enc_jax, 0):.1f} | - | |",
      f"| encoder GFLOP/s (median run; {_enc_flops(cfg) / 1e12:.2f} TFLOP per image) | "
      f"{_enc_flops(cfg) / enc_jax / 1e9:.0f} | {_enc_flops(cfg) / enc_torch / 1e9:.0f} | |",
      f"| float32 matmul peak, 2048^3, same run (GFLOP/s) | {peak_jax:.0f} | {peak_torch:.0f} | |",
      f"| encoder share of the matmul peak | {_enc_flops(cfg) / enc_jax / 1e9 / peak_jax:.0%} | "
      f"{_enc_flops(cfg) / enc_torch / 1e9 / peak_torch:.0%} | |",
  ]
  for r in rows:
    lines.append(f"| {r['n']} prompts -> masks, median of {args.decoder_repeats} (s) | "
                 f"{r['jax']:.3f} | {r['torch']:.3f} | {r['jax'] / r['torch']:.2f} |")
  for r in rows:
    lines.append(f"| predictor compile, {r['n']} prompts (s) | {r['compile']:.1f} | - | |")
  for fw in ("jax", "torch"):
    m = mem.get(fw)
    if not m:
      continue
    if "peak_rss_kb" in m:
      val = f"{m['peak_rss_kb'] / 1e6:.2f} GB peak RSS"
    elif "peak_device_bytes" in m and m["peak_device_bytes"]:
      val = f"{m['peak_device_bytes'] / 1e9:.2f} GB device peak"
    else:
      val = m.get("error", "n/a")
    mem[fw] = val
  if mem:
    lines.append(f"| peak memory (embed + 64 prompts, own process) | {mem.get('jax')} | "
                 f"{mem.get('torch')} | |")
  lines += [
      "",
      f"Agreement: embedding rel. L2 {emb_err:.1e}; low-res logits rel. L2 "
      + ", ".join(f"{r['low_err']:.1e} ({r['n']})" for r in rows)
      + "; mask pixel agreement "
      + ", ".join(f"{r['agree']:.5f}" for r in rows) + ".",
      "",
      f"Setup (build + convert random weights): {t_build:.1f}s.  JAX and PyTorch encoder runs "
      "alternate; prompts are 1 random foreground point each, multimask output, masks at the "
      "original size; both frameworks process prompts in batches of <= 64.",
  ]
  return "\n".join(lines) + "\n"


def bf16_report(args) -> str:
  """bfloat16 vs float32 compute on the same vit_b random weights."""
  import numpy as np
  import jax
  import jax.numpy as jnp
  from aopsam_jax.sam.image_io import load_image, sample_image_path
  from aopsam_jax.sam.predictor import SamPredictor
  image = load_image(args.image or sample_image_path())
  h, w = image.shape[:2]
  cfg, tsam, jsam = _build(args.model)
  del tsam
  p32 = SamPredictor(jsam)
  p16 = SamPredictor(jsam, dtype=jnp.bfloat16)
  p32.set_image(image)
  t32 = _timed(lambda: (p32.set_image(image), p32.features.block_until_ready()))[0]
  p16.set_image(image)
  t16 = _timed(lambda: (p16.set_image(image), p16.features.block_until_ready()))[0]
  rng = np.random.default_rng(0)
  n = 64
  pts = rng.uniform([0, 0], [w, h], size=(n, 2, 2))
  lab = rng.integers(0, 2, size=(n, 2))
  lab[:, 0] = 1
  x0, y0 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
  boxes = np.stack([x0, y0, x0 + rng.uniform(20, w / 2, n), y0 + rng.uniform(20, h / 2, n)], 1)
  res = {}
  for name, kw in (("points", dict(point_coords=pts, point_labels=lab)),
                   ("boxes", dict(box=boxes)),
                   ("points+box", dict(point_coords=pts, point_labels=lab, box=boxes))):
    m32, i32, l32 = p32.predict(**kw)
    m16, i16, l16 = p16.predict(**kw)
    inter = np.logical_and(m16, m32).sum((-1, -2))
    union = np.logical_or(m16, m32).sum((-1, -2))
    miou = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))
    res[name] = dict(low=_rel(l16, l32), iou=_rel(i16, i32), agree=float(np.mean(m16 == m32)),
                     miou=miou, iou_abs=float(np.max(np.abs(i16 - i32))))
  emb = _rel(np.asarray(p16.features), np.asarray(p32.features))
  lines = [
      f"# bfloat16 vs float32 compute ({args.model}, random weights)",
      "",
      f"Generated by `python benchmarks/bench_sam.py --bf16 --model {args.model}` on "
      f"{jax.default_backend()} ({cpu_model()}), jax {jax.__version__}.",
      "`SamPredictor(model, dtype=jnp.bfloat16)`: matmuls / convolutions in bfloat16, "
      "parameters, LayerNorm and softmax in float32.  Reference: the float32 JAX model "
      "(itself within ~1e-6 of the official PyTorch model).  Image: bundled sample.jpg; "
      f"{n} random prompts per row (2 points, 1-2 positive, and/or a random box), "
      "multimask output (3 masks per prompt).",
      "",
      f"Image embedding relative L2 error: **{emb:.4f}**",
      "",
      "| prompts | low-res logits rel. L2 | IoU-pred rel. L2 | IoU-pred max abs | "
      "mask pixel agreement | mean mask IoU bf16 vs f32 |",
      "|---|---|---|---|---|---|",
  ]
  for name, r in res.items():
    lines.append(f"| {name} | {r['low']:.4f} | {r['iou']:.4f} | {r['iou_abs']:.4f} | "
                 f"{r['agree']:.4f} | {r['miou']:.4f} |")
  lines += ["", f"Encoder time on this machine (one run after compile): float32 {t32:.2f}s, "
            f"bfloat16 {t16:.2f}s (embed + preprocessing; CPU bf16 is not faster in XLA:CPU "
            "unless the hardware has native bf16 matmuls).",
            "",
            "Note: random weights are a harsher test than trained ones (no confident "
            "masks, many logits near the 0 threshold), so pixel agreement on real checkpoints "
            "is expected to be at least as high.", ""]
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="Writes benchmarks/results/sam_<backend>.md (or "
                               "sam_bf16.md with --bf16).")
  ap.add_argument("--model", default="vit_b", help="vit_b (default), vit_l, vit_h or vit_tiny_test")
  ap.add_argument("--repeats", type=int, default=3, help="timed encoder runs per framework")
  ap.add_argument("--decoder-repeats", type=int, default=2, help="timed runs per prompt count")
  ap.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")],
                  default=[1, 64, 256], help="comma-separated prompt counts (default 1,64,256)")
  ap.add_argument("--torch-threads", type=int, default=0,
                  help="torch.set_num_threads (default: torch's default, all cores)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="JAX compute dtype")
  ap.add_argument("--image", default=None, help="image path (default: bundled sample)")
  ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
  ap.add_argument("--bf16", action="store_true",
                  help="measure bfloat16-vs-float32 error instead; writes results/sam_bf16.md")
  ap.add_argument("--out", default=None, help="output markdown path")
  ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_weights", dest="weights", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if args.memory_child:
    _memory_child(args.memory_child, args.model, args.weights)
    return
  if args.bf16:
    text = bf16_report(args)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "sam_bf16.md")
  else:
    text = bench(args)
    import jax
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"sam_{jax.default_backend()}.md")
  write_table(text, out)


if __name__ == "__main__":
  main()
