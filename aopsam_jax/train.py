r"""Train the AoP-SAM Prompt Predictor.

  python -m aopsam_jax.train --config configs/coco_tiny.py --workdir /tmp/pp \
      [--config.total_steps=400 --config.batch_size=8 ...]

Multi-host (TPU pod / several GPU hosts): run the same command on every host
with ``--multihost`` (calls `jax.distributed.initialize()`, which
auto-detects TPU pods / SLURM), or give ``--coordinator_address host:port
--num_processes N --process_id i`` explicitly (also how two CPU processes on
one machine are tested).

What happens:
  * data: each selected dataset split is converted once per source
    fingerprint to array_record files in `config.data.dir` (all processes
    in parallel, `data.records`), read with grain; every process reads only
    its slice of each global batch (`data.pipeline`).
  * SAM's image encoder is frozen: embeddings are computed inside the jitted
    step (``config.embeddings='online'``, accelerators) or once into an
    on-disk cache keyed by the encoder weights (``'cache'``, CPUs).
  * one jitted train step, batch sharded over a Mesh of all devices, params
    replicated; AdamW + warmup/cosine + global-norm clipping.
  * Orbax CheckpointManager (params, optimizer, step and the grain iterator
    state): saves every `ckpt_every` steps and at the end, keeps
    `keep_ckpts`, resumes automatically from the latest step.
  * metrics as JSON lines in `<workdir>/metrics.jsonl` (+TensorBoard when
    tensorboardX is installed); evaluation every `eval_every` steps; PNG
    plots (curves, and `plots/val_prompts.png`: validation images with the
    predicted prompts and the instances they missed) and the trained
    predictor (`<workdir>/predictor`, see `prompt_predictor.load_predictor`)
    at the end.
  * guards (`trainer.workdir`), before any work: a lock in the workdir (a
    second run into it stops at once), the run's config stored as
    `<workdir>/config.json` and compared on restart (keys that do not match
    the checkpoints are named; total_steps and the logging / evaluation
    cadence may change), loop settings checked (total_steps >= 1).

Exit status: 0 when training finished; 1 when it could not run or failed (the
workdir is in use by another run, an unusable dataset; one line names the
cause); 2 for a usage error (a missing flag, an impossible setting, a config
that does not match the workdir's checkpoints), reported before any work.
(`--help` itself exits with 1: absl's convention.)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (auto-detect).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process (with --coordinator_address).")
flags.DEFINE_bool("compile_cache", True, "Keep compiled programs on disk (aopsam_jax.compile_cache); "
                  "--nocompile_cache turns it off.")
flags.DEFINE_bool("library_logs", False, "Also print the libraries' INFO logs (Orbax writes ~45 "
                  "lines per checkpoint); by default only this program's and every WARNING.")


@dataclasses.dataclass
class Data:
  """The run's data: sources, the (checkpointable) train iterator, the evaluator."""
  train_src: Any
  train_iter: Any
  val_src: Any
  val_tr: Any
  evaluator: Any


@dataclasses.dataclass
class Model:
  """The predictor's graph and config, the optimizer and the jitted steps."""
  pp_cfg: Any
  graphdef: Any
  tx: Any
  sched: Any
  enc_state: Any   # replicated SAM encoder state (online mode) or None
  train_step: Any
  eval_step: Any


def load_frozen_sam(config):
  from aopsam_jax.sam.checkpoints import load_sam
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import build_model
  if config.sam.checkpoint:
    return load_sam(config.sam.checkpoint)
  logging.warning("SAM %s with RANDOM weights (seed %d): its embedding carries no learned "
                  "information; the predictor must rely on its image branch.",
                  config.sam.model, config.sam.seed)
  return build_model(get_sam_config(config.sam.model), seed=config.sam.seed)


