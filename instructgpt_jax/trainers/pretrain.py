"""Stage 0: next-token pretraining on plain text (the ptx data source of PPO-ptx later).

    python -m instructgpt_jax.main --config=configs/pretrain.py --workdir=/tmp/pretrain

Phases: setup and validation → sharded init → restore → train loop (metrics a step late, checkpoints) →
final evaluation and save.
"""

from __future__ import annotations

import logging

import jax
import optax

from instructgpt_jax import checkpoint, losses, models, optim, sharding, train_state
from instructgpt_jax import metrics as metrics_lib
from instructgpt_jax.data import text
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.trainers import common


def train(config, workdir: str) -> dict[str, float]:
  """Runs (or resumes) pretraining in `workdir`; returns the final metrics row."""
  # ---------------------------------------------------------------- setup and validation (no compile yet)
  model_cfg = models.resolve(config.model)
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = sharding.rules_dict(config.sharding_rules)
  common.check(
    config.data.seq_len <= model_cfg.max_len,
    f"data.seq_len: {config.data.seq_len} exceeds the model's max_len {model_cfg.max_len}",
  )
  common.check(
    tokenizer.eos_id < model_cfg.vocab_size,
    f"model.vocab_size: {model_cfg.vocab_size} cannot hold the tokenizer's ids "
    f"(EOS is {tokenizer.eos_id}; tokenizer {tokenizer.name})",
  )
  common.check_batch("data.batch_size", config.data.batch_size, mesh)
  data = text.build_text_data(
    config.data, tokenizer, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count()
  )
  common.write_config(workdir, config)
  tokens_per_step = config.data.batch_size * config.data.seq_len

  # ---------------------------------------------------------------- sharded init
  tx = optim.make_optimizer(config.optim, config.total_steps)
  lr_schedule = optim.schedule(config.optim, config.total_steps)
  graphdef, state, state_shardings = train_state.create_sharded(model_cfg, tx, config.seed, mesh, rules)
  logging.info("model %s: %s parameters", config.model.size, f"{models.param_count(state.params):,}")

  # ---------------------------------------------------------------- restore
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(state)
    data.set_state(data_state)
    logging.info("resumed from step %d", int(state.step))
  start_step = int(state.step)

  # ---------------------------------------------------------------- step functions
  def loss_fn(params, batch, dropout_rng):
    logits, _ = models.apply(graphdef, params, batch["inputs"], dropout_rng=dropout_rng)
    return losses.lm_loss(logits, batch["targets"], batch["mask"])

  def train_step(state, batch):
    rng, dropout_rng = jax.random.split(state.rng)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, dropout_rng)
    new_state = state.apply_gradients(grads, tx).replace(rng=rng)
    return new_state, {
      "loss": loss,
      "accuracy": aux["accuracy"],
      "grad_norm": optax.tree.norm(grads),
      "lr": lr_schedule(state.step),
    }

  def eval_step(params, batch):
    loss_sum, count = losses.lm_loss_sum(
      models.apply(graphdef, params, batch["inputs"])[0], batch["targets"], batch["mask"]
    )
    return loss_sum, count

  batch_sh = common.batch_sharding(mesh, rules)
  with sharding.use_mesh_rules(mesh, rules):
    step_fn = train_state.jit_step(train_step, state_shardings, batch_sh)
    eval_fn = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sh))

  def evaluate(params) -> dict[str, float]:
    total, count = 0.0, 0.0
    for batch in data.eval_batches(config.data.eval_batches):
      s, c = eval_fn(params, common.to_global(batch, mesh, rules))
      total, count = total + float(s), count + float(c)
    return {"eval_loss": total / count} if count else {}

  # ---------------------------------------------------------------- train loop
  writer = metrics_lib.MetricWriter(
    workdir,
    total_steps=config.total_steps,
    start_step=start_step,
    progress=config.progress_bar,
    tokens_per_step=tokens_per_step,
  )
  fetcher = metrics_lib.LateFetcher()
  last_row: dict[str, float] = {}

  def log(fetched, extra=None):
    nonlocal last_row
    if fetched is None:
      return
    step, values = fetched
    values = dict(values, **(extra or {}))
    metrics_lib.check_finite(step, values)
    last_row = writer.write(step, values)

  for step in range(start_step, config.total_steps):
    batch = common.to_global(next(data), mesh, rules)
    state, step_metrics = step_fn(state, batch)
    done = step + 1
    if done % config.log_every_steps == 0 or done == config.total_steps:
      log(fetcher.push(done, step_metrics))
    if config.eval_every_steps and done % config.eval_every_steps == 0 and done != config.total_steps:
      log(fetcher.flush(), evaluate(state.params))
    if done % config.checkpoint_every_steps == 0 and done != config.total_steps:
      log(fetcher.flush())  # metrics first: a non-finite step must not be saved as the last good state
      ckpt.save(done, state, data.get_state())

  # ---------------------------------------------------------------- final evaluation and save
  final_eval = evaluate(state.params)
  pending = fetcher.flush()
  if pending is not None:
    log(pending, final_eval)
  elif final_eval:
    last_row = writer.write(int(state.step), final_eval)
  if int(state.step) > start_step or ckpt.latest_step() is None:
    ckpt.save(int(state.step), state, data.get_state(), force=True)
  ckpt.close()
  writer.close()
  return last_row
