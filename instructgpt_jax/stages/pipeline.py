"""The embedded lab, end to end: tokenizer → pretrain → SFT (PPO-init) → labels → RM → SFT baseline → PPO and
PPO-ptx → evaluation (Figure 1 against the SFT baseline) → report; with `seeds` > 1, all of it once per seed.

    python -m instructgpt_jax.main --config=configs/pipeline.py --workdir=runs/lab

Each step runs in its own folder of the workdir and leaves `done.json` when it finishes; a rerun skips
finished steps, and the training stages resume from their own checkpoints, so kill -9 at any point and
the same command continues. Every number of the report is computed here, from the runs.
"""

from __future__ import annotations

import json
import random

import numpy as np

from instructgpt_jax import paths
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.lab import datasets, labelers, report, tasks, world
from instructgpt_jax.library import judging
from instructgpt_jax.stages import chain, compare


def check_config(config, checks) -> None:
  """The lab's own fields (stages.check_config checks each stage's section after them)."""
  checks.at_least("tokenizer.vocab_size", config.tokenizer.vocab_size, 256)
  labels = config.labels
  for field in ("prompts", "eval_prompts", "max_new_tokens", "agreement_pairs"):
    checks.at_least(f"labels.{field}", labels[field], 1)
  if checks.at_least("labels.k_min", labels.k_min, 2):
    checks.require(labels.k_max >= labels.k_min, "labels.k_max", f"{labels.k_max} is below labels.k_min {labels.k_min}")
  checks.positive("labels.temperature", labels.temperature)
  for field in ("prompts", "max_new_tokens", "bootstrap"):
    checks.at_least(f"evaluation.{field}", config.evaluation[field], 1)
  checks.positive("evaluation.temperature", config.evaluation.temperature)
  for name in ("pretrain", "sft", "rm", "sft_baseline", "ppo", "ppo_ptx"):
    checks.require(name in config.stages, f"stages.{name}", "missing: the lab runs it")
  checks.at_least("seeds", config.seeds, 1)


def unused_fields(config) -> dict[str, str]:
  """What the lab sets in every stage's section from its own fields, or from the stage before."""
  unused = {}
  for name in config.stages:
    why = "the lab sets it in every stage from its own field of that name"
    unused.update({f"stages.{name}.{f}": why for f in ("seed", "progress_bar", "compilation_cache_dir")})
    unused[f"stages.{name}.data.tokenizer"] = "the lab trains its own BPE and gives it to every stage"
    if name != "pretrain":
      unused[f"stages.{name}.model.init_from"] = "the lab starts each stage from the one before it"
    if name in compare.RL_STAGES:
      unused[f"stages.{name}.ppo.reward_model"] = "the lab's RL stages score with the lab's own RM"
      unused[f"stages.{name}.eval.baseline"] = "the lab's RL stages are evaluated against its SFT baseline"
  unused["stages.sft_baseline.eval_rm.rm"] = "the lab's RM selects the SFT baseline's checkpoint"
  for name in ("rm", "dpo"):
    for field in ("train", "eval"):
      unused[f"stages.{name}.data.{field}"] = "the lab ranks its own comparisons (labels) for it"
  unused["stages.rm.data.bias_demonstrations"] = "the lab's RM takes its bias from the SFT stage's demonstrations"
  return unused


def train(config, workdir: str) -> dict[str, float]:
  """The lab once (seeds = 1: its stages in `workdir`), or once per seed in `workdir/seed_<seed>` with
  seeds config.seed, config.seed + 1, ... and a report over them in `workdir` (lab/report.py write_seeds)."""
  paths.check_output_dir(workdir, "--workdir")
  paths.make_dir(workdir)
  if config.seeds == 1:
    results, summary = run_seed(config, workdir)
    print(summary, flush=True)
    return report.headline(results)
  runs = {}
  for k in range(config.seeds):
    one = config.copy_and_resolve_references()
    one.seed, one.seeds = config.seed + k, 1
    runs[one.seed], _ = run_seed(one, paths.join(workdir, f"seed_{one.seed}"))
  summary = report.write_seeds(
    workdir, runs, {name: label for name, label in compare.RL_STAGES.items() if name in config.stages}
  )
  print(summary, flush=True)
  return report.pooled_headline(runs)


