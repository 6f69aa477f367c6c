"""The runs under a sweep's root, compared: found on disk, each from its own config.json and metrics.jsonl (no
config and no grid needed), the fields that differ as columns, ranked by a metric's direction, runs that differ
only in their seed pooled into a mean with a 95% Student-t interval; Markdown, CSV or JSON (docs/sweeps.md).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from instructgpt_jax import errors, paths
from instructgpt_jax import metrics as metrics_lib

# ------------------------------------------------------------------------------------------ runs on disk

IGNORED_FIELDS = ("instructgpt_jax_version", "git_commit")  # written into config.json; differ by checkout
OWN_FOLDER = "<run>"  # stands for a run's own top folder in the config values that name it


@dataclasses.dataclass(frozen=True)
class FoundRun:
  """A run under a sweep's root: its folder relative to the root, its stage, its config.json flattened to
  dotted fields (its own folder written as OWN_FOLDER), and its metrics.jsonl rows."""

  name: str
  workdir: str
  stage: str
  fields: dict[str, Any]
  rows: list[dict[str, float]]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"ppo": {"kl_coef": 0.02}} -> {"ppo.kl_coef": 0.02}; lists stay values."""
  out = {}
  for key, value in config.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _own_folder_replaced(value: Any, folders: Sequence[str]) -> Any:
  """`value` with each of `folders` (a path and its absolute form) written OWN_FOLDER where it is a whole path
  prefix (followed by '/', ',', white space or the end), in strings and inside lists."""
  if isinstance(value, str):
    for folder in folders:
      value = re.sub(re.escape(folder) + r"(?![^/,\s])", OWN_FOLDER, value)
    return value
  if isinstance(value, list):
    return [_own_folder_replaced(v, folders) for v in value]
  return value


def _is_run(folder) -> bool:
  """A run's folder: its config.json is a run's (it names a stage; an HF export's config.json does not)."""
  config = folder / "config.json"
  return config.exists() and "stage" in paths.read_json(config, {})


def _run_folders(root: str) -> list[tuple[str, str]]:
  """(name, top folder) of each run's folder (`_is_run`): a child of `root`, or, for a child that is none (a lab
  pipeline or recipe workdir), each of its own children that is one."""
  found = []
  for child in sorted(paths.path(root).iterdir(), key=lambda p: p.name):
    if _is_run(child):
      found.append((child.name, child.name))
    elif child.is_dir():
      found += [
        (f"{child.name}/{g.name}", child.name) for g in sorted(child.iterdir(), key=lambda p: p.name) if _is_run(g)
      ]
  return found


def find_runs(root: str, stage: str = "") -> list[FoundRun]:
  """Every run under `root` (see _run_folders), of `stage` when given. A root that does not exist or holds no
  run, or runs of several stages with no `stage` chosen, is a one-line errors.UserError."""
  if not paths.path(root).exists():
    raise errors.UserError(f"--root: {root}: no such folder")
  runs = []
  for name, top in _run_folders(root):
    workdir = paths.join(root, name)
    config = paths.read_json(paths.join(workdir, "config.json"))
    own = [paths.join(root, top)]
    if not paths.is_remote(root):
      own.insert(0, str(paths.absolute(own[0])))
    fields = {k: _own_folder_replaced(v, own) for k, v in flatten(config).items() if k not in IGNORED_FIELDS}
    rows = metrics_lib.read_rows(workdir)
    if config.get("stage") == "ppo":
      rows = [with_policy_loss(row) for row in rows]
    runs.append(FoundRun(name, workdir, str(config.get("stage", "")), fields, rows))
  if not runs:
    raise errors.UserError(f"--root: {root}: no runs (no folder below it holds a config.json)")
  counts = {s: sum(r.stage == s for r in runs) for s in dict.fromkeys(r.stage for r in runs)}
  if stage:
    if stage not in counts:
      raise errors.UserError(f"--stage={stage}: no {stage} run under {root} (stages: {', '.join(counts)})")
    return [r for r in runs if r.stage == stage]
  if len(counts) > 1:
    found = ", ".join(f"{s}: {n}" for s, n in counts.items())
    raise errors.UserError(f"--root: {root} holds runs of several stages ({found}); pick one with --stage=NAME")
  return runs


def with_policy_loss(row: dict[str, float]) -> dict[str, float]:
  """A PPO row with `policy_loss`, the clipped policy loss alone. Every PPO run logs it since version 0.2.0;
  an earlier run without the ptx term logged it only as `loss` (plus kl_coef · kl_loss where the KL is in the
  loss, ppo.kl_in="loss"), from which it is worked out here."""
  if "policy_loss" in row or "loss" not in row:
    return row
  return dict(row, policy_loss=row["loss"] - row.get("kl_coef", 0.0) * row.get("kl_loss", 0.0))


