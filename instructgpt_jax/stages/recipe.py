"""The recipe (configs/recipe.py): a pretrained HF model and HH-format pairs through SFT → RM → PPO-ptx → export.

Steps, each once in its own folder of the workdir (chain.once; a rerun continues where a run stopped):
  data     the pairs converted (data/convert.py) into demonstrations, comparisons and prompts, the last
           `data.eval_pairs` of each held out
  sft      the PPO-init SFT from the HF model (its tokenizer follows it through every stage)
  rm       the reward model from the SFT model, with its bias on the SFT demonstrations
  ppo      PPO-ptx from the SFT model against the RM (plain PPO without pretraining text)
  export   the PPO policy's EMA weights as an HF folder (export.py), loadable by transformers and vLLM
  eval     with `eval.tasks`: lm-eval's tasks on the starting model, the SFT model and the PPO policy (and
           `eval.ppo_without_ptx`), each in its own folder, and <workdir>/alignment_tax.md: the paper's §4.2
           alignment tax, each model's scores with their standard errors and differences from the start
"""

from __future__ import annotations

from instructgpt_jax import errors, paths
from instructgpt_jax.data import convert
from instructgpt_jax.library import model_io
from instructgpt_jax.stages import chain

KINDS = ("demonstrations", "comparisons", "prompts")


def split_data(pairs: str, directory: str, *, eval_records: int, bias_records: int) -> dict[str, str]:
  """Converts `pairs` into the three kinds and splits each into `<kind>_train.jsonl` and `<kind>_eval.jsonl`
  (the last `eval_records` records held out), and the first `bias_records` training demonstrations (0: all)
  into `demonstrations_bias.jsonl`; returns {"<kind>_<split>": path}."""
  paths.make_dir(directory)
  conversion = convert.convert(pairs, paths.join(directory, "all"), ",".join(KINDS))
  print(conversion.summary(), flush=True)
  out = {}
  for kind in KINDS:
    lines = paths.read_text(conversion.files[kind]).splitlines(keepends=True)
    if len(lines) <= eval_records:
      raise errors.DataError(
        f"data.pairs: {pairs}: {len(lines)} records leave none for training after data.eval_pairs={eval_records}"
      )
    for split, chunk in (("train", lines[:-eval_records]), ("eval", lines[-eval_records:])):
      out[f"{kind}_{split}"] = paths.join(directory, f"{kind}_{split}.jsonl")
      paths.write_text(out[f"{kind}_{split}"], "".join(chunk))
    if kind == "demonstrations":
      out["demonstrations_bias"] = paths.join(directory, "demonstrations_bias.jsonl")
      paths.write_text(out["demonstrations_bias"], "".join(lines[:-eval_records][: bias_records or None]))
  return out


def check_config(config, checks) -> None:
  """The recipe's own fields (stages.check_config checks each stage's section after them)."""
  if config.model or checks.inputs:
    model = f"{config.model!r}: give a HuggingFace folder as the config arg model=hf:PATH"
    checks.require(config.model.startswith("hf:"), "model", model)
  checks.require_input(config.data.pairs, "data.pairs", "HH-RLHF-style {chosen, rejected} JSONL (config arg data=)")
  checks.at_least("data.eval_pairs", config.data.eval_pairs, 1)
  checks.at_least("data.bias_demonstrations", config.data.bias_demonstrations, 0)
  if config.eval.tasks:
    checks.capture(check_eval, config)


def check_eval(config) -> None:
  """The evaluation's tasks exist (lm-eval installed), before any stage runs."""
  if config.eval.dtype not in ("float32", "bfloat16"):
    raise errors.UserError(f"eval.dtype: {config.eval.dtype!r} is not float32 or bfloat16")
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    raise errors.UserError('eval.tasks: needs lm-eval, the [eval] extra: pip install -e ".[eval]"') from None
  from instructgpt_jax.library import lm_eval_tasks

  lm_eval_tasks.task_manager(config.eval.tasks, "eval.tasks")
  if config.eval.ppo_without_ptx:
    model_io.read_source(config.eval.ppo_without_ptx, "eval.ppo_without_ptx")


