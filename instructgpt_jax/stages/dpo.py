"""DPO (beyond the paper; Rafailov et al. 2023, K-wise as in docs/losses.md): the SFT model trained directly on
the RM's comparison data, against a frozen reference; `dpo.form` picks the K-wise loss (all pairs or
Plackett-Luce, `losses.dpo_loss`).

    python -m instructgpt_jax.main --config=configs/dpo.py:tiny --workdir=W_DPO --config.model.init_from=W_SFT

Phases: setup and validation → init (from model.init_from) or restore → train loop (a prompt's K responses in
one batch element: their sequence log-probabilities under the policy and the reference, `losses.dpo_loss`
in `dpo.form`) → evaluation on held-out comparisons (implicit-reward accuracy, margin, loss) →
export of the policy as a language model. Resumable like every stage.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import losses, models, paths, scoring, train_state
from instructgpt_jax.data import stage_data
from instructgpt_jax.library import loop, model_io
from instructgpt_jax.models import lora


def sequence_logps(graphdef, params, batch):
  """[B, K] log π(y_k | x) of a comparison batch's rows, summed over each response's tokens."""
  return scoring.sequence_logprobs(
    graphdef,
    params,
    batch["tokens"],
    batch["segment_ids"],
    batch["prompt_lengths"][:, None],
    batch["response_lengths"],
  )


def prompt_terms(graphdef, params, batch, *, beta: float, normalizer: str, form: str) -> dict:
  """`losses.dpo_prompt_terms` of a comparison batch (per prompt: the form's loss, correct pairs, pairs, Σ margins);
  `batch["ref_logps"]` [B, K] holds the reference's sequence log-probs."""
  return losses.dpo_prompt_terms(
    sequence_logps(graphdef, params, batch),
    batch["ref_logps"],
    batch["ranks"],
    beta=beta,
    normalizer=normalizer,
    form=form,
  )


def make_train_step(graphdef, tx, lr_schedule, microbatches: int, *, beta: float, normalizer: str, form: str):
  """The DPO step (state, batch) -> (state, metrics); `batch["ref_logps"]` [B, K] holds the reference's
  sequence log-probs. `losses.dpo_loss` is a mean over the prompts with pairs: sums make micro-batching exact."""

  def loss_sums(params, batch, _rng):
    loss, stats = losses.dpo_loss(
      sequence_logps(graphdef, params, batch),
      batch["ref_logps"],
      batch["ranks"],
      beta=beta,
      normalizer=normalizer,
      form=form,
    )
    return loss * stats["num_prompts"], {
      "count": stats["num_prompts"],
      "pairs": stats["num_pairs"],
      "correct": stats["accuracy"] * stats["num_pairs"],
      "margin_sum": stats["margin"] * stats["num_pairs"],
    }

  def summarize(sums, _batch):
    pairs = jnp.maximum(sums["pairs"], 1.0)
    # the implicit-reward accuracy and margin r_w − r_l
    return {"accuracy": sums["correct"] / pairs, "margin": sums["margin_sum"] / pairs, "pairs_per_batch": sums["pairs"]}

  return train_state.sums_step(loss_sums, tx, lr_schedule, microbatches, summarize)


def check_config(config, checks) -> None:
  """DPO's own fields, without reading a file (stages.check_config)."""
  d = config.data
  loop.check_data_values(d, checks)
  loop.check_batch_values("data.batch_size", d.batch_size, config.mesh, checks)
  checks.at_least("data.max_responses", d.max_responses, 2)
  checks.positive("dpo.beta", config.dpo.beta)
  checks.one_of("dpo.pair_normalizer", config.dpo.pair_normalizer, losses.PAIR_NORMALIZERS)
  checks.one_of("dpo.form", config.dpo.form, losses.DPO_FORMS)
  checks.require_input(d.train, "data.train", "comparison JSONL files, or lab:comparisons:train:N")
  checks.require_input(config.model.init_from, "model.init_from", "DPO starts from the SFT model")


def unused_fields(config) -> dict[str, str]:
  if config.dpo.form == "plackett_luce":
    return {"dpo.pair_normalizer": "dpo.form is 'plackett_luce', whose loss has no pair normalizer"}
  return {}


def train(config, workdir: str) -> dict[str, float]:
  # ---------------------------------------------------------------- setup and validation (no compile yet)
  setup = loop.setup(config, workdir, seq_len=config.data.seq_len)
  config, mesh, rules = setup.config, setup.mesh, setup.rules
  d = config.dpo
  reference = model_io.read_source(d.reference, "dpo.reference") if d.reference else setup.source
  loop.check_batch("data.batch_size", config.data.batch_size, mesh)
  data = stage_data.build_comparison_data(setup.data_cfg, setup.tokenizer, seed=config.seed, **setup.process)
  total_steps = loop.steps_for_epochs(config, len(data.train_source))

  # ---------------------------------------------------------------- init (from the SFT model) or restore
  run = loop.start_training(setup, workdir, kind="lm", total_steps=total_steps, data=data)
  if setup.model_cfg.lora.rank and not d.reference:  # the reference is the policy's base, its adapters off
    ref_graphdef = models.abstract(dataclasses.replace(setup.model_cfg, lora=models.LoraConfig()))[0]
    ref_shardings = lora.without_adapters(run.shardings.params)

    def reference_params(state):
      return lora.without_adapters(state.params)  # the same arrays: no second copy
  else:
    ref_graphdef, ref_params = model_io.load_frozen(reference, "lm", mesh, rules, seed=config.seed)
    ref_shardings = jax.tree.map(lambda t: t.sharding, ref_params)

    def reference_params(_state):
      return ref_params

  # ---------------------------------------------------------------- step functions
  loss_options = {"beta": d.beta, "normalizer": d.pair_normalizer, "form": d.form}
  train_step = make_train_step(run.graphdef, run.tx, run.lr_schedule, config.optim.microbatches, **loss_options)
  batch_sh = loop.batch_sharding(mesh, rules)
  jitted_step = train_state.jit_step(train_step, run.shardings, batch_sh, rules)
  ref_fn = train_state.jit_eval(
    lambda p, b: sequence_logps(ref_graphdef, p, b), mesh, rules, ref_shardings, out_shardings=batch_sh
  )

  def with_reference(batch, state):
    return dict(batch, ref_logps=ref_fn(reference_params(state), batch))

  def step_fn(state, batch):
    return jitted_step(state, with_reference(batch, state))

  def eval_step(params, batch):
    """Per prompt: (loss, correct pairs, pairs, Σ margins), as training computes them."""
    terms = prompt_terms(run.graphdef, params, batch, **loss_options)
    return terms["loss"], terms["correct"], terms["num_pairs"], terms["margin_sum"]

  eval_fn = train_state.jit_eval(
    eval_step, mesh, rules, run.shardings.params, out_shardings=train_state.replicated(mesh)
  )

  def evaluate(state) -> dict[str, float]:
    totals = np.zeros(5)  # Σ prompt losses, prompts with pairs, correct pairs, pairs, Σ margins
    for batch in data.eval_batches(config.data.eval_batches or None):
      batch = with_reference(loop.to_global(batch, mesh, rules), state)
      prompt_loss, correct, pairs, margin = jax.device_get(eval_fn(state.params, batch))
      totals += (prompt_loss[pairs > 0].sum(), (pairs > 0).sum(), correct.sum(), pairs.sum(), margin.sum())
    if not totals[1]:
      return {}
    return {
      "eval_loss": totals[0] / totals[1],
      "eval_accuracy": totals[2] / totals[3],
      "eval_margin": totals[4] / totals[3],
      "eval_pairs": totals[3],
    }

  # ---------------------------------------------------------------- train loop
  tokens_per_step = config.data.batch_size * config.data.max_responses * config.data.seq_len
  state, final = loop.train_loop(
    setup, workdir, run.ckpt, data, run.state, step_fn, evaluate, tokens_per_step=tokens_per_step
  )

  # ---------------------------------------------------------------- export: the policy, a language model
  export_dir = paths.join(workdir, "export")
  model_io.export(export_dir, state.params, "lm", setup.model_cfg, tokenizer=config.data.tokenizer)
  loop.print_summary("DPO", final, export=export_dir)
  return final