# ------------------------------------------------------------------------------------------ metrics

HIGHER, LOWER = "higher", "lower"

# Each metric whose better direction is known, and the stages whose table shows it by default, in this order.
# A metric that is not here sorts only with a sign (--sort=-METRIC / +METRIC).
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
  "score": (HIGHER, ("ppo",)),  # the RM's mean score of the rollouts
  "kl": (LOWER, ("ppo",)),  # KL(π ‖ π_SFT) of a response, summed over its tokens: the reward's penalty
  "eval_win_rate_rm": (HIGHER, ("ppo",)),
  "policy_loss": (LOWER, ("ppo",)),  # the clipped loss without γ·ptx (with_policy_loss)
  "eval_accuracy": (HIGHER, ("rm", "dpo")),
  "eval_margin": (HIGHER, ("dpo",)),
  "eval_loss": (LOWER, ("pretrain", "sft", "rm", "dpo")),
  "eval_rm_score": (HIGHER, ("sft",)),
  "loss": (LOWER, ("pretrain", "sft")),  # SFT: with a pretraining mix, demonstrations and ptx together
  "accuracy": (HIGHER, ("rm", "dpo")),
  "raw_score": (HIGHER, ()),
  "eval_gold": (HIGHER, ()),
  "eval_win_rate_gold": (HIGHER, ()),
  "margin": (HIGHER, ()),
  "explained_variance": (HIGHER, ()),
  "demo_loss": (LOWER, ()),
  "ptx_loss": (LOWER, ()),
  "eval_ptx_loss": (LOWER, ()),
  "value_loss": (LOWER, ()),
  "kl_loss": (LOWER, ()),
  "logprob_gap": (LOWER, ()),
  "steps_per_sec": (HIGHER, ()),
  "tokens_per_sec": (HIGHER, ()),
  "rollout_tokens_per_sec": (HIGHER, ()),
  "episodes_per_sec": (HIGHER, ()),
  "time_rollout": (LOWER, ()),
  "time_scoring": (LOWER, ()),
  "time_training": (LOWER, ()),
}


def headline_metrics(stage: str) -> list[str]:
  return [m for m, (_, stages) in METRICS.items() if stage in stages]


def direction(metric: str) -> str | None:
  return METRICS[metric][0] if metric in METRICS else None


@dataclasses.dataclass(frozen=True)
class Reduce:
  """Which value of a metric's logged values a cell holds: the last, or the best or the mean of the last
  `last_k` (None: all)."""

  kind: str = "last"
  last_k: int | None = None

  def describe(self) -> str:
    if self.kind == "last":
      return "last"
    return f"{self.kind} of " + ("all" if self.last_k is None else f"last {self.last_k}")


def parse_reduce(text: str) -> Reduce:
  """--reduce's text (last, best, best:K, mean or mean:K) -> a Reduce."""
  kind, sep, k = text.partition(":")
  if kind in ("best", "mean") and (not sep or (k.isdigit() and int(k) > 0)):
    return Reduce(kind, int(k) if sep else None)
  if text == "last":
    return Reduce()
  raise errors.UserError(f"--reduce={text}: expected last, best, best:K, mean or mean:K (K ≥ 1)")


def reduce_values(values: Sequence[float], reduce: Reduce, better: str | None) -> float | None:
  """One number of a run's logged `values` of a metric (oldest first); None when there are none."""
  if not values:
    return None
  if reduce.kind == "last":
    return values[-1]
  window = values[-reduce.last_k :] if reduce.last_k else values
  if reduce.kind == "mean":
    return sum(window) / len(window)
  return max(window) if better == HIGHER else min(window)


def parse_sort(text: str) -> tuple[str, bool]:
  """--sort's METRIC, -METRIC or +METRIC -> (metric, descending). No sign: best first by its direction."""
  if text[:1] in "+-" and text[1:]:
    return text[1:], text[0] == "-"
  if direction(text) is None:
    raise errors.UserError(
      f"--sort={text}: {text} has no known better direction; write --sort=-{text} (descending) or +{text} (ascending)"
    )
  return text, direction(text) == HIGHER


# ------------------------------------------------------------------------------------------ the table


