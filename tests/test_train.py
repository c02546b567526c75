"""End-to-end training program on a synthetic COCO dataset (vit_tiny_test, random SAM).

Fast: a short run (metrics, plots, predictor bundle) and resume-from-checkpoint
equality.  Slow (`-m slow`): SIGKILL + restart, 8 simulated devices, and two
jax.distributed processes x 4 devices, all against the 1-device loss curve.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.subprocess_helpers import free_port
from tests.test_data import make_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data_root, tmp, **over):
  from configs import coco_tiny
  c = coco_tiny.get_config()
  c.data.sources = {"synth": {"format": "coco", "dir": data_root, "splits": {
      "train": ["annotations/instances.json", "images"],
      "val": ["annotations/instances.json", "images"]}}}
  c.data.train, c.data.val = "synth:train", "synth:val"
  c.data.dir = os.path.join(tmp, "records")
  c.data.cache_dir = os.path.join(tmp, "cache")
  c.model.img_channels, c.model.embed_proj, c.model.hidden = (4, 8, 8), 8, 8
  c.model.dec_channels, c.model.norm_groups = (8, 4), 4
  c.optim.lr, c.optim.warmup_steps = 1e-2, 2
  c.batch_size, c.total_steps, c.log_every = 8, 6, 1
  c.eval_every, c.eval_batch_size, c.eval_ks, c.grid_baselines = 0, 8, (8,), (4,)
  c.ckpt_every, c.keep_ckpts, c.tensorboard = 2, 10, False
  # every run below augments, so the device / process / resume equalities cover it
  c.data.augment = dict(hflip=0.5, brightness=0.2, contrast=0.2, saturation=0.2)
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("train"))
  root, _ = make_synthetic_coco(os.path.join(tmp, "src"), n_images=8, empty=(2,))
  return root, tmp


def _losses(workdir):
  from aopsam_jax.trainer.io import read_metrics
  return np.array([r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))["train"]])


def _params(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, "predictor", "params.safetensors"))


def test_train_runs_and_resumes(synth):
  from aopsam_jax.aop.prompt_predictor import load_predictor
  from aopsam_jax.train import train_and_evaluate
  root, tmp = synth
  wa = os.path.join(tmp, "run_a")
  res = train_and_evaluate(make_config(root, tmp), wa)
  loss = _losses(wa)
  assert len(loss) == 6 and np.all(np.isfinite(loss))
  assert loss[-1] < loss[0]  # 8 images, 6 steps of the same data: it learns
  for key in ("k8/recall", "k8/precision", "k8/prompts_per_image", "k8/duplicates_per_image",
              "grid16/recall", "loss"):
    assert key in res["eval"], key
  assert 0 <= res["eval"]["k8/recall"] <= 1
  assert os.path.exists(os.path.join(wa, "plots", "loss.png"))
  from PIL import Image
  with Image.open(os.path.join(wa, "plots", "val_prompts.png")) as im:  # 6 of the 8 images
    assert im.size[0] > 600 and im.size[1] > 400
  load_predictor(os.path.join(wa, "predictor"))
  # resume: keep only the step-2 checkpoint, rerun -> identical final params
  wb = os.path.join(tmp, "run_b")
  shutil.copytree(wa, wb, ignore=shutil.ignore_patterns("predictor"))
  for s in ("4", "6"):
    shutil.rmtree(os.path.join(wb, "checkpoints", s))
  train_and_evaluate(make_config(root, tmp), wb)
  pa, pb = _params(wa), _params(wb)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  np.testing.assert_allclose(_losses(wb), loss, rtol=1e-6)  # steps 3..6 rewritten identically


def test_ctrl_c_checkpoints_the_step_and_resumes_exactly(synth, monkeypatch):
  """Ctrl-C (SIGINT) during step 3 of 6 with no checkpoint due before step 100:
  the run stops after step 3 with a checkpoint there (the steps are not lost),
  and re-running finishes with the same weights as an uninterrupted run."""
  import dataclasses
  import signal

  from aopsam_jax import train
  root, tmp = synth
  cfg = lambda: make_config(root, tmp, ckpt_every=100)  # noqa: E731
  ref = os.path.join(tmp, "ctrl_c_ref")
  train.train_and_evaluate(cfg(), ref)
  real_setup, calls = train.setup_model, []

  def setup_with_ctrl_c(*a, **k):
    m, state = real_setup(*a, **k)

    def step(*args):
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the step runs
      return m.train_step(*args)
    return dataclasses.replace(m, train_step=step), state
  w = os.path.join(tmp, "ctrl_c")
  with monkeypatch.context() as mp:
    mp.setattr(train, "setup_model", setup_with_ctrl_c)
    with pytest.raises(train.TrainingInterrupted, match="stopped at step 3 of 6"):
      train.train_and_evaluate(cfg(), w)
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["3"]
  assert len(_losses(w)) == 3 and not os.path.exists(os.path.join(w, "predictor"))
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
  train.train_and_evaluate(cfg(), w)
  pa, pb = _params(ref), _params(w)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  np.testing.assert_allclose(_losses(w), _losses(ref), rtol=1e-6)


def test_online_embeddings_match_cache(synth):
  """`embeddings='online'` (SAM encoder inside the jitted step) trains on the
  same inputs as the on-disk cache: same loss curve.  No augmentation here:
  in cache mode a flip flips the cached embedding (an approximation), online
  mode encodes the flipped image."""
  from aopsam_jax.train import train_and_evaluate
  root, tmp = synth
  off = {f"data.augment.{k}": 0.0 for k in ("hflip", "brightness", "contrast", "saturation")}
  curves = {}
  for mode in ("cache", "online"):
    w = os.path.join(tmp, f"mode_{mode}")
    train_and_evaluate(make_config(root, tmp, embeddings=mode, total_steps=3, **off), w)
    curves[mode] = _losses(w)
  assert len(curves["online"]) == 3
  np.testing.assert_allclose(curves["online"], curves["cache"], rtol=1e-4)
  # and online mode with augmentation (flipped image encoded in the step) runs
  w = os.path.join(tmp, "mode_online_aug")
  train_and_evaluate(make_config(root, tmp, embeddings="online", total_steps=2), w)
  assert np.all(np.isfinite(_losses(w)))


# --- subprocess runs -------------------------------------------------------------

def _run_args(cfg, workdir, extra_env=None, dist=None):
  cfg_path = workdir + ".json"
  os.makedirs(os.path.dirname(cfg_path), exist_ok=True)
  with open(cfg_path, "w") as f:
    f.write(cfg.to_json())
  env = dict(os.environ, PYTHONPATH=REPO, **(extra_env or {}))
  args = [sys.executable, "-m", "tests.test_train", cfg_path, workdir]
  if dist:
    args += list(map(str, dist))
  return args, env


def _subprocess_main(argv):
  import ml_collections
  if len(argv) > 2:
    import jax
    jax.distributed.initialize(coordinator_address=argv[2], num_processes=int(argv[3]),
                               process_id=int(argv[4]))
  from aopsam_jax.train import train_and_evaluate
  with open(argv[0]) as f:
    cfg = ml_collections.ConfigDict(json.loads(f.read()))
  train_and_evaluate(cfg, argv[1])


@pytest.fixture(scope="module")
def reference_run(synth):
  """Uninterrupted 1-device run of 8 steps (subprocess, like the others)."""
  root, tmp = synth
  w = os.path.join(tmp, "ref1")
  args, env = _run_args(make_config(root, tmp, total_steps=8), w,
                        {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  subprocess.run(args, env=env, check=True, cwd=REPO, capture_output=True)
  return w


def test_sigkill_and_restart(synth, reference_run):
  root, tmp = synth
  w = os.path.join(tmp, "killed")
  args, env = _run_args(make_config(root, tmp, total_steps=8), w,
                        {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  p = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ck = os.path.join(w, "checkpoints", "4")
  t0 = time.time()
  while not os.path.isdir(ck) and time.time() - t0 < 300 and p.poll() is None:
    time.sleep(0.05)
  assert p.poll() is None, "run finished before it could be killed"
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not os.path.exists(os.path.join(w, "predictor"))
  subprocess.run(args, env=env, check=True, cwd=REPO, capture_output=True)
  pa, pb = _params(reference_run), _params(w)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_eight_devices_same_curve(synth, reference_run):
  root, tmp = synth
  w = os.path.join(tmp, "dev8")
  args, env = _run_args(make_config(root, tmp, total_steps=8), w,
                        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  subprocess.run(args, env=env, check=True, cwd=REPO, capture_output=True)
  info = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl")) if '"info"' in l][0]
  assert info["devices"] == 8
  np.testing.assert_allclose(_losses(w), _losses(reference_run), rtol=2e-4, atol=1e-5)


def test_two_processes_same_curve(synth, reference_run):
  root, tmp = synth
  w = os.path.join(tmp, "proc2")
  port = free_port()
  procs = []
  for i in range(2):
    # records and embedding cache prepared anew by both processes (each its
    # share, barriers between), each process with its own HOME: nothing by way of ~
    home = os.path.join(tmp, f"proc2_home{i}")
    os.makedirs(home, exist_ok=True)
    cfg = make_config(root, tmp, total_steps=8, **{"data.dir": os.path.join(tmp, "records2"),
                                                   "data.cache_dir": os.path.join(tmp, "cache2")})
    args, env = _run_args(cfg, w, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                   "HOME": home}, dist=(f"localhost:{port}", 2, i))
    procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=900)[0].decode(errors="replace") for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  info = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl")) if '"info"' in l][0]
  assert info["devices"] == 8 and info["processes"] == 2
  np.testing.assert_allclose(_losses(w), _losses(reference_run), rtol=2e-4, atol=1e-5)


if __name__ == "__main__":
  _subprocess_main(sys.argv[1:])