def run_seed(config, workdir: str) -> tuple[dict, str]:
  """Every stage of one seed in `workdir`, and its report there: (every step's results, the summary)."""
  stages = config.stages.copy_and_resolve_references()  # filled in below with each stage's inputs
  paths.make_dir(workdir)

  # ---------------------------------------------------------------- a BPE of the world's text
  def train_tokenizer(directory):
    w = world.make_world(0)
    texts = world.corpus_documents(n_documents=config.tokenizer.documents, seed=config.seed)
    rng = random.Random(config.seed)
    for _ in range(3000):
      task = tasks.make_task(w, rng)
      texts += [task.prompt, task.answer, labelers.write_demonstration(task, rng, w)[0]]
      texts += [r for r, _ in tasks.flawed_responses(task, w, rng)]
    tokenizer = tokenizer_lib.train_bpe(texts, vocab_size=config.tokenizer.vocab_size)
    tokenizer.save(paths.join(directory, "tokenizer.json"))
    return {"path": paths.join(directory, "tokenizer.json"), "vocab_size": tokenizer.vocab_size}

  tokenizer_path = chain.once(workdir, "tokenizer", train_tokenizer)["path"]
  for stage in stages.values():
    stage.data.tokenizer = tokenizer_path
    stage.seed = config.seed
    stage.progress_bar = config.progress_bar
    stage.compilation_cache_dir = config.compilation_cache_dir
  path = {name: paths.join(workdir, name) for name in ("pretrain", "sft", "labels", "rm", *stages)}

  # ---------------------------------------------------------------- the stages
  results = {"pretrain": chain.once(workdir, "pretrain", lambda d: chain.run_stage(stages.pretrain, d))}
  stages.sft.model.init_from = path["pretrain"]
  results["sft"] = chain.once(workdir, "sft", lambda d: chain.run_stage(stages.sft, d))
  results["labels"] = chain.once(workdir, "labels", lambda d: label_comparisons(config, path["sft"], tokenizer_path, d))
  stages.rm.model.init_from = path["sft"]
  stages.rm.data.update(
    train=results["labels"]["train"], eval=results["labels"]["eval"], bias_demonstrations=stages.sft.data.train
  )
  results["rm"] = chain.once(workdir, "rm", lambda d: chain.run_stage(stages.rm, d))
  stages.sft_baseline.model.init_from = path["pretrain"]
  stages.sft_baseline.eval_rm.rm = paths.join(path["rm"], "export")
  results["sft_baseline"] = chain.once(workdir, "sft_baseline", lambda d: chain.run_stage(stages.sft_baseline, d))
  # The methods (SFT, the PPO-init SFT, every RL method's start, first) and Figure 1's other models.
  exports = {"SFT": path["sft"]}
  figure1 = {"GPT": path["pretrain"], "GPT prompted": path["pretrain"], "SFT baseline": path["sft_baseline"]}
  for name in (n for n in compare.RL_STAGES if n in stages):
    stages[name].model.init_from = path["sft"]
    stages[name].ppo.reward_model = paths.join(path["rm"], "export")
    stages[name].eval.baseline = path["sft_baseline"]
    results[name] = chain.once(workdir, name, lambda d, name=name: chain.run_stage(stages[name], d))
    exports[compare.RL_STAGES[name]] = paths.join(path[name], "export")
  if "dpo" in stages:  # on the RM's comparisons, from the SFT model
    stages.dpo.model.init_from = path["sft"]
    stages.dpo.data.update(train=results["labels"]["train"], eval=results["labels"]["eval"])
    results["dpo"] = chain.once(workdir, "dpo", lambda d: chain.run_stage(stages.dpo, d))
    exports["DPO"] = paths.join(path["dpo"], "export")

  # ---------------------------------------------------------------- evaluation and report
  results["evaluation"] = chain.once(
    workdir, "evaluation", lambda d: evaluate(config, {**exports, **figure1}, tokenizer_path, results, d)
  )
  summary = report.write(workdir, results)
  if config.get("compare"):
    results["compare"] = chain.once(
      workdir, "compare", lambda d: compare.measure(config, exports, tokenizer_path, path, d)
    )
    rl_stages = {name: label for name, label in compare.RL_STAGES.items() if name in stages}
    summary += "\n" + report.write_comparison(workdir, results, rl_stages)
  return results, summary


# ------------------------------------------------------------------------------------------ labels


