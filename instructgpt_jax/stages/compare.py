"""The lab's comparison of methods (configs/pipeline.py:compare): every policy the pipeline trained from the same
SFT model and RM, and best-of-n from the SFT model, measured the same way on the same held-out prompts.

    python -m instructgpt_jax.main --config=configs/pipeline.py:compare --workdir=runs/compare

Per method: the held-out labelers' win rate against SFT (from the pipeline's evaluation step, with its 95%
interval), gold quality, the KL to the SFT model of its own samples on the held-out prompts (Σ_t log π(y_t) −
log π_SFT(y_t), averaged over prompts: one estimator for every method; best-of-n's is log n − (n − 1)/n), the
change of held-out pretraining loss against SFT's, and the wall time of its training stage. Best-of-n draws
`compare.best_of_n` samples per prompt from the SFT model and keeps the RM's best of the first n, for every
n in `compare.n`. Everything is written to `<workdir>/compare/done.json`; lab/report.py draws the table and
the over-optimization figure from it and from the RL runs' metrics.
"""

from __future__ import annotations

import functools
import time

import ml_collections
import numpy as np

from instructgpt_jax import paths, rl, scoring, sharding, train_state
from instructgpt_jax.data import schemes, text
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.lab import datasets, labelers, tasks, world
from instructgpt_jax.library import judging, lm_steps, ppo_steps

# The RL stages a pipeline config may hold, by the name the report gives each (configs/pipeline.py:compare adds
# GRPO and RLOO, and DPO, which trains on the RM's comparisons instead).
RL_STAGES = {"ppo": "PPO", "ppo_ptx": "PPO-ptx", "grpo": "GRPO", "rloo": "RLOO"}


def measure(config, exports: dict[str, str], tokenizer_path: str, stage_paths: dict[str, str], directory: str) -> dict:
  e = config.evaluation
  tokenizer = tokenizer_lib.from_file(tokenizer_path)
  eval_tasks = datasets.sample_tasks(
    e.prompts, split="eval", seed=config.seed, world=world.make_world(0), kind="evaluation"
  )
  prompts = [t.prompt for t in eval_tasks]
  policies = {
    n: judging.Policy(path, tokenizer, temperature=e.temperature, max_new_tokens=e.max_new_tokens)
    for n, path in exports.items()
  }
  out = {"methods": {}}
  # Each policy's (text, stopped) samples: the evaluation step's (same seed, same batches), reused for best-of-n.
  responses, sft = {}, policies["SFT"]
  sft_logprobs = sharding.jit_on_mesh(
    lambda p, *seq: scoring.response_logprobs(sft.graphdef, p, *seq), mesh=sft.mesh, rules=sft.rules
  )
  for name, policy in policies.items():
    kl, responses[name] = _kl_to_sft(policy, functools.partial(sft_logprobs, sft.params), prompts, config.seed + 7)
    out["methods"][name] = {"kl": kl}
  losses_by_model = _pretraining_losses(config, policies, tokenizer, directory)
  stage_of = {label: name for name, label in RL_STAGES.items()} | {"DPO": "dpo", "SFT": "sft"}
  for name in policies:
    out["methods"][name]["pretraining_loss"] = losses_by_model[name]
    out["methods"][name]["pretraining_loss_change"] = losses_by_model[name] - losses_by_model["SFT"]
    # The wall time of each training stage (the last run of it: a resumed stage counts its last part).
    done = paths.read_json(paths.join(stage_paths[stage_of[name]], "done.json")) or {}
    out["methods"][name]["wall_time_s"] = done.get("wall_time_s")
  start = time.perf_counter()
  judge = judging.Judge.load(paths.join(stage_paths["rm"], "export"), policies["SFT"].mesh, policies["SFT"].rules)
  out["best_of_n"] = _best_of_n(config, policies["SFT"], judge, eval_tasks, responses["SFT"])
  out["best_of_n_wall_time_s"] = time.perf_counter() - start
  out["prompts"] = len(prompts)
  return out


