"""KV-cached generation, jit-compiled with static shapes (PPO rollouts, evaluation, the `sample` command).

Prompts are left-padded to a prompt-length bucket, so every row's next token goes to the same cache slot.
`generate` runs one prefill over the prompts (`first_tokens`), then a `lax.while_loop` over `sample_step`,
which feeds each row's previous token and draws the next one into a fixed [B, R] buffer (R a
response-length bucket) against an explicit KVCache (models/kv_cache.py). A run therefore compiles one
program per (prompt bucket, response bucket) pair, whatever the actual prompt and response lengths. The
streaming command line (`instructgpt_jax.sample`) jits the same two functions and calls them from Python.

The sequence layout (prompt ‖ response, segment ids, positions) is the one `scoring.py` describes and
scores: a row stops after emitting EOS (which is part of the response, mask 1) or at its length limit, and
from then on holds `pad_id` with mask 0 and log-prob 0. A row whose prompt is all padding (a filler row of
a global batch) produces no response at all.

Log-prob semantics (docs/paper.md §8 row 13). The sampler returns, for each sampled token y_t,

    log softmax(z_t / T)[y_t]

the log-probability under the temperature-scaled **full** distribution, which is exactly what the
teacher-forced pass (`scoring.response_logprobs`, with the same T) recomputes, so PPO's first ratio is 1 and
the sampler-vs-scorer gap it logs measures only numerical drift. With top-k or top-p the tokens are drawn
from the truncated, renormalized distribution instead, so those log-probs are not the log-probs of the
proposal that drew the tokens; the InstructGPT setting (T = 1, no truncation) has the two coincide. Greedy
decoding takes the argmax and reports its log-prob under the same scaled distribution.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from instructgpt_jax import errors, losses, sharding
from instructgpt_jax.models.kv_cache import KVCache

BT = ("batch", "length")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How tokens are drawn. Frozen and hashable: a static argument of the jitted sampler.

  eos_id: ends a row's response (and is part of it). pad_id: fills a row after it ended (any int; it is
  never looked up). temperature: T > 0, divides the logits before everything else. top_k: keep the k most
  likely tokens (0 = off; tokens tied with the k-th are kept too). top_p: keep the smallest set of most
  likely tokens whose probability reaches p, after top-k (1 = off). greedy: take the argmax instead.
  """

  eos_id: int
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if self.eos_id == self.pad_id:
      raise errors.ConfigError(f"sampling: pad_id must differ from eos_id ({self.eos_id}), docs/paper.md §8 row 2")
    if not self.temperature > 0:
      raise errors.ConfigError(f"sampling.temperature: {self.temperature} must be > 0 (use greedy=True for argmax)")
    if self.top_k < 0:
      raise errors.ConfigError(f"sampling.top_k: {self.top_k} must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise errors.ConfigError(f"sampling.top_p: {self.top_p} must be in (0, 1] (1 = off)")


class Rollout(NamedTuple):
  """What `generate` returns, all [B, R] (R = the response bucket).

  tokens: int32 response tokens, pad_id after the row ended. mask: int32, 1 on the real response tokens
  (EOS included). logprobs: float32 log softmax(z/T) of each real token (module docstring), 0 elsewhere.
  """

  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array


# ------------------------------------------------------------------------------------------ buckets


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length. Raises a one-line error when none is long enough."""
  fitting = [b for b in sorted(buckets) if b >= length]
  if not fitting:
    raise errors.ConfigError(f"sampling: length {length} exceeds the largest bucket {max(buckets)}")
  return fitting[0]


def left_pad(
  prompts: Sequence[Sequence[int]], *, buckets: Sequence[int], pad_id: int, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to the bucket of the longest: (tokens, segment_ids), both int32 [B, P].

  With `batch_size`, rows of pure padding are appended up to it (they produce empty responses), so the
  batch dimension is static too.
  """
  batch = len(prompts) if batch_size is None else batch_size
  if batch < len(prompts):
    raise errors.ConfigError(f"sampling: {len(prompts)} prompts do not fit batch_size {batch}")
  width = pick_bucket(max((len(p) for p in prompts), default=1), buckets)
  tokens = np.full((batch, width), pad_id, np.int32)
  segment_ids = np.zeros((batch, width), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, width - len(prompt) :] = prompt
      segment_ids[row, width - len(prompt) :] = 1
  return tokens, segment_ids


# ------------------------------------------------------------------------------------------ drawing one token


def truncate_logits(scaled_logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets every logit outside the top-k, then outside the top-p nucleus, to -inf. [..., V] -> [..., V].

  top-p keeps token j (in descending order) while the probability mass before it, under the distribution
  left by top-k, is below p; so the most likely token is always kept and ties at the cut are kept.
  """
  if top_k == 0 and top_p >= 1.0:
    return scaled_logits
  if top_k:
    descending = jax.lax.top_k(scaled_logits, min(top_k, scaled_logits.shape[-1]))[0]
  else:
    descending = -jnp.sort(-scaled_logits, axis=-1)
  threshold = descending[..., -1:]
  if top_p < 1.0:
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled_logits >= threshold, scaled_logits, -jnp.inf)


def sample_tokens(logits: jax.Array, rng: jax.Array, settings: SamplingSettings) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row. logits [B, V] -> (tokens [B] int32, log-probs [B] float32, module docstring)."""
  scaled = logits.astype(jnp.float32) / settings.temperature
  if settings.greedy:
    tokens = jnp.argmax(scaled, axis=-1)
  else:
    tokens = jax.random.categorical(rng, truncate_logits(scaled, top_k=settings.top_k, top_p=settings.top_p))
  tokens = tokens.astype(jnp.int32)
  # The same function the teacher-forced pass uses, so the two agree to rounding.
  logprobs = losses.token_logprobs(logits[:, None], tokens[:, None], temperature=settings.temperature)[:, 0]
  return tokens, logprobs


# ------------------------------------------------------------------------------------------ generation


def prefill(model, prompt_tokens: jax.Array, prompt_segment_ids: jax.Array, *, cache_length: int):
  """The prompt pass. model: a merged Transformer; prompts [B, P]. -> (next-token logits [B, V], KVCache)."""
  hidden, cache = model.prefill(prompt_tokens, segment_ids=prompt_segment_ids, cache_length=cache_length)
  return model.logits(hidden[:, -1:])[:, 0], cache


def first_tokens(model, prompt_tokens, prompt_segment_ids, rng, *, settings: SamplingSettings, cache_length: int):
  """The prefill and response token 0, drawn with fold_in(rng, 0). -> (tokens [B], log-probs [B], KVCache)."""
  logits, cache = prefill(model, prompt_tokens, prompt_segment_ids, cache_length=cache_length)
  tokens, logprobs = sample_tokens(logits, jax.random.fold_in(rng, 0), settings)
  return tokens, logprobs, cache


def decode_step(model, tokens: jax.Array, segment_ids: jax.Array, cache: KVCache):
  """One token per row at slot `cache.end`. tokens, segment_ids [B] -> (next-token logits [B, V], cache)."""
  hidden, cache = model.decode(tokens[:, None], cache, segment_ids=segment_ids[:, None])
  return model.logits(hidden)[:, 0], cache


def sample_step(model, tokens, segment_ids, cache: KVCache, rng, step, *, settings: SamplingSettings):
  """Feeds each row's previous token (`decode_step`) and draws response token `step` with fold_in(rng, step).
  tokens, segment_ids [B] -> (tokens [B], log-probs [B], cache). The body of `generate`'s loop and the
  streaming command's step."""
  logits, cache = decode_step(model, tokens, segment_ids, cache)
  tokens, logprobs = sample_tokens(logits, jax.random.fold_in(rng, step), settings)
  return tokens, logprobs, cache


def cache_length_for(prompt_length: int, max_new_tokens: int) -> int:
  """KV-cache slots for a prompt bucket and a response bucket: P + R − 1, because the last generated token is
  never fed back. Also the most positions a sampled sequence uses."""
  return prompt_length + max_new_tokens - 1


def generate(
  graphdef,
  params,
  prompt_tokens: jax.Array,
  prompt_segment_ids: jax.Array,
  rng: jax.Array,
  *,
  settings: SamplingSettings,
  max_new_tokens: int,
  length_limit: jax.Array | None = None,
) -> Rollout:
  """Samples a response for every left-padded prompt. Trace under jit with `settings`, `max_new_tokens` static.

  Args:
    graphdef, params: a language model (`models.init(cfg, key)`).
    prompt_tokens, prompt_segment_ids: [B, P] int, left-padded (`left_pad`); segment id 1 real, 0 pad.
    rng: a PRNG key; step t draws with fold_in(rng, t) (no RNG state: the same key and batch give the same
      rollout).
    settings: SamplingSettings.
    max_new_tokens: R, the response buffer (a response-length bucket).
    length_limit: optional int [B] or scalar: a row also stops after this many tokens (<= R), so a run can
      ask for any length up to the bucket without compiling again.

  Returns:
    Rollout of [B, R] arrays.
  """
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  batch, prompt_length = prompt_tokens.shape
  cache_length = cache_length_for(prompt_length, max_new_tokens)
  if not cfg.positions_fit(cache_length):
    raise errors.ConfigError(
      f"sampling: prompt bucket {prompt_length} + response bucket {max_new_tokens} exceeds the learned "
      f"positions (max_len {cfg.max_len})"
    )
  prompt_tokens = sharding.constrain(prompt_tokens, BT)
  prompt_segment_ids = sharding.constrain(prompt_segment_ids, BT)
  limit = jnp.broadcast_to(max_new_tokens if length_limit is None else length_limit, (batch,))

  first, first_logprob, cache = first_tokens(
    model, prompt_tokens, prompt_segment_ids, rng, settings=settings, cache_length=cache_length
  )
  active = jnp.any(prompt_segment_ids > 0, axis=-1) & (limit > 0)

  empty = Rollout(
    tokens=jnp.full((batch, max_new_tokens), settings.pad_id, jnp.int32),
    mask=jnp.zeros((batch, max_new_tokens), jnp.int32),
    logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
  )
  rollout = _write_column(empty, 0, first, first_logprob, active, settings.pad_id)
  # A row keeps going after step t if its token t was real, was not EOS, and t + 1 is under its limit.
  running = active & (first != settings.eos_id) & (limit > 1)

  def keep_going(carry):
    step, _, _, running = carry
    return (step < max_new_tokens) & jnp.any(running)

  def step_fn(carry):
    step, cache, rollout, running = carry
    previous = jax.lax.dynamic_index_in_dim(rollout.tokens, step - 1, axis=1, keepdims=False)
    previous_mask = jax.lax.dynamic_index_in_dim(rollout.mask, step - 1, axis=1, keepdims=False)
    tokens, logprobs, cache = sample_step(model, previous, previous_mask, cache, rng, step, settings=settings)
    rollout = _write_column(rollout, step, tokens, logprobs, running, settings.pad_id)
    running = running & (tokens != settings.eos_id) & (step + 1 < limit)
    return step + 1, cache, rollout, running

  _, _, rollout, _ = jax.lax.while_loop(keep_going, step_fn, (jnp.int32(1), cache, rollout, running))
  return rollout


def _write_column(buffers: Rollout, step, tokens, logprobs, real, pad_id: int) -> Rollout:
  """Stores column `step` of the response buffers; rows not `real` get pad, mask 0, log-prob 0."""
  columns = (jnp.where(real, tokens, pad_id), real.astype(jnp.int32), jnp.where(real, logprobs, 0.0))
  return Rollout(
    *(
      sharding.constrain(jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None], step, axis=1), BT)
      for buffer, column in zip(buffers, columns)
    )
  )


