"""The checkpoint converter: key map coverage for every SAM size, file formats,
and clear, safe failures on bad input (never executing code from a pickle)."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.reference import build_torch_sam, save_official_pth, state_dict_numpy
from tests.subprocess_helpers import BLOCK_TORCH

import torch  # noqa: E402  (after tests.reference installed the torchvision stand-in)

from aopsam_jax.sam import params as P  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from conversion import convert_sam  # noqa: E402
from conversion.convert_sam import CheckpointError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Totals of the released checkpoints (official build_sam.py; also Keras-Hub preset metadata).
OFFICIAL_PARAM_COUNTS = {"vit_b": 93_735_728, "vit_l": 312_343_088, "vit_h": 641_090_864}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A vit_tiny_test official model, its numpy state dict and its .pth file."""
  sam = build_torch_sam(SAM_CONFIGS["vit_tiny_test"], seed=4)
  d = tmp_path_factory.mktemp("conv")
  pth = save_official_pth(sam, str(d / "sam_vit_t.pth"))
  return sam, state_dict_numpy(sam), pth


def run_cli(args, capsys):
  rc = convert_sam.main([str(a) for a in args])
  out = capsys.readouterr()
  return rc, out.out, out.err


# --- key map coverage for the real sizes (no weights materialised) ------------


def _zero_stride(shape):
  """A read-only numpy array of `shape` that takes no memory (for shape checks)."""
  return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_key_map_covers_official_sizes(name):
  """Official state dict (built on the meta device) -> every key maps, every Flax
  parameter is filled exactly once with the right shape, counts equal the releases."""
  cfg = SAM_CONFIGS[name]
  with torch.device("meta"):
    sam = build_torch_sam(cfg)
  sd = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
  torch_count = sum(int(np.prod(s)) for s in sd.values())
  assert torch_count == OFFICIAL_PARAM_COUNTS[name]
  expected = P.flat_param_shapes(cfg)
  got, rows = {}, {}
  for key, shape in sd.items():
    hit = P.map_key(key)
    assert hit is not None, f"official key {key} has no mapping"
    path, fn = hit
    new_shape = fn(_zero_stride(shape)).shape
    if "@" in path:
      path, row = path.split("@")
      rows.setdefault(path, []).append((int(row), new_shape))
      continue
    assert path not in got, f"two keys map to {path}"
    got[path] = new_shape
  for path, parts in rows.items():
    assert sorted(r for r, _ in parts) == list(range(len(parts)))
    got[path] = (len(parts),) + parts[0][1][1:]
  assert got == expected
  assert sum(int(np.prod(s)) for s in expected.values()) == OFFICIAL_PARAM_COUNTS[name]
  # Shape-based detection recognises the size.
  assert P.detect_config({k: _zero_stride(s) for k, s in sd.items()}) == cfg


# --- round trip through the file ------------------------------------------------


