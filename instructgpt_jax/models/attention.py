"""Scaled dot-product attention, softmax(q kᵀ / √H + mask) v, by one of several implementations.

`ModelConfig.attention_impl` names one; all compute the same function of q [B, T, N, H], k and v [B, S, K, H]
(K divides N: grouped heads) under the model's mask: a token attends to earlier (or the same) positions of
its own segment (segment id 0 is padding, and a padding token attends to earlier padding, so no row is empty).

* "einsum": written out (two einsums, a where, a float32 softmax) with its gradient written out too
  (`jax.custom_vjp`); in a full pass, whose mask is causal, queries go in blocks of 128 that skip the keys
  after them. With `f32_probs` the probabilities stay float32 through P·V; otherwise they are rounded to v's
  dtype first, as the XLA path does.
* "xla": `jax.nn.dot_product_attention`'s XLA path (materializes [B, N, T, S] scores; probabilities rounded to
  v's dtype). On this project's 2-core CPU the LM step with it is 1.28× (tiny) and 1.10× (mini) slower than
  with "einsum" (benchmarks/RESULTS.md, 2026-12-02, load 1.7).
* "cudnn": cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`, NVIDIA GPUs only, bfloat16 or
  float16. It takes the dense mask as given, so packing and left padding work. Not run on a GPU by this
  project yet (benchmarks/RESULTS.md).
* "splash": Pallas splash attention (jax.experimental.pallas.ops.tpu), TPU only; on CPU it runs in Pallas
  interpret mode, which is how the tests check it. It builds the causal and segment mask itself from
  `segment_ids`, pads T to a multiple of 128 (its smallest block) with padding segments, and runs under
  `shard_map` over the batch and key/value-head axes of the active mesh.
* "auto": "einsum" on CPU, "cudnn" on GPU (bfloat16/float16, head size a multiple of 8 up to 128; else "xla"),
  "splash" on TPU, chosen by the platform of the active mesh's devices (so an ahead-of-time compile for a TPU
  topology on a CPU host picks "splash").

The cached passes (prefill and decode steps, `Attention.decode`) take an explicit [B, 1, T, W] mask over the
cache; there "splash" falls back to "xla", and single-token steps (a matrix-vector product per row, which a
flash kernel does not speed up) use "xla" under "cudnn".
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from instructgpt_jax import errors, sharding
from instructgpt_jax.models.sizes import ATTENTION_IMPLS as IMPLS

SPLASH_BLOCK = 128  # the smallest block the splash kernel takes (a multiple of the TPU's 128 lanes)
EINSUM_BLOCK = 128  # query block of the einsum path under a causal mask (none of 32, 64, 256 measured faster here)


def platform() -> str:
  """The platform attention is compiled for: the active mesh's devices' ("tpu" in an AOT compile for a TPU
  topology), else JAX's default backend."""
  active = sharding.active_mesh_and_rules()
  return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def resolve(impl: str | None, *, dtype, head_dim: int, on: str | None = None) -> str:
  """The implementation "auto" (or None, as older saved configs have it) stands for on platform `on`; checks
  that a named one can run there. Raises errors.ConfigError with one line otherwise."""
  on = on or platform()
  dtype = jnp.dtype(dtype)
  if impl in (None, "auto"):
    if on == "tpu":
      return "splash"
    if on == "gpu":
      fused = dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
      return "cudnn" if fused else "xla"
    return "einsum"
  if impl not in IMPLS:
    raise errors.ConfigError(f"model.attention_impl: {impl!r} is not one of {IMPLS}")
  if impl == "cudnn" and on != "gpu":
    raise errors.ConfigError(f"model.attention_impl: 'cudnn' runs on NVIDIA GPUs, these devices are {on}; use 'auto'")
  if impl == "splash" and on not in ("tpu", "cpu"):
    raise errors.ConfigError(f"model.attention_impl: 'splash' runs on TPUs (and on CPU, interpreted), not {on}")
  return impl


