"""`python -m aopsam_jax.train` refuses, in one line and before any work: a
second run into a locked workdir, a config that does not match the workdir's
checkpoints, and loop settings that cannot work (total_steps=0)."""

import json
import os
import subprocess
import sys

import pytest

from aopsam_jax.cli import UsageError
from aopsam_jax.trainer import workdir as wd
from tests.test_train import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(workdir, *flags):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "aopsam_jax.train", "--config",
                         os.path.join(REPO, "configs", "coco_tiny.py"), "--workdir", str(workdir),
                         *flags], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def error_lines(stderr):
  """The program's own error lines (not library warnings)."""
  return [ln for ln in stderr.splitlines() if ln.startswith("train: error:")]


def test_total_steps_zero_is_a_usage_error(tmp_path):
  cfg = make_config(str(tmp_path / "data"), str(tmp_path), total_steps=0)
  with pytest.raises(UsageError, match="total_steps"):
    from aopsam_jax.train import train_and_evaluate
    train_and_evaluate(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused before the workdir was touched
  proc = run_train(tmp_path / "w2", "--config.total_steps=0")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "--config.total_steps=0" in lines[0]
  assert "Traceback" not in proc.stderr


TRAIN_MISTAKES = {  # flags -> what the one error line names
    "no_config": (["--workdir", "W"], "--config is required"),
    "missing_config_file": (["--config", "nosuch_cfg.py", "--workdir", "W"], "nosuch_cfg.py"),
    "config_syntax_error": (["--config", "BAD", "--workdir", "W"], "line 1"),
    "unknown_field": (["--config", "CFG", "--workdir", "W", "--config.data.nosuch=1"],
                      "--config.data.nosuch"),
    "bad_value": (["--config", "CFG", "--workdir", "W", "--config.batch_size=abc"],
                  "--config.batch_size=abc"),
    "unknown_flag": (["--config", "CFG", "--workdir", "W", "--nosuchflag"], "nosuchflag"),
    "no_workdir": (["--config", "CFG"], "--workdir is required"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_MISTAKES))
def test_flag_mistakes_are_one_line_exit_2(case, tmp_path):
  """Ordinary mistakes on the command line: one `train: error:` line naming the
  flag or file, exit 2, no traceback, nothing written (absl printed two lines
  and exited 1; a config file it could not load was a traceback)."""
  (tmp_path / "bad_cfg.py").write_text("def get_config(:\n")
  subs = {"W": str(tmp_path / "w"), "BAD": str(tmp_path / "bad_cfg.py"),
          "CFG": os.path.join(REPO, "configs", "coco_tiny.py")}
  args, named = TRAIN_MISTAKES[case]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "aopsam_jax.train", *[subs.get(a, a) for a in args]],
                        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == error_lines(proc.stderr), proc.stderr[-2000:]
  assert len(error_lines(proc.stderr)) == 1 and named in proc.stderr, proc.stderr
  assert not (tmp_path / "w").exists()


