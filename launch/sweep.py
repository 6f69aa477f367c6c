"""Expand a sweep into named runs, run them here one after another or print their commands; compare and rank the
runs found under a sweep's root.

    # a grid of overrides (or, with no --grid, the config's sweep()) run here in order, then the table
    python -m launch.sweep --config=configs/pretrain.py:tiny --root=/tmp/sweep_lr --run \
        --grid=optim.lr=1e-3,3e-3 --grid=seed=0,1 \
        --config.total_steps=20 --config.eval_every_steps=5 --config.log_every_steps=5 --config.progress_bar=false
    # the same runs' commands (for a TPU pod: --launcher=tpu --tpu=NAME --zone=ZONE; SLURM: --launcher=slurm)
    python -m launch.sweep --config=configs/pretrain.py:tiny --root=/tmp/sweep_lr --print \
        --grid=optim.lr=1e-3,3e-3 --grid=seed=0,1 \
        --config.total_steps=20 --config.eval_every_steps=5 --config.log_every_steps=5 --config.progress_bar=false
    # the table of every run under the root, from each run's config.json and metrics.jsonl; ranked; CSV
    python -m launch.sweep --root=/tmp/sweep_lr --table
    python -m launch.sweep --root=/tmp/sweep_lr --table --sort=eval_loss --reduce=mean:3
    python -m launch.sweep --root=/tmp/sweep_lr --table --by_seed --format=csv
    # the best configuration's runs: name and workdir
    python -m launch.sweep --root=/tmp/sweep_lr --best=eval_loss

Each run is `main.py` with `--workdir=<root>/<name>`, the fixed `--config.*` flags given here, and the
point's overrides; rerunning a sweep resumes every run from its newest checkpoint. Before anything is printed
or run, every run's whole config is loaded and checked as main.py does: a mistake in any of them is one line
per problem (`error: ...` on stderr) and exit status 2. --table and --best need no --config (given, it is
checked the same way, except that the data and models a run reads may be left unset: nothing runs). Runs
whose configs differ only in `seed` are one row (mean, std, 95% t interval, n; --by_seed shows them apart).
docs/sweeps.md describes the table.
"""

from __future__ import annotations

import argparse
import sys

from instructgpt_jax import errors, paths, sweep, sweep_table


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="", help="configs/<stage>.py[:arg]; required with --run and --print")
  parser.add_argument("--root", required=True, help="the sweep's directory: one workdir per run below it")
  parser.add_argument("--grid", action="append", default=[], help="field=v1,v2 (repeat); default: sweep()")
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--run", action="store_true", help="run every point here, one after another, then the table")
  mode.add_argument("--print", action="store_true", help="print each run's command")
  mode.add_argument("--table", action="store_true", help="the table of the runs under --root")
  mode.add_argument("--best", metavar="METRIC", default="", help="the best run's name and workdir (as --sort)")
  parser.add_argument("--metrics", default="", help="the table's metrics, comma-separated (default: the stage's)")
  parser.add_argument("--sort", default="", help="METRIC: best first; -METRIC descending, +METRIC ascending")
  parser.add_argument("--reduce", default="last", help="each cell: last | best[:K] | mean[:K] of the last K values")
  parser.add_argument("--by_seed", action="store_true", help="a row per run: no pooling of seeds")
  parser.add_argument("--stage", default="", help="only runs of this stage (a root holding several)")
  parser.add_argument("--format", choices=tuple(sweep_table.FORMATS), default="markdown")
  parser.add_argument("--python", default="python", help="the interpreter in printed commands")
  parser.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
  parser.add_argument("--tpu", default="", help="--launcher=tpu: the TPU VM's name")
  parser.add_argument("--zone", default="", help="--launcher=tpu: its zone")
  return parser


def main(argv=None) -> int:
  args, fixed = _parser().parse_known_args(argv)
  try:
    return _main(args, fixed)
  except errors.UserError as e:  # bad input: a line per problem, no traceback
    for line in str(e).splitlines():
      print(f"error: {line}", file=sys.stderr)
    return 2


def _checked_runs(args, fixed: list[str]):
  """(the runs, their loaded configs): every flag and every run's config checked before anything happens."""
  bad = [f for f in fixed if not f.startswith("--config.")]
  if bad:
    raise errors.UserError(f"unknown arguments {bad} (fixed overrides are --config.<field>=<value>)")
  if not args.config:
    if args.run or args.print:
      raise errors.UserError("--config: required with --run and --print")
    if args.grid or fixed:
      raise errors.UserError("--grid and --config.<field> overrides need --config")
    return [], {}, {}
  given = {
    "--launcher": args.launcher != "local",
    "--tpu": args.tpu,
    "--zone": args.zone,
    "--python": args.python != "python",
  }
  printing_only = [flag for flag, is_given in given.items() if is_given]
  if printing_only and not args.print:
    raise errors.UserError(f"{', '.join(printing_only)}: go with --print (the commands for elsewhere); --run runs here")
  if args.launcher == "tpu" and args.print and not (args.tpu and args.zone):
    raise errors.UserError("--launcher=tpu: give the TPU VM's --tpu=NAME and --zone=ZONE")
  points = sweep.grid_points(args.grid) if args.grid else sweep.sweep_points(args.config)
  runs = sweep.expand(points, args.root)
  configs, dropped = sweep.load_configs(runs, args.config, fixed, inputs=args.run or args.print)
  for field in dict.fromkeys(f for unused in dropped.values() for f in unused):
    names = [name for name, unused in dropped.items() if field in unused]
    why = dropped[names[0]][field]
    print(f"note: --config.{field} is left out of {sweep.runs_named(names)}: {why}", file=sys.stderr)
  return runs, configs, dropped


def _main(args, fixed: list[str]) -> int:
  reduce = sweep_table.parse_reduce(args.reduce)
  for spec in (args.sort, args.best):
    if spec:
      sweep_table.parse_sort(spec)
  runs, configs, dropped = _checked_runs(args, fixed)
  commands = {
    run.name: sweep.command(run, args.config, fixed, python=args.python, left_out=dropped.get(run.name, {}))
    for run in runs
  }
  if args.print:
    for run in runs:
      argv = commands[run.name]
      if args.launcher == "tpu":
        from launch import tpu

        print(tpu.shell(tpu.run_command(args.tpu, args.zone, argv[3:])))
      elif args.launcher == "slurm":
        print(sweep.shell(["sbatch", f"--job-name={run.name}", "launch/slurm.sbatch", *argv[3:]]))
      else:
        print(sweep.shell(argv))
    return 0
  if args.run:
    paths.make_dir(args.root)
    sweep.run_local(runs, configs, {name: sweep.shell(argv) for name, argv in commands.items()})

  found = sweep_table.find_runs(args.root, args.stage)
  metrics = [m for m in args.metrics.split(",") if m]
  if args.best:
    sweep_table.check_logged(sweep_table.parse_sort(args.best)[0], found, "--best")
  table = sweep_table.comparison(found, metrics, reduce=reduce, by_seed=args.by_seed, sort=args.best or args.sort)
  if args.best:
    for run in sweep_table.best(table, sweep_table.parse_sort(args.best)[0]).runs:
      print(f"{run.name}\t{run.workdir}")
    return 0
  print(sweep_table.FORMATS[args.format](table))
  return 0


if __name__ == "__main__":
  sys.exit(main())
