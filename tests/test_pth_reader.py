"""The torch-free .pth reader against torch.load: bit-identical tensors for every
dtype, layout (strides, offsets, shared storages) and file format, and the
official vit_b / vit_l / vit_h state dicts (key names and shapes), whose size
is recognised from the shapes alone."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tests.reference import build_torch_sam, save_official_pth

import torch  # noqa: E402  (after tests.reference installed the torchvision stand-in)

from aopsam_jax.sam import checkpoints as C  # noqa: E402
from aopsam_jax.sam import params as P  # noqa: E402
from aopsam_jax.sam import pth_reader  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402


def bits(a) -> np.ndarray:
  """The raw bits of a tensor / array (bf16 compared without rounding)."""
  if isinstance(a, torch.Tensor):
    a = a.detach().contiguous()
    if a.dtype == torch.bfloat16:
      return a.view(torch.int16).numpy().reshape(-1)
    a = a.numpy()
  a = np.ascontiguousarray(a).reshape(-1)
  return a.view(np.int16) if str(a.dtype) == "bfloat16" else a.view(np.uint8)


def assert_same(ours: dict, ref: dict):
  assert list(ours) == list(ref)  # order kept, as torch.load keeps it
  for k, t in ref.items():
    a = ours[k]
    assert tuple(a.shape) == tuple(t.shape), k
    np.testing.assert_array_equal(bits(a), bits(t), err_msg=k)


def every_dtype_dict():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  shared = torch.randn(40, generator=g)
  bn = torch.nn.BatchNorm2d(4)
  bn.train()
  bn(torch.randn(2, 4, 3, 3, generator=g))  # running stats and num_batches_tracked = 1
  sd = collections.OrderedDict()
  sd["f32"] = base
  sd["f16"] = base.half()
  sd["bf16"] = torch.randn(3, 7, generator=g).bfloat16()
  sd["f64"] = base.double()
  sd["i64"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
  sd["i32"] = torch.arange(5, dtype=torch.int32)
  sd["u8"] = torch.arange(250, 256, dtype=torch.uint8)
  sd["bool"] = torch.tensor([True, False, True])
  sd["transposed"] = base.t()                     # non-contiguous strides
  sd["offset_slice"] = shared[7:19].view(3, 4)    # storage offset
  sd["shared_again"] = shared[::3]                # same storage, stride 3
  sd["expanded"] = torch.randn(1, 5, generator=g).expand(4, 5)  # stride 0
  sd["scalar"] = torch.tensor(2.5)
  sd["empty"] = torch.zeros(0, 3)
  for k, v in bn.state_dict().items():            # MobileSAM-style BatchNorm buffers
    sd["bn." + k] = v
  sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
  return sd


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_bit_identical(legacy, tmp_path):
  sd = every_dtype_dict()
  p = tmp_path / "all.pth"
  torch.save(sd, p, _use_new_zipfile_serialization=not legacy)
  ref = torch.load(p, map_location="cpu", weights_only=True)
  ours = pth_reader.read_pth(str(p))
  assert_same(ours, ref)
  assert ours["bn.num_batches_tracked"].dtype == np.int64 and int(ours["bn.num_batches_tracked"]) == 1
  assert str(ours["bf16"].dtype) == "bfloat16" and ours["f16"].dtype == np.float16
  # a training checkpoint wrapping the state dict
  torch.save({"model": sd, "epoch": 3, "opt": {"lr": 0.1}}, p)
  assert_same(pth_reader.read_pth(str(p)), ref)


def test_no_torch_import_and_refusals(tmp_path):
  """The reader module never imports torch; non-allowlisted globals are refused by name."""
  import ast
  import inspect
  tree = ast.parse(inspect.getsource(pth_reader))
  mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert not any(m.split(".")[0] == "torch" for m in mods)
  p = tmp_path / "module.pth"
  torch.save({"w": torch.zeros(2), "net": torch.nn.Linear(2, 2)}, p)  # a whole module pickled
  with pytest.raises(pth_reader.RefusedGlobal) as e:
    pth_reader.read_pth(str(p))
  assert e.value.module.startswith("torch.nn")


def official_format_pth(cfg, path, seed=0):
  """A state dict with the official key names and shapes of `cfg`, cheaply: each
  tensor is a random vector of its last dimension expanded with stride 0, so even
  a vit_h file is a few MB."""
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in build_torch_sam(cfg).state_dict().items()}
  g = torch.Generator().manual_seed(seed)
  sd = collections.OrderedDict(
      (k, torch.randn(s[-1], generator=g).expand(*s) if s else torch.randn((), generator=g))
      for k, s in shapes.items())
  torch.save(sd, path)
  return shapes


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_sizes_bit_identical_and_detected(name, tmp_path):
  p = tmp_path / f"sam_{name}.pth"
  shapes = official_format_pth(SAM_CONFIGS[name], str(p))
  assert p.stat().st_size < 8 << 20
  ref = torch.load(p, map_location="cpu", weights_only=True)
  ours = pth_reader.read_pth(str(p))
  assert list(ours) == list(ref) and {k: tuple(v.shape) for k, v in ours.items()} == shapes
  for k, t in ref.items():  # same layout and bytes, without materialising 2.5 GB
    assert ours[k].strides == tuple(s * 4 for s in t.stride()), k
    first = (0,) * max(t.dim() - 1, 0)
    np.testing.assert_array_equal(bits(ours[k][first]), bits(t[first]), err_msg=k)
  # the architecture comes from the shapes, no model type given
  assert P.detect_config(C.read_checkpoint(str(p))) == SAM_CONFIGS[name]


@pytest.mark.slow  # ~40 s: builds the real 94M-parameter module
def test_real_vit_b_module_bit_identical_and_converted(tmp_path):
  """A random-init official vit_b (the real module, 94M parameters): every tensor
  bit-identical to torch.load, and converted with no model type given."""
  sam = build_torch_sam(SAM_CONFIGS["vit_b"], seed=1)
  p = save_official_pth(sam, str(tmp_path / "sam_vit_b_random.pth"))
  del sam
  ref = torch.load(p, map_location="cpu", weights_only=True)
  assert_same(pth_reader.read_pth(p), ref)
  cfg, flat, layout = C.convert_checkpoint(p)
  assert cfg == SAM_CONFIGS["vit_b"] and layout == "official"
  np.testing.assert_array_equal(flat["image_encoder.pos_embed"], ref["image_encoder.pos_embed"].numpy())
