"""Models: the Transformer (both families), scalar heads, named sizes, low-rank adapters (models/lora.py), and the
functional interface.

The functional interface keeps NNX at the boundary:

    graphdef, params = models.init(cfg, jax.random.key(0))          # params: a pure dict of arrays
    logits, hidden = models.apply(graphdef, params, tokens)         # inside any jax.jit

With `model.lora.rank` > 0, params also holds each targeted projection's adapters ("lora_a", "lora_b");
`lora.split(params)` separates them from the base, `lora.without_adapters(params)` is the base alone.
"""

from __future__ import annotations

import jax
from flax import nnx

from instructgpt_jax.models.heads import ScalarHead, ScalarModel, final_token_value
from instructgpt_jax.models.sizes import LoraConfig, ModelConfig, lookup, resolve, size_names
from instructgpt_jax.models.transformer import Transformer, apply_rope, attention_mask, positions_from_mask

KINDS = ("lm", "scalar")


def build(cfg: ModelConfig, rng: jax.Array, *, kind: str = "lm") -> nnx.Module:
  """The NNX module: `kind="lm"` a language model, `kind="scalar"` a reward / value model."""
  rngs = nnx.Rngs(params=rng)
  if kind == "lm":
    return Transformer(cfg, rngs=rngs)
  if kind == "scalar":
    return ScalarModel(cfg, rngs=rngs)
  raise ValueError(f"model kind {kind!r} is not one of {KINDS}")


def init(cfg: ModelConfig, rng: jax.Array, *, kind: str = "lm"):
  """(graphdef, params) with params a pure dict of arrays. Allocates the whole model on the default
  device: for large models use `abstract` and a jitted init with out_shardings (sharding.py)."""
  graphdef, state = nnx.split(build(cfg, rng, kind=kind))
  return graphdef, nnx.to_pure_dict(state)


def abstract(cfg: ModelConfig, *, kind: str = "lm"):
  """(graphdef, abstract nnx State): shapes, dtypes and logical axis names; nothing is allocated."""
  module = nnx.eval_shape(lambda: build(cfg, jax.random.key(0), kind=kind))
  return nnx.split(module)


def apply(graphdef, params, tokens, **kwargs):
  """Pure forward pass: merge the parameter pytree into the module and call it."""
  return nnx.merge(graphdef, params)(tokens, **kwargs)


def param_count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


__all__ = [
  "KINDS",
  "LoraConfig",
  "ModelConfig",
  "ScalarHead",
  "ScalarModel",
  "Transformer",
  "abstract",
  "apply",
  "apply_rope",
  "attention_mask",
  "build",
  "final_token_value",
  "init",
  "lookup",
  "param_count",
  "positions_from_mask",
  "resolve",
  "size_names",
]
