"""Judging a policy with a reward model: sample responses to prompts, score them (minus the RM's bias).

Used for SFT checkpoint selection by RM score (docs/paper.md §3.1) and for PPO's evaluations.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from instructgpt_jax import generation, models, scoring, sharding, train_state
from instructgpt_jax.data import tfds_builders
from instructgpt_jax.data.tokenizer import Tokenizer
from instructgpt_jax.trainers import common, model_io


@dataclasses.dataclass
class Judge:
  """An exported reward model, sharded and jitted; `score` returns r_θ(x, y) − bias, [B]."""

  graphdef: object
  params: object
  bias: float
  model_cfg: models.ModelConfig
  _score: object = None

  @classmethod
  def load(cls, path: str, mesh, rules, *, seed: int = 0, field: str = "ppo.reward_model") -> Judge:
    source = model_io.read_source(path, field)
    common.check(
      source is not None and source.kind == "scalar", f"{field}: {path} is a {source.kind} model, not a reward model"
    )
    graphdef, target = train_state.param_shardings_for(source.config, mesh, rules, kind="scalar")
    params = model_io.load(source, "scalar", target, source.config, seed)
    judge = cls(graphdef, params, float(source.metadata.get("reward_bias", 0.0)), source.config)
    judge._score = sharding.jit_on_mesh(
      lambda p, *rollout: scoring.response_values(graphdef, p, *rollout)[1] - judge.bias, mesh=mesh, rules=rules
    )
    return judge

  def score(self, prompt_tokens, prompt_segment_ids, response_tokens, response_mask) -> jax.Array:
    return self._score(self.params, prompt_tokens, prompt_segment_ids, response_tokens, response_mask)


def load_prompts(
  spec_or_files: str, tokenizer: Tokenizer, *, data_dir: str, max_prompt_len: int
) -> tuple[list[str], list[np.ndarray]]:
  """(texts, token ids) of evaluation prompt JSONL files (over-long prompts are dropped and counted by the
  build, whose report names the split "prompts/eval")."""
  dataset = tfds_builders.build(
    "prompts", {"eval": spec_or_files}, data_dir=data_dir, tokenizer=tokenizer, max_tokens=max_prompt_len
  )
  source = dataset.source("eval")
  records = [source[i] for i in range(len(source))]
  texts = [r["prompt"].decode() if isinstance(r["prompt"], bytes) else str(r["prompt"]) for r in records]
  return texts, [np.asarray(r["prompt_ids"], np.int32) for r in records]


def sample_and_score(
  sampler: generation.Sampler,
  params,
  judge: Judge,
  prompts: list[np.ndarray],
  rng: jax.Array,
  *,
  batch_size: int,
  max_new_tokens: int,
  pad_id: int,
  buckets=(32, 64, 128, 256, 512, 1024),
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
  """RM scores [n] of a response sampled for each of the n `prompts`, and the (prompt, response) token pairs."""
  scores, samples = [], []
  batches = generation.sample_batches(
    sampler,
    params,
    prompts,
    batch_size=batch_size,
    buckets=buckets,
    pad_id=pad_id,
    max_new_tokens=max_new_tokens,
    key_of=lambda start: jax.random.fold_in(rng, start),
  )
  for chunk, tokens, segment_ids, rollout in batches:
    batch_scores = np.asarray(judge.score(tokens, segment_ids, rollout.tokens, rollout.mask))
    scores.extend(batch_scores[: len(chunk)].tolist())
    response_tokens, response_mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    samples.extend((p, response_tokens[i][response_mask[i] > 0]) for i, p in enumerate(chunk))
  return np.asarray(scores), samples


def best_of_n(
  sampler: generation.Sampler,
  params,
  judge: Judge,
  prompts: list[np.ndarray],
  rng: jax.Array,
  *,
  n: int,
  batch_size: int,
  max_new_tokens: int,
  pad_id: int,
  buckets=(32, 64, 128, 256, 512, 1024),
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
  """Best-of-n, an evaluation method that trains nothing: n responses per prompt from the policy (`params`,
  e.g. the SFT model), the RM's best kept. Its KL to the policy is `rl.best_of_n_kl(n)` (Stiennon et al.
  2020, App. G.3; Gao et al. 2022).

  Returns (the kept responses' scores [P], their (prompt, response) token pairs, all scores [P, n]); the
  samples are `sample_and_score`'s on the prompts each repeated n times, in prompt order.
  """
  if n < 1:
    raise ValueError(f"best_of_n: n {n} must be at least 1")
  repeated = [p for p in prompts for _ in range(n)]
  scores, samples = sample_and_score(
    sampler,
    params,
    judge,
    repeated,
    rng,
    batch_size=batch_size,
    max_new_tokens=max_new_tokens,
    pad_id=pad_id,
    buckets=buckets,
  )
  scores = scores.reshape(len(prompts), n)
  best = np.argmax(scores, axis=1)
  return scores[np.arange(len(prompts)), best], [samples[i * n + b] for i, b in enumerate(best)], scores
