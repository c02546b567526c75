"""A training workdir's guards: one run at a time, and the config it was started with.

`WorkdirLock` holds an exclusive `fcntl` lock on `<workdir>/.lock` for the
whole run; a second run into the same workdir fails at once (two runs would
both crash at their first checkpoint and interleave `metrics.jsonl`).  The
lock goes away with the process, also when it is killed, so a stale lock
file never blocks a restart.

`check_config` stores the run's config as `<workdir>/config.json` and, when
the workdir already holds checkpoints, compares: keys that decide the shape
of the saved state (model, optimizer, SAM, data, ...) must be equal to
resume; keys that only steer the loop (`RESUMABLE`: total_steps, logging,
evaluation, checkpoint cadence) may change and are reported.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Tuple

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"

# Config keys that may differ between a run and its resumption.
RESUMABLE = ("total_steps", "log_every", "eval_every", "ckpt_every", "keep_ckpts", "tensorboard",
             "eval_batch_size", "eval_ks", "grid_baselines", "data.worker_count")


class WorkdirError(Exception):
  """The workdir cannot be used for this run; the message says why and what to do."""


class WorkdirBusy(WorkdirError):
  """Another run holds the workdir's lock."""


class ConfigMismatch(WorkdirError):
  """The workdir's checkpoints come from an incompatible config."""


class WorkdirLock:
  """Exclusive, non-blocking lock on `<workdir>/.lock` (context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    import fcntl
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise WorkdirBusy(f"workdir {os.path.dirname(self.path)} is in use by another training "
                         f"run ({holder}); wait for it to finish or choose another --workdir"
                         ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      import fcntl
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists (as JSON stores them)."""
  out: Dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = json.loads(json.dumps(v, default=str))
  return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
  """[(dotted key, old value, new value)] for every key that differs (missing = None)."""
  a, b = flatten(old), flatten(new)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _resumable(key: str) -> bool:
  return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def _show(changes) -> str:
  return ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changes)


def check_config(workdir: str, config: Mapping[str, Any], has_checkpoints: bool,
                 write: bool = True) -> List[str]:
  """Compare with the stored config; store the new one (when `write`).
  Returns notes (one line each) on resumable changes; raises `WorkdirError`
  naming the keys that make the stored checkpoints unusable."""
  path = os.path.join(workdir, CONFIG_NAME)
  notes = []
  if os.path.exists(path) and has_checkpoints:
    with open(path) as f:
      old = json.load(f)
    changes = config_diff(old, config)
    fixed = [c for c in changes if not _resumable(c[0])]
    if fixed:
      raise ConfigMismatch(
          f"workdir {workdir} holds checkpoints of a run with a different config: "
          f"{_show(fixed)}; restore those values to resume, or choose a new --workdir")
    if changes:
      notes.append(f"resuming with changed {_show(changes)}")
  if not write:
    return notes
  tmp = path + ".partial"
  with open(tmp, "w") as f:
    json.dump(dict(config), f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)
  return notes
