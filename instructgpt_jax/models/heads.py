"""Scalar heads: the reward model and the value function (a Transformer trunk + one projection to R).

InstructGPT replaces the unembedding with a projection to one scalar (docs/paper.md §2, §4.1). The projection is
initialized N(0, 1/sqrt(d_model + 1)) with zero bias, as in Ziegler et al.'s code (docs/paper.md §4.3, row 8).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from instructgpt_jax.models.sizes import ModelConfig
from instructgpt_jax.models.transformer import Transformer, _axes


class ScalarHead(nnx.Module):
  """hidden [..., D] -> float32 scalar [...]."""

  def __init__(self, d_model: int, *, param_dtype="float32", rngs: nnx.Rngs):
    self.proj = nnx.Linear(
      d_model,
      1,
      kernel_init=nnx.initializers.normal(1.0 / math.sqrt(d_model + 1)),
      bias_init=nnx.initializers.zeros,
      param_dtype=param_dtype,
      dtype=jnp.float32,
      kernel_metadata=_axes("embed", "scalar"),
      bias_metadata=_axes("scalar"),
      rngs=rngs,
    )

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return self.proj(hidden.astype(jnp.float32))[..., 0]


class ScalarModel(nnx.Module):
  """Transformer trunk without the unembedding, plus a ScalarHead at every position.

  Call: tokens [B, T] -> (scalars [B, T] float32, hidden [B, T, D]). The reward of a sequence is the
  scalar at its final real token (`final_token_value`); a value function uses every position.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.transformer = Transformer(cfg, lm_head=False, rngs=rngs)
    self.head = ScalarHead(cfg.d_model, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, tokens, *, positions=None, segment_ids=None, dropout_rng=None):
    _, hidden = self.transformer(tokens, positions=positions, segment_ids=segment_ids, dropout_rng=dropout_rng)
    return self.head(hidden), hidden


def final_token_value(values: jax.Array, mask: jax.Array) -> jax.Array:
  """values [B, T] at the last position where mask [B, T] is nonzero -> [B] (0 for an all-zero mask)."""
  length = mask.shape[-1]
  last = length - 1 - jnp.argmax(jnp.flip(mask > 0, axis=-1), axis=-1)
  picked = jnp.take_along_axis(values, last[:, None], axis=-1)[:, 0]
  return jnp.where(jnp.any(mask > 0, axis=-1), picked, 0.0)
