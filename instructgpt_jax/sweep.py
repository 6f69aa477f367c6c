"""Hyperparameter sweeps: named runs from a config's `sweep()` or a grid of overrides, and their comparison.

    python -m launch.sweep --config=configs/ppo.py:tiny --root=/tmp/sweep --run \
        --config.model.init_from=W_SFT --config.ppo.reward_model=W_RM/export

A sweep point is a dict of dotted config fields, `{"ppo.ptx_coef": 27.8, "ppo.kl_coef": 0.02}`, the form
`sweep()` beside a config returns. Its run is named by its overrides (`ptx_coef=27.8+kl_coef=0.02`, the
last component of each field unless two fields share it) and writes to `<root>/<name>`. No commas in
names: the data fields take comma-separated globs, and lab data files are written below the workdir. Each run is the
ordinary `main.py` command plus `--config.<field>=<value>` flags, so a sweep can be printed and launched
anywhere a single run can.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from instructgpt_jax import config_lib, errors, paths
from instructgpt_jax import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  overrides: dict[str, Any]  # the sweep point's fields, in order


def _config_path(config_arg: str) -> str:
  return config_arg.split(":", 1)[0]


_importable_repo = config_lib.make_config_importable


def load_config(config_arg: str, overrides: Sequence[str] = ()):
  """The ConfigDict `main.py --config=<config_arg> <overrides>` would run: ml_collections' own flag parsing,
  so `--config.a.b=v` flags mean exactly what they mean on the command line."""
  _importable_repo(config_arg)
  argv = ["sweep", f"--config={config_arg}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=False)
  # config_flags finds the `--config.<field>` overrides by reading sys.argv, whatever argv is parsed.
  saved, sys.argv = sys.argv, argv
  try:
    flag_values(argv)
  finally:
    sys.argv = saved
  return flag_values["config"].value


def sweep_points(config_arg: str) -> list[dict[str, Any]]:
  """The list of override dicts returned by `sweep()` in the config file."""
  path = _config_path(config_arg)
  _importable_repo(config_arg)
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise errors.ConfigError(f"{path}: defines no sweep(); pass --grid=field=v1,v2 instead")
  return [dict(point) for point in module.sweep()]


def _parse_value(text: str):
  for convert in (int, float):
    try:
      return convert(text)
    except ValueError:
      pass
  return text


def grid_points(grid: Sequence[str]) -> list[dict[str, Any]]:
  """["ppo.ptx_coef=0,27.8", "ppo.kl_coef=0.01,0.02"] -> the 4 points of their product, the first field outermost."""
  axes = []
  for item in grid:
    field, sep, values = item.partition("=")
    if not sep or not values:
      raise errors.ConfigError(f"--grid {item!r}: expected field=v1,v2,...")
    axes.append([(field.removeprefix("config."), _parse_value(v)) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)]


def run_name(point: dict[str, Any]) -> str:
  leaves = [field.rsplit(".", 1)[-1] for field in point]
  names = [leaf if leaves.count(leaf) == 1 else field for leaf, field in zip(leaves, point)]
  return "+".join(f"{name}={value}" for name, value in zip(names, point.values()))


def expand(points: Sequence[dict[str, Any]], root: str) -> list[Run]:
  runs = [Run(run_name(p), paths.join(root, run_name(p)), dict(p)) for p in points]
  if len({r.name for r in runs}) != len(runs):
    raise errors.ConfigError("sweep: two points have the same overrides")
  return runs


def override_flags(overrides: dict[str, Any]) -> list[str]:
  return [f"--config.{field}={value}" for field, value in overrides.items()]


def command(run: Run, config_arg: str, fixed: Sequence[str] = (), *, python: str = "python") -> list[str]:
  """The `main.py` command line of one run: the config, its workdir, the fixed overrides, then the point's."""
  return [
    python,
    "-m",
    "instructgpt_jax.main",
    f"--config={config_arg}",
    f"--workdir={run.workdir}",
    *fixed,
    *override_flags(run.overrides),
  ]


def shell(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)


def run_local(runs: Sequence[Run], config_arg: str, fixed: Sequence[str] = ()) -> dict[str, dict[str, float]]:
  """Runs the sweep one run after another in this process (`stages.run`); a finished run resumes to its end."""
  from instructgpt_jax import stages

  finals = {}
  for run in runs:
    print(f"== {run.name}: {shell(command(run, config_arg, fixed))}", flush=True)
    finals[run.name] = stages.run(load_config(config_arg, [*fixed, *override_flags(run.overrides)]), run.workdir)
  return finals


# ------------------------------------------------------------------------------------------ comparison

DEFAULT_METRICS = (
  "loss",
  "eval_loss",
  "eval_accuracy",
  "score",
  "kl",
  "ptx_loss",
  "value_loss",
  "eval_rm_score",
  "eval_win_rate_rm",
  "eval_gold",
)


def final_values(rows: Sequence[dict[str, float]]) -> dict[str, float]:
  """Each metric's last logged value (evaluation metrics come only on some rows), and the last step."""
  out: dict[str, float] = {}
  for row in rows:
    out.update(row)
  return out


def compare(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
  """(columns, one row per run): the sweep's overrides, the last step, and each metric's final value."""
  finals = {r.name: final_values(metrics_lib.read_rows(r.workdir)) for r in runs}
  if metrics is None:
    present = set().union(*finals.values()) if finals else set()
    metrics = [m for m in DEFAULT_METRICS if m in present]
  fields = list(dict.fromkeys(f for r in runs for f in r.overrides))
  rows = []
  for r in runs:
    final = finals[r.name]
    rows.append(
      {
        "run": r.name,
        **{f: r.overrides.get(f, "") for f in fields},
        "step": int(final["step"]) if "step" in final else None,
        **{m: final.get(m) for m in metrics},
      }
    )
  return ["run", *fields, "step", *metrics], rows


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)


def format_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
  """A Markdown table (readable as plain text too), floats to 6 significant digits, "-" for a missing value."""
  return metrics_lib.markdown_table(columns, rows, _cell)
