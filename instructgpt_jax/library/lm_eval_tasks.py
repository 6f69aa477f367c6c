"""lm-evaluation-harness tasks on our backend (library/lm_eval_model.JaxLM), for `python -m
instructgpt_jax.evaluate` and the recipe's alignment-tax table: task lists (names or YAML paths), every task's
data loaded before any model is read, results written as lm-eval's JSON and markdown table, and the table of
paper §4.2 (Table 14's layout): each model's score on each task with its standard error, and its difference
from the starting model.
"""

from __future__ import annotations

import difflib
import functools
import json
import math

from instructgpt_jax import errors, paths


def task_list(spec: str, field: str = "--tasks") -> tuple[list[str], list[str]]:
  """(task names, folders to search): a YAML path gives the `task` it defines and its folder."""
  import yaml

  names, folders = [], []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    if item.endswith((".yaml", ".yml")):
      if not paths.path(item).exists():
        raise errors.UserError(f"{field}: {item}: no such task file")
      config = yaml.safe_load(paths.path(item).read_text()) or {}
      if "task" not in config:
        raise errors.UserError(f"{field}: {item} defines no `task:` name")
      names.append(config["task"])
      folders.append(str(paths.path(item).parent))
    else:
      names.append(item)
  if not names:
    raise errors.UserError(f"{field}: empty; give lm-eval task names or task YAML files, comma-separated")
  return names, folders


@functools.cache
def _manager(folders: tuple[str, ...], installed: bool):
  """lm-eval's TaskManager over the folders' task YAMLs and (`installed`) lm-eval's own tasks, whose index
  takes seconds to build: one per process."""
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=list(folders) or None, include_defaults=installed)


def task_manager(spec: str, field: str = "--tasks"):
  """(lm-eval's TaskManager over the installed tasks and the YAMLs' folders, the task names), every name
  known to it: one that is not is a one-line UserError with the nearest names."""
  names, folders = task_list(spec, field)
  bare = len(folders) < len(names)  # a task named, not given as a file: lm-eval's own tasks are indexed
  manager = _manager(tuple(sorted(set(folders))), bare)
  known = set(manager.all_tasks)
  for name in names:
    if name not in known:
      near = difflib.get_close_matches(name, sorted(known), n=3)
      raise errors.UserError(
        f"{field}: {name!r} is not an lm-eval task" + (f"; did you mean {', '.join(near)}?" if near else "")
      )
  return manager, names


def load_data(manager, names: list[str], field: str = "--tasks") -> None:
  """Loads every task once (its dataset included), so that data that is missing or out of reach is one line
  before any model is read."""
  import datasets

  datasets.disable_progress_bars()  # one line on error; lm-eval's own progress follows
  try:
    manager.load(names)
  except (OSError, ConnectionError) as e:  # FileNotFoundError (a data file), the hub out of reach, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise errors.UserError(
      f"{field}: the data of {', '.join(names)} could not be read: {first} (hub datasets need the network or "
      "a filled HF_DATASETS_CACHE; docs/evaluation.md)"
    ) from None


def run(lm, manager, names: list[str], *, num_fewshot=None, limit=None, chat: bool = False) -> dict:
  """lm-eval's results for the tasks on `lm` (a JaxLM), with what our backend did under "instructgpt_jax"."""
  import lm_eval

  if chat:
    lm.chat_template(True)  # a tokenizer without a template is one line here, before anything runs
  results = lm_eval.simple_evaluate(
    model=lm,
    tasks=names,
    num_fewshot=num_fewshot,
    limit=limit,
    task_manager=manager,
    log_samples=False,
    apply_chat_template=chat,
  )
  results["instructgpt_jax"] = {
    "init_from": lm.init_from,
    "tasks": names,
    "limit": limit,
    "compiled": sorted(map(list, lm.compiled)),
    "truncated": lm.truncated,
    "dtype": lm.cfg.dtype,
    "mesh": dict(lm.mesh.shape),
  }
  return results