def label_comparisons(config, sft_dir: str, tokenizer_path: str, directory: str) -> dict:
  """K samples of the SFT model per prompt, ranked: the training split by the training labelers, the eval
  split by the held-out labelers (so the RM's eval accuracy is the paper's held-out-labeler accuracy)."""
  c = config.labels
  tokenizer = tokenizer_lib.from_file(tokenizer_path)
  policy = judging.Policy(sft_dir, tokenizer, temperature=c.temperature, max_new_tokens=c.max_new_tokens)
  w = world.make_world(0)
  rng = random.Random(config.seed)
  out = {}
  pairs = []
  for split, n, group in (
    ("train", c.prompts, labelers.TRAINING_LABELERS),
    ("eval", c.eval_prompts, labelers.HELD_OUT_LABELERS),
  ):
    split_tasks = datasets.sample_tasks(n, split=split, seed=config.seed, world=w, kind="labels")
    samples = policy.sample([t.prompt for t in split_tasks], c.k_max, seed=config.seed + (split == "eval"))
    path, written, no_pairs, empty = paths.join(directory, f"comparisons_{split}.jsonl"), 0, 0, 0
    lines = []
    for i, (task, responses) in enumerate(zip(split_tasks, samples)):
      responses = responses[: rng.randint(c.k_min, c.k_max)]
      # A sample that is EOS alone has no text a comparison file can hold (empty responses are errors in
      # the data formats): it leaves the set, counted.
      empty += sum(not text for text, _ in responses)
      responses = [(text, stopped) for text, stopped in responses if text]
      ranks = group[i % len(group)].rank(task, responses, rng) if len(responses) >= 2 else [0]
      if len(responses) < 2 or len(set(ranks)) < 2:
        no_pairs += 1  # every response the same: nothing to compare (counted)
        continue
      lines.append(json.dumps({"prompt": task.prompt, "responses": [r for r, _ in responses], "ranks": ranks}) + "\n")
      written += 1
      if split == "train":
        a, b = rng.sample(responses, 2)
        pairs.append((task, a, b))
    paths.write_text(path, "".join(lines))
    out[split], out[f"{split}_prompts"], out[f"{split}_without_pairs"] = path, written, no_pairs
    out[f"{split}_empty_samples_dropped"] = empty
  pairs = pairs[: c.agreement_pairs]
  out["agreement_training_labelers"] = labelers.agreement(labelers.TRAINING_LABELERS, pairs, seed=config.seed)
  out["agreement_held_out_labelers"] = labelers.agreement(labelers.HELD_OUT_LABELERS, pairs, seed=config.seed)
  return out


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(config, exports: dict[str, str], tokenizer_path: str, results: dict, directory: str) -> dict:
  """The human-evaluation analogue on held-out prompts, and the numbers the report sets side by side.

  exports: model name -> its workdir or export, "SFT" (the PPO-init SFT) first. Every model is judged against
  "SFT" (`win_rate_<name>`) and, where exports has it, against the "SFT baseline" (`baseline_win_rate_<name>`:
  Figure 1). "GPT prompted" is the pretrained model given lab.datasets.FEW_SHOT_PREFIX before each prompt."""
  c = config.evaluation
  tokenizer = tokenizer_lib.from_file(tokenizer_path)
  eval_tasks = datasets.sample_tasks(
    c.prompts, split="eval", seed=config.seed, world=world.make_world(0), kind="evaluation"
  )
  prompts = [t.prompt for t in eval_tasks]
  models = list(exports)
  responses = {}
  for name in models:
    policy = judging.Policy(exports[name], tokenizer, temperature=c.temperature, max_new_tokens=c.max_new_tokens)
    shown = [datasets.FEW_SHOT_PREFIX + p for p in prompts] if name == "GPT prompted" else prompts
    responses[name] = [r[0] for r in policy.sample(shown, 1, seed=config.seed + 7)]
  out = {"prompts": len(prompts)}
  features = {  # each response judged once; gold quality and correctness read from its features
    n: [tasks.features(t, text, stopped=stopped) for t, (text, stopped) in zip(eval_tasks, responses[n])]
    for n in models
  }
  gold = {n: np.array([tasks.gold_score(f) for f in features[n]]) for n in models}
  correct = {n: np.array([f["correct"] for f in features[n]]) for n in models}
  for n in models:
    out[f"features_{n}"] = {k: float(np.mean([f[k] for f in features[n]])) for k in tasks.FEATURES}
    out[f"gold_{n}"] = float(gold[n].mean())
    out[f"correct_{n}"] = float(correct[n].mean())
    by_constraints = {}
    for k in sorted({t.n_constraints for t in eval_tasks}):
      chosen = np.array([t.n_constraints == k for t in eval_tasks])
      by_constraints[str(k)] = float(correct[n][chosen].mean())
    out[f"correct_by_constraints_{n}"] = by_constraints
  for against, key in (("SFT", "win_rate"), ("SFT baseline", "baseline_win_rate")):
    if against not in responses:
      continue
    for n in (name for name in models if name != against):
      per_prompt = labelers.held_out_preference(
        eval_tasks, responses[n], responses[against], f"{config.seed}:{n}:{against}"
      )
      out[f"{key}_{n}"] = float(per_prompt.mean())
      out[f"{key}_{n}_interval"] = labelers.bootstrap_interval(per_prompt, c.bootstrap, config.seed)
      out[f"gold_{key}_{n}"] = float(np.mean((gold[n] > gold[against]) + 0.5 * (gold[n] == gold[against])))
  records = [
    {
      "prompt": task.prompt,
      "gold_answer": task.answer,
      **{n: {"response": responses[n][i][0], "stopped": responses[n][i][1], "gold": float(gold[n][i])} for n in models},
    }
    for i, task in enumerate(eval_tasks)
  ]
  paths.write_text(paths.join(directory, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
  return out
