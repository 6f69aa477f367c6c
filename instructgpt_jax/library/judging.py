"""Judging a policy with a reward model: sample responses to prompts, score them (minus the RM's bias).

Used for SFT checkpoint selection by RM score (docs/paper.md §3.1) and for PPO's evaluations.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from instructgpt_jax import generation, models, scoring, sharding
from instructgpt_jax.data import tfds_builders
from instructgpt_jax.data.tokenizer import Tokenizer
from instructgpt_jax.library import loop, model_io


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
    loop.check(
      source is not None and source.kind == "scalar", f"{field}: {path} is a {source.kind} model, not a reward model"
    )
    return cls.from_source(source, mesh, rules, seed=seed)

  @classmethod
  def from_source(cls, source: model_io.Source, mesh, rules, *, seed: int = 0) -> Judge:
    """The reward model read from `source` (already checked to be one), with its scoring program."""
    graphdef, params = model_io.load_frozen(source, "scalar", mesh, rules, seed=seed)
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
  best = best_of_first(scores, n)
  return scores[np.arange(len(prompts)), best], [samples[i * n + b] for i, b in enumerate(best)], scores


def best_of_first(scores: np.ndarray, n: int) -> np.ndarray:
  """[P] the index of the RM's best among the first n of each prompt's responses (scores [P, N], N >= n): best-of-n,
  and best-of-n for every n <= N from one pool of N samples per prompt (the lab's comparison)."""
  return np.argmax(scores[:, :n], axis=1)


class Policy:
  """A language model loaded from a workdir or an export, and a sampler for it."""

  def __init__(self, source_path: str, tokenizer, *, temperature: float, max_new_tokens: int):
    self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    self.rules = sharding.rules_dict(sharding.DEFAULT_RULES)
    source = model_io.read_source(source_path)
    self.graphdef, self.params = model_io.load_frozen(source, "lm", self.mesh, self.rules)
    settings = generation.SamplingSettings(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature)
    self.sampler = generation.Sampler(
      self.graphdef, settings, response_buckets=(max_new_tokens,), mesh=self.mesh, rules=self.rules
    )
    self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens

  def batches(self, prompts: list[str], copies: int, seed: int, batch_rows: int = 144):
    """`generation.sample_batches` over `copies` rows per prompt, in prompt order; deterministic in `seed`."""
    ids = [np.array(self.tokenizer.encode(p), np.int32) for p in prompts]
    rows = [i for i in ids for _ in range(copies)]
    return generation.sample_batches(
      self.sampler,
      self.params,
      rows,
      batch_size=max(copies, batch_rows // copies * copies),
      buckets=(32, 64, 128),
      pad_id=self.tokenizer.pad_id,
      max_new_tokens=self.max_new_tokens,
      key_of=lambda start: jax.random.PRNGKey(seed + start),
    )

  def texts(self, rollout, rows: int) -> list[tuple[str, bool]]:
    """The first `rows` responses of a rollout as (text, stopped) pairs."""
    response, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    out = []
    for i in range(rows):
      real = response[i][mask[i] > 0]
      out.append((self.tokenizer.decode(real), bool(len(real) > 0 and int(real[-1]) == self.tokenizer.eos_id)))
    return out

  def sample(self, prompts: list[str], copies: int, seed: int, batch_rows: int = 144) -> list[list[tuple[str, bool]]]:
    """`copies` responses per prompt as (text, stopped) pairs, in prompt order. Deterministic in `seed`."""
    outputs = []
    for chunk, _, _, rollout in self.batches(prompts, copies, seed, batch_rows):
      outputs += self.texts(rollout, len(chunk))
    return [outputs[i * copies : (i + 1) * copies] for i in range(len(prompts))]
