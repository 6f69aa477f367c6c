"""Teacher-forced scoring of given responses: per-token log-probs (policy, reference), hidden states, and
values and final-token scores of scalar-head models (critic, reward model).

The layout, shared with `generation.py`. For prompt tokens [B, P] with segment ids (1 real, 0 pad) and a
response [B, R] with its mask, the sequence the model sees is `prompt ‖ response` with segment ids
`prompt_segment_ids ‖ response_mask`, and position ids `cumsum(mask) - mask` (docs/paper.md §8 rows 2-4).
Prompts are left-padded, responses right-padded (the `generation.Rollout` layout). Logits are computed only
at the R positions that predict response tokens (P - 1 + t predicts token t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from instructgpt_jax import losses, sharding
from instructgpt_jax.models.heads import final_token_value

BT = ("batch", "length")


def _prompt_and_response(prompt_tokens, prompt_segment_ids, response_tokens, response_mask):
  """The sequence the model sees: tokens and segment ids [B, P + R] (module docstring)."""
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
  segment_ids = jnp.concatenate([prompt_segment_ids, response_mask], axis=1).astype(jnp.int32)
  return sharding.constrain(tokens, BT), sharding.constrain(segment_ids, BT)


def response_hidden(graphdef, params, prompt_tokens, prompt_segment_ids, response_tokens, response_mask):
  """(model, hidden [B, R, D]) at the R positions that predict the response tokens (P - 1 + t predicts t).

  A value read from hidden[:, t] sees the state before response token t, as `response_values` does.
  """
  model = nnx.merge(graphdef, params)
  tokens, segment_ids = _prompt_and_response(prompt_tokens, prompt_segment_ids, response_tokens, response_mask)
  prompt_length = prompt_tokens.shape[1]
  return model, model.hidden_states(tokens, segment_ids=segment_ids)[:, prompt_length - 1 : -1]


def logprobs_from_hidden(model, hidden, response_tokens, response_mask, *, temperature=1.0, with_entropy=False):
  """The response's per-token log-probs (and entropies) from `response_hidden`'s output; 0 where masked."""
  logits = model.logits(hidden)
  logprobs = losses.token_logprobs(logits, response_tokens, temperature=temperature)
  logprobs = sharding.constrain(jnp.where(response_mask > 0, logprobs, 0.0), BT)
  if not with_entropy:
    return logprobs
  entropy = jnp.where(response_mask > 0, losses.token_entropy(logits, temperature=temperature), 0.0)
  return logprobs, sharding.constrain(entropy, BT)


def response_logprobs(
  graphdef,
  params,
  prompt_tokens: jax.Array,
  prompt_segment_ids: jax.Array,
  response_tokens: jax.Array,
  response_mask: jax.Array,
  *,
  temperature: float = 1.0,
  with_entropy: bool = False,
):
  """Per-token log softmax(z/T)[y_t] of a given response under any language model (policy, reference).

  prompt_*: [B, P] left-padded; response_*: [B, R] right-padded (the Rollout layout). Logits are computed
  only at the R positions that predict response tokens. Returns [B, R] float32, 0 where the mask is 0;
  with `with_entropy`, also the entropy [B, R] of each of those temperature-scaled distributions.
  """
  model, hidden = response_hidden(graphdef, params, prompt_tokens, prompt_segment_ids, response_tokens, response_mask)
  return logprobs_from_hidden(
    model, hidden, response_tokens, response_mask, temperature=temperature, with_entropy=with_entropy
  )


def response_values(
  graphdef,
  params,
  prompt_tokens: jax.Array,
  prompt_segment_ids: jax.Array,
  response_tokens: jax.Array,
  response_mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Per-token values and the final-token score of a response under a scalar-head model (value, reward).

  prompt_*: [B, P] left-padded; response_*: [B, R] right-padded. Returns (values [B, R], scores [B]),
  float32: values[t] is read at the state before response token t (position P - 1 + t, docs/paper.md §5.4 step 5),
  0 where the mask is 0; scores[b] is read at the last real response token (EOS when the row ended
  there, docs/paper.md §8 row 7), 0 for an empty response.
  """
  model = nnx.merge(graphdef, params)
  tokens, segment_ids = _prompt_and_response(prompt_tokens, prompt_segment_ids, response_tokens, response_mask)
  prompt_length = prompt_tokens.shape[1]
  scalars, _ = model(tokens, segment_ids=segment_ids)
  values = jnp.where(response_mask > 0, scalars[:, prompt_length - 1 : -1], 0.0)
  scores = final_token_value(scalars[:, prompt_length:], response_mask)
  return sharding.constrain(values, BT), sharding.constrain(scores, ("batch",))


def sequence_logprobs(graphdef, params, tokens, segment_ids, prompt_lengths, response_lengths) -> jax.Array:
  """Σ_t log π(y_t | x, y_<t) over each response's tokens, for rows `prompt ‖ response` right-padded (the
  comparison layout of data/batching.comparison_element: every row of a prompt starts with its prompt).

  tokens, segment_ids: [..., L]; prompt_lengths: broadcastable to [...] (e.g. [B, 1] for [B, K] rows);
  response_lengths: [...] (0 for an empty slot, which gets 0). Returns [...] float32.
  """
  shape, length = tokens.shape[:-1], tokens.shape[-1]
  flat_tokens = tokens.reshape(-1, length)
  logits, _ = nnx.merge(graphdef, params)(flat_tokens, segment_ids=segment_ids.reshape(-1, length))
  logprobs = losses.token_logprobs(logits[:, :-1], flat_tokens[:, 1:])  # column j predicts token j + 1
  start = jnp.broadcast_to(prompt_lengths, shape).reshape(-1, 1)
  end = start + response_lengths.reshape(-1, 1)
  target = jnp.arange(1, length)[None, :]
  in_response = (target >= start) & (target < end)
  return jnp.sum(jnp.where(in_response, logprobs, 0.0), axis=1).reshape(shape)