def alignment_tax(config, workdir: str, out: str) -> dict:
  """lm-eval's tasks on the starting model, the SFT model and the PPO policy (its EMA, as exported), and
  PPO without ptx when given; <workdir>/alignment_tax.md is the table (lm_eval_tasks.tax_table)."""
  from instructgpt_jax.library import lm_eval_tasks

  e = config.eval
  models = {"start": config.model, "SFT": paths.join(workdir, "sft")}
  models["PPO-ptx" if config.data.ptx_corpus else "PPO"] = paths.join(workdir, "ppo")
  if e.ppo_without_ptx:
    models["PPO (no ptx)"] = e.ppo_without_ptx
  results = lm_eval_tasks.evaluate_models(
    models,
    e.tasks,
    out,
    limit=e.limit or None,
    num_fewshot=None if e.num_fewshot < 0 else e.num_fewshot,
    batch_size=e.batch_size,
    dtype=e.dtype,
    max_length=e.max_length or None,
    progress_bar=config.progress_bar,
  )
  table = lm_eval_tasks.tax_table(results)
  note = (
    f"# Alignment tax (paper §4.2)\n\nlm-eval tasks {', '.join(results['start']['results'])} in {e.dtype}"
    + (f", {e.limit} examples per task" if e.limit else "")
    + "; each model's results under eval/. A difference's ± is √(se₁² + se₂²) (errors taken as independent).\n\n"
  )
  paths.write_text(paths.join(workdir, "alignment_tax.md"), note + table)
  return {"table": table}


def unused_fields(config) -> dict[str, str]:
  """What the recipe sets in every stage's section from its own fields, or from the stage before."""
  unused = {}
  for name in config.stages:
    why = "the recipe sets it in every stage from its own field of that name"
    unused.update({f"stages.{name}.{f}": why for f in ("seed", "progress_bar", "compilation_cache_dir")})
    unused[f"stages.{name}.model.init_from"] = "the recipe starts each stage from the one before (config arg model)"
  why = "the recipe fills it in from its own data (config args data and ptx)"
  for field in ("sft.data.train", "sft.data.eval", "sft.data.pretrain_corpus", "rm.data.train", "rm.data.eval"):
    unused[f"stages.{field}"] = why
  for field in ("rm.data.bias_demonstrations", "ppo.data.train", "ppo.data.eval", "ppo.data.ptx_corpus"):
    unused[f"stages.{field}"] = why
  unused["stages.ppo.ppo.reward_model"] = "the recipe's PPO scores with the RM it trained"
  return unused


def train(config, workdir: str) -> dict[str, float]:
  paths.check_output_dir(workdir, "--workdir")
  paths.make_dir(workdir)
  stages, ptx = config.stages.copy_and_resolve_references(), config.data.ptx_corpus  # filled in below
  for stage in stages.values():
    stage.update(seed=config.seed, progress_bar=config.progress_bar, compilation_cache_dir=config.compilation_cache_dir)
  d = config.data
  files = chain.once(
    workdir,
    "data",
    lambda out: split_data(d.pairs, out, eval_records=d.eval_pairs, bias_records=d.bias_demonstrations),
  )
  sft_dir, rm_dir = paths.join(workdir, "sft"), paths.join(workdir, "rm")

  stages.sft.model.init_from = config.model
  stages.sft.data.update(train=files["demonstrations_train"], eval=files["demonstrations_eval"], pretrain_corpus=ptx)
  sft = chain.once(workdir, "sft", lambda d: chain.run_stage(stages.sft, d))

  stages.rm.model.init_from = sft_dir
  stages.rm.data.update(
    train=files["comparisons_train"], eval=files["comparisons_eval"], bias_demonstrations=files["demonstrations_bias"]
  )
  rm = chain.once(workdir, "rm", lambda d: chain.run_stage(stages.rm, d))

  stages.ppo.model.init_from = sft_dir
  stages.ppo.ppo.reward_model = paths.join(rm_dir, "export")
  stages.ppo.data.update(train=files["prompts_train"], eval=files["prompts_eval"], ptx_corpus=ptx)
  ppo = chain.once(workdir, "ppo", lambda d: chain.run_stage(stages.ppo, d))

  exported = chain.once(workdir, "export", lambda d: {"summary": model_io.export_hf(paths.join(workdir, "ppo"), d)})
  print(exported["summary"], flush=True)
  if config.eval.tasks:
    # Not chain.once: each model's results are kept (and reused while the tasks stay the same), the table is
    # made again, so a rerun with other tasks evaluates them.
    print(alignment_tax(config, workdir, paths.join(workdir, "eval"))["table"], flush=True)
  return {
    "sft_eval_loss": sft.get("eval_loss", float("nan")),
    "rm_eval_accuracy": rm.get("eval_accuracy", float("nan")),
    "rm_reward_bias": rm.get("reward_bias", float("nan")),
    "ppo_score": ppo.get("score", float("nan")),
    "ppo_kl": ppo.get("kl", float("nan")),
  }
