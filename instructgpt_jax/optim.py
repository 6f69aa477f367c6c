"""Optimizers and learning-rate schedules (optax).

InstructGPT uses Adam with β = (0.9, 0.95) for every model (docs/paper.md §2). Schedules:
  * "cosine":   linear warmup, then cosine decay to `final_lr_fraction` × peak (SFT and RM: 10%, no warmup).
  * "constant": linear warmup from `warmup_init_fraction` × peak, then constant (PPO: 10 iterations from 0.1×).
  * "linear":   linear warmup, then linear decay to `final_lr_fraction` × peak.
Weight decay (decoupled, AdamW) skips biases and norm scales. The optional TF-style ε (docs/paper.md §8.3) adds a
constant ε to √v of the raw, not bias-corrected, moments, as TF1's Adam did.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from instructgpt_jax import errors

SCHEDULES = ("cosine", "constant", "linear")
NO_DECAY_LEAVES = ("bias", "scale")  # parameter names (last path key) that weight decay skips


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer step from an `optim` config section."""
  peak, warmup = cfg.lr, cfg.warmup_steps
  if cfg.schedule not in SCHEDULES:
    raise errors.ConfigError(f"optim.schedule: {cfg.schedule!r} is not one of {SCHEDULES}")
  init = peak * cfg.warmup_init_fraction
  warm = optax.linear_schedule(init, peak, warmup) if warmup else None
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_fraction)
  else:
    after = optax.linear_schedule(peak, peak * cfg.final_lr_fraction, decay_steps)
  return after if warm is None else optax.join_schedules([warm, after], [warmup])


def weight_decay_mask(params) -> Any:
  """True for parameters that get weight decay: every matrix and embedding, not biases or norm scales."""

  def decays(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", str(last)))
    return name not in NO_DECAY_LEAVES

  return jax.tree_util.tree_map_with_path(decays, params)


class ScaleByAdamTFState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam_tf_style(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-5) -> optax.GradientTransformation:
  """Adam as TF1 computes it: step = √(1-β2^t)/(1-β1^t) · m / (√v + ε), ε not bias-corrected.

  optax's adam divides by (√v̂ + ε) with bias-corrected v̂, whose effective ε is ε·√(1-β2^t): tiny early
  in training, so the first updates are larger (docs/paper.md §8.3).
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ScaleByAdamTFState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = state.count + 1
    t = count.astype(jnp.float32)
    step = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    out = jax.tree.map(lambda m, v: step * m / (jnp.sqrt(v) + eps), mu, nu)
    return out, ScaleByAdamTFState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, Adam (optax or TF-style ε), decoupled weight decay, the schedule."""
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.tf_style_eps:
    parts.append(scale_by_adam_tf_style(cfg.b1, cfg.b2, cfg.eps))
  else:
    parts.append(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps))
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule(cfg, total_steps)))
  return optax.chain(*parts)
