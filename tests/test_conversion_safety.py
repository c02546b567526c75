"""The converter never loses work: the source is never replaced, unfinished files
are never mistaken for weights, training-wrapper prefixes are handled, and the
output gets normal file permissions."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.reference import build_torch_sam

import torch  # noqa: E402  (after tests.reference installed the torchvision stand-in)

from aopsam_jax.sam import params as P  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from conversion import convert_sam  # noqa: E402
from conversion.convert_sam import CheckpointError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(official state dict, its .pth, the reference conversion of it)."""
  sam = build_torch_sam(SAM_CONFIGS["vit_tiny_test"], seed=7)
  d = tmp_path_factory.mktemp("conv_safety")
  pth = str(d / "sam_tiny.pth")
  torch.save(sam.state_dict(), pth)
  return sam.state_dict(), pth, convert_sam.convert_checkpoint(pth)[1]


def _sha(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _run(args, capsys):
  try:
    rc = convert_sam.main([str(a) for a in args])
  except SystemExit as e:  # argparse's own errors
    rc = e.code
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_out_equal_to_checkpoint_is_refused(tiny, tmp_path, capsys):
  _, pth, _ = tiny
  src = tmp_path / "w.pth"
  src.write_bytes(open(pth, "rb").read())
  before = _sha(src)
  link = tmp_path / "link.pth"
  os.symlink(src, link)
  for out in (src, f"{tmp_path}/./w.pth", link):
    rc, _, err = _run(["-c", src, "-o", out], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--out" in err and "itself" in err, err
  assert _sha(src) == before
  assert sorted(os.listdir(tmp_path)) == ["link.pth", "w.pth"]


def test_path_mistakes_exit_2(tiny, tmp_path, capsys):
  _, pth, _ = tiny
  for args, needle in ((["-c", tmp_path / "nope.pth", "-o", tmp_path / "o.safetensors"], "nope.pth"),
                       (["-c", pth, "-o", tmp_path], "is a directory"),
                       (["-c", pth, "-o", tmp_path / "no" / "o.safetensors"], "does not exist"),
                       (["-c", pth, "--model-type", "vit_q", "-o", tmp_path / "o.st"], "vit_q")):
    rc, _, err = _run(args, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
  assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_file(tiny, tmp_path, capsys, monkeypatch):
  """The writer fails half-way (disk full, Ctrl-C): nothing is left behind."""
  import safetensors.numpy as stn
  _, pth, _ = tiny
  real = stn.save_file

  for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
    def failing(tensors, filename, metadata=None, exc=exc):
      real(tensors, filename, metadata=metadata)
      with open(filename, "r+b") as f:  # the file is there, half of it garbage
        f.truncate(os.path.getsize(filename) // 2)
      raise exc
    monkeypatch.setattr(stn, "save_file", failing)
    rc, _, err = _run(["-c", pth, "-o", tmp_path / "o.safetensors"], capsys)
    assert rc == (1 if isinstance(exc, OSError) else 130), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


KILLED_CHILD = r"""
import sys, time
import safetensors.numpy as stn
real = stn.save_file
def slow(tensors, filename, metadata=None):
  real(tensors, filename, metadata=metadata)
  print("WRITTEN", filename, flush=True)
  time.sleep(120)  # killed here: the complete data sits under the temporary name
stn.save_file = slow
from conversion import convert_sam
convert_sam.main(["-c", sys.argv[1], "-o", sys.argv[2], "-q"])
"""


def test_sigkill_leftover_is_refused_then_cleaned(tiny, tmp_path, capsys):
  _, pth, ref = tiny
  out = tmp_path / "sam.safetensors"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, pth, str(out)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, text=True)
  try:
    line = child.stdout.readline()
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
  assert line.startswith("WRITTEN"), line
  leftover = line.split(maxsplit=1)[1].strip()
  assert leftover.endswith(".partial") and os.path.dirname(leftover) == str(tmp_path)
  assert not out.exists()
  assert os.listdir(tmp_path) == [os.path.basename(leftover)]
  # its content is a complete converted file, yet no loader takes it for weights
  for load in (P.read_converted, P.load_sam, convert_sam.read_checkpoint):
    with pytest.raises(CheckpointError, match="interrupted"):
      load(leftover)
  # a live writer's partial file in the same folder is left alone
  live = tmp_path / f"other.safetensors.{os.getpid()}.partial"
  live.write_bytes(b"in progress")
  rc, stdout, _ = _run(["-c", pth, "-o", out], capsys)
  assert rc == 0 and f"removed {leftover}" in stdout
  assert sorted(os.listdir(tmp_path)) == sorted([out.name, live.name])
  _, flat, _ = P.read_converted(str(out))
  assert all(np.array_equal(flat[k], ref[k]) for k in ref)


@pytest.mark.parametrize("wrap", ["dataparallel", "lightning", "lightning_dataparallel"])
def test_training_wrapper_prefix_is_stripped_and_said(wrap, tiny, tmp_path, capsys):
  sd, _, ref = tiny
  if wrap == "dataparallel":
    obj, prefix = {f"module.{k}": v for k, v in sd.items()}, "module."
  elif wrap == "lightning":
    obj, prefix = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                   "global_step": 10}, "model."
  else:
    obj, prefix = {"state_dict": {f"model.module.{k}": v for k, v in sd.items()}}, "model.module."
  src = tmp_path / f"{wrap}.ckpt"
  torch.save(obj, src)
  out = tmp_path / "o.safetensors"
  rc, stdout, err = _run(["-c", src, "-o", out], capsys)
  assert rc == 0, err
  assert f"stripped the key prefix {prefix!r}" in stdout
  _, flat, _ = P.read_converted(str(out))
  assert set(flat) == set(ref) and all(np.array_equal(flat[k], ref[k]) for k in ref)


def test_unknown_prefix_is_named_in_the_error(tmp_path, capsys):
  src = tmp_path / "other.pth"
  torch.save({"backbone.layer1.weight": torch.zeros(3, 3), "backbone.fc.bias": torch.zeros(3)}, src)
  rc, _, err = _run(["-c", src, "-o", tmp_path / "o.safetensors"], capsys)
  assert rc == 1 and len(err.splitlines()) == 1 and "'backbone.'" in err, err


def test_strip_wrapper_prefix_only_when_it_reveals_sam_keys():
  strip = convert_sam.strip_wrapper_prefix
  assert strip({"module.image_encoder.x": 1, "module.mask_decoder.y": 2})[1] == "module."
  assert strip({"image_encoder.x": 1})[1] == ""
  assert strip({"module.other.x": 1, "module.other.y": 2})[1] == ""
  # keys that merely share a SAM module name are left alone
  assert strip({"image_encoder.a": 1, "image_encoder.b": 2})[1] == ""


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_output_mode_follows_umask(umask, mode, tiny, tmp_path, capsys):
  _, pth, _ = tiny
  old = os.umask(umask)
  try:
    rc, _, err = _run(["-c", pth, "-o", tmp_path / "o.safetensors", "-q"], capsys)
  finally:
    os.umask(old)
  assert rc == 0, err
  assert os.stat(tmp_path / "o.safetensors").st_mode & 0o777 == mode
