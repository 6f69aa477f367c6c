"""Stage 0: next-token pretraining on plain text (the ptx data source of PPO-ptx later).

    python -m instructgpt_jax.main --config=configs/pretrain.py --workdir=/tmp/pretrain

Phases: setup and validation → sharded init → restore → train loop (metrics a step late, checkpoints) →
final evaluation and save.
"""

from __future__ import annotations

from instructgpt_jax import train_state
from instructgpt_jax.data import text
from instructgpt_jax.library import lm_steps, loop


def check_config(config, checks) -> None:
  """Pretraining's own fields, without reading a file (stages.check_config)."""
  d = config.data
  checks.require_input(d.corpus, "data.corpus", "globs of .txt / .jsonl files, or 'lab'")
  loop.check_data_values(d, checks)
  loop.check_batch_values("data.batch_size", d.batch_size, config.mesh, checks)
  checks.fraction("data.eval_fraction", d.eval_fraction, below_one=True)
  checks.require(config.total_steps > 0, "total_steps", f"{config.total_steps}: pretraining runs a set number of steps")


def train(config, workdir: str) -> dict[str, float]:
  """Runs (or resumes) pretraining in `workdir`; returns the final metrics row."""
  # ---------------------------------------------------------------- setup and validation (no compile yet)
  setup = loop.setup(config, workdir, seq_len=config.data.seq_len)
  config, mesh, rules = setup.config, setup.mesh, setup.rules
  loop.check_batch("data.batch_size", config.data.batch_size, mesh)
  data = text.build_text_data(setup.data_cfg, setup.tokenizer, seed=config.seed, **setup.process)
  tokens_per_step = config.data.batch_size * config.data.seq_len

  # ---------------------------------------------------------------- sharded init, or restore
  run = loop.start_training(setup, workdir, kind="lm", total_steps=config.total_steps, data=data)

  # ---------------------------------------------------------------- step functions
  microbatches = config.optim.microbatches
  train_step = lm_steps.make_train_step(
    run.graphdef, setup.model_cfg, run.tx, run.lr_schedule, microbatches=microbatches
  )
  step_fn = train_state.jit_step(train_step, run.shardings, loop.batch_sharding(mesh, rules), rules)
  eval_fn = train_state.jit_eval(lm_steps.make_eval_step(run.graphdef), mesh, rules, run.shardings.params)

  def evaluate(state) -> dict[str, float]:
    loss = lm_steps.eval_loss(eval_fn, state.params, data.eval_batches(config.data.eval_batches), mesh, rules)
    return {"eval_loss": loss} if loss is not None else {}

  # ---------------------------------------------------------------- train loop
  _, final = loop.train_loop(
    setup, workdir, run.ckpt, data, run.state, step_fn, evaluate, tokens_per_step=tokens_per_step
  )

  return final
