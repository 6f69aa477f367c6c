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

import time

import jax
import ml_collections
import numpy as np

from instructgpt_jax import paths, rl, scoring, sharding
from instructgpt_jax.data import schemes
from instructgpt_jax.data import text
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.lab import datasets, labelers, tasks, world
from instructgpt_jax.library import judging, lm_steps, loop

# The RL stages a pipeline config may hold, by the name the report gives each (configs/pipeline.py:compare adds
# GRPO and RLOO, and DPO, which trains on the RM's comparisons instead).
RL_STAGES = {"ppo": "PPO", "ppo_ptx": "PPO-ptx", "grpo": "GRPO", "rloo": "RLOO"}


def measure(config, exports: dict[str, str], tokenizer_path: str, stage_paths: dict[str, str], directory: str) -> dict:
  c, e = config.compare, config.evaluation
  tokenizer = tokenizer_lib.from_file(tokenizer_path)
  eval_tasks = datasets.sample_tasks(
    e.prompts, split="eval", seed=config.seed, world=world.make_world(0), kind="evaluation"
  )
  prompts = [t.prompt for t in eval_tasks]
  policies = {
    n: judging.Policy(path, tokenizer, temperature=e.temperature, max_new_tokens=e.max_new_tokens)
    for n, path in exports.items()
  }
  sft = policies["SFT"]
  sft_logprobs = sharding.jit_on_mesh(
    lambda p, *seq: scoring.response_logprobs(sft.graphdef, p, *seq), mesh=sft.mesh, rules=sft.rules
  )
  out = {"methods": {}}
  responses = {}  # each policy's (text, stopped) samples: the evaluation step's, reused below for best-of-n

  # ---- KL to SFT of each policy's own samples (the evaluation step's samples: same seed, same batches)
  for name, policy in policies.items():
    kl, responses[name] = [], []
    for chunk, tokens, segments, rollout in policy.batches(prompts, 1, seed=config.seed + 7):
      responses[name] += policy.texts(rollout, len(chunk))
      reference = np.asarray(sft_logprobs(sft.params, tokens, segments, rollout.tokens, rollout.mask))
      own, mask = np.asarray(rollout.logprobs), np.asarray(rollout.mask)
      kl += list(np.sum(np.where(mask > 0, own - reference, 0.0), axis=1)[: len(chunk)])
    out["methods"][name] = {"kl": float(np.mean(kl))}

  # ---- the change of pretraining loss on held-out prose (the PPO stages' ptx evaluation, for every model)
  ptx = config.stages[next(n for n in RL_STAGES if n in config.stages)]
  corpus = schemes.resolve({"ptx_corpus": "lab"}, paths.join(directory, "data"), seed=config.seed)
  text_cfg = ml_collections.ConfigDict(
    dict(
      corpus=corpus["ptx_corpus"],
      seq_len=ptx.data.ptx_seq_len,
      batch_size=ptx.ppo.ptx_per_episode * ptx.ppo.minibatch,
      eval_fraction=0.05,
    )
  )
  prose = text.build_text_data(text_cfg, tokenizer, seed=config.seed)
  losses_by_model = {}
  for name, policy in policies.items():
    eval_fn = jax.jit(sharding.traced_with_rules(lm_steps.make_eval_step(policy.graphdef), policy.mesh, policy.rules))
    losses_by_model[name] = lm_steps.eval_loss(eval_fn, policy.params, prose.eval_batches(4), policy.mesh, policy.rules)
  for name in policies:
    out["methods"][name]["pretraining_loss"] = losses_by_model[name]
    out["methods"][name]["pretraining_loss_change"] = losses_by_model[name] - losses_by_model["SFT"]

  # ---- wall time of each training stage (the last run of it: a resumed stage counts its last part)
  stage_of = {label: name for name, label in RL_STAGES.items()} | {"DPO": "dpo", "SFT": "sft"}
  for name in policies:
    done = paths.read_json(paths.join(stage_paths[stage_of[name]], "done.json")) or {}
    out["methods"][name]["wall_time_s"] = done.get("wall_time_s")

  # ---- best-of-n from the SFT model, judged by the RM (proxy) and by the gold scorer
  start = time.perf_counter()
  judge = judging.Judge.load(paths.join(stage_paths["rm"], "export"), sft.mesh, sft.rules)
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
  sft_responses = responses["SFT"]  # the evaluation's SFT samples
  bon = []
  for n in sorted(int(x) for x in str(c.n).split(",")):
    chosen = np.argmax(proxy[:, :n], axis=1)
    rows = np.arange(len(prompts))
    point = {
      "n": n,
      "kl": rl.best_of_n_kl(n),
      "proxy": float(proxy[rows, chosen].mean()),
      "gold": float(gold[rows, chosen].mean()),
    }
    if n == c.table_n:  # the table's best-of-n row: the held-out labelers against SFT's responses, as every method
      kept = [samples[i * c.best_of_n + k] for i, k in enumerate(chosen)]
      per_prompt = labelers.held_out_preference(eval_tasks, kept, sft_responses, config.seed)
      point["win_rate"] = float(per_prompt.mean())
      point["win_rate_interval"] = labelers.bootstrap_interval(per_prompt, e.bootstrap, config.seed)
    bon.append(point)
  out["best_of_n"] = bon
  out["best_of_n_wall_time_s"] = time.perf_counter() - start
  out["prompts"] = len(prompts)
  return out
