"""Public-benchmark evaluation with EleutherAI's lm-evaluation-harness, our JAX model as its backend
(library/lm_eval_model.py; `pip install -e .[eval]`):

    python -m instructgpt_jax.evaluate --init_from=runs/ppo --tasks=hellaswag,truthfulqa_mc2 --out=runs/eval_ppo

--init_from: a run's workdir (the weights `export` takes: the selected checkpoint, or a PPO run's EMA policy), an
exported model, or hf:PATH (local or gs://). --tasks: comma-separated lm-eval task names, or paths of task YAML
files (their folder is searched for the tasks they name). lm-eval writes its results JSON; `results.md` is its
table. Hub datasets need the network (docs/evaluation.md: pre-download them for a pod). docs/evaluation.md lists
the other flags (--dtype, --fsdp, --chat, --max_length, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys

from instructgpt_jax import errors, paths


def evaluate(init_from: str, tasks: str, out: str, **settings) -> dict:
  """Runs the tasks on the model; writes results.json and results.md into `out`; returns lm-eval's results.
  `settings`: lm_eval_tasks.run's (num_fewshot, limit, chat) and JaxLM's (batch_size, dtype, fsdp,
  max_length, max_gen_toks, progress_bar, step)."""
  from instructgpt_jax.library import lm_eval_model, lm_eval_tasks

  paths.check_output_dir(out, "--out")
  manager, names = lm_eval_tasks.task_manager(tasks)
  lm_eval_model.read_model(
    init_from, step=settings.get("step", ""), dtype=settings.get("dtype"), tokenizer=settings.get("tokenizer")
  )
  lm_eval_tasks.load_data(manager, names)
  run_settings = {k: settings.pop(k) for k in ("num_fewshot", "limit", "chat") if k in settings}
  lm = lm_eval_model.JaxLM(init_from, **settings)
  results = lm_eval_tasks.run(lm, manager, names, **run_settings)
  lm_eval_tasks.write(results, out)
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init_from", required=True, help="a run's workdir, an exported model, or hf:PATH")
  parser.add_argument("--tasks", required=True, help="lm-eval task names or task YAML paths, comma-separated")
  parser.add_argument("--out", required=True, help="the folder to write results.json and results.md into")
  parser.add_argument("--num_fewshot", type=int, default=None)
  parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction when < 1)")
  parser.add_argument("--batch_size", type=int, default=16, help="rows per compiled call")
  parser.add_argument("--chat", action="store_true", help="prompts in the tokenizer's chat template")
  parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the model's config)")
  parser.add_argument("--tokenizer", default=None, help="a tokenizer in place of the model's own")
  parser.add_argument("--fsdp", type=int, default=1, help="devices each parameter is split over")
  parser.add_argument("--max_length", type=int, default=None, help="the window (default: the model's)")
  parser.add_argument("--max_gen_toks", type=int, default=256, help="new tokens when a task does not say")
  parser.add_argument("--step", default="", help="a workdir's checkpoint: latest or a step number")
  parser.add_argument("--no_progress_bar", action="store_true")
  args = parser.parse_args(argv)
  logging.getLogger("lm_eval").setLevel(logging.WARNING)
  try:
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate(
      args.init_from,
      args.tasks,
      args.out,
      num_fewshot=args.num_fewshot,
      limit=limit,
      batch_size=args.batch_size,
      chat=args.chat,
      dtype=args.dtype,
      tokenizer=args.tokenizer,
      fsdp=args.fsdp,
      max_length=args.max_length,
      max_gen_toks=args.max_gen_toks,
      step=args.step,
      progress_bar=not args.no_progress_bar,
    )
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(paths.path(args.out, "results.md").read_text(), end="")
  ours = results["instructgpt_jax"]
  print(f"compiled programs: {len(ours['compiled'])}; requests cut to the window: {ours['truncated']}")


if __name__ == "__main__":
  main()