def setup_data(config, sam, mode: str, target_cfg) -> Data:
  """Records (and the embedding cache) prepared by every process for its
  share, then this process' slice of each global batch."""
  import jax

  from aopsam_jax.data import pipeline
  from aopsam_jax.data.augment import AugmentConfig
  from aopsam_jax.sam.config import config_from_dict
  from aopsam_jax.sam.params import encoder_fingerprint
  from aopsam_jax.trainer import data_setup
  from aopsam_jax.trainer.evaluation import PromptEvaluator
  pidx, pcount = jax.process_index(), jax.process_count()
  fingerprint = encoder_fingerprint(sam) if mode == "cache" else None
  par = dict(process_index=pidx, process_count=pcount, barrier=data_setup.barrier_fn(pcount),
             progress=pidx == 0)
  aug_cfg = config_from_dict(AugmentConfig, dict(config.data.get("augment", {})), "data.augment")
  train_src, train_tr = data_setup.make_split(config.data, config.data.train, mode, target_cfg,
                                              sam=sam, fingerprint=fingerprint, augment=aug_cfg, **par)
  val_src, val_tr = data_setup.make_split(config.data, config.data.val, mode, target_cfg,
                                          sam=sam, fingerprint=fingerprint, **par)
  train_ds = pipeline.train_dataset(train_src, train_tr, config.batch_size, config.data.seed, pidx,
                                    pcount, worker_count=config.data.worker_count)
  evaluator = PromptEvaluator(data_setup.annotations_of(val_src), target_cfg)
  return Data(train_src, iter(train_ds), val_src, val_tr, evaluator)


def setup_model(config, sam, mode: str, mesh):
  """(Model, replicated train state {"params", "opt_state", "step"})."""
  import jax.numpy as jnp
  from flax import nnx

  from aopsam_jax.aop.prompt_predictor import PromptPredictor, PromptPredictorConfig
  from aopsam_jax.trainer import steps
  pp_cfg = PromptPredictorConfig.from_dict(config.model.to_dict())
  model = PromptPredictor(pp_cfg, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  tx, sched = steps.make_optimizer(config.optim, config.total_steps)
  enc_graphdef, enc_state = nnx.split(sam.image_encoder) if sam is not None else (None, None)
  enc_state = steps.replicate(enc_state, mesh) if mode == "online" else None
  state = steps.replicate({"params": params, "opt_state": tx.init(params),
                           "step": jnp.zeros((), jnp.int32)}, mesh)
  train_step, eval_step = steps.build_steps(graphdef, tx, config.loss, mesh, enc_graphdef,
                                            tuple(config.eval_ks), config.nms_kernel)
  return Model(pp_cfg, graphdef, tx, sched, enc_state, train_step, eval_step), state


def log_info(writer, model_obj, data: Data) -> None:
  import jax

  from aopsam_jax.aop.prompt_predictor import forward_flops
  from aopsam_jax.sam.flat_state import count_params
  info = {"params": count_params(model_obj), "gflops_per_image": forward_flops(model_obj) / 1e9,
          "devices": jax.device_count(), "processes": jax.process_count(),
          "train_images": len(data.train_src), "val_images": len(data.val_src)}
  logging.info("prompt predictor: %s", info)
  writer.write("info", 0, info)


def open_checkpoints(workdir: str, config, state, train_iter):
  """Orbax manager over (state, grain iterator); restores the latest step.
  -> (manager, start step, state)."""
  import grain
  import jax
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"), item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_ckpts,
                                           save_interval_steps=config.ckpt_every,
                                           enable_async_checkpointing=False))
  start = mngr.latest_step()
  if start is None:
    return mngr, 0, state
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = mngr.restore(start, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(train_iter)))
  logging.info("resumed from step %d", start)
  return mngr, start, restored["state"]


def save_checkpoint(mngr, step: int, state, train_iter, force: bool) -> None:
  import grain
  import orbax.checkpoint as ocp
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(train_iter)),
            force=force)


def evaluate(config, data: Data, m: Model, params, mesh, writer, step: int, last_peaks: dict):
  """Validation loss and prompt metrics at k = eval_ks (+ grid baselines);
  the peaks are kept in `last_peaks` for the example picture."""
  import jax
  import numpy as np

  from aopsam_jax.data import pipeline
  from aopsam_jax.trainer import steps
  eval_iter = iter(pipeline.eval_dataset(data.val_src, data.val_tr, config.eval_batch_size,
                                         jax.process_index(), jax.process_count()))
  ids, peaks, loss_sum, pos_sum = [], {f"k{k}": ([], []) for k in config.eval_ks}, 0.0, 0.0
  for local in eval_iter:
    valid = steps.fetch(steps.to_global(mesh, {"v": local.pop("valid")})["v"])
    iid = steps.fetch(steps.to_global(mesh, {"i": local.pop("image_id")})["i"])
    out = m.eval_step(params, steps.to_global(mesh, local), m.enc_state)
    # per-batch loss is normalised by its positives: accumulate sums
    loss_sum += float(out["loss"]) * max(float(out["num_pos"]), 1.0)
    pos_sum += float(out["num_pos"])
    ids.extend(iid[valid].tolist())
    for k in config.eval_ks:
      peaks[f"k{k}"][0].append(steps.fetch(out[f"k{k}_coords"])[valid])
      peaks[f"k{k}"][1].append(steps.fetch(out[f"k{k}_valid"])[valid])
  peaks = {n: (np.concatenate(c), np.concatenate(v)) for n, (c, v) in peaks.items()}
  last_peaks.update(ids=ids, peaks=peaks)
  res = {"loss": loss_sum / max(pos_sum, 1.0), **data.evaluator.evaluate(ids, peaks)}
  for n in config.grid_baselines:
    res.update(data.evaluator.grid_baseline(ids, n))
  writer.write("eval", step, res)
  return res