def evaluate_models(models: dict[str, str], spec: str, out: str, *, field: str = "eval.tasks", **settings) -> dict:
  """{label: lm-eval results} of each model (label -> init_from) on the tasks, each written to
  `out/<n>_<label>/` (results.json, results.md) and read back from there on a rerun. Models of one
  architecture and tokenizer share one JaxLM and its compiled programs (JaxLM.swap). `settings`: `run`'s
  num_fewshot, limit and chat, and JaxLM's."""
  from instructgpt_jax.library import lm_eval_model

  manager, names = task_manager(spec, field)
  run_settings = {k: settings.pop(k) for k in ("num_fewshot", "limit", "chat") if k in settings}
  lm, done, loaded = None, {}, False
  for n, (label, init_from) in enumerate(models.items()):
    folder = paths.join(out, f"{n}_{''.join(c if c.isalnum() else '_' for c in label)}")
    kept = paths.read_json(paths.join(folder, "results.json"))
    ours = (kept or {}).get("instructgpt_jax", {})
    if (ours.get("init_from"), ours.get("tasks"), ours.get("limit")) == (init_from, names, run_settings.get("limit")):
      done[label] = kept
      continue
    lm_eval_model.read_model(init_from, dtype=settings.get("dtype"))  # a bad model is one line before data loads
    if not loaded:
      load_data(manager, names, field)
      loaded = True
    if lm is None or not lm.swap(init_from):
      lm = lm_eval_model.JaxLM(init_from, **settings)
    done[label] = run(lm, manager, names, **run_settings)
    write(done[label], folder)
  return done


def write(results: dict, out: str) -> None:
  """results.json (lm-eval's) and results.md (its table) into `out` (local or gs://)."""
  from lm_eval.utils import handle_non_serializable, make_table

  paths.make_dir(out)
  paths.write_text(paths.join(out, "results.json"), json.dumps(results, indent=2, default=handle_non_serializable))
  paths.write_text(paths.join(out, "results.md"), make_table(results) + "\n")


def scores(results: dict) -> dict[tuple[str, str], tuple[float, float | None, bool | None]]:
  """{(task, metric): (value, standard error or None, higher is better or None)} from lm-eval's results:
  every metric of every task (a metric's key is "name,filter"; its error's "name_stderr,filter")."""
  out = {}
  for task, metrics in sorted(results.get("results", {}).items()):
    better = results.get("higher_is_better", {}).get(task, {})
    for key, value in metrics.items():
      name, _, filt = key.partition(",")
      counts = name == "sample_len" or (better and name not in better)
      if name.endswith("_stderr") or not isinstance(value, (int, float)) or counts:
        continue  # a metric's error, the alias, and counts such as sample_len (no direction: not a metric)
      error = metrics.get(f"{name}_stderr,{filt}")
      error = float(error) if isinstance(error, (int, float)) and math.isfinite(error) else None
      metric = name if filt in ("", "none") else f"{name} ({filt})"
      out[(task, metric)] = (float(value), error, better.get(name))
  return out


def _cell(value: float, error: float | None, sign: bool = False) -> str:
  text = f"{value:+.4f}" if sign else f"{value:.4f}"
  return text + (f" ± {error:.4f}" if error is not None else "")


def tax_table(results: dict[str, dict]) -> str:
  """The alignment-tax table: one row per (task, metric), a column per model (label -> lm-eval results, the
  first the starting model) with its standard error, then each later model's difference from the first.
  A difference's error is √(se₁² + se₂²), as if the two models' errors were independent; on the same examples
  they are correlated, so this is wider than a paired error when the correlation is positive."""
  labels = list(results)
  by_label = {label: scores(r) for label, r in results.items()}
  first = labels[0]
  header = ["task", "metric", *labels, *(f"{label} − {first}" for label in labels[1:])]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for key, (start, start_error, better) in by_label[first].items():
    arrow = {True: " ↑", False: " ↓"}.get(better, "")
    row = [key[0], key[1] + arrow]
    row += [_cell(*by_label[label][key][:2]) if key in by_label[label] else "—" for label in labels]
    for label in labels[1:]:
      if key not in by_label[label]:
        row.append("—")
        continue
      value, error = by_label[label][key][:2]
      both = math.hypot(error, start_error) if error is not None and start_error is not None else None
      row.append(_cell(value - start, both, sign=True))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"
