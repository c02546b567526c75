"""Optimizer and the jitted train / eval steps.

State is a pytree ``{"params": nnx.State, "opt_state": ..., "step": int32}``
replicated over a 1-D Mesh ('data',) of all devices; batches are sharded
along their leading axis.  The frozen SAM image encoder's state is passed
as a (replicated) argument, used only in online-embedding mode, and never
differentiated.
"""

from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aopsam_jax.sam.compile_options import jit
from aopsam_jax.sam.geometry import LOW_RES_STRIDE, low_res_valid_region
from aopsam_jax.aop.peaks import extract_peaks
from aopsam_jax.aop.prompt_predictor import predictor_inputs
from aopsam_jax.trainer.losses import LOSSES


def make_schedule(opt_cfg, total_steps: int):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=opt_cfg.warmup_steps,
      decay_steps=max(total_steps, opt_cfg.warmup_steps + 1), end_value=opt_cfg.lr * opt_cfg.end_lr_factor)


def make_optimizer(opt_cfg, total_steps: int):
  sched = make_schedule(opt_cfg, total_steps)
  tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip),
                   optax.adamw(sched, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay))
  return tx, sched


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ("data",))


def to_global(mesh: Mesh, local_batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays sharded over 'data'."""
  sh = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
          for k, v in local_batch.items()}


def model_inputs(batch, encoder_graphdef, encoder_state):
  """(embedding, image_small) from a cached, an image-only (embedding None:
  the predictor does not read it) or an online batch."""
  if "embedding" in batch:
    return batch["embedding"], batch["image_small"]
  if "image_small" in batch:
    return None, batch["image_small"]
  encoder = nnx.merge(encoder_graphdef, encoder_state)
  emb, small = predictor_inputs(encoder, batch["image"], batch["input_hw"])
  return jax.lax.stop_gradient(emb), small


def build_steps(graphdef, tx, loss_cfg, mesh: Mesh, encoder_graphdef=None,
                eval_ks: Sequence[int] = (32,), nms_kernel: int = 3):
  loss_fn_impl = LOSSES[loss_cfg.kind]
  loss_kw = dict(loss_cfg.get("kwargs", {}))
  repl = NamedSharding(mesh, P())

  def loss_fn(params, batch, enc_state):
    emb, small = model_inputs(batch, encoder_graphdef, enc_state)
    logits = nnx.merge(graphdef, params)(emb, small)
    loss, num_pos = loss_fn_impl(logits, batch["target"], batch["weight"], **loss_kw)
    return loss, (num_pos, logits)

  def train_step(state, batch, enc_state):
    (loss, (num_pos, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], batch, enc_state)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "num_pos": num_pos}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  def eval_step(params, batch, enc_state):
    loss, (num_pos, logits) = loss_fn(params, batch, enc_state)
    out = {"loss": loss, "num_pos": num_pos}
    # peaks only inside the resized image, as ASF takes them (the loss ignores
    # the padding, so the logits there are unconstrained)
    size = logits.shape[-1]
    region = jax.vmap(lambda hw: low_res_valid_region(hw, size, LOW_RES_STRIDE * size))(
        batch["input_hw"])
    logits = jnp.where(region, logits, -jnp.inf)
    for k in eval_ks:
      coords, scores, valid = extract_peaks(logits, k, kernel=nms_kernel)
      out[f"k{k}_coords"], out[f"k{k}_valid"] = coords, valid
    return out

  train_step = jit(train_step, donate_argnums=(0,), out_shardings=(repl, repl))
  data_sh = NamedSharding(mesh, P("data"))
  eval_out = {"loss": repl, "num_pos": repl}
  for k in eval_ks:
    eval_out[f"k{k}_coords"] = data_sh
    eval_out[f"k{k}_valid"] = data_sh
  eval_step = jit(eval_step, out_shardings=eval_out)
  return train_step, eval_step


def replicate(tree, mesh: Mesh):
  repl = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(x, repl) if jax.process_count() == 1 else
                      jax.make_array_from_process_local_data(repl, np.asarray(x)), tree)


def fetch(x) -> np.ndarray:
  """Global (possibly multi-host sharded) array -> full numpy on every host."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def fetch_tree(tree):
  return jax.tree.map(fetch, tree)