def check_loop_config(config) -> None:
  """Loop settings that cannot work, as `UsageError` (before anything is loaded)."""
  from aopsam_jax.cli import UsageError
  for key, low in (("total_steps", 1), ("batch_size", 1), ("log_every", 1), ("ckpt_every", 1),
                   ("eval_every", 0), ("eval_batch_size", 1)):
    value = config.get(key)
    if value is None:
      continue
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      hint = " (a run of 0 steps would save an untrained predictor)" if key == "total_steps" else ""
      raise UsageError(f"--config.{key}={value!r}: must be a whole number >= {low}{hint}")


def _has_checkpoints(workdir: str) -> bool:
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))


def train_and_evaluate(config, workdir: str) -> dict:
  """The whole run; returns the final metrics (also in metrics.jsonl).

  Before any work: the loop settings are checked (`UsageError`), the workdir
  is locked against a second run (`workdir.WorkdirBusy`) and its stored
  config compared with this one (`workdir.ConfigMismatch` names the keys).
  """
  import jax

  from aopsam_jax.trainer import workdir as wd
  check_loop_config(config)
  if "://" in workdir:  # object storage: no file locks; the guards need a local filesystem
    return _train_and_evaluate(config, workdir)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  lock = wd.WorkdirLock(workdir).acquire() if is_main else None  # one lock per run
  try:
    for note in wd.check_config(workdir, config.to_dict(), _has_checkpoints(workdir),
                                write=is_main):
      logging.warning(note)
    return _train_and_evaluate(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir: str) -> dict:
  import jax
  from flax import nnx

  from aopsam_jax.aop.prompt_predictor import save_predictor
  from aopsam_jax.data.targets import TargetConfig
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.params import encoder_fingerprint
  from aopsam_jax.trainer import io, steps

  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = steps.make_mesh()
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                     f"{jax.device_count()} devices")
  mode = config.embeddings if config.model.use_embedding else "image"
  if mode not in ("cache", "online", "image"):
    raise ValueError(f"config.embeddings must be 'cache' or 'online', got {mode!r}")
  if mode == "image":  # an image-only predictor: no SAM encoder runs at all
    logging.info("image-only predictor (model.use_embedding=False): no SAM encoder is run")
    sam, sam_cfg, fingerprint = None, get_sam_config(config.sam.model), None
  else:
    sam = load_frozen_sam(config)
    # the predictor only fits this encoder: recorded in predictor/ for `bundle`
    sam_cfg, fingerprint = sam.config, encoder_fingerprint(sam)
  target_cfg = TargetConfig(img_size=sam_cfg.img_size, **config.targets)
  data = setup_data(config, sam, mode, target_cfg)
  m, state = setup_model(config, sam, mode, mesh)
  writer = io.MetricWriter(workdir, enabled=is_main, tensorboard=config.tensorboard)
  if is_main:
    log_info(writer, nnx.merge(m.graphdef, state["params"]), data)
  mngr, start, state = open_checkpoints(workdir, config, state, data.train_iter)
  last_peaks = {}  # the latest evaluation's peaks, for the example picture
  run_eval = lambda state, step: evaluate(config, data, m, state["params"], mesh, writer, step,
                                          last_peaks)
  state, last, res = train_loop(config, data, m, state, start, mesh, mngr, writer, run_eval)
  mngr.wait_until_finished()
  if not res:
    res = run_eval(state, config.total_steps)
  if is_main:
    save_predictor(os.path.join(workdir, "predictor"), nnx.merge(m.graphdef, steps.fetch_tree(
        state["params"])), m.pp_cfg, metadata=predictor_metadata(config, m.pp_cfg, fingerprint))
    io.plot_curves(workdir)
    plot_examples(workdir, config, data.val_src, data.evaluator, last_peaks)
  writer.close()
  mngr.close()
  return {"train": last, "eval": res}