def _blocks(t: int, s: int, causal: bool, block: int) -> list[tuple[int, int, int]]:
  """(first query, end query, end key) of each query block: under a causal mask a query block sees no later key."""
  if not causal or t != s:
    return [(0, t, s)]
  return [(a, min(a + block, t), min(a + block, t)) for a in range(0, t, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _einsum_attention(q, k, v, mask, f32_probs, causal, block):
  return _einsum_forward(q, k, v, mask, f32_probs, causal, block)[0]


def _einsum_forward(q, k, v, mask, f32_probs, causal, block):
  """q, k and v [B, T|S, N, H], mask bool [B, 1, T, S] -> (float32 [B, T, N, H], residuals)."""
  scale = 1 / math.sqrt(q.shape[-1])
  outs, probs = [], []
  for a, b, s in _blocks(q.shape[1], k.shape[1], causal, block):
    logits = jnp.einsum("BTNH,BSNH->BNTS", q[:, a:b], k[:, :s], preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask[:, :, a:b, :s], logits, -0.7 * jnp.finfo(jnp.float32).max), axis=-1)
    if f32_probs:
      outs.append(jnp.einsum("BNTS,BSNH->BTNH", p, v[:, :s].astype(jnp.float32)))
    else:
      outs.append(jnp.einsum("BNTS,BSNH->BTNH", p.astype(v.dtype), v[:, :s], preferred_element_type=jnp.float32))
    probs.append(p)
  out = jnp.concatenate(outs, axis=1)
  return out, (q, k, v, tuple(probs), out)


def _einsum_backward(f32_probs, causal, block, residuals, d_out):
  """The softmax's gradient written out, block by block: with P the probabilities and dP = dO Vᵀ,
  dS = P ∘ (dP − rowsum(P ∘ dP)) / √H, dQ = dS K, dK = dSᵀ Q, dV = Pᵀ dO (rowsum(P ∘ dP) = rowsum(dO ∘ O) when O = P V
  in float32)."""
  q, k, v, probs, out = residuals
  scale = 1 / math.sqrt(q.shape[-1])
  d_out = d_out.astype(jnp.float32)
  d_q, d_k, d_v = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for (a, b, s), p in zip(_blocks(q.shape[1], k.shape[1], causal, block), probs):
    d_o = d_out[:, a:b]
    d_v = d_v.at[:, :s].add(jnp.einsum("BNTS,BTNH->BSNH", p if f32_probs else p.astype(v.dtype), d_o))
    d_p = jnp.einsum("BTNH,BSNH->BNTS", d_o, v[:, :s].astype(jnp.float32))
    if f32_probs:
      row = jnp.einsum("BTNH,BTNH->BNT", d_o, out[:, a:b])[..., None]
    else:  # O was computed from rounded probabilities: take the row sum from P itself
      row = jnp.sum(p * d_p, axis=-1, keepdims=True)
    d_s = p * (d_p - row) * scale
    d_q.append(jnp.einsum("BNTS,BSNH->BTNH", d_s, k[:, :s].astype(jnp.float32)))
    d_k = d_k.at[:, :s].add(jnp.einsum("BNTS,BTNH->BSNH", d_s, q[:, a:b].astype(jnp.float32)))
  d_q = jnp.concatenate(d_q, axis=1)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_einsum_attention.defvjp(_einsum_forward, _einsum_backward)


def einsum_attention(q, k, v, mask, *, f32_probs: bool = True, causal: bool = False, block: int = EINSUM_BLOCK):
  """softmax(q kᵀ / √H + mask) v written out; q [B, T, N, H], k and v [B, S, K, H], mask bool [B, 1, T, S].

  Logits and softmax in float32. With `f32_probs` the probabilities stay float32 through the product with v
  (in bfloat16, their rounding is where two compilations of the same forward part ways: docs/ppo.md);
  otherwise they are rounded to v's dtype first. Returns [B, T, N, H] in v's dtype.

  `causal` says the mask lets no query see a later key (the full passes' mask; T = S): queries then go in
  blocks of `block`, each against the keys up to its own last position, which skips the masked upper blocks
  (about half the scores for long sequences). The gradient is written out (`_einsum_backward`) rather than
  traced through the softmax: on this project's 2-core CPU the two took the tiny LM step from 90 ms to 55-62 ms
  (benchmarks/RESULTS.md, 2026-12-02).
  """
  groups = q.shape[2] // k.shape[2]
  if groups > 1:  # each key/value head once per query head of its group: [B, S, N, H] (faster here than a 5-D layout)
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  return _einsum_attention(q, k, v, mask, f32_probs, causal, block).astype(v.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(groups: int, length: int, interpret: bool):
  """The splash kernel for one key/value head and its `groups` query heads over `length` (a multiple of 128)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  block = next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
  sizes = dict.fromkeys(("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv"), block)
  blocks = kernel.BlockSizes(**sizes, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  causal = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(groups)])
  with jax.ensure_compile_time_eval():  # its mask tables are constants, not values of the trace that asks first
    return kernel.make_splash_mqa(causal, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, interpret: bool | None = None):
  """Splash attention with the causal, same-segment mask; q [B, T, N, H], k and v [B, T, K, H], segment_ids
  [B, T]. Returns [B, T, N, H] in v's dtype. `interpret` (default: off TPU) runs the Pallas kernel interpreted."""
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  groups = n // kv_heads
  interpret = platform() != "tpu" if interpret is None else interpret
  length = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
  pad = [(0, 0), (0, length - t)]
  q = jnp.pad(q.reshape(b, t, kv_heads, groups, h) / math.sqrt(h), pad + [(0, 0)] * 3).astype(v.dtype)
  k, v = (jnp.pad(x, pad + [(0, 0)] * 2) for x in (k, v))
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), pad)
  kernel = _splash_kernel(groups, length, interpret)

  def one_head(q, k, v, segments):  # q [G, T, H], k and v [T, H], segments [T]
    return kernel(q, k, v, segment_ids=SegmentIds(q=segments, kv=segments))

  def local(q, k, v, segments):  # the kernel, vmapped over the batch and the key/value heads of one shard
    # Mapped axes lead, so the kernel's blocks keep (T, H) as the last two dimensions that TPU tiles need.
    per_head = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(q.transpose(0, 2, 3, 1, 4), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), segments)
    return out.transpose(0, 3, 1, 2, 4)  # [B, K, G, T, H] -> [B, T, K, G, H]

  active = sharding.active_mesh_and_rules()
  if active is not None:
    mesh, rules = active
    batch, _, heads, _ = sharding.logical_to_spec(("batch", None, "kv_heads", None), rules, k.shape, mesh)
    P = jax.sharding.PartitionSpec
    local = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(batch, None, heads, None, None), P(batch, None, heads, None), P(batch, None, heads, None), P(batch)),
      out_specs=P(batch, None, heads, None, None),
      check_vma=False,
    )
  out = local(q, k, v, segment_ids)
  return out[:, :t].reshape(b, t, n, h).astype(v.dtype)


def attend(q, k, v, mask, segment_ids, *, impl: str, f32_probs: bool):
  """Attention by the resolved `impl` (see `resolve`). mask bool [B, 1, T, S]; segment_ids [B, T] or None
  (cached passes, which have no splash path)."""
  if impl == "einsum":  # a full pass (it has segment ids) has the causal mask
    return einsum_attention(q, k, v, mask, f32_probs=f32_probs, causal=segment_ids is not None)
  if impl == "splash":
    if segment_ids is None:
      raise ValueError("splash attention needs the segment ids of a full pass")
    return splash_attention(q, k, v, segment_ids)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
