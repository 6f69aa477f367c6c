"""Public-benchmark evaluation with EleutherAI's lm-evaluation-harness, our JAX model as its backend
(library/lm_eval_model.py; `pip install -e .[eval]`):

    python -m instructgpt_jax.evaluate --init_from=runs/ppo --tasks=hellaswag,my_tasks/local_mc.yaml --out=runs/eval

--init_from: a run's workdir (the weights `export` takes: the selected checkpoint, or a PPO run's EMA policy), an
exported model, or hf:PATH (local or gs://). --tasks: comma-separated lm-eval task names, or paths of task YAML
files (their folder is searched for the tasks they name). lm-eval writes its results JSON; `results.md` is its
table. Hub datasets need the network (docs/evaluation.md: pre-download them for a pod).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys

from instructgpt_jax import errors, paths


def task_list(spec: str) -> tuple[list[str], list[str]]:
  """(task names, folders to search): a YAML path gives the `task` it defines and its folder."""
  import yaml

  names, folders = [], []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    if item.endswith((".yaml", ".yml")):
      if not paths.path(item).exists():
        raise errors.UserError(f"--tasks: {item}: no such task file")
      config = yaml.safe_load(paths.path(item).read_text()) or {}
      if "task" not in config:
        raise errors.UserError(f"--tasks: {item} defines no `task:` name")
      names.append(config["task"])
      folders.append(str(paths.path(item).parent))
    else:
      names.append(item)
  if not names:
    raise errors.UserError("--tasks: empty; give lm-eval task names or task YAML files, comma-separated")
  return names, folders


def load_tasks(manager, names: list[str]) -> None:
  """Loads every task once (its dataset included) so that a task lm-eval does not have, or data that is
  missing or out of reach, is one line before the model is read."""
  known = set(manager.all_tasks)
  for name in names:
    if name not in known:
      near = difflib.get_close_matches(name, sorted(known), n=3)
      raise errors.UserError(
        f"--tasks: {name!r} is not an lm-eval task" + (f"; did you mean {', '.join(near)}?" if near else "")
      )
  import datasets

  datasets.disable_progress_bars()  # one line on error; lm-eval's own progress follows
  try:
    manager.load(names)
  except (OSError, ConnectionError) as e:  # FileNotFoundError (a data file), the hub out of reach, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise errors.UserError(
      f"--tasks: the data of {', '.join(names)} could not be read: {first} (hub datasets need the network or "
      "a filled HF_DATASETS_CACHE; docs/evaluation.md)"
    ) from None


def evaluate(
  init_from: str,
  tasks: str,
  out: str,
  *,
  num_fewshot=None,
  limit=None,
  batch_size: int = 16,
  chat: bool = False,
  **model_args,
) -> dict:
  """Runs the tasks on the model; writes results.json and results.md into `out`; returns lm-eval's results.
  `model_args`: JaxLM's (dtype, fsdp, max_length, max_gen_toks, progress_bar, step)."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import handle_non_serializable, make_table

  from instructgpt_jax.library import lm_eval_model

  paths.check_output_dir(out, "--out")
  names, folders = task_list(tasks)
  manager = TaskManager(include_path=sorted(set(folders)) or None)
  lm_eval_model.read_model(init_from, step=model_args.get("step", ""), dtype=model_args.get("dtype"))
  load_tasks(manager, names)
  model = lm_eval_model.JaxLM(init_from, batch_size=batch_size, **model_args)
  if chat:
    model.chat_template(True)  # a tokenizer without a template is one line here, before anything runs
  results = lm_eval.simple_evaluate(
    model=model,
    tasks=names,
    num_fewshot=num_fewshot,
    limit=limit,
    task_manager=manager,
    log_samples=False,
    apply_chat_template=chat,
  )
  results["instructgpt_jax"] = {
    "init_from": init_from,
    "compiled": sorted(map(list, model.compiled)),
    "truncated": model.truncated,
    "dtype": model.cfg.dtype,
    "mesh": dict(model.mesh.shape),
  }
  paths.make_dir(out)
  paths.write_text(paths.join(out, "results.json"), json.dumps(results, indent=2, default=handle_non_serializable))
  paths.write_text(paths.join(out, "results.md"), make_table(results) + "\n")
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