def test_second_run_in_a_locked_workdir_exits_at_once(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  with wd.WorkdirLock(str(w)):
    cfg = make_config(str(tmp_path / "data"), str(tmp_path))
    from aopsam_jax.train import train_and_evaluate
    with pytest.raises(wd.WorkdirBusy, match=f"pid {os.getpid()}"):
      train_and_evaluate(cfg, str(w))
    proc = run_train(w)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and str(w) in lines[0] and "in use" in lines[0]
  assert not (w / "metrics.jsonl").exists() and not (w / "checkpoints").exists()
  # the lock dies with its holder: the workdir is free again
  with wd.WorkdirLock(str(w)):
    pass


def _workdir_with_checkpoint(tmp_path, cfg):
  w = tmp_path / "w"
  (w / "checkpoints" / "2").mkdir(parents=True)
  (w / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
  return w


def test_changed_model_config_is_named_in_one_line(tmp_path):
  cfg = make_config(str(tmp_path / "data"), str(tmp_path))
  w = _workdir_with_checkpoint(tmp_path, cfg)
  changed = make_config(str(tmp_path / "data"), str(tmp_path))
  changed.model.hidden = 16
  changed.optim.lr = 0.5
  from aopsam_jax.train import train_and_evaluate
  with pytest.raises(wd.ConfigMismatch) as e:
    train_and_evaluate(changed, str(w))
  msg = str(e.value)
  assert "model.hidden (8 -> 16)" in msg and "optim.lr (0.01 -> 0.5)" in msg
  assert "\n" not in msg and str(w) in msg
  # the stored config is left as it was (the checkpoints still belong to it)
  assert json.loads((w / "config.json").read_text())["model"]["hidden"] == 8


def test_real_config_file_mismatch_through_the_cli(tmp_path):
  from configs import coco_tiny
  cfg = coco_tiny.get_config()
  w = _workdir_with_checkpoint(tmp_path, cfg)
  proc = run_train(w, "--config.model.hidden=64")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "model.hidden (32 -> 64)" in lines[0], proc.stderr[-2000:]


def test_resumable_changes_are_reported_not_refused(tmp_path):
  cfg = make_config(str(tmp_path / "data"), str(tmp_path))
  w = _workdir_with_checkpoint(tmp_path, cfg)
  longer = make_config(str(tmp_path / "data"), str(tmp_path), total_steps=12, eval_every=4)
  notes = wd.check_config(str(w), longer.to_dict(), has_checkpoints=True)
  assert notes == ["resuming with changed eval_every (0 -> 4), total_steps (6 -> 12)"]
  assert json.loads((w / "config.json").read_text())["total_steps"] == 12
  # without checkpoints nothing can be inconsistent: the new config is stored
  other = make_config(str(tmp_path / "data"), str(tmp_path))
  other.model.hidden = 16
  assert wd.check_config(str(w), other.to_dict(), has_checkpoints=False) == []


def test_config_diff_flattens_and_compares_like_json():
  old = {"a": {"b": (1, 2), "c": 1}, "d": "x"}
  assert wd.config_diff(old, {"a": {"b": [1, 2], "c": 1}, "d": "x"}) == []
  assert wd.config_diff(old, {"a": {"b": (1, 3)}, "e": 0}) == [
      ("a.b", [1, 2], [1, 3]), ("a.c", 1, None), ("d", "x", None), ("e", None, 0)]


def test_empty_validation_split_is_a_clear_error(tmp_path):
  from aopsam_jax.data.coco import DatasetError
  from aopsam_jax.train import train_and_evaluate
  from tests.test_data import make_synthetic_coco
  root, _ = make_synthetic_coco(str(tmp_path / "src"), n_images=2, empty=())
  with open(os.path.join(root, "annotations", "instances.json")) as f:
    d = json.load(f)
  d.update(images=[], annotations=[])
  with open(os.path.join(root, "annotations", "empty.json"), "w") as f:
    json.dump(d, f)
  cfg = make_config(root, str(tmp_path))
  cfg.data.sources["synth"]["splits"]["val"] = ["annotations/empty.json", "images"]
  with pytest.raises(DatasetError, match="synth:val has no usable images") as e:
    train_and_evaluate(cfg, str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_library_info_logs_are_quiet_by_default():
  """The train CLI keeps INFO lines of this package only (Orbax logs ~45 per
  checkpoint save); warnings from every library still show."""
  import logging as std

  from absl import logging

  from aopsam_jax import train
  handler = logging.get_absl_handler()
  before = list(handler.filters)
  try:
    train.quiet_library_logs()
    record = lambda level, path: std.LogRecord("absl", level, path, 1, "m", None, None)  # noqa: E731
    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not handler.filter(record(std.INFO, orbax))
    assert handler.filter(record(std.WARNING, orbax))
    assert handler.filter(record(std.INFO, os.path.abspath(train.__file__)))
  finally:
    handler.filters[:] = before


def test_next_steps_names_the_outputs_and_the_bundle_command(tmp_path):
  from aopsam_jax.train import next_steps
  cfg = make_config(str(tmp_path / "data"), str(tmp_path))
  text = next_steps(cfg, str(tmp_path / "w"))
  assert f"{tmp_path}/w/predictor" in text and "metrics.jsonl" in text and "val_prompts.png" in text
  assert text.splitlines()[-1].endswith(
      f"python -m aopsam_jax.bundle --predictor {tmp_path}/w/predictor --sam-random "
      "vit_tiny_test:0 --out MY_BUNDLE")
  cfg.sam.checkpoint = "sam_vit_b.safetensors"
  assert "--sam-checkpoint sam_vit_b.safetensors --out" in next_steps(cfg, str(tmp_path / "w"))
