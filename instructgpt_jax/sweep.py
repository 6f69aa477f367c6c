"""Hyperparameter sweeps: named runs from a config's `sweep()` or a grid of overrides, each run's config checked
before anything starts (the table of their results: sweep_table.py).

    python -m launch.sweep --config=configs/ppo.py:tiny --root=/tmp/sweep_ppo --print \
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
import itertools
import shlex
from collections.abc import Sequence
from typing import Any

from instructgpt_jax import config_lib, errors, paths


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  overrides: dict[str, Any]  # the sweep point's fields, in order


def _config_path(config_arg: str) -> str:
  return config_arg.split(":", 1)[0]


def sweep_points(config_arg: str) -> list[dict[str, Any]]:
  """The list of override dicts returned by `sweep()` in the config file."""
  path = _config_path(config_arg)
  module = config_lib.config_module(config_arg)
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


def load_configs(runs: Sequence[Run], config_arg: str, fixed: Sequence[str] = (), *, inputs: bool = True):
  """({run name: its ConfigDict}, {run name: {fixed field: why that run leaves it out}}): the config with the
  fixed overrides, then the point's, loaded and checked as `main.py` does first (`stages.check_config`;
  `inputs` False: the data and models a run reads may be left unset, as for `main.py --print_config`).

  A fixed override that some points cannot use (`--config.ppo.ptx_reduction=token_mean` in a sweep over
  γ = 0, 27.8: the γ = 0 runs have no pretraining term) is left out of those runs, whose command would
  otherwise be refused; one that no point can use is a problem. Every run is loaded before this returns, and
  every problem is raised together as one errors.UserError, a line per distinct problem: bare when every run
  has it (a typo in a fixed override or in a grid field, a bad config argument), else after the runs that
  have it (a bad value in one point)."""
  from instructgpt_jax import stages

  fixed_fields = stages.overridden_fields(fixed)
  configs, dropped, problems = {}, {}, {}
  for run in runs:
    try:
      point = override_flags(run.overrides)
      config = config_lib.load_config(config_arg, [*fixed, *point])
      unused = stages.unused_overrides(config, [f for f in fixed_fields if f not in run.overrides])
      if unused:
        kept = [flag for flag, field in zip(fixed, fixed_fields) if field not in unused]
        config = config_lib.load_config(config_arg, [*kept, *point])
        dropped[run.name] = unused
      overridden = [f for f in fixed_fields if f not in unused] + list(run.overrides)
      stages.check_config(config, overridden, inputs=inputs)
      configs[run.name] = config
    except errors.UserError as e:
      for line in str(e).splitlines():
        problems.setdefault(line, []).append(run.name)
  for field in fixed_fields:
    if runs and all(field in dropped.get(run.name, {}) for run in runs):
      problems.setdefault(f"{field}: given, but {dropped[runs[0].name][field]}; drop it", []).extend(
        run.name for run in runs
      )
  if problems:
    lines = [line if len(names) == len(runs) else f"{runs_named(names)}: {line}" for line, names in problems.items()]
    raise errors.UserError("\n".join(lines))
  return configs, dropped


def runs_named(names: Sequence[str], shown: int = 3) -> str:
  more = f" and {len(names) - shown} more" if len(names) > shown else ""
  return ("run " if len(names) == 1 else "runs ") + ", ".join(names[:shown]) + more


def command(
  run: Run, config_arg: str, fixed: Sequence[str] = (), *, python: str = "python", left_out: Sequence[str] = ()
) -> list[str]:
  """The `main.py` command line of one run: the config, its workdir, the fixed overrides (but those of the
  `left_out` fields: `load_configs`), then the point's."""
  fixed = [flag for flag in fixed if flag.split("=", 1)[0].removeprefix("--config.") not in left_out]
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


def run_local(runs: Sequence[Run], configs: dict[str, Any], commands: dict[str, str]) -> dict[str, dict[str, float]]:
  """Runs the sweep one run after another in this process (`stages.run` on each run's loaded config, announced
  by its command); a finished run resumes to its end. -> {run name: its final metrics}."""
  from instructgpt_jax import stages

  finals = {}
  for run in runs:
    print(f"== {run.name}: {commands[run.name]}", flush=True)
    finals[run.name] = stages.run(configs[run.name], run.workdir)
  return finals