def sample_batches(
  sampler: Sampler,
  params,
  prompts: Sequence[np.ndarray],
  *,
  batch_size: int,
  buckets: Sequence[int],
  pad_id: int,
  max_new_tokens: int,
  key_of: Callable[[int], jax.Array],
):
  """One response per prompt, `batch_size` prompts per call (the last call padded to the same shape, so one
  program serves all). Yields (prompts of the call, prompt tokens, prompt segment ids, Rollout); the call
  that starts at prompt `start` draws with `key_of(start)`."""
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    tokens, segment_ids = left_pad(chunk, buckets=buckets, pad_id=pad_id, batch_size=batch_size)
    rollout = sampler(
      params, jnp.asarray(tokens), jnp.asarray(segment_ids), key_of(start), max_new_tokens=max_new_tokens
    )
    yield chunk, tokens, segment_ids, rollout


def _in_layout(fn, param_shardings):
  """fn(params, ...) with its params resharded into `param_shardings` first (inside the same program)."""

  def run(params, *args, **kwargs):
    return fn(jax.lax.with_sharding_constraint(params, param_shardings), *args, **kwargs)

  return run


class Sampler:
  """Jitted `generate` for one model structure, with response-length buckets.

  A call compiles once per (prompt bucket, response bucket); asking for `max_new_tokens` between two
  buckets runs the larger bucket with a per-row length limit, not a new program.
  """

  def __init__(
    self,
    graphdef,
    settings: SamplingSettings,
    *,
    response_buckets: Sequence[int],
    mesh: Mesh | None = None,
    rules=None,
    param_shardings=None,
  ):
    """`param_shardings`: a layout to reshard the params into once, at the start of each call (its `rules`
    then lay out the activations and the KV cache); the resharded copy lives only inside the call."""
    self.settings = settings
    self.response_buckets = tuple(sorted(response_buckets))
    run = functools.partial(generate, graphdef, settings=settings)
    if param_shardings is not None:
      run = _in_layout(run, param_shardings)
    self.jitted = sharding.jit_on_mesh(run, mesh=mesh, rules=rules, static_argnames=("max_new_tokens",))

  def __call__(self, params, prompt_tokens, prompt_segment_ids, rng, *, max_new_tokens: int) -> Rollout:
    """prompts [B, P] left-padded (a prompt bucket) -> Rollout of [B, bucket(max_new_tokens)] arrays."""
    bucket = pick_bucket(max_new_tokens, self.response_buckets)
    # A NumPy scalar is a traced argument: its value changes no compiled program.
    limit = np.int32(max_new_tokens)
    return self.jitted(params, prompt_tokens, prompt_segment_ids, rng, max_new_tokens=bucket, length_limit=limit)