def _kl_to_sft(policy: judging.Policy, sft_logprobs, prompts: list[str], seed: int):
  """(the KL to the SFT model of the policy's own samples: Σ_t log π(y_t) − log π_SFT(y_t), averaged over
  prompts; the samples as (text, stopped) pairs). sft_logprobs(*rollout): the SFT model's log-probs."""
  kl, responses = [], []
  for chunk, tokens, segments, rollout in policy.batches(prompts, 1, seed=seed):
    responses += policy.texts(rollout, len(chunk))
    reference = np.asarray(sft_logprobs(tokens, segments, rollout.tokens, rollout.mask))
    own, mask = np.asarray(rollout.logprobs), np.asarray(rollout.mask)
    kl += list(np.sum(np.where(mask > 0, own - reference, 0.0), axis=1)[: len(chunk)])
  return float(np.mean(kl)), responses


def _pretraining_losses(config, policies: dict, tokenizer, directory: str) -> dict[str, float]:
  """Each model's loss on held-out prose: the PPO stages' ptx evaluation (same corpus, same batches)."""
  ptx = config.stages[next(n for n in RL_STAGES if n in config.stages)]
  corpus = schemes.resolve({"ptx_corpus": "lab"}, paths.join(directory, "data"), seed=config.seed)
  text_cfg = ml_collections.ConfigDict(
    dict(
      corpus=corpus["ptx_corpus"],
      seq_len=ptx.data.ptx_seq_len,
      batch_size=ppo_steps.ptx_rows(ptx.ppo),
      eval_fraction=0.05,
    )
  )
  prose = text.build_text_data(text_cfg, tokenizer, seed=config.seed)
  out = {}
  for name, policy in policies.items():
    eval_fn = train_state.jit_eval(lm_steps.make_eval_step(policy.graphdef), policy.mesh, policy.rules)
    out[name] = lm_steps.eval_loss(eval_fn, policy.params, prose.eval_batches(4), policy.mesh, policy.rules)
  return out


def _best_of_n(config, sft: judging.Policy, judge: judging.Judge, eval_tasks, sft_responses) -> list[dict]:
  """Best-of-n from the SFT model for every n in `compare.n`, judged by the RM (proxy) and by the gold scorer:
  one pool of `compare.best_of_n` samples per prompt, the RM's best of its first n kept
  (judging.best_of_first)."""
  c, e = config.compare, config.evaluation
  prompts = [t.prompt for t in eval_tasks]
  samples, proxy = [], []
  for chunk, tokens, segments, rollout in sft.batches(prompts, c.best_of_n, seed=config.seed + 11):
    proxy += list(np.asarray(judge.score(tokens, segments, rollout.tokens, rollout.mask))[: len(chunk)])
    samples += sft.texts(rollout, len(chunk))
  proxy = np.array(proxy).reshape(len(prompts), c.best_of_n)
  gold = np.array(
    [
      tasks.gold_score(tasks.features(t, text_, stopped=stopped))
      for t, (text_, stopped) in zip([t for t in eval_tasks for _ in range(c.best_of_n)], samples)
    ]
  ).reshape(len(prompts), c.best_of_n)
  points = []
  for n in sorted(int(x) for x in str(c.n).split(",")):
    chosen, rows = judging.best_of_first(proxy, n), np.arange(len(prompts))
    point = {"n": n, "kl": rl.best_of_n_kl(n), "proxy": float(proxy[rows, chosen].mean())}
    point["gold"] = float(gold[rows, chosen].mean())
    if n == c.table_n:  # the table's best-of-n row: the held-out labelers against SFT's responses, as every method
      kept = [samples[i * c.best_of_n + k] for i, k in enumerate(chosen)]
      per_prompt = labelers.held_out_preference(eval_tasks, kept, sft_responses, config.seed)
      point["win_rate"] = float(per_prompt.mean())
      point["win_rate_interval"] = labelers.bootstrap_interval(per_prompt, e.bootstrap, config.seed)
    points.append(point)
  return points
