"""Stage 2: the reward model (docs/paper.md §4): a Transformer trunk and a scalar head trained with Eq. 1.

    python -m instructgpt_jax.main --config=configs/rm.py:tiny --workdir=W_RM --config.model.init_from=W_SFT

Phases: setup and validation → init (from the SFT model) or restore → train loop (all K responses of a
prompt in one batch element; every C(K,2) pair in the loss once) → evaluation (pairwise accuracy and loss,
overall and per K) → the bias that makes the demonstrations' mean reward 0 → export for PPO.
"""

from __future__ import annotations

import collections
import logging

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import losses, paths, train_state
from instructgpt_jax.data import batching, stage_data, tfds_builders
from instructgpt_jax.library import lm_steps, loop, model_io


def check_config(config, checks) -> None:
  """The RM's own fields, without reading a file (stages.check_config)."""
  d = config.data
  loop.check_data_values(d, checks)
  loop.check_batch_values("data.batch_size", d.batch_size, config.mesh, checks)
  checks.at_least("data.max_responses", d.max_responses, 2)
  checks.one_of("rm.pair_normalizer", config.rm.pair_normalizer, losses.PAIR_NORMALIZERS)
  checks.require_input(d.train, "data.train", "comparison JSONL files, or lab:comparisons:train:N")
  checks.require_input(
    d.bias_demonstrations, "data.bias_demonstrations", "demonstrations (docs/paper.md §4.1: the bias)"
  )


def train(config, workdir: str) -> dict[str, float]:
  # ---------------------------------------------------------------- setup and validation (no compile yet)
  setup = loop.setup(config, workdir, kind="scalar", seq_len=config.data.seq_len)
  config, tokenizer, mesh, rules, data_cfg = setup.config, setup.tokenizer, setup.mesh, setup.rules, setup.data_cfg
  if config.rm.export_dir:
    paths.check_output_dir(config.rm.export_dir, "rm.export_dir")
  loop.check_batch("data.batch_size", config.data.batch_size, mesh)
  data = stage_data.build_comparison_data(data_cfg, tokenizer, seed=config.seed, **setup.process)
  bias_source = bias_demonstrations(data_cfg, tokenizer)
  total_steps = loop.steps_for_epochs(config, len(data.train_source))

  # ---------------------------------------------------------------- init (from the SFT model) or restore
  run = loop.start_training(setup, workdir, kind="scalar", total_steps=total_steps, data=data)
  graphdef, normalizer = run.graphdef, config.rm.pair_normalizer

  # ---------------------------------------------------------------- step functions
  train_step = lm_steps.make_rm_train_step(graphdef, run.tx, run.lr_schedule, config.optim.microbatches, normalizer)

  def eval_step(params, batch):
    """Per prompt: (Eq. 1 loss normalized as in training, correct pairs, pairs, K present)."""
    rewards = lm_steps.rm_rewards(graphdef, params, batch["tokens"], batch["segment_ids"])
    terms = losses.ranking_prompt_terms(rewards, batch["ranks"], normalizer=normalizer)
    return terms["loss"], terms["correct"], terms["num_pairs"], terms["num_present"]

  def reward_sum(params, batch):
    return jnp.sum(lm_steps.rm_rewards(graphdef, params, batch["tokens"], batch["segment_ids"]))

  step_fn = train_state.jit_step(train_step, run.shardings, loop.batch_sharding(mesh, rules), rules)
  replicated = train_state.replicated(mesh)  # per-prompt results, whole on every host
  eval_fn = train_state.jit_eval(eval_step, mesh, rules, run.shardings.params, out_shardings=replicated)
  reward_sum_fn = train_state.jit_eval(reward_sum, mesh, rules, run.shardings.params, out_shardings=replicated)

  def evaluate(state) -> dict[str, float]:
    """eval_loss: the mean over prompts of the per-prompt loss, as training averages it; accuracies over
    pairs (in all, and by K)."""
    params = state.params
    by_k = collections.defaultdict(lambda: np.zeros(4))  # K -> (Σ prompt losses, correct, pairs, prompts)
    for batch in data.eval_batches(config.data.eval_batches or None):
      outs = jax.device_get(eval_fn(params, loop.to_global(batch, mesh, rules)))
      for prompt_loss, correct, pairs, k in zip(*outs):
        if pairs:
          by_k[int(k)] += (prompt_loss, correct, pairs, 1)
    if not by_k:
      return {}
    total = sum(by_k.values())
    row = {"eval_loss": total[0] / total[3], "eval_accuracy": total[1] / total[2], "eval_pairs": total[2]}
    row.update({f"eval_accuracy_k{k}": v[1] / v[2] for k, v in sorted(by_k.items())})
    return row

  # ---------------------------------------------------------------- train loop
  tokens_per_step = config.data.batch_size * config.data.max_responses * config.data.seq_len
  state, final = loop.train_loop(
    setup, workdir, run.ckpt, data, run.state, step_fn, evaluate, tokens_per_step=tokens_per_step
  )

  # ---------------------------------------------------------------- the bias (docs/paper.md §4.1) and export
  bias, count = demonstration_reward_mean(
    reward_sum_fn, state.params, bias_source, data_cfg, tokenizer, mesh, rules, progress=config.progress_bar
  )
  export_dir = config.rm.export_dir or paths.join(workdir, "export")
  model_io.export(
    export_dir,
    state.params,
    "scalar",
    setup.model_cfg,
    reward_bias=bias,
    bias_demonstrations=count,
    tokenizer=config.data.tokenizer,
  )
  logging.info("reward bias %.6f from %d demonstrations; exported to %s", bias, count, export_dir)
  loop.print_summary("reward model", final, reward_bias=bias, export=export_dir)
  return dict(final, reward_bias=bias)


