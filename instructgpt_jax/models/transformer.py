"""A decoder-only Transformer in Flax NNX for two families, chosen by `ModelConfig.family`, whose traits
(models/sizes.py ARCHITECTURES: `cfg.learned_positions`, `cfg.rope`, `cfg.norm`, `cfg.mlp`, `cfg.biases`) are
what this module reads.

* "gpt" (GPT-2 / GPT-3): learned position embeddings, pre-LayerNorm, GELU MLP, biases everywhere.
* "llama": rotary position embeddings, RMSNorm, SwiGLU MLP, grouped-query attention, no biases (except
  query/key/value biases with `qkv_bias`, as in Qwen2). Options: per-head RMSNorm of queries and keys
  (`qk_norm`, Qwen3) and Llama 3.1's RoPE frequency scaling (`rope_scaling="llama3"`).

The modules are used functionally: build once, `graphdef, state = nnx.split(model)`, and every jitted
function takes the parameter state as a plain pytree and calls `nnx.merge` inside (see `models/__init__.py`).
Dropout takes an explicit PRNG key; there are no RNG streams and no mutable state in a forward pass.

Layers are always stored stacked, with a leading `layers` axis, whether they run under `lax.scan`
(`scan_layers=True`: one compiled layer body, fast compiles for deep models) or unrolled. A checkpoint
therefore loads into either mode.

Padding: `segment_ids` is 0 at padding and a positive id per packed example elsewhere. A token attends
only to earlier (or the same) positions of its own segment (padding to earlier padding, so no row is empty;
padding rows are never read). Attention is computed by the implementation `attention_impl` names
(models/attention.py). Position ids default to the padding-aware
`cumsum(mask) - mask` (docs/paper.md §8.2), so left padding does not change a sequence's logits.

Low-rank adapters (`model.lora`, models/lora.py): with rank > 0 each targeted projection of a layer carries
LoRAParams A and B beside its kernel, built in the layers' vmap (so stacked and named like the kernel), and every
projection is called through `_projection`, which adds (alpha/r)·dropout(x)·A·B: the full pass, `hidden_states`,
`prefill` and `decode` all see them. Embeddings, norms and the unembedding are never adapted.

Incremental decoding (`prefill`, then `decode` one step at a time) runs the same layers against an explicit
KVCache (models/kv_cache.py) and reproduces the full forward pass's hidden states under the same padding
convention: the cache slots are the sequence's positions, and the mask and position ids are built from
the cached segment ids exactly as `attention_mask` and `positions_from_mask` build them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from instructgpt_jax.models import attention, lora
from instructgpt_jax.models.kv_cache import KV_CACHE_AXES, KVCache, empty_cache
from instructgpt_jax.models.sizes import ModelConfig
from instructgpt_jax.sharding import LOGICAL_AXES_KEY, constrain

# Activation layouts, by logical axis name.
BTD = ("batch", "length", "embed")
BTNH = ("batch", "length", "heads", "kv")
BTKH = ("batch", "length", "kv_heads", "kv")


def _axes(*names):
  return {LOGICAL_AXES_KEY: names}


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids that skip padding: exclusive cumulative sum of the mask. mask [B, T] -> [B, T] int32.

  Example (docs/paper.md §8.2): mask [1, 0, 0, 1, 1, 1] -> positions [0, 1, 1, 1, 2, 3].
  """
  mask = mask.astype(jnp.int32)
  return jnp.cumsum(mask, axis=-1) - mask


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal, same-segment mask. segment_ids [B, T] (0 = padding) -> bool [B, 1, T, T].

  A real token sees the real tokens of its own segment up to itself; a padding row sees earlier padding
  (never nothing, which a fused kernel may turn into NaN; splash attention builds this same mask), and
  padding rows are never read.
  """
  length = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same_segment)[:, None]


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """The RoPE inverse frequencies [H/2] float32: f_i = theta^(-2i/H), i < H/2, then the config's scaling.

  Llama 3.1's scaling ("llama3"; factor s, low/high frequency factors a < b, pretraining context C) acts on
  the wavelength w_i = 2π / f_i: short wavelengths (w_i < C/b) are kept, long ones (w_i > C/a) become
  f_i / s, and between them f_i is interpolated, with g = (C / w_i - a) / (b - a), as (1 - g) · f_i / s + g · f_i.
  Computed in float32 (once per attention call, for q and k), the scaling's steps in the order transformers
  takes them, so both round alike. Without scaling this is the plain RoPE's expression, bit for bit.
  """
  half = cfg.head_dim // 2
  inv_freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / cfg.head_dim)
  if cfg.rope_scaling is None:
    return inv_freq
  factor, low, high, context = (
    cfg.rope_factor,
    cfg.rope_low_freq_factor,
    cfg.rope_high_freq_factor,
    cfg.rope_original_max_len,
  )
  wavelength = 2 * math.pi / inv_freq
  long = wavelength > context / low
  short = wavelength < context / high
  scaled = jnp.where(long, inv_freq / factor, inv_freq)
  smooth = (context / wavelength - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  return jnp.where(~short & ~long, smoothed, scaled)


def apply_rope(
  x: jax.Array, positions: jax.Array, theta: float | None = None, *, inv_freq: jax.Array | None = None
) -> jax.Array:
  """Rotary embedding (Su et al. 2021), half-split layout as in Llama's reference code.

  x: [B, T, N, H]; positions: [B, T]. The pair (x_i, x_{i+H/2}) is rotated by angle position · f_i, with
  f_i = theta^(-2i/H), or `inv_freq` [H/2] when given (`rope_frequencies`). Computed in float32.
  """
  half = x.shape[-1] // 2
  if inv_freq is None:
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _precise(cfg: ModelConfig, flag: bool) -> bool:
  """Whether a float32 island applies: the flag is set and compute is not already float32."""
  return flag and jnp.dtype(cfg.dtype) != jnp.float32


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `rng` is None (evaluation, RM, PPO)."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _projection(cfg: ModelConfig, projection: nnx.Module, x: jax.Array, lora_rng: jax.Array | None = None):
  """projection(x), plus the LoRA term (alpha/r)·dropout(x)·A·B where the projection carries adapters
  (models/lora.py); every projection of a layer is called through here, in every entry point."""
  y = projection(x)
  if not lora.has_adapters(projection):
    return y
  x = dropout(x, cfg.lora.dropout, lora_rng)
  return y + lora.update(x, projection.lora_a[...], projection.lora_b[...], cfg.lora.scale, y.dtype)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs, *, per_head: bool = False, dtype: str | None = None) -> nnx.Module:
  """The family's norm over d_model; `per_head`: an RMSNorm over each head's H features (Qwen3's q/k norms).
  `dtype`: its output dtype when not the compute dtype."""
  axis = "kv" if per_head else "embed"
  kwargs = dict(
    epsilon=cfg.norm_eps,
    dtype=dtype or cfg.dtype,
    param_dtype=cfg.param_dtype,
    rngs=rngs,
    scale_metadata=_axes(axis),
  )
  if per_head:
    return nnx.RMSNorm(cfg.head_dim, **kwargs)
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, **kwargs)
  return nnx.LayerNorm(cfg.d_model, bias_metadata=_axes("embed"), **kwargs)


class Attention(nnx.Module):
  """Multi-head attention with grouped key/value heads (n_kv_heads <= n_heads).

  With `qk_norm` (Qwen3), each head's query and key is RMS-normalized over its H features, with one scale
  [H] shared by the heads, before RoPE: q <- q / rms(q) · g_q, k <- k / rms(k) · g_k.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    bias = cfg.biases
    qkv_bias = bias or cfg.qkv_bias
    init = nnx.initializers.normal(cfg.init_std)
    # GPT-2's modified initialization: residual output projections scaled by 1/sqrt(2 · n_layers).
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def proj(heads, head_axis):
      return nnx.Einsum(
        "BTD,DNH->BTNH",
        (d, heads, h),
        (heads, h) if qkv_bias else None,
        kernel_init=init,
        kernel_metadata=_axes("embed", head_axis, "kv"),
        bias_metadata=_axes(head_axis, "kv"),
        **common,
      )

    self.query = proj(n, "heads")
    self.key = proj(k, "kv_heads")
    self.value = proj(k, "kv_heads")
    if cfg.qk_norm:
      self.query_norm = _norm(cfg, rngs, per_head=True)
      self.key_norm = _norm(cfg, rngs, per_head=True)
    self.out = nnx.Einsum(
      "BTNH,NHD->BTD",
      (n, h, d),
      (d,) if bias else None,
      kernel_init=out_init,
      kernel_metadata=_axes("heads", "kv", "embed"),
      bias_metadata=_axes("embed"),
      **common,
    )

  def _project(self, x: jax.Array, positions: jax.Array, lora_rngs=(None, None, None)):
    """x [B, T, D], positions [B, T] -> q [B, T, N, H], k and v [B, T, K, H]; q/k norms and RoPE (llama).

    `__call__` and `decode` both project here, so the cached decode path computes what the full pass does.
    lora_rngs: the adapter dropout keys of the query, key and value projections (or Nones).
    """
    q = constrain(_projection(self.cfg, self.query, x, lora_rngs[0]), BTNH)
    k = constrain(_projection(self.cfg, self.key, x, lora_rngs[1]), BTKH)
    v = constrain(_projection(self.cfg, self.value, x, lora_rngs[2]), BTKH)
    if self.cfg.qk_norm:
      q, k = constrain(self.query_norm(q), BTNH), constrain(self.key_norm(k), BTKH)
    if self.cfg.rope:
      inv_freq = rope_frequencies(self.cfg)  # once for q and k
      q = apply_rope(q, positions, inv_freq=inv_freq)
      k = apply_rope(k, positions, inv_freq=inv_freq)
    return q, k, v

  def __call__(self, x, positions, mask, segment_ids, lora_rng=None) -> jax.Array:
    """x [B, T, D], positions [B, T], mask bool [B, 1, T, T], segment_ids [B, T] -> [B, T, D].
    lora_rng: the key of the adapters' dropout (training), or None."""
    *qkv_rngs, out_rng = lora.dropout_keys(lora_rng, 4)
    q, k, v = self._project(x, positions, qkv_rngs)
    out = constrain(self._attend(q, k, v, mask, segment_ids, self._implementation()), BTNH)
    return _projection(self.cfg, self.out, out, out_rng)

  def _implementation(self) -> str:
    return attention.resolve(self.cfg.attention_impl, dtype=self.cfg.dtype, head_dim=self.cfg.head_dim)

  def _attend(self, q, k, v, mask, segment_ids, implementation):
    f32_probs = _precise(self.cfg, self.cfg.f32_attention_probs)
    return attention.attend(q, k, v, mask, segment_ids, impl=implementation, f32_probs=f32_probs)

  def decode(self, x, positions, mask, keys, values, layer, start):
    """Attention of T new tokens at cache slots start..start+T-1 over the cache of this layer.

    x [B, T, D]; positions [B, T]; mask bool [B, 1, T, W] over the first W cache slots; keys, values
    [L, B, K, S, H], the whole stacked cache; layer and start: int or int32 scalar.
    Returns (out [B, T, D], keys, values) with this layer's new keys and values written.
    """
    q, k, v = self._project(x, positions)

    def write(cache, new):  # new [B, T, K, H] -> slots start.. of layer `layer`
      new = jnp.swapaxes(new, 1, 2)[None].astype(cache.dtype)
      return constrain(jax.lax.dynamic_update_slice(cache, new, (layer, 0, 0, start, 0)), KV_CACHE_AXES)

    def read(cache):  # -> [B, W, K, H], the layout attention takes; XLA folds the transpose into the dots
      window = mask.shape[-1]
      return jnp.swapaxes(jax.lax.dynamic_index_in_dim(cache, layer, keepdims=False)[:, :, :window], 1, 2)

    keys, values = write(keys, k), write(values, v)
    # The cache's mask [B, 1, T, W] is explicit: splash (which builds its own) falls back to XLA's attention,
    # and so do cuDNN's single-token steps (a matrix-vector product per row, which a flash kernel does not speed up).
    implementation = self._implementation()
    if implementation == "splash" or (implementation == "cudnn" and x.shape[1] == 1):
      implementation = "xla"
    out = self._attend(q, read(keys), read(values), mask, None, implementation)
    return _projection(self.cfg, self.out, constrain(out, BTNH)), keys, values


class Mlp(nnx.Module):
  """GELU MLP (gpt) or SwiGLU (llama)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, ff = cfg.d_model, cfg.d_ff
    bias = cfg.biases
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    common = dict(use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    up = dict(kernel_init=init, kernel_metadata=_axes("embed", "mlp"), bias_metadata=_axes("mlp"), **common)
    self.up = nnx.Linear(d, ff, **up)
    if cfg.mlp == "swiglu":
      self.gate = nnx.Linear(d, ff, **up)
    self.down = nnx.Linear(
      ff, d, kernel_init=out_init, kernel_metadata=_axes("mlp", "embed"), bias_metadata=_axes("embed"), **common
    )

  def __call__(self, x: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] -> [B, T, D]. lora_rng: the key of the adapters' dropout (training), or None."""
    gate_rng, up_rng, down_rng = lora.dropout_keys(lora_rng, 3)
    up = _projection(self.cfg, self.up, x, up_rng)
    if self.cfg.mlp == "swiglu":
      hidden = jax.nn.silu(_projection(self.cfg, self.gate, x, gate_rng)) * up
    else:
      hidden = jax.nn.gelu(up, approximate=True)  # GPT-2's tanh approximation
    return _projection(self.cfg, self.down, constrain(hidden, ("batch", "length", "mlp")), down_rng)


class Block(nnx.Module):
  """Pre-norm residual block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    if cfg.lora_modules:  # last: the base parameters draw the keys they draw without adapters
      lora.add_adapters(self, cfg, rngs)

  def __call__(self, x, positions, mask, segment_ids, dropout_rng=None):
    attn_rng, mlp_rng = jax.random.split(dropout_rng) if dropout_rng is not None else (None, None)
    attn_lora_rng, mlp_lora_rng = lora.layer_dropout_keys(self.cfg, dropout_rng)
    attn_out = self.attn(self.attn_norm(x), positions, mask, segment_ids, attn_lora_rng)
    x = x + dropout(attn_out, self.cfg.resid_dropout, attn_rng)
    x = x + dropout(self.mlp(self.mlp_norm(x), mlp_lora_rng), self.cfg.resid_dropout, mlp_rng)
    return constrain(x, BTD)

  def decode(self, x, positions, mask, keys, values, layer, start):
    """The block against a KV cache (no dropout): see Attention.decode. Returns (x, keys, values)."""
    attn_out, keys, values = self.attn.decode(self.attn_norm(x), positions, mask, keys, values, layer, start)
    x = x + attn_out
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, BTD), keys, values


_REMAT_POLICIES = {
  "full": None,  # save nothing; recompute the whole layer in the backward pass
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """Token embedding, `n_layers` blocks, final norm, and (with `lm_head`) the unembedding.

  Call: tokens [B, T] int -> (logits [B, T, V] float32 or None, hidden [B, T, D]).
  Incremental decoding: `prefill` a prompt into a fresh KVCache, then `decode` new tokens against it;
  both return final-norm hidden states, and `logits` turns the ones a caller needs into logits.
  """

  def __init__(self, cfg: ModelConfig, *, lm_head: bool = True, rngs: nnx.Rngs):
    self.cfg = cfg
    self.lm_head = lm_head
    common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=nnx.initializers.normal(cfg.init_std),
      embedding_metadata=_axes("vocab", "embed"),
      **common,
    )
    if cfg.learned_positions:
      # GPT-2 initializes position embeddings with std 0.01.
      self.pos_embed = nnx.Embed(
        cfg.max_len,
        cfg.d_model,
        embedding_init=nnx.initializers.normal(0.01),
        embedding_metadata=_axes("pos", "embed"),
        **common,
      )

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", LOGICAL_AXES_KEY: "layers"})
    def make_layers(rngs):
      return Block(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = _norm(cfg, rngs, dtype="float32" if _precise(cfg, cfg.f32_logits) else None)
    if lm_head and not cfg.tied_embeddings:
      self.unembed = nnx.Linear(
        cfg.d_model,
        cfg.vocab_size,
        use_bias=False,
        kernel_init=nnx.initializers.normal(cfg.init_std),
        kernel_metadata=_axes("embed", "vocab"),
        **common,
      )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
  ):
    hidden = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, dropout_rng=dropout_rng)
    return (self.logits(hidden) if self.lm_head else None), hidden

  def hidden_states(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """The full forward pass up to the final norm: tokens [B, T] -> hidden [B, T, D].

    For callers that need logits at a few positions only (teacher-forced scoring of a response), which
    then cost [B, R, V] instead of [B, T, V].
    """
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
      positions = positions_from_mask(segment_ids > 0)
    x = self._embed(tokens, positions, segment_ids)
    x = self._run_layers(x, positions, segment_ids, dropout_rng)
    return self.final_norm(x)

  def prefill(self, tokens: jax.Array, *, segment_ids: jax.Array, cache_length: int):
    """Runs a left-padded prompt and caches its keys and values.

    tokens, segment_ids: [B, P] (segment id 1 on real tokens, 0 on padding). cache_length: S >= P slots.
    Returns (hidden [B, P, D], KVCache with `end` = P). hidden equals `hidden_states` of the same batch.
    """
    if cache_length < tokens.shape[1]:
      raise ValueError(f"prefill: cache_length {cache_length} is shorter than the prompt ({tokens.shape[1]})")
    cache = empty_cache(self.cfg, tokens.shape[0], cache_length)
    return self._extend(tokens, segment_ids, cache, start=0)

  def decode(self, tokens: jax.Array, cache: KVCache, *, segment_ids: jax.Array):
    """Runs T new tokens at cache slots end..end+T-1 (T = 1 for a decode step).

    tokens, segment_ids: [B, T] (segment id 0 for a row whose sequence has ended). Returns
    (hidden [B, T, D], the cache with these tokens written and `end` advanced by T).
    """
    return self._extend(tokens, segment_ids, cache, start=cache.end)

  def _extend(self, tokens, segment_ids, cache: KVCache, *, start):
    """Writes tokens [B, T] at slots start.. of the cache and returns their hidden states [B, T, D].

    A Python-int `start` (prefill) is static: attention then reads only the slots 0..start+T-1 written so
    far, so prefilling costs what the full forward pass costs. A traced `start` reads all S slots (the
    unwritten ones are masked out), which keeps one compiled decode step for every position.
    """
    new_tokens = tokens.shape[1]
    # Positions continue each row's count of real tokens, the cumsum(mask) - mask rule of the full pass.
    positions = cache.real_token_counts()[:, None] + positions_from_mask(segment_ids > 0)
    cached_segments = constrain(
      jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, start)), ("batch", "length")
    )
    window = start + new_tokens if isinstance(start, int) else cache.length
    key_segments = cached_segments[:, :window]
    causal = jnp.arange(window)[None, :] <= start + jnp.arange(new_tokens)[:, None]  # [T, W]
    same_segment = segment_ids[:, :, None] == key_segments[:, None, :]
    mask = (causal[None] & same_segment)[:, None]  # [B, 1, T, W], as `attention_mask` builds it

    x = self._embed(tokens, positions, segment_ids)
    x, keys, values = self._run_layers_cached(x, positions, mask, cache.keys, cache.values, start)
    cache = KVCache(keys=keys, values=values, segment_ids=cached_segments, end=cache.end + new_tokens)
    return self.final_norm(x), cache

  def _embed(self, tokens, positions, segment_ids):
    # Padding ids may lie outside the vocabulary (docs/paper.md §8 row 2); a real id keeps the lookup finite.
    tokens = jnp.where(segment_ids > 0, tokens, 0)
    x = self.embed(tokens)
    if self.cfg.learned_positions:
      x = x + self.pos_embed(positions)
    return constrain(x, BTD)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V]; with `f32_logits`, a float32 product of float32 operands."""
    if _precise(self.cfg, self.cfg.f32_logits):
      f32 = jnp.float32
      if self.cfg.tied_embeddings:
        out = jnp.einsum("...D,VD->...V", hidden.astype(f32), self.embed.embedding[...].astype(f32))
      else:
        out = jnp.einsum("...D,DV->...V", hidden.astype(f32), self.unembed.kernel[...].astype(f32))
    elif self.cfg.tied_embeddings:
      out = self.embed.attend(hidden)
    else:
      out = self.unembed(hidden)
    return constrain(out, ("batch", "length", "vocab")).astype(jnp.float32)

  def _run_layers(self, x, positions, segment_ids, dropout_rng):
    graphdef, stacked = nnx.split(self.layers)
    n = self.cfg.n_layers
    layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, n)
    mask = attention_mask(segment_ids)  # unused, and so never computed, under splash attention

    def layer(x, params, rng):
      return nnx.merge(graphdef, params)(x, positions, mask, segment_ids, rng)

    if self.cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
    if self.cfg.scan_layers:
      x, _ = jax.lax.scan(lambda h, xs: (layer(h, *xs), None), x, (stacked, layer_rngs))
      return x
    for i in range(n):
      params_i = jax.tree.map(lambda p: p[i], stacked)
      x = layer(x, params_i, None if layer_rngs is None else layer_rngs[i])
    return x

  def _run_layers_cached(self, x, positions, mask, keys, values, start):
    """The layer loop of `_extend`: each layer writes its slice of the stacked cache [L, B, K, S, H].

    Under scan the cache rides in the carry and layer i updates it at index i in place, so a step reads
    each layer's cache once and writes only the new slots (scanning over the cache as xs/ys would rewrite
    all of it every step).
    """
    graphdef, stacked = nnx.split(self.layers)

    def layer(x, keys, values, params, index):
      return nnx.merge(graphdef, params).decode(x, positions, mask, keys, values, index, start)

    if self.cfg.scan_layers:

      def body(carry, xs):
        return layer(*carry, *xs), None

      layer_indices = jnp.arange(self.cfg.n_layers, dtype=jnp.int32)
      (x, keys, values), _ = jax.lax.scan(body, (x, keys, values), (stacked, layer_indices))
      return x, keys, values
    for i in range(self.cfg.n_layers):
      x, keys, values = layer(x, keys, values, jax.tree.map(lambda p: p[i], stacked), i)
    return x, keys, values