def test_convert_official_pth(tiny, tmp_path, capsys):
  sam, sd, pth = tiny
  out = tmp_path / "sam_vit_t.safetensors"
  rc, stdout, stderr = run_cli(["--checkpoint", pth, "--out", out], capsys)
  assert rc == 0, stderr
  assert "vit_tiny_test" in stdout and len(stdout.splitlines()) <= 4  # short progress output
  cfg, flat, meta = P.read_converted(str(out))
  assert cfg == SAM_CONFIGS["vit_tiny_test"]
  assert meta["model_type"] == "vit_tiny_test" and meta["source_layout"] == "official"
  assert meta["source_file"] == "sam_vit_t.pth" and len(meta["source_sha256"]) == 64
  assert set(flat) == set(P.flat_param_shapes(cfg))
  assert sum(v.size for v in flat.values()) == sum(v.size for v in sd.values())
  # Layout transforms, checked against the torch tensors directly.
  np.testing.assert_array_equal(flat["image_encoder.blocks.1.attn.qkv.kernel"],
                                sd["image_encoder.blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(flat["image_encoder.patch_embed.kernel"],
                                sd["image_encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat["mask_decoder.upscale_conv1.kernel"],
                                sd["mask_decoder.output_upscaling.0.weight"].transpose(2, 3, 0, 1))
  np.testing.assert_array_equal(
      flat["prompt_encoder.point_embeddings"],
      np.concatenate([sd[f"prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)]))
  np.testing.assert_array_equal(flat["image_encoder.blocks.0.attn.rel_pos_h"],
                                sd["image_encoder.blocks.0.attn.rel_pos_h"])
  assert all(v.dtype == np.float32 for v in flat.values())
  # The loaded model holds exactly these values.
  model = P.load_sam(str(out))
  np.testing.assert_array_equal(np.asarray(model.image_encoder.pos_embed[...]),
                                sd["image_encoder.pos_embed"])


def test_explicit_model_type_and_formats(tiny, tmp_path):
  """--model-type vit_tiny_test; legacy (non-zip) torch.save; a training-checkpoint wrapper;
  fp16 weights; no stray .tmp file left."""
  sam, sd, pth = tiny
  ref = convert_sam.convert_checkpoint(pth)[1]
  legacy = tmp_path / "legacy.pth"
  torch.save(sam.state_dict(), legacy, _use_new_zipfile_serialization=False)
  wrapped = tmp_path / "wrapped.pth"
  torch.save({"model": sam.state_dict(), "epoch": 3}, wrapped)
  for src in (legacy, wrapped):
    out = tmp_path / (src.stem + ".safetensors")
    assert convert_sam.main(["-c", str(src), "-o", str(out), "--model-type", "vit_tiny_test", "-q"]) == 0
    _, flat, _ = P.read_converted(str(out))
    assert set(flat) == set(ref) and all(np.array_equal(flat[k], ref[k]) for k in ref)
  half = tmp_path / "half.pth"
  torch.save({k: v.half() for k, v in sam.state_dict().items()}, half)
  _, flat, _ = convert_sam.convert_checkpoint(str(half))
  for k in ref:
    assert flat[k].dtype == np.float32
    np.testing.assert_allclose(flat[k], ref[k], rtol=1e-3, atol=1e-3)
  assert not [p for p in os.listdir(tmp_path) if p.endswith((".tmp", ".partial"))]


def test_wrong_model_type_names_keys(tiny, tmp_path, capsys):
  _, _, pth = tiny
  rc, _, err = run_cli(["-c", pth, "-o", tmp_path / "x.safetensors", "--model-type", "vit_b"],
                       capsys)
  assert rc == 1
  assert err.startswith("error: ") and "Traceback" not in err
  assert pth in err and "--model-type vit_b given, but the tensor shapes are vit_tiny_test" in err
  assert not (tmp_path / "x.safetensors").exists()


def test_reduced_depth_against_full_type(tmp_path):
  """A depth-2 checkpoint of vit_h width converted as vit_h: error lists the missing blocks."""
  cfg = SAM_CONFIGS["vit_tiny_test"].__class__(encoder_embed_dim=1280, encoder_depth=2,
                                         encoder_num_heads=16, encoder_global_attn_indexes=(1,))
  with torch.device("meta"):
    sam = build_torch_sam(cfg)
  sd = {k: _zero_stride(tuple(v.shape)) for k, v in sam.state_dict().items()}
  with pytest.raises(CheckpointError) as e:
    P.convert_state_dict(sd, SAM_CONFIGS["vit_h"])
  assert f"{30 * 14} missing parameter(s): image_encoder.blocks.2." in str(e.value)
  assert "image_encoder.blocks.1.attn.rel_pos_h: got (127, 80) -> expected (27, 80)" in str(e.value)
  assert P.detect_config(sd) == cfg


# --- malformed state dicts: the offending key is named --------------------------


def _convert_sd(sd, tmp_path, name="bad.pth"):
  path = tmp_path / name
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
  with pytest.raises(CheckpointError) as e:
    convert_sam.convert_checkpoint(str(path))
  assert str(path) in str(e.value)
  return str(e.value)


def test_missing_key(tiny, tmp_path):
  sd = dict(tiny[1])
  del sd["mask_decoder.iou_token.weight"]
  del sd["image_encoder.blocks.1.mlp.lin2.bias"]
  msg = _convert_sd(sd, tmp_path)
  assert "2 missing" in msg
  assert "mask_decoder.iou_token" in msg and "image_encoder.blocks.1.mlp.lin2.bias" in msg


def test_unexpected_key(tiny, tmp_path):
  sd = dict(tiny[1])
  sd["mask_decoder.extra_head.weight"] = np.zeros((3, 3), np.float32)
  msg = _convert_sd(sd, tmp_path)
  assert "1 unexpected" in msg and "mask_decoder.extra_head.weight" in msg
  # An extra encoder block against an explicit size is named as unexpected ...
  sd = dict(tiny[1])
  sd["image_encoder.blocks.7.attn.qkv.weight"] = sd["image_encoder.blocks.1.attn.qkv.weight"]
  with pytest.raises(CheckpointError, match=r"unexpected key\(s\): image_encoder\.blocks\.7"):
    P.convert_state_dict(sd, SAM_CONFIGS["vit_tiny_test"])
  # ... and makes shape-based detection fail cleanly, naming what it lacks.
  msg = _convert_sd(sd, tmp_path, "gap.pth")
  assert "cannot infer the SAM size" in msg and "image_encoder.blocks.2.attn.rel_pos_h" in msg


def test_wrongly_shaped_key(tiny, tmp_path):
  sd = dict(tiny[1])
  sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"] = np.zeros((2048, 128), np.float32)
  msg = _convert_sd(sd, tmp_path)
  assert "wrongly shaped" in msg and "mask_decoder.transformer.layers.0.mlp.lin1.weight" in msg
  assert "(128, 2048)" in msg


def test_missing_point_embedding_row(tiny, tmp_path):
  sd = dict(tiny[1])
  del sd["prompt_encoder.point_embeddings.2.weight"]
  assert "prompt_encoder.point_embeddings" in _convert_sd(sd, tmp_path)


def test_not_a_sam_state_dict(tmp_path):
  msg = _convert_sd({"encoder.weight": np.zeros((4, 4), np.float32)}, tmp_path)
  assert "not a SAM checkpoint" in msg


# --- unreadable and hostile files: one clear message naming the file, rc 1 -----


def _expect_cli_error(path, tmp_path, capsys, *needles, status=1):
  out = tmp_path / "never.safetensors"
  rc, _, err = run_cli(["--checkpoint", path, "--out", out], capsys)
  assert rc == status
  assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
  assert str(path) in err
  for n in needles:
    assert n in err, err
  assert not out.exists()
  with pytest.raises(CheckpointError):
    convert_sam.read_checkpoint(str(path))
  return err


def test_truncated_pth(tiny, tmp_path, capsys):
  data = open(tiny[2], "rb").read()
  for frac in (0.5, 0.99):
    p = tmp_path / f"trunc{frac}.pth"
    p.write_bytes(data[:int(len(data) * frac)])
    _expect_cli_error(p, tmp_path, capsys, "truncated or corrupt")


def test_truncated_legacy_pth(tiny, tmp_path, capsys):
  p = tmp_path / "legacy.pth"
  torch.save(tiny[0].state_dict(), p, _use_new_zipfile_serialization=False)
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 3])
  _expect_cli_error(p, tmp_path, capsys)


def test_random_bytes(tmp_path, capsys):
  p = tmp_path / "random.pth"
  p.write_bytes(np.random.RandomState(0).bytes(10_000))
  _expect_cli_error(p, tmp_path, capsys, "not a checkpoint")


def test_png_renamed_pth(tmp_path, capsys):
  from PIL import Image
  p = tmp_path / "photo.pth"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p, format="PNG")
  _expect_cli_error(p, tmp_path, capsys, "PNG image")


def test_empty_and_missing_files(tmp_path, capsys):
  p = tmp_path / "empty.pth"
  p.write_bytes(b"")
  _expect_cli_error(p, tmp_path, capsys, "empty")
  _expect_cli_error(tmp_path / "nope.pth", tmp_path, capsys, "no such file", status=2)


def test_zip_that_is_not_torch(tmp_path, capsys):
  p = tmp_path / "archive.pth"
  with zipfile.ZipFile(p, "w") as z:
    z.writestr("hello.txt", "hi")
  _expect_cli_error(p, tmp_path, capsys)


def test_truncated_safetensors(tiny, tmp_path, capsys):
  from safetensors.numpy import save_file
  p = tmp_path / "w.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in tiny[1].items()}, str(p))
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 2])
  _expect_cli_error(p, tmp_path, capsys, "safetensors")


@pytest.mark.parametrize("obj,what", [([1, 2, 3], "list"), ({"a": 1}, "int"), ({}, "empty"),
                                      ({1: torch.zeros(2)}, "keys must be strings")])
def test_pickle_but_not_state_dict(obj, what, tmp_path, capsys):
  p = tmp_path / "other.pth"
  torch.save(obj, p)
  _expect_cli_error(p, tmp_path, capsys, what)


class _Marker:
  """Unpickling this calls `fn(*args)` (the classic pickle code-execution gadget)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize("gadget", ["os.system", "builtins.open", "builtins.exec"])
@pytest.mark.parametrize("container", ["torch.save", "pickle-p2", "pickle-p4"])
def test_malicious_pickle_is_not_executed(gadget, container, tmp_path, capsys):
  marker = tmp_path / "PWNED"
  if gadget == "os.system":
    obj = _Marker(os.system, f"touch {marker}")
  elif gadget == "builtins.open":
    obj = _Marker(builtins.open, str(marker), "w")
  else:
    obj = _Marker(builtins.exec, f"open({str(marker)!r}, 'w').close()")
  # A plausible-looking state dict with the payload hidden among real tensors.
  payload = {"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8), "evil": obj}
  p = tmp_path / "sam_vit_b_01ec64.pth"
  if container == "torch.save":
    torch.save(payload, p)
  else:
    p.write_bytes(pickle.dumps(payload, protocol=2 if container == "pickle-p2" else 4))
  assert not marker.exists()
  err = _expect_cli_error(p, tmp_path, capsys, "Nothing from the file was executed")
  assert not marker.exists(), "the pickle's code ran"
  if container == "torch.save":  # the raw pickles are refused even earlier (framing, storages)
    callee = {"os.system": "posix.system", "builtins.open": "io.open",
              "builtins.exec": "builtins.exec"}[gadget]
    assert "refused" in err and f"references {callee}," in err
    assert "add_safe_globals" not in err  # no advice to allowlist the payload


def test_output_directory_missing(tiny, tmp_path, capsys):
  rc, _, err = run_cli(["-c", tiny[2], "-o", tmp_path / "no" / "dir" / "x.safetensors"], capsys)
  assert rc == 2 and "does not exist" in err


def test_cli_subprocess(tiny, tmp_path):
  """`python -m conversion.convert_sam`: --help, and a failure is one line and rc 1."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-m", "conversion.convert_sam", "--help"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0
  for word in ("--checkpoint", "--out", "--model-type", "vit_h", "safetensors", "weights_only"):
    assert word in r.stdout
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
  r = subprocess.run([sys.executable, "-m", "conversion.convert_sam", "-c", str(bad), "-o",
                      str(tmp_path / "o.safetensors")], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1
  assert "Traceback" not in r.stderr and str(bad) in r.stderr


NO_TORCH_CHILD = BLOCK_TORCH + r"""
import json
import numpy as np
from aopsam_jax.sam.params import load_sam
from aopsam_jax.sam.predictor import SamPredictor
sam = load_sam(sys.argv[1])
pred = SamPredictor(sam)
pred.set_image(np.load(sys.argv[2]))
masks, iou, low = pred.predict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]),
                               multimask_output=True)
assert "torch" not in sys.modules
np.savez(sys.argv[3], low=np.asarray(low), iou=np.asarray(iou))
"""


def test_library_runs_without_torch(tiny, tmp_path, capsys):
  """Convert here (torch present), then load + embed + predict in a process
  where importing torch fails; its outputs match the official predictor."""
  from tests.test_parity import synthetic_image, torch_predict
  from segment_anything import SamPredictor as OfficialPredictor
  sam, _, pth = tiny
  out = tmp_path / "sam.safetensors"
  assert run_cli(["-c", pth, "-o", out], capsys)[0] == 0
  img = synthetic_image(60, 80, seed=1)
  np.save(tmp_path / "img.npy", img)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  r = subprocess.run([sys.executable, "-c", NO_TORCH_CHILD, str(out), str(tmp_path / "img.npy"),
                      str(tmp_path / "res.npz")], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(tmp_path / "res.npz")
  ref = OfficialPredictor(sam)
  ref.set_image(img)
  _, iou_t, low_t = torch_predict(ref, np.array([[[20.0, 30.0]]]), np.array([[1]]),
                                  multimask_output=True)
  from tests.reference import rel_err
  assert rel_err(got["low"], low_t[0]) < 1e-4
  assert rel_err(got["iou"], iou_t[0]) < 1e-4


def test_existing_out_needs_overwrite(tiny, tmp_path, capsys):
  """A converted file is not replaced silently: exit 2 before reading, one line;
  with --overwrite it is rewritten (same tensors)."""
  pth = tiny[2]
  ref = convert_sam.convert_checkpoint(pth)[1]
  out = tmp_path / "sam.safetensors"
  assert run_cli(["-c", pth, "-o", out, "-q"], capsys)[0] == 0
  before = out.stat().st_mtime_ns
  rc, _, err = run_cli(["-c", tmp_path / "does_not_matter.pth", "-o", out], capsys)
  assert rc == 2 and "does_not_matter.pth" in err  # the missing input is named first
  rc, _, err = run_cli(["-c", pth, "-o", out, "-q"], capsys)
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err, err
  assert out.stat().st_mtime_ns == before
  assert run_cli(["-c", pth, "-o", out, "-q", "--overwrite"], capsys)[0] == 0
  _, flat, _ = P.read_converted(str(out))
  assert set(flat) == set(ref) and all(np.array_equal(flat[k], ref[k]) for k in ref)
