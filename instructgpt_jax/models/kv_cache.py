"""The key/value cache of incremental decoding: an explicit pytree, passed in and returned by every step.

Keys and values are stored for all layers in one array each, [layers, B, kv_heads, S, head_dim], the same
leading `layers` axis as the stacked parameters. Under `scan_layers=True` the layer loop carries the whole
stack and each layer writes its new slots in place at its own index; unrolled layers do the same with a
static index, so one cache layout serves both modes.

kv_heads sits before the slots so that (batch, kv head) are the leading batch dimensions of the attention
dots: with [B, S, K, H] the compiled step transposes every layer's whole cache into that order on every
step, an extra read and write of the cache (about 2x slower steps for `mini` at batch 64 on CPU,
benchmarks/RESULTS.md).

A cache holds one sequence per row, laid out in slots 0..S-1 exactly as the full forward pass would see
it: left padding first (segment id 0), then the prompt and the generated tokens (segment id 1). `end` is
the first unwritten slot, the same for every row, so a decode step writes one column for the whole batch.
Slots at or past `end` hold segment id 0 and are never attended to.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from instructgpt_jax.models.sizes import ModelConfig
from instructgpt_jax.sharding import constrain

# Batch over data × fsdp and kv heads over tensor, by the same rules as activations and parameters.
KV_CACHE_AXES = ("layers", "batch", "kv_heads", "length", "kv")


class KVCache(NamedTuple):
  """keys, values: [L, B, K, S, H] in the compute dtype; segment_ids: [B, S] int32; end: int32 scalar."""

  keys: jax.Array
  values: jax.Array
  segment_ids: jax.Array
  end: jax.Array

  @property
  def length(self) -> int:
    """S, the number of slots (static)."""
    return self.segment_ids.shape[1]

  def real_token_counts(self) -> jax.Array:
    """[B] int32: how many real tokens each row holds, which is the position id of its next token."""
    return jnp.sum(self.segment_ids > 0, axis=-1, dtype=jnp.int32)


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  """A cache of `length` slots with nothing written; sharded by KV_CACHE_AXES when traced under a mesh."""
  shape = (cfg.n_layers, batch, cfg.kv_heads, length, cfg.head_dim)
  zeros = constrain(jnp.zeros(shape, cfg.dtype), KV_CACHE_AXES)
  segment_ids = constrain(jnp.zeros((batch, length), jnp.int32), ("batch", "length"))
  return KVCache(keys=zeros, values=zeros, segment_ids=segment_ids, end=jnp.zeros((), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
  """Bytes of keys and values in a cache of `length` slots (what one decode step reads at most)."""
  return 2 * cfg.n_layers * batch * length * cfg.kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
