"""The one prepared speed + parity check for a lent accelerator (or --smoke on CPU).

  bash benchmarks/device_check.sh             # on the GPU machine: installs, then runs this
  python benchmarks/device_check.py --smoke   # every step at toy sizes on CPU (< 2 min)

Steps, in priority order, each inside a global time budget (a step that no
longer fits is reported as skipped, so a run never overruns its lease):
  1. machine: device, versions, measured matmul rates (float32 at default and
     highest precision, bfloat16) = the ceilings the numbers below are read against;
  2. parity vs the official PyTorch model on the same device at highest
     matmul precision (vit_b with random weights; every attention implementation);
  3. per SAM variant (vit_h, vit_b) and compute dtype (bfloat16, float32):
     encoder per attention implementation at batch 1 (the fastest one is
     used for the rest), encoder at batch 8, 1 and 64 prompts -> masks at
     original size, AoP-SAM end to end at batch 1 and 8, AMG_S and AMG_D;
     cold compile seconds of each program; device peak memory so far;
  4. Prompt Predictor train step with online embeddings (images/s).

Weights are random (no files needed).  Timing: each program is called once
(compile; reported), then repeated on alternating inputs; every call ends in
`block_until_ready`, so the host clock brackets finished device work; the
median is reported.  Writes benchmarks/results/device_<name>.md (and a copy
plus JSON under $OUT when that is set) after every step, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from aopsam_jax.sam import amg, modeling  # noqa: E402
from aopsam_jax.sam.config import SamConfig, get_sam_config  # noqa: E402
from aopsam_jax.sam.prompts import build_sparse_prompts  # noqa: E402
from aopsam_jax.sam.transforms import apply_coords, prepare_image  # noqa: E402
from aopsam_jax.sysinfo import cpu_model  # noqa: E402

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# --smoke: a thin encoder at a 256 input, so every program compiles and runs in seconds on CPU.
SMOKE_CFG = SamConfig(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
                      encoder_global_attn_indexes=(1,), img_size=256)


def sam_config(name: str) -> SamConfig:
  return SMOKE_CFG if name == "smoke" else get_sam_config(name)


# ----------------------------------------------------------------------------
# Settings and bookkeeping
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  variants: List[Any]  # Specs in priority order
  batches: List[int]
  aop_batches: List[int]
  prompts: List[int]
  amg_sides: Dict[str, int]
  parity_model: str
  matmul_n: int
  max_repeats: int
  repeat_s: float
  train_models: List[str]
  train_batch: int
  image_hw: tuple
  min_left: float


def make_plan(args) -> Plan:
  if args.smoke:
    return Plan(variants=[Spec("smoke", "float32", steps=STEPS + EXTRA_STEPS)], batches=[1, 2],
                aop_batches=[1], prompts=[1, 4],
                amg_sides={"AMG_S": 2}, parity_model="smoke", matmul_n=256,
                max_repeats=2, repeat_s=0.0, train_models=["smoke"], train_batch=2,
                image_hw=(192, 256), min_left=0.0)
  variants = [Spec.parse(v) for v in args.variants.split(",") if v]
  return Plan(variants=variants, batches=[1, 8], aop_batches=[1, 8],
              prompts=[1, 64], amg_sides={"AMG_S": 16, "AMG_D": 32}, parity_model="vit_b",
              matmul_n=8192 if jax.default_backend() != "cpu" else 2048, max_repeats=10, repeat_s=3.0,
              train_models=args.train_models.split(",") if args.train_models else [],
              train_batch=8, image_hw=(768, 1024), min_left=1.0)


class Report:
  """Rows of results, written out (markdown + JSON) after every step."""

  def __init__(self, path: str, header: List[str]):
    self.path = path
    self.header = header
    self.machine: List[str] = []
    self.parity: List[Dict[str, Any]] = []
    self.rows: List[Dict[str, Any]] = []
    self.notes: List[str] = []

  def add(self, **row) -> None:
    self.rows.append(row)
    t = row.get("median_s")
    print(f"  {row['model']:>13} {row['dtype']:>8} {row['what']:<34} "
          + (f"{t * 1e3:10.2f} ms" if t is not None else f"{row.get('status', ''):>13}")
          + (f"  compile {row['compile_s']:.1f}s" if row.get("compile_s") is not None else ""),
          flush=True)
    self.write()

  def markdown(self) -> str:
    lines = list(self.header) + [""] + self.machine + [""]
    if self.parity:
      lines += ["## Parity vs official PyTorch (same device, highest matmul precision)", "",
                "| model | attention | embedding rel. L2 | low-res logits rel. L2 | IoU rel. L2 |",
                "|---|---|---|---|---|"]
      lines += [f"| {p['model']} | {p['impl']} | {p['emb']:.1e} | {p['low']:.1e} | {p['iou']:.1e} |"
                if "emb" in p else f"| {p['model']} | {p['impl']} | {p['status']} | | |"
                for p in self.parity]
      lines.append("")
    lines += ["## Timings (median; device work finished inside each timed call)", "",
              "| model | dtype | what | batch | attention | median ms | per image ms | "
              "compile s | runs | TFLOP/s | peak device GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in self.rows:
      med = r.get("median_s")
      if med is None:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['what']} | {r.get('batch', '')} | "
                     f"{r.get('impl', '')} | {r.get('status', '')} | | | | | |")
        continue
      b = r.get("batch", 1)
      tf = f"{r['flops'] / med / 1e12:.1f}" if r.get("flops") else ""
      peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else ""
      comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else ""
      lines.append(f"| {r['model']} | {r['dtype']} | {r['what']} | {b} | {r.get('impl', '')} | "
                   f"{med * 1e3:.2f} | {med * 1e3 / b:.2f} | {comp} | {r['runs']} | {tf} | "
                   f"{peak} |")
    if self.notes:
      lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
    return "\n".join(lines) + "\n"

  def write(self) -> None:
    text = self.markdown()
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.path, "w") as f:
      f.write(text)
    out = os.environ.get("OUT")
    if out and os.path.isdir(out):
      with open(os.path.join(out, os.path.basename(self.path)), "w") as f:
        f.write(text)
      with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump({"machine": self.machine, "parity": self.parity, "rows": self.rows,
                   "notes": self.notes}, f, indent=1, default=str)


class Budget:
  """Wall-clock budget; `scale` multiplies the reserve a step needs before it starts
  (0 in --smoke, which must run every step)."""

  def __init__(self, seconds: float, scale: float = 1.0):
    self.end = time.perf_counter() + seconds
    self.scale = scale

  def left(self) -> float:
    return self.end - time.perf_counter()


def block(x):
  return jax.block_until_ready(x)


def timed_calls(fn: Callable[[int], Any], plan: Plan, budget: Budget) -> Dict[str, Any]:
  """First call (compile + run) and the median of repeated calls on alternating inputs."""
  t0 = time.perf_counter()
  block(fn(0))
  first = time.perf_counter() - t0
  times: List[float] = []
  spent = 0.0
  while len(times) < plan.max_repeats and (len(times) < 2 or spent < plan.repeat_s):
    if budget.left() < 2 * (times[-1] if times else first) + 1.0 and len(times) >= 1:
      break
    t0 = time.perf_counter()
    block(fn(len(times) + 1))
    times.append(time.perf_counter() - t0)
    spent += times[-1]
  med = statistics.median(times)
  return {"median_s": med, "compile_s": max(first - med, 0.0), "runs": len(times)}


def peak_gib() -> Optional[float]:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return peak / 2**30 if peak else None


def rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------
# FLOP counts (multiply-adds x 2), for achieved-rate columns
# ----------------------------------------------------------------------------


def encoder_flops(cfg: SamConfig, batch: int = 1) -> float:
  """Image encoder forward FLOPs: patch embedding, blocks (windowed blocks on
  the zero-padded grid, as computed), neck."""
  g, d, ws = cfg.embed_size, cfg.encoder_embed_dim, cfg.window_size
  t = g * g
  total = 2 * t * (cfg.patch_size ** 2 * 3) * d
  for i in range(cfg.encoder_depth):
    if i in cfg.encoder_global_attn_indexes or ws == 0:
      ta, n, side = t, t, g
    else:
      gp = -(-g // ws) * ws
      ta, n, side = gp * gp, ws * ws, ws
    total += 2 * ta * d * 3 * d + 2 * ta * d * d   # qkv, proj
    total += 4 * ta * n * d                         # q k^T and p v
    total += 4 * ta * side * d                      # decomposed rel-pos terms
    total += 2 * 2 * t * d * int(d * cfg.mlp_ratio)  # MLP
  p = cfg.prompt_embed_dim
  total += 2 * t * d * p + 2 * t * p * p * 9        # neck 1x1 and 3x3 convs
  return float(total * batch)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def machine_info(report: Report, plan: Plan, budget: Budget) -> None:
  import flax
  dev = jax.devices()[0]
  try:
    import torch
    tv = f"torch {torch.__version__} (cuda {'yes' if torch.cuda.is_available() else 'no'})"
  except ImportError:
    tv = "no torch"
  report.machine += [
      "| machine | |", "|---|---|",
      f"| device | {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}) |",
      f"| host | {platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()} |",
      f"| versions | jax {jax.__version__}, flax {flax.__version__}, numpy {np.__version__}, "
      f"python {platform.python_version()}, {tv} |",
  ]
  n = plan.matmul_n
  rng = np.random.default_rng(0)
  for dt, prec in (("float32", "default"), ("float32", "highest"), ("bfloat16", "default")):
    a = [jnp.asarray(rng.standard_normal((n, n)), dt) for _ in range(2)]
    f = jax.jit(lambda x, y, p=prec: jnp.dot(x, y, precision=p))
    r = timed_calls(lambda i, f=f, a=a: f(a[i % 2], a[(i + 1) % 2]), plan, budget)
    report.machine.append(f"| matmul {n}^3 {dt} ({prec} precision) | "
                          f"{2 * n ** 3 / r['median_s'] / 1e12:.2f} TFLOP/s |")
  report.write()




def test_image(seed: int, h: int = 768, w: int = 1024) -> np.ndarray:
  """Smooth random RGB (never zeros: zeros can run faster than real data)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (h // 64 + 1, w // 64 + 1, 3))
  img = np.repeat(np.repeat(coarse, 64, 0), 64, 1)[:h, :w]
  return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def parity(report: Report, plan: Plan, budget: Budget) -> None:
  """Official PyTorch SAM vs this port on the same device, highest precision."""
  try:
    import torch
    from tests import reference
    from segment_anything import SamPredictor as TorchPredictor
  except ImportError as e:
    report.parity.append({"model": plan.parity_model, "impl": "-", "status": f"skipped ({e})"})
    return
  from aopsam_jax.sam.params import build_model, convert_state_dict
  from aopsam_jax.sam.predictor import SamPredictor
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  cfg = sam_config(plan.parity_model)
  tsam = reference.build_torch_sam(cfg, 0)
  _, params = convert_state_dict(reference.state_dict_numpy(tsam))
  tsam = tsam.to(dev)
  image = test_image(1, plan.image_hw[0] * 3 // 4, plan.image_hw[1] * 3 // 4)
  tp = TorchPredictor(tsam)
  tp.set_image(image)
  pts = np.random.default_rng(2).uniform([0, 0], image.shape[1::-1], (8, 1, 2))
  lab = np.ones((8, 1), np.int64)
  with torch.no_grad():
    c = torch.as_tensor(tp.transform.apply_coords(pts, tp.original_size), dtype=torch.float,
                        device=dev)
    _, t_iou, t_low = tp.predict_torch(c, torch.as_tensor(lab, device=dev))
  t_emb = tp.features[0].permute(1, 2, 0).cpu().numpy()
  impls = ["chunked", "xla"]
  with jax.default_matmul_precision("highest"):
    for impl in impls:
      model = modeling.set_attention(build_model(cfg, params), impl)
      p = SamPredictor(model)
      p.set_image(image)
      _, iou, low = p.predict(pts, lab)
      report.parity.append({"model": plan.parity_model, "impl": impl + f" ({dev} vs torch {dev})",
                            "emb": rel(p.features[0], t_emb), "low": rel(low, t_low.cpu().numpy()),
                            "iou": rel(iou, t_iou.cpu().numpy())})
      print(f"  parity {impl}: {report.parity[-1]}", flush=True)
  del tp, tsam
  if dev == "cuda":
    torch.cuda.empty_cache()  # leave the device memory to JAX
  report.write()


def _graphdef(cfg: SamConfig, dtype, impl: str, predictor_cfg=None, prompt_chunk="auto"):
  """graphdef of Sam (or AopSam with a predictor config) for a compute dtype, attention
  and decoder prompt chunk; the parameter state is shared by all of them."""
  from aopsam_jax.aop.pipeline import AopSam
  from aopsam_jax.aop.prompt_predictor import PromptPredictor

  def build():
    sam = modeling.Sam(cfg, rngs=nnx.Rngs(0), dtype=dtype, attention=impl)
    sam.mask_decoder.prompt_chunk = prompt_chunk
    if predictor_cfg is None:
      return sam
    return AopSam(sam, PromptPredictor(predictor_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(nnx.eval_shape(build))[0]


def random_state(abstract_state, seed: int = 0):
  """Random float32 parameters for an abstract (eval_shape) nnx state, made on the device
  by one small program: one normal draw for all parameters, sliced (a whole-model nnx
  init program took 80 s to compile for vit_h on an H100, per-shape fills ~60 s on CPU)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  shapes = [tuple(leaf.shape) for _, leaf in leaves]
  sizes = [int(np.prod(shp)) for shp in shapes]
  is_scale = []
  for path, _ in leaves:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    is_scale.append(len(names) > 1 and names[-2] == "scale")

  @jax.jit
  def make(key):
    flat = 0.02 * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, off = [], 0
    for shp, n, sc in zip(shapes, sizes, is_scale):
      x = flat[off:off + n].reshape(shp)
      out.append(x + 1.0 if sc else x)
      off += n
    return out
  return jax.tree_util.tree_unflatten(treedef, make(jax.random.key(seed)))


class Variant:
  """One SAM variant (+ prompt predictor) with random weights made on the device."""

  def __init__(self, name: str, image_hw):
    from aopsam_jax.aop.pipeline import AopSam
    from aopsam_jax.aop.prompt_predictor import PromptPredictor, PromptPredictorConfig
    self.name = name
    self.cfg = sam_config(name)
    self.pp_cfg = PromptPredictorConfig()
    abstract = nnx.eval_shape(lambda: AopSam(modeling.Sam(self.cfg, rngs=nnx.Rngs(0)),
                                             PromptPredictor(self.pp_cfg, rngs=nnx.Rngs(1))))
    graphdef, self.aop_state = nnx.split(abstract)
    self.aop_state = random_state(self.aop_state)
    self.sam_state = nnx.split(nnx.merge(graphdef, self.aop_state).sam)[1]
    images = [test_image(s, *image_hw) for s in range(2)]
    prepared = [prepare_image(im, self.cfg.img_size) for im in images]
    self.padded = [p[0] for p in prepared]
    self.input_hw = [p[1].astype(np.int32) for p in prepared]
    self.original_hw = [p[2].astype(np.int32) for p in prepared]
    self.images = images
    self._batches: Dict[tuple, tuple] = {}

  def batch(self, i: int, b: int):
    """Device arrays (padded, input_hw, original_hw) of b images (input set i % 2), made once
    so that timed calls hold no host-to-device copies."""
    k = i % 2
    if (k, b) not in self._batches:
      stack = lambda xs: jnp.asarray(np.stack([xs[(k + j) % 2] for j in range(b)]))
      self._batches[k, b] = block((stack(self.padded), stack(self.input_hw),
                                   stack(self.original_hw)))
    return self._batches[k, b]


STEPS = ("enc1", "enc8", "decode", "aop1", "aop8", "amg_s", "amg_d")
# Opt-in (not in the default run): AoP-SAM at batch 1 with the decoder's prompts
# in chunks of 8, so ASF's two stages run as one loop and the decoder compiles
# once (what a CPU does by default): its compile and call times beside aop1's.
EXTRA_STEPS = ("aop1_loop",)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One measured variant: `MODEL:DTYPE[:IMPL+IMPL...[:STEP+STEP...]]` on the command line.

  Attention impls default to every one available (cudnn only for bfloat16 on
  a GPU); steps default to all of STEPS (enc1 = encoder per impl at batch 1,
  the fastest impl is used for the rest; without enc1 the first impl is)."""

  model: str
  dtype: str
  impls: tuple = ()
  steps: tuple = STEPS

  @classmethod
  def parse(cls, text: str) -> "Spec":
    parts = text.split(":")
    if len(parts) < 2 or parts[1] not in DTYPES:
      raise SystemExit(f"--variants: {text!r} is not MODEL:DTYPE[:IMPLS[:STEPS]] with DTYPE "
                       f"float32 or bfloat16")
    sam_config(parts[0])
    impls = tuple(x for x in parts[2].split("+") if x) if len(parts) > 2 else ()
    steps = tuple(x for x in parts[3].split("+") if x) if len(parts) > 3 else STEPS
    for impl in impls:
      modeling.check_attention_impl(impl)
    bad = set(steps) - set(STEPS + EXTRA_STEPS)
    if bad:
      raise SystemExit(f"--variants: unknown steps {sorted(bad)} in {text!r}; use "
                       f"{STEPS + EXTRA_STEPS}")
    return cls(parts[0], parts[1], impls, steps)

  def attention_impls(self):
    if self.impls:
      return list(self.impls)
    dtype = DTYPES[self.dtype]
    return ["chunked", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" and dtype else [])


def bench_variant(report: Report, plan: Plan, budget: Budget, v: Variant, spec: Spec) -> None:
  """Encoder per attention impl, then decode, AoP and AMG with the fastest impl."""
  from aopsam_jax.sam.predictor import embed_fn
  dtype = DTYPES[spec.dtype]
  base = dict(model=v.name, dtype=spec.dtype)
  impls = spec.attention_impls()
  enc_flops = encoder_flops(v.cfg)
  best, best_t = impls[0], float("inf")
  for impl in impls if "enc1" in spec.steps else ():
    g = _graphdef(v.cfg, dtype, impl)
    r = _guarded(report, base, f"encoder ({impl})", budget, 1, lambda g=g: timed_calls(
        lambda i: embed_fn(g, v.sam_state, *v.batch(i, 1)[:2]), plan, budget), impl=impl,
        flops=enc_flops)
    if r and r["median_s"] < best_t:
      best, best_t = impl, r["median_s"]
  g = _graphdef(v.cfg, dtype, best)
  for b in plan.batches[1:] if "enc8" in spec.steps else ():
    _guarded(report, base, "encoder", budget, b, lambda b=b: timed_calls(
        lambda i: embed_fn(g, v.sam_state, *v.batch(i, b)[:2]), plan, budget), impl=best,
        flops=enc_flops * b)
  if "decode" in spec.steps:
    bench_decode(report, plan, budget, v, g, base)
  ga = _graphdef(v.cfg, dtype, best, v.pp_cfg)
  aop_batches = [b for b in plan.aop_batches if f"aop{1 if b == 1 else 8}" in spec.steps]
  bench_aop(report, plan, budget, v, ga, base, best, aop_batches)
  if "aop1_loop" in spec.steps:
    bench_aop(report, plan, budget, v, _graphdef(v.cfg, dtype, best, v.pp_cfg, prompt_chunk=8),
              base, best, [1], what="AoP-SAM end to end, ASF stages as one loop (prompt_chunk 8)")
  amg_sides = {k: n for k, n in plan.amg_sides.items() if k.lower() in spec.steps}
  bench_amg(report, plan, budget, v, g, base, best, amg_sides)


def _guarded(report: Report, base: Dict[str, Any], what: str, budget: Budget, batch: int,
             run: Callable[[], Dict[str, Any]], min_left: float = 20.0, **extra):
  """Run one measurement unless the budget is spent; record errors instead of dying."""
  if budget.left() < min_left * budget.scale:
    report.add(**base, what=what, batch=batch, status="skipped (time)", **extra)
    return None
  try:
    r = run()
  except Exception as e:  # a failed step must not lose the others' numbers
    traceback.print_exc()
    report.add(**base, what=what, batch=batch, status=f"error: {type(e).__name__}: "
               f"{str(e).splitlines()[0][:120] if str(e) else ''}", **extra)
    return None
  report.add(**base, what=what, batch=batch, peak_gib=peak_gib(), **r, **extra)
  return r


def bench_decode(report, plan, budget, v: Variant, graphdef, base) -> None:
  """n prompts -> masks at the original size (predict_fn, as SamPredictor.predict)."""
  from aopsam_jax.sam.predictor import OUT_ALIGN, embed_fn, predict_fn
  padded, ihw, ohw = v.batch(0, 1)
  emb = block(embed_fn(graphdef, v.sam_state, padded, ihw))
  h, w = (int(x) for x in v.original_hw[0])
  out_hw = (-(-h // OUT_ALIGN) * OUT_ALIGN, -(-w // OUT_ALIGN) * OUT_ALIGN)
  for n in plan.prompts:
    sets = []
    for s in range(2):
      pts = np.random.default_rng(s).uniform([0, 0], [w, h], (n, 1, 2))
      c, l = build_sparse_prompts(apply_coords(pts, (h, w), v.input_hw[0]), np.ones((n, 1)), None)
      sets.append((jnp.asarray(c), jnp.asarray(l)))
    run = lambda i, n=n, sets=sets: predict_fn(
        graphdef, v.sam_state, emb, np.int32(0), ihw, ohw, *sets[i % 2], None,
        multimask_output=True, out_hw=out_hw)
    _guarded(report, base, f"{n} prompt(s) -> masks (orig. size)", budget, 1,
             lambda run=run: timed_calls(run, plan, budget))


def bench_aop(report, plan, budget, v: Variant, graphdef, base, impl, batches,
              what: str = "AoP-SAM end to end") -> None:
  from aopsam_jax.aop import pipeline
  asf = pipeline.AsfConfig(img_size=v.cfg.img_size)
  flops = encoder_flops(v.cfg)
  for b in batches:
    def run(i, b=b):
      padded, ihw, ohw = v.batch(i, b)
      if b == 1:
        padded, ihw, ohw = padded[0], ihw[0], ohw[0]
      return pipeline.segment_jit((graphdef, v.aop_state), padded, ihw, ohw, asf)
    _guarded(report, base, what, budget, b,
             lambda run=run: timed_calls(run, plan, budget), impl=impl, flops=flops * b)


def bench_amg(report, plan, budget, v: Variant, graphdef, base, impl, sides) -> None:
  for name, side in sides.items():
    cfg = amg.AmgConfig(points_per_side=side)
    inputs = [amg.prepare(im, cfg, v.cfg.img_size) for im in v.images]
    _guarded(report, base, f"{name} ({side}x{side} grid)", budget, 1,
             lambda cfg=cfg, inputs=inputs: timed_calls(
                 lambda i: amg.generate((graphdef, v.sam_state), inputs[i % 2], cfg), plan,
                 budget), min_left=40.0, impl=impl)


def bench_train(report: Report, plan: Plan, budget: Budget, name: str) -> None:
  """Prompt Predictor train step, SAM encoder (float32) inside the step."""
  import optax
  from aopsam_jax.aop.prompt_predictor import PromptPredictor, PromptPredictorConfig
  from aopsam_jax.trainer import steps

  cfg = sam_config(name)
  b = plan.train_batch
  base = dict(model=name, dtype="float32")

  def run():
    mesh = steps.make_mesh()
    model = PromptPredictor(PromptPredictorConfig(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-3)
    enc = nnx.jit(lambda: modeling.Sam(cfg, rngs=nnx.Rngs(0)).image_encoder)()
    enc_g, enc_s = nnx.split(enc)
    enc_s = steps.replicate(enc_s, mesh)
    state = steps.replicate({"params": params, "opt_state": tx.init(params),
                             "step": jnp.zeros((), jnp.int32)}, mesh)
    loss_cfg = {"kind": "focal", "kwargs": {"alpha": 2.0, "beta": 4.0}}
    train_step, _ = steps.build_steps(graphdef, tx, _Cfg(loss_cfg), mesh, enc_g)
    rng = np.random.default_rng(0)
    s = cfg.img_size // 4
    tgt = np.zeros((b, s, s), np.float32)
    tgt[:, s // 2, s // 2] = 1.0
    batches = [steps.to_global(mesh, {
        "target": tgt, "weight": np.ones((b, s, s), np.float32),
        "image": rng.integers(0, 255, (b, cfg.img_size, cfg.img_size, 3), dtype=np.uint8),
        "input_hw": np.tile(np.array([plan.image_hw], np.int32), (b, 1))}) for _ in range(2)]
    holder = {"state": state}

    def step(i):
      holder["state"], m = train_step(holder["state"], batches[i % 2], enc_s)
      return m
    return timed_calls(step, plan, budget)
  r = _guarded(report, base, "train step (online embeddings)", budget, b, run, min_left=40.0,
               flops=encoder_flops(cfg) * b)
  if r:
    report.notes.append(f"train step {name} batch {b}: {b / r['median_s']:.1f} images/s "
                        "(encoder forward inside the step, predictor forward + backward, AdamW)")
    report.write()


class _Cfg(dict):
  """The dict-with-attributes shape `steps.build_steps` reads its loss config from."""

  def __getattr__(self, k):
    return self[k]


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------


def run_all(args) -> Report:
  plan = make_plan(args)
  budget = Budget(args.budget_s, plan.min_left)
  name = args.name or ("smoke" if args.smoke else _device_name())
  path = args.out or os.path.join(ROOT, "benchmarks", "results", f"device_{name}.md")
  cmd = "python benchmarks/device_check.py " + " ".join(sys.argv[1:])
  when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  h, w = plan.image_hw
  report = Report(path, [f"# Device check: {name}", "",
                         f"Generated by `{cmd.strip()}` on {when} (budget {args.budget_s:.0f} s). "
                         f"Random weights; images {w}x{h} (padded square); AoP-SAM with an "
                         "untrained predictor decodes all its 32 prompt slots, like a trained one."])
  print(f"device check '{name}': {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  machine_info(report, plan, budget)
  print("\n".join(report.machine), flush=True)
  if not args.skip_parity:
    try:
      parity(report, plan, budget)
    except Exception as e:
      traceback.print_exc()
      report.parity.append({"model": plan.parity_model, "impl": "-",
                            "status": f"error: {type(e).__name__}: {e}"[:160]})
  variants: Dict[str, Variant] = {}
  for spec in plan.variants:
    if budget.left() < 30 * budget.scale:
      report.add(model=spec.model, dtype=spec.dtype, what="all", status="skipped (time)")
      continue
    if spec.model not in variants:
      t0 = time.perf_counter()
      variants[spec.model] = Variant(spec.model, plan.image_hw)
      report.notes.append(f"{spec.model}: random init on the device "
                          f"{time.perf_counter() - t0:.1f} s")
    bench_variant(report, plan, budget, variants[spec.model], spec)
  variants.clear()
  for model in plan.train_models:
    bench_train(report, plan, budget, model)
  report.notes.append(f"total wall time {args.budget_s - budget.left():.0f} s; float32 matmuls "
                      "run at JAX's default precision (TF32 on NVIDIA GPUs) except in the "
                      "parity step; peak device memory is the process high-water mark so far")
  report.write()
  return report


def _device_name() -> str:
  kind = jax.devices()[0].device_kind.lower()
  return "".join(c if c.isalnum() else "_" for c in kind).strip("_") or "device"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--smoke", action="store_true",
                  help="every step at toy sizes (vit_tiny_test, tiny grids) on any backend")
  ap.add_argument("--variants", default="vit_h:bfloat16,vit_b:float32,vit_h:float32,vit_b:bfloat16",
                  help="MODEL:DTYPE[:IMPL+..[:STEP+..]] list in priority order; steps: "
                  + ", ".join(STEPS) + " (default), " + ", ".join(EXTRA_STEPS) + " (opt-in)")
  ap.add_argument("--train-models", default="vit_b",
                  help="SAM encoders for the online train step ('' to skip)")
  ap.add_argument("--budget-s", type=float, default=400.0,
                  help="stop starting new steps after this many seconds (default 400)")
  ap.add_argument("--skip-parity", action="store_true")
  ap.add_argument("--name", default=None, help="results name (default: the device kind)")
  ap.add_argument("--out", default=None, help="markdown path (default results/device_<name>.md)")
  args = ap.parse_args(argv)
  report = run_all(args)
  print()
  print(report.markdown())
  print(f"wrote {report.path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
