"""The supervised stages' steps: the language-model step shared by pretraining and SFT (masked next-token
loss, exact accumulation) and the reward model's ranking step.

Batches hold `inputs`, `targets`, `mask` [B, L] and optionally `segment_ids`, `positions` [B, L] (padding
and packing) and `kind` [B] (SFT with a pretraining mix: 0 demonstration, 1 pretraining row).
"""

from __future__ import annotations

import jax.numpy as jnp

from instructgpt_jax import losses, models, train_state
from instructgpt_jax.library import loop


def forward_logits(graphdef, params, batch, dropout_rng=None):
  logits, _ = models.apply(
    graphdef,
    params,
    batch["inputs"],
    positions=batch.get("positions"),
    segment_ids=batch.get("segment_ids"),
    dropout_rng=dropout_rng,
  )
  return logits


def loss_sums(graphdef, params, batch, dropout_rng=None):
  """(Σ NLL over the masked tokens, sums): token count, correct argmax predictions, and per-kind sums."""
  logits = forward_logits(graphdef, params, batch, dropout_rng)
  nll_sum, count = losses.lm_loss_sum(logits, batch["targets"], batch["mask"])
  correct = jnp.sum(jnp.where(batch["mask"] > 0, jnp.argmax(logits, -1) == batch["targets"], False))
  sums = {"count": count, "correct": correct.astype(jnp.float32)}
  if "kind" in batch:  # the same log-softmax as above (XLA computes it once), split by row kind
    is_pretraining = (batch["kind"] == 1)[:, None]
    ptx_sum, ptx_count = losses.lm_loss_sum(logits, batch["targets"], batch["mask"] * is_pretraining)
    sums.update(ptx_nll=ptx_sum, ptx_count=ptx_count, demo_nll=nll_sum - ptx_sum, demo_count=count - ptx_count)
  return nll_sum, sums


def make_train_step(graphdef, model_cfg: models.ModelConfig, tx, lr_schedule, *, microbatches: int = 1):
  """train_step(state, batch) -> (state, metrics) for train_state.jit_step."""
  use_dropout = model_cfg.uses_dropout

  def summarize(sums, batch):
    metrics = {"accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0)}
    if "ptx_count" in sums:
      metrics["demo_loss"] = sums["demo_nll"] / jnp.maximum(sums["demo_count"], 1.0)
      metrics["ptx_loss"] = sums["ptx_nll"] / jnp.maximum(sums["ptx_count"], 1.0)
      metrics["ptx_fraction"] = jnp.mean(batch["kind"] == 1)  # of the rows
      metrics["ptx_token_fraction"] = sums["ptx_count"] / jnp.maximum(sums["count"], 1.0)  # of the loss tokens
    return metrics

  return train_state.sums_step(
    lambda p, b, r: loss_sums(graphdef, p, b, r if use_dropout else None), tx, lr_schedule, microbatches, summarize
  )


def eval_loss(eval_fn, params, batches, mesh, rules) -> float | None:
  """Σ NLL / Σ tokens over host-local `batches` with `make_eval_step`'s jitted function: the same number for
  any batching. None when the batches hold no token."""
  total = count = 0.0
  for batch in batches:
    loss_sum, n = eval_fn(params, loop.to_global(batch, mesh, rules))
    total, count = total + float(loss_sum), count + float(n)
  return total / count if count else None


def make_eval_step(graphdef):
  """eval_step(params, batch) -> (Σ NLL, token count): sums, so evaluation over batches is exact."""

  def eval_step(params, batch):
    return losses.lm_loss_sum(forward_logits(graphdef, params, batch), batch["targets"], batch["mask"])

  return eval_step


def rm_rewards(graphdef, params, tokens, segment_ids):
  """Raw rewards [...] of sequences tokens, segment_ids [..., L]: the scalar at each final real token."""
  shape = tokens.shape
  values, _ = models.apply(
    graphdef, params, tokens.reshape(-1, shape[-1]), segment_ids=segment_ids.reshape(-1, shape[-1])
  )
  return models.final_token_value(values, segment_ids.reshape(-1, shape[-1])).reshape(shape[:-1])


def make_rm_train_step(graphdef, tx, lr_schedule, microbatches: int, normalizer: str):
  """The RM train step (state, batch) -> (state, metrics): Eq. 1 over each prompt's K responses (every
  C(K,2) pair once), exact over `microbatches`; the step stages/rm.py runs and `aot` compiles."""

  def loss_sums(params, batch, _rng):
    rewards = rm_rewards(graphdef, params, batch["tokens"], batch["segment_ids"])  # [B, K]
    loss, stats = losses.ranking_loss(rewards, batch["ranks"], normalizer=normalizer)
    # ranking_loss is a mean over the prompts that have pairs; sums make micro-batching exact.
    return loss * stats["num_prompts"], {
      "count": stats["num_prompts"],
      "pairs": stats["num_pairs"],
      "correct": stats["accuracy"] * stats["num_pairs"],
    }

  def summarize(sums, _batch):
    return {"accuracy": sums["correct"] / jnp.maximum(sums["pairs"], 1.0), "pairs_per_batch": sums["pairs"]}

  return train_state.sums_step(loss_sums, tx, lr_schedule, microbatches, summarize)