@dataclasses.dataclass(frozen=True)
class Pooled:
  """One metric over a row's seeds: the mean, the standard deviation (ddof=1), the 95% Student-t interval of
  the mean (mean ± t_{0.975, n-1} · std / √n) and n, the runs that logged it. std and ci95 are None for n=1."""

  mean: float
  std: float | None
  ci95: tuple[float, float] | None
  n: int


def pool(values: Sequence[float]) -> Pooled:
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return Pooled(mean, None, None, n)
  from scipy import stats

  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
  return Pooled(mean, std, (mean - half, mean + half), n)


@dataclasses.dataclass(frozen=True)
class Row:
  cells: dict[str, Any]  # column -> value: a config value, an int step, a float, a Pooled, or None
  runs: tuple[FoundRun, ...]  # one, or a pooled row's seeds


@dataclasses.dataclass(frozen=True)
class Table:
  columns: list[str]  # run, the fields that differ, [seeds], step, a column per metric
  metric_columns: dict[str, str]  # metric -> its column, e.g. "score" -> "score (mean of last 3)"
  rows: list[Row]
  pooled: bool


def logged_metrics(runs: Sequence[FoundRun]) -> list[str]:
  return sorted({k for r in runs for row in r.rows for k in row} - {"step"})


def check_logged(metric: str, runs: Sequence[FoundRun], flag: str) -> None:
  logged = logged_metrics(runs)
  if metric not in logged:
    near = difflib.get_close_matches(metric, logged, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise errors.UserError(f"{flag}: no run logged {metric!r}{hint}; the runs logged: {', '.join(logged)}")


def _key(value: Any) -> str:
  return json.dumps(value, sort_keys=True)


def differing_fields(runs: Sequence[FoundRun]) -> list[str]:
  """The config fields whose values are not the same in every run (a field a run lacks counts as None)."""
  fields = list(dict.fromkeys(f for r in runs for f in r.fields))
  return [f for f in fields if len({_key(r.fields.get(f)) for r in runs}) > 1]


def _order(value: Any) -> tuple:
  """A sort key that puts numbers in numeric order, before strings and other values."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (0, value, "")
  return (1, 0, _key(value))


def _pooled_name(names: Sequence[str]) -> str:
  """A row's name: its run's; a pooled row's, its runs' names with `seed=<value>` written `seed=*` when that
  makes them one, else the names joined by ','."""
  if len(names) == 1:
    return names[0]
  stars = {re.sub(r"(?<![^+/])seed=[^+/]*", "seed=*", n) for n in names}
  return stars.pop() if len(stars) == 1 else ",".join(names)


def comparison(
  runs: Sequence[FoundRun],
  metrics: Sequence[str] = (),
  *,
  reduce: Reduce = Reduce(),
  by_seed: bool = False,
  sort: str = "",
) -> Table:
  """The table of `runs`: a row per run, or, unless `by_seed`, a row per group of runs whose configs differ only
  in `seed` (when any group has two or more). Columns: the run, the fields that differ (seed only by_seed),
  `seeds` (pooled), `step` (the last logged; pooled: the smallest over the seeds), then each metric reduced by
  `reduce`: `metrics`, else the stage's headline metrics that some run logged, and the `sort` metric. Rows in
  the order of the differing fields' values, or best first by `sort` (parse_sort). A metric no run logged, or
  `best` of a metric with no known direction, is a one-line errors.UserError."""
  for m in metrics:
    check_logged(m, runs, "--metrics")
  if not metrics:
    logged = set(logged_metrics(runs))
    metrics = [m for m in headline_metrics(runs[0].stage) if m in logged]
  sort_metric, descending = parse_sort(sort) if sort else ("", False)
  if sort_metric:
    check_logged(sort_metric, runs, "--sort")
    metrics = list(metrics) + [sort_metric] * (sort_metric not in metrics)
  if reduce.kind == "best":
    unknown = [m for m in metrics if direction(m) is None]
    if unknown:
      raise errors.UserError(f"--reduce=best: no known better direction for {', '.join(unknown)}; use last or mean")

  fields = differing_fields(runs)
  groups: dict[str, list[FoundRun]] = {}
  for r in sorted(runs, key=lambda r: [_order(r.fields.get(f)) for f in fields]):
    group = r.name if by_seed else _key([r.fields.get(f) for f in fields if f != "seed"])
    groups.setdefault(group, []).append(r)
  pooled = any(len(g) > 1 for g in groups.values())
  if pooled:
    fields = [f for f in fields if f != "seed"]
  metric_columns = {m: f"{m} ({reduce.describe()})" for m in metrics}

  rows = []
  for members in groups.values():
    values = {m: [_reduced(r, m, reduce) for r in members] for m in metrics}
    values = {m: [v for v in vs if v is not None] for m, vs in values.items()}
    steps = [r.rows[-1]["step"] for r in members if r.rows]
    cells = {"run": _pooled_name([r.name for r in members]), **{f: members[0].fields.get(f) for f in fields}}
    if pooled:
      cells["seeds"] = len(members)
    cells["step"] = int(min(steps)) if steps else None
    for m, vs in values.items():
      cells[metric_columns[m]] = (pool(vs) if pooled else vs[0]) if vs else None
    rows.append(Row(cells, tuple(members)))
  if sort_metric:
    column = metric_columns[sort_metric]
    present = [r for r in rows if _number(r.cells[column]) is not None]
    present.sort(key=lambda r: _number(r.cells[column]), reverse=descending)
    rows = present + [r for r in rows if _number(r.cells[column]) is None]
  columns = ["run", *fields, *(["seeds"] if pooled else []), "step", *metric_columns.values()]
  return Table(columns, metric_columns, rows, pooled)


def _reduced(run: FoundRun, metric: str, reduce: Reduce) -> float | None:
  return reduce_values([row[metric] for row in run.rows if metric in row], reduce, direction(metric))


def _number(cell: Any) -> float | None:
  """A metric cell as one number (a pooled cell's mean); None for a missing or NaN value."""
  value = cell.mean if isinstance(cell, Pooled) else cell
  return None if value is None or math.isnan(value) else value


def best(table: Table, metric: str) -> Row:
  """The first row of a table sorted by `metric` (comparison's `sort`), when it has a value of it."""
  column = table.metric_columns[metric]
  if not table.rows or _number(table.rows[0].cells[column]) is None:
    raise errors.UserError(f"--best: no run has a value of {column}")
  return table.rows[0]


# ------------------------------------------------------------------------------------------ output


def _text(value: Any) -> str:
  """A cell in the Markdown table: floats to 6 significant digits, '-' where there is no value."""
  if value is None:
    return "-"
  if isinstance(value, Pooled):
    if value.std is None:
      return f"{value.mean:.4g} (n=1)"
    low, high = value.ci95
    return f"{value.mean:.4g} ± {value.std:.4g} [{low:.4g}, {high:.4g}] (n={value.n})"
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, str):
    return value
  return json.dumps(value)


def format_markdown(table: Table) -> str:
  """A Markdown table (readable as plain text too); a pooled table says what its cells are under it."""
  text = metrics_lib.markdown_table(table.columns, [r.cells for r in table.rows], _text)
  if table.pooled:
    text += (
      "\nMetrics of a row with several seeds: mean ± std (ddof=1) [95% Student-t interval of the mean] (n: the"
      " seeds that logged it), 4 significant digits."
    )
  return text


POOLED_PARTS = ("mean", "std", "ci95_low", "ci95_high", "n")


def format_csv(table: Table) -> str:
  """CSV with a header row; numbers in full precision, '' where there is no value. A pooled table has five
  columns per metric: `<column> mean`, `std`, `ci95_low`, `ci95_high`, `n`."""
  metric_columns = set(table.metric_columns.values())
  header = []
  for c in table.columns:
    header += [f"{c} {part}" for part in POOLED_PARTS] if table.pooled and c in metric_columns else [c]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  for row in table.rows:
    line = []
    for c in table.columns:
      value = row.cells[c]
      if table.pooled and c in metric_columns:
        parts = (None,) * 5 if value is None else (value.mean, value.std, *(value.ci95 or (None, None)), value.n)
        line += ["" if p is None else repr(p) for p in parts]
      else:
        line.append("" if value is None else value if isinstance(value, str) else json.dumps(value))
    writer.writerow(line)
  return out.getvalue().rstrip("\n")


def format_json(table: Table) -> str:
  """{"columns": [...], "rows": [{column: value, ..., "workdirs": [...]}]}; a pooled cell is
  {"mean", "std", "ci95": [low, high], "n"}, a missing value null."""

  def value(cell):
    if isinstance(cell, Pooled):
      return {"mean": cell.mean, "std": cell.std, "ci95": list(cell.ci95) if cell.ci95 else None, "n": cell.n}
    return cell

  rows = [
    {**{c: value(r.cells[c]) for c in table.columns}, "workdirs": [m.workdir for m in r.runs]} for r in table.rows
  ]
  return json.dumps({"columns": table.columns, "rows": rows}, indent=1)


FORMATS = {"markdown": format_markdown, "csv": format_csv, "json": format_json}
