"""Stage 1: supervised fine-tuning on demonstrations (docs/paper.md §3), optionally with a pretraining mix.

    python -m instructgpt_jax.main --config=configs/sft.py:tiny --workdir=W_SFT

Phases: setup and validation → init (from a pretrained LM) or restore → train loop (loss on response
tokens) → evaluation every `eval_every_steps` and at the end → final save.

Checkpoint selection (paper §3.5, App. C.1; `select_checkpoint`, on for the baseline variant and off for
ppo_init, which the paper trains for 2 epochs and keeps): with `eval_rm.rm`, each evaluation samples
responses to the validation prompts and scores them with that RM; the checkpoint with the best mean score is
kept (never removed by retention) and named in `<workdir>/selected.json`. Without an RM, the lowest
validation loss selects (our fallback; the paper found validation loss a poor guide after ~1 epoch). Without
an eval split, or with `select_checkpoint=False`, nothing is selected and the last step is the stage's model.
A later stage's `model.init_from=<this workdir>` loads the selected checkpoint, else the newest
(`model.init_from_step=latest` loads the newest always).
"""

from __future__ import annotations

import jax

from instructgpt_jax import checkpoint, generation, paths, train_state
from instructgpt_jax.data import schemes, stage_data
from instructgpt_jax.library import judging, lm_steps, loop


def check_config(config, checks) -> None:
  """SFT's own fields, without reading a file (stages.check_config)."""
  d = config.data
  loop.check_data_values(d, checks)
  loop.check_batch_values("data.batch_size", d.batch_size, config.mesh, checks)
  checks.require_input(d.train, "data.train", "demonstration JSONL files, or lab:demonstrations:train:N")
  if checks.fraction("data.pretrain_mix", d.pretrain_mix, below_one=True) and d.pretrain_mix > 0:
    checks.require_input(
      d.pretrain_corpus, "data.pretrain_corpus", "pretraining text ('lab' or globs) with data.pretrain_mix > 0"
    )
  checks.one_of("data.pretrain_mix_by", d.pretrain_mix_by, ("rows", "loss_tokens"))
  e = config.eval_rm
  for field in ("num_prompts", "max_new_tokens", "batch_size"):
    checks.at_least(f"eval_rm.{field}", e[field], 1)
  checks.positive("eval_rm.temperature", e.temperature)
  if e.rm:
    checks.require_input(e.prompts, "eval_rm.prompts", "the validation prompts the RM scores (eval_rm.rm is set)")


def unused_fields(config) -> dict[str, str]:
  unused = {}
  if not config.eval_rm.rm:
    unused.update(
      {f"eval_rm.{f}": "eval_rm.rm is empty (no RM scores the evaluations)" for f in config.eval_rm if f != "rm"}
    )
  if not config.data.pretrain_mix:
    unused.update({f"data.{f}": "data.pretrain_mix is 0" for f in ("pretrain_corpus", "pretrain_mix_by")})
  return unused


def train(config, workdir: str) -> dict[str, float]:
  # ---------------------------------------------------------------- setup and validation (no compile yet)
  setup = loop.setup(config, workdir, seq_len=config.data.seq_len)
  config, model_cfg, tokenizer, mesh, rules = setup.config, setup.model_cfg, setup.tokenizer, setup.mesh, setup.rules
  loop.check_batch("data.batch_size", config.data.batch_size, mesh)
  data = stage_data.build_sft_data(setup.data_cfg, tokenizer, seed=config.seed, **setup.process)
  judge, eval_prompts = None, []
  if config.eval_rm.rm:
    judge = judging.Judge.load(config.eval_rm.rm, mesh, rules, field="eval_rm.rm")
    loop.check(
      judge.model_cfg.vocab_size == model_cfg.vocab_size,
      f"eval_rm.rm: its vocabulary ({judge.model_cfg.vocab_size}) differs from the policy's",
    )
    prompts_spec = schemes.resolve({"train": config.eval_rm.prompts}, paths.join(workdir, "data"), seed=config.seed)[
      "train"
    ]
    _, eval_prompts = judging.load_prompts(
      prompts_spec, tokenizer, data_dir=setup.data_cfg.data_dir, max_prompt_len=config.data.seq_len // 2
    )
    eval_prompts = eval_prompts[: config.eval_rm.num_prompts]
  total_steps = loop.steps_for_epochs(config, len(data.train_source), mix_fraction=data.mix_fraction)
  select = None  # which checkpoint the next stage starts from (module docstring)
  if not config.select_checkpoint:
    pass
  elif judge is not None:
    select = checkpoint.Selection(workdir, "eval_rm_score", "max")
  elif data.eval_source is not None:
    select = checkpoint.Selection(workdir, "eval_loss", "min")

  # ---------------------------------------------------------------- init (from a pretrained LM) or restore
  run = loop.start_training(setup, workdir, kind="lm", total_steps=total_steps, data=data, select=select)

  # ---------------------------------------------------------------- step functions
  microbatches = config.optim.microbatches
  train_step = lm_steps.make_train_step(run.graphdef, model_cfg, run.tx, run.lr_schedule, microbatches=microbatches)
  step_fn = train_state.jit_step(train_step, run.shardings, loop.batch_sharding(mesh, rules), rules)
  eval_fn = train_state.jit_eval(lm_steps.make_eval_step(run.graphdef), mesh, rules, run.shardings.params)
  sampler = None
  if judge is not None:
    settings = generation.SamplingSettings(
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=config.eval_rm.temperature
    )
    sampler = generation.Sampler(
      run.graphdef, settings, response_buckets=(config.eval_rm.max_new_tokens,), mesh=mesh, rules=rules
    )

  def evaluate(state) -> dict[str, float]:
    params = state.params
    loss = lm_steps.eval_loss(eval_fn, params, data.eval_batches(config.data.eval_batches or None), mesh, rules)
    row = {"eval_loss": loss} if loss is not None else {}
    if judge is not None:
      # The paper selects the SFT baseline's checkpoint by this score, not by validation loss (docs/paper.md §3.1).
      scores, _ = judging.sample_and_score(
        sampler,
        params,
        judge,
        eval_prompts,
        jax.random.PRNGKey(config.seed),
        batch_size=config.eval_rm.batch_size,
        max_new_tokens=config.eval_rm.max_new_tokens,
        pad_id=tokenizer.pad_id,
      )
      row["eval_rm_score"] = float(scores.mean())
    return row

  # ---------------------------------------------------------------- train loop
  tokens_per_step = config.data.batch_size * config.data.seq_len
  _, final = loop.train_loop(
    setup, workdir, run.ckpt, data, run.state, step_fn, evaluate, tokens_per_step=tokens_per_step, select=select
  )

  selected = select.best if select is not None else None
  chosen = f"step {selected['step']} ({selected['metric']} {selected['value']:.6g})" if selected else "the last"
  loop.print_summary(f"SFT ({config.variant})", final, workdir=workdir, selected=chosen)
  return final
