"""MobileSAM (`mobilesam-mirror`, the `mobile_sam` package) as an independent reference.

MobileSAM's `tiny_vit_sam.py` imports four helpers from timm
(`models.layers.{DropPath, to_2tuple, trunc_normal_}`, `models.registry.register_model`);
importing timm itself needs torchvision, which has no CPU build here.  The
stand-ins below follow timm's semantics for what MobileSAM uses: DropPath is
the identity at drop rate 0 (MobileSAM's), trunc_normal_ only initialises.

The model is built as `build_sam_vit_t` does, with random weights perturbed
where the reference initialises constants (BatchNorm affine parameters and
running statistics, attention biases, LayerNorms), then put in eval mode
*after* the perturbation: TinyViT's attention caches its bias table (`ab`)
when switched to eval, as MobileSAM's README does after loading a checkpoint.
"""

from __future__ import annotations

import sys
import types

from tests import torchvision_stub

torchvision_stub.install()

import torch  # noqa: E402


def _install_timm_stub() -> None:
  timm = types.ModuleType("timm")
  models = types.ModuleType("timm.models")
  layers = types.ModuleType("timm.models.layers")
  registry = types.ModuleType("timm.models.registry")

  class DropPath(torch.nn.Module):
    def __init__(self, drop_prob=None):
      super().__init__()
      self.drop_prob = drop_prob

    def forward(self, x):
      assert not self.drop_prob or not self.training, "stochastic depth is not stubbed"
      return x

  layers.DropPath = DropPath
  layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
  layers.trunc_normal_ = lambda t, std=1.0, **kw: torch.nn.init.trunc_normal_(t, std=std, **kw)
  registry.register_model = lambda fn: fn
  timm.models, models.layers, models.registry = models, layers, registry
  sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                      "timm.models.registry": registry})


_install_timm_stub()

from mobile_sam import SamPredictor, build_sam_vit_t  # noqa: E402,F401


def build_torch_mobile_sam(seed: int = 0):
  """MobileSAM vit_t with every constant-initialised tensor perturbed, in eval mode."""
  torch.manual_seed(seed)
  sam = build_sam_vit_t()
  with torch.no_grad():
    for name, p in sam.named_parameters():
      if "attention_biases" in name:
        p.normal_(0.0, 0.5)
      elif p.dim() == 1:
        p.add_(torch.randn_like(p) * 0.1)
      if name.endswith("conv3.bn.weight"):  # zero-initialised in MBConv
        p.add_(torch.randn_like(p) * 0.3)
    for name, b in sam.named_buffers():
      if name.endswith("running_mean"):
        b.normal_(0.0, 0.1)
      elif name.endswith("running_var"):
        b.uniform_(0.5, 1.5)
      elif name.endswith("num_batches_tracked"):
        b.fill_(1000)
  return sam.eval()