def predictor_metadata(config, pp_cfg, fingerprint) -> dict:
  """What `predictor/config.json` records about the run: an embedding predictor
  names the encoder it was trained on (`bundle` and `segment` check it)."""
  from aopsam_jax.aop.prompt_predictor import consumes
  meta = {"steps": str(config.total_steps), "sam_model": config.sam.model,
          "consumes": consumes(pp_cfg)}
  if fingerprint is not None:
    meta["sam_encoder_fingerprint"] = fingerprint
    meta["sam_checkpoint"] = config.sam.checkpoint or f"random:{config.sam.model}:{config.sam.seed}"
  return meta


class TrainingInterrupted(Exception):
  """Ctrl-C stopped the run at a step boundary, after checkpointing that step."""


class StopOnInterrupt:
  """The first Ctrl-C (SIGINT) asks the loop to stop after the current step,
  which is checkpointed first; a second one interrupts at once.  A plain
  KeyboardInterrupt mid-step would lose the steps since the last checkpoint
  (and the donated train state).  Single-process runs only: one process of a
  multi-process run stopping alone would leave the others waiting."""

  def __init__(self, enabled: bool, write):
    self.enabled, self.write, self.requested = enabled, write, False
    self.previous = None  # the handler replaced, while ours is installed

  def __enter__(self):
    import signal
    import threading
    if self.enabled and threading.current_thread() is threading.main_thread():
      previous = signal.getsignal(signal.SIGINT)
      self.previous = signal.SIG_DFL if previous is None else previous  # None: set outside Python
      signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    import signal
    self.requested = True
    signal.signal(signal.SIGINT, self.previous)
    self.write("Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again: stop now)")

  def __exit__(self, *exc):
    import signal
    if self.previous is not None:
      signal.signal(signal.SIGINT, self.previous)


def train_loop(config, data: Data, m: Model, state, start: int, mesh, mngr, writer, run_eval):
  """Steps start..total_steps with logging, checkpoints and evaluations.
  -> (state, last logged train metrics, last evaluation or {}).  Ctrl-C:
  `TrainingInterrupted` after checkpointing the step it stopped at."""
  import jax
  from tqdm import tqdm

  total = config.total_steps
  is_main = jax.process_index() == 0
  train_step = m.train_step
  if is_main:
    from aopsam_jax import compile_cache
    train_step = compile_cache.announce_first_call(train_step, "the train step",
                                                   write=lambda line: tqdm.write(line))
  bar = tqdm(total=total, initial=start, disable=not is_main, desc="train", dynamic_ncols=True)
  t0, n0, last, res = time.perf_counter(), start, {}, {}
  with StopOnInterrupt(jax.process_count() == 1, bar.write) as stop:
    for step in range(start, total):
      state, last, res, t0, n0 = _one_step(config, data, m, train_step, state, step, mesh, mngr,
                                           writer, run_eval, bar, (last, res, t0, n0))
      if stop.requested and step + 1 < total:
        if (step + 1) % config.ckpt_every:
          save_checkpoint(mngr, step + 1, state, data.train_iter, force=True)
        mngr.wait_until_finished()
        bar.close()
        raise TrainingInterrupted(f"stopped at step {step + 1} of {total} (Ctrl-C), with a "
                                  "checkpoint there: run the same command to resume")
  bar.close()
  return state, last, res


def _one_step(config, data: Data, m: Model, train_step, state, step: int, mesh, mngr, writer,
              run_eval, bar, carry):
  """One train step with its logging, checkpoint and evaluation."""
  from aopsam_jax.trainer import steps
  last, res, t0, n0 = carry
  total, gbatch = config.total_steps, config.batch_size
  batch = next(data.train_iter)
  batch.pop("image_id")
  state, metrics = train_step(state, steps.to_global(mesh, batch), m.enc_state)
  done = step + 1
  if done % config.log_every == 0 or done == total:
    metrics = {k: float(v) for k, v in metrics.items()}
    rate = (done - n0) / max(time.perf_counter() - t0, 1e-9)
    metrics.update(lr=float(m.sched(done - 1)), steps_per_s=rate, images_per_s=rate * gbatch)
    writer.write("train", done, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{rate * gbatch:.2f}")
    t0, n0, last = time.perf_counter(), done, metrics
  bar.update(1)
  if done % config.ckpt_every == 0 or done == total:
    save_checkpoint(mngr, done, state, data.train_iter, force=done == total)
  if (config.eval_every and done % config.eval_every == 0) or done == total:
    res = run_eval(state, done)
    bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(res.items())
                                           if k.endswith(("recall", "loss", "precision"))))
  return state, last, res, t0, n0


