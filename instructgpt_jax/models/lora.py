"""Low-rank adapters (LoRA, Hu et al. 2021): the adapter parameters of a layer's projections, the update they add,
and pure helpers on the params pytree.

A projection y = x·W (kernel W [*in, *out], e.g. the query's [D, N, H]) that `model.lora.targets` matches
(sizes.LoraConfig, `ModelConfig.lora_modules`) carries two `nnx.LoRAParam`s beside its kernel:

    lora_a  A [*in, r]   logical axes (*the kernel's input axes, "lora_rank")    Gaussian, std 1/sqrt(prod(in))
    lora_b  B [r, *out]  logical axes ("lora_rank", *the kernel's output axes)   zeros

and computes y = x·W + (alpha/r)·dropout(x)·A·B. With B = 0 the update is exactly zero, so a model that has just
been given adapters computes what its base computes, bit for bit. Built inside the layers' `nnx.vmap`, the
adapters are stacked like every layer parameter: params["layers"]["attn"]["query"]["lora_a"] is [L, D, r].

Adapters off (the KL reference of a LoRA policy): `without_adapters(params)` run with the base model's graphdef
(the same config with rank 0): the same arrays, no copy, the base program.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from instructgpt_jax.models.sizes import ModelConfig
from instructgpt_jax.sharding import LOGICAL_AXES_KEY, constrain

ADAPTER_KEYS = ("lora_a", "lora_b")  # the params-pytree names of A and B, under their projection
HEADS = ("head", "value_head")  # top-level params of a scalar head, which train fully beside the adapters
# A layer's dropout key k is split as split(k) = (fold_in(k, 0), fold_in(k, 1)) for the residual dropouts;
# the adapters' dropout takes the next stream, fold_in(k, 2), so a residual mask is the same with or without LoRA.
DROPOUT_STREAM = 2


def add_adapters(block: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
  """Gives each targeted projection of a layer (`cfg.lora_modules`, paths under `block`) its A and B.

  Called at the end of the layer's constructor, after every base parameter has drawn its key, so the base weights
  are the same with and without adapters (same seed). A ~ N(0, 1/prod(in)): Hu et al. draw A from "a random
  Gaussian" without a scale; this std keeps each of the r features x·A at the scale of one feature of x (PEFT's
  default, kaiming-uniform, has the same bound 1/sqrt(prod(in))). With B = 0 it sets only how fast B starts to
  learn (dL/dB = (x·A)ᵀ·dL/dy).
  """
  rank = cfg.lora.rank
  for path in cfg.lora_modules:
    projection = _submodule(block, path)
    n_in = len(cfg.projections[path][0])
    kernel = projection.kernel
    axes = kernel.get_metadata()[LOGICAL_AXES_KEY]
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    std = 1.0 / math.sqrt(math.prod(in_shape))
    a = std * jax.random.normal(rngs.params(), (*in_shape, rank), jnp.float32)
    projection.lora_a = nnx.LoRAParam(a.astype(cfg.param_dtype), **{LOGICAL_AXES_KEY: (*axes[:n_in], "lora_rank")})
    projection.lora_b = nnx.LoRAParam(
      jnp.zeros((rank, *out_shape), cfg.param_dtype), **{LOGICAL_AXES_KEY: ("lora_rank", *axes[n_in:])}
    )


def _submodule(module: nnx.Module, path: str) -> nnx.Module:
  for name in path.split("/"):
    module = getattr(module, name)
  return module


def has_adapters(projection: nnx.Module) -> bool:
  return hasattr(projection, "lora_a")


def update(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype) -> jax.Array:
  """The adapter's term of the projection: scale · x·A·B, computed as ((x·A)·scale)·B in `dtype`.

  x [..., *in], A [*in, r], B [r, *out] -> [..., *out]. In the compute dtype, like the base product beside it
  (flax casts its kernel to the compute dtype too): under bfloat16 the term rounds like x·W does, and x is
  never copied to float32. x·A first: [..., r] is the small intermediate.
  """
  x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
  xa = constrain(jnp.tensordot(x, a, axes=a.ndim - 1), ("batch", "length", "lora_rank"))  # x [B, T, *in]
  return jnp.tensordot(xa * scale, b, axes=1)


def dropout_keys(rng: jax.Array | None, n: int) -> tuple[jax.Array | None, ...]:
  """n independent keys for n adapters' dropout, or n Nones (no dropout) without a key."""
  return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def layer_dropout_keys(cfg: ModelConfig, dropout_rng: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
  """The adapter-dropout keys of a layer's attention and MLP, from the layer's dropout key (None: no dropout,
  as in evaluation, scoring and sampling): stream DROPOUT_STREAM of that key, split in two."""
  if dropout_rng is None or not cfg.lora_modules or cfg.lora.dropout == 0.0:
    return None, None
  return dropout_keys(jax.random.fold_in(dropout_rng, DROPOUT_STREAM), 2)


# ------------------------------------------------------------------------------------------ the params pytree


def is_adapter(path) -> bool:
  """Whether a key path of the params pytree (jax key entries, or plain names) ends at an adapter leaf."""
  last = path[-1]
  return getattr(last, "key", last) in ADAPTER_KEYS


def split(params) -> tuple[dict, dict]:
  """params -> (adapters, base): two pytrees of the same arrays (no copy). adapters holds only the branches that
  lead to an A or B; base is what the model with rank 0 has (models.init of the base config), leaf for leaf."""
  adapters, base = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      sub_adapters, base[key] = split(value)
      if sub_adapters:
        adapters[key] = sub_adapters
    elif key in ADAPTER_KEYS:
      adapters[key] = value
    else:
      base[key] = value
  return adapters, base


def combine(adapters, base) -> dict:
  """The inverse of `split`: base with the adapters' leaves put back beside their kernels (no copy)."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(value, base.get(key, {})) if isinstance(value, dict) else value
  return out


def split_trainable(params) -> tuple[dict, dict]:
  """params -> (what trains, what stays frozen), the same arrays (no copy); `combine` puts them back together.

  Without adapters everything trains: (params, {}), full fine-tuning. With adapters the adapters train, and the
  scalar heads (`HEADS`: a reward model's or critic's head, PPO's shared-trunk value head: created for the
  stage, nothing to keep frozen); the base model is frozen. The optimizer's moments and PPO's EMA cover the
  first part only (train_state)."""
  adapters, base = split(params)
  if not adapters:
    return params, {}
  heads = {k: v for k, v in base.items() if k in HEADS}
  return {**adapters, **heads}, {k: v for k, v in base.items() if k not in HEADS}


def without_adapters(params) -> dict:
  """The base model's params: the same arrays (no copy), every A and B dropped. Run with the base graphdef
  (the config with rank 0) it is the model with its adapters off."""
  return split(params)[1]


def zero_adapters(params) -> dict:
  """params with every B set to zero (A and the base the same arrays): the adapted graph computing exactly what
  its base computes, for a program compiled for the adapted model (the sampler) to run the base."""

  def zero(node):
    if not isinstance(node, dict):
      return node
    return {k: jnp.zeros_like(v) if k == "lora_b" else zero(v) for k, v in node.items()}

  return zero(params)


def merged(params, cfg: ModelConfig) -> dict:
  """The base model's params with each adapter folded into its kernel: W' = W + (alpha/r)·A·B.

  Stacked: W [L, *in, *out], A [L, *in, r], B [L, r, *out]. A·B is accumulated in float32 at full precision and
  W' is cast back to W's dtype. The result runs with the base graphdef and equals the adapted model up to rounding.
  """

  def fold(node):
    if not isinstance(node, dict):
      return node
    if "lora_a" not in node:
      return {key: fold(value) for key, value in node.items()}
    a, b = node["lora_a"].astype(jnp.float32), node["lora_b"].astype(jnp.float32)
    product = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST))(a, b)
    kernel = node["kernel"]
    out = {key: value for key, value in node.items() if key not in ADAPTER_KEYS}
    out["kernel"] = (kernel.astype(jnp.float32) + cfg.lora.scale * product).astype(kernel.dtype)
    return out

  return fold(params)