def bias_demonstrations(data_cfg, tokenizer):
  """The demonstrations that set the reward bias, read, checked and encoded like the comparisons (same
  template, length limit and data.truncate_prompt); built before training, so a bad file stops the run
  before anything compiles."""
  dataset = tfds_builders.build(
    "demonstrations",
    {"train": data_cfg.bias_demonstrations},
    data_dir=data_cfg.data_dir,
    tokenizer=tokenizer,
    template=data_cfg.template,
    max_tokens=data_cfg.seq_len,
    on_error=data_cfg.on_error,
    truncate_prompt=data_cfg.get("truncate_prompt", "none"),
  )
  return dataset.source("train")


def demonstration_reward_mean(
  reward_sum_fn, params, source, data_cfg, tokenizer, mesh, rules, *, progress: bool = False
) -> tuple[float, int]:
  """Mean raw reward of the bias demonstrations `source` (prompt ‖ response ‖ EOS, scored like a ranked
  response)."""
  rows_per_batch = data_cfg.batch_size * data_cfg.max_responses  # as many sequences as one training batch
  total = 0.0
  starts = range(0, len(source), rows_per_batch)
  if progress and jax.process_index() == 0:
    import tqdm

    starts = tqdm.tqdm(starts, desc="reward bias: scoring demonstrations", unit="batch", dynamic_ncols=True)
  for start in starts:
    records = [source[i] for i in range(start, min(start + rows_per_batch, len(source)))]
    rows = batching.sequence_rows(records, seq_len=data_cfg.seq_len, pad_id=tokenizer.pad_id)
    # A static shape: the last batch is filled with empty rows, whose reward is 0 (no real token).
    rows = {k: np.pad(v, ((0, rows_per_batch - len(records)), (0, 0))) for k, v in rows.items()}
    local = {k: v[jax.process_index() :: jax.process_count()] for k, v in rows.items()}
    total += float(reward_sum_fn(params, loop.to_global(local, mesh, rules)))
  return total / len(source), len(source)