def plot_examples(workdir, config, val_src, evaluator, last_peaks, count: int = 6) -> str:
  """`plots/val_prompts.png`: the first validation images with the final
  evaluation's k = eval_ks[0] peaks (see `io.plot_prompt_examples`)."""
  from aopsam_jax.data import coco
  from aopsam_jax.trainer import io
  from aopsam_jax.sam.geometry import heatmap_to_original
  k = config.eval_ks[0]
  coords, valid = last_peaks["peaks"][f"k{k}"]
  examples = []
  for i, iid in enumerate(last_peaks["ids"][:count]):  # eval order = record order
    g = evaluator.gt(int(iid))
    image = coco.decode_record(val_src[i])["image"]
    pts = heatmap_to_original(coords[i], g.h0, g.w0, evaluator.cfg.img_size)[valid[i]]
    inside = g.inside(pts)
    examples.append((image, pts, g.gt, inside, f"image {iid}: {int(inside.any(1).sum())}/"
                                               f"{len(g.gt)} instances hit by {len(pts)} prompts"))
  return io.plot_prompt_examples(os.path.join(workdir, "plots", "val_prompts.png"), examples)


def next_steps(config, workdir: str) -> str:
  """What a finished run wrote, and the command that packages it."""
  w = os.path.abspath(os.path.expanduser(workdir))
  sam = config.sam
  source = (f"--sam-checkpoint {sam.checkpoint}" if sam.get("checkpoint")
            else f"--sam-random {sam.model}:{sam.get('seed', 0)}")
  return (f"train: done, {config.total_steps} steps. The predictor is in {w}/predictor; curves in "
          f"{w}/plots/ (loss.png, val_prompts.png: the prompts on validation images); numbers "
          f"in {w}/metrics.jsonl.\nPackage it for segment / label with: python -m "
          f"aopsam_jax.bundle --predictor {w}/predictor {source} --out MY_BUNDLE")


def quiet_library_logs() -> None:
  """Keep INFO log lines from this package only (warnings and errors from all):
  each Orbax checkpoint save logs ~45 INFO lines through absl, which scroll the
  progress bar away."""
  import logging as std_logging

  package = os.path.dirname(os.path.abspath(__file__))
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or r.pathname.startswith(package))


def main(argv):
  del argv
  import jax
  from aopsam_jax import compile_cache
  if not FLAGS.library_logs:
    quiet_library_logs()
  compile_cache.setup(not FLAGS.compile_cache)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.multihost:
    jax.distributed.initialize()
  from aopsam_jax.cli import UsageError, WorkError
  from aopsam_jax.data.coco import DatasetError
  from aopsam_jax.trainer.workdir import ConfigMismatch, WorkdirBusy
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
      print(next_steps(FLAGS.config, FLAGS.workdir))
  except (UsageError, ConfigMismatch) as e:
    _exit(2, str(e))
  except (WorkError, WorkdirBusy, DatasetError) as e:
    _exit(1, str(e))
  except TrainingInterrupted as e:
    _exit(130, str(e), "interrupted")
  except KeyboardInterrupt:
    _exit(130, "stopped by Ctrl-C; the checkpoints already written stay (run the same command "
               "to resume from the latest)", "interrupted")


def parse_flags(argv):
  """absl's flag parsing with each mistake as one line and exit status 2 (absl
  prints two lines and exits 1; a config file that cannot be loaded, or an
  override of a field it lacks, ended in a traceback)."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _exit(2, " ".join(str(e).split()))
  except SyntaxError as e:
    _exit(2, f"--config: {e.filename}, line {e.lineno}: {e.msg}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    field = str(e).strip("\"' ")
    named = [a.split("=")[0] for a in argv
             if a.startswith("--config.") and a.split("=")[0].rsplit(".", 1)[-1] == field]
    _exit(2, f"{named[0] if named else field}: the config has no such field (its fields are "
             "those its get_config() returns)")
  if FLAGS.config is None:
    _exit(2, "--config is required: a training config file, e.g. --config configs/coco_tiny.py")
  try:
    FLAGS.config.get("total_steps")  # config_flags reports a file it could not load only now
  except OSError as e:
    reason = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
    _exit(2, f"--config: cannot load the config file ({reason})")
  if FLAGS.workdir is None:
    _exit(2, "--workdir is required: the folder for checkpoints, metrics and plots")
  return rest


def _exit(status: int, message: str, kind: str = "error"):
  """One line on stderr, then exit (absl's own UsageError prints the whole help)."""
  import sys
  print(f"train: {kind}: {message}", file=sys.stderr)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
