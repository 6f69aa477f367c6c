"""Expand a sweep into named runs, run them here one after another or print their commands, compare them.

    # the config's sweep() (configs/ppo.py: γ × β), run here in order, then the comparison table
    python -m launch.sweep --config=configs/ppo.py:tiny --root=/tmp/sweep --run \
        --config.model.init_from=W_SFT --config.ppo.reward_model=W_RM/export
    # a grid of overrides instead of sweep(); print the commands (for a TPU pod: --launcher=tpu ...)
    python -m launch.sweep --config=configs/sft.py:tiny --root=/tmp/lr --grid=optim.lr=1e-3,2e-3 --print
    # the table again later, from the runs' metrics.jsonl
    python -m launch.sweep --config=configs/ppo.py:tiny --root=/tmp/sweep --table

Each run is `main.py` with `--workdir=<root>/<name>`, the fixed `--config.*` flags given here, and the
point's overrides; rerunning a sweep resumes every run from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from instructgpt_jax import sweep


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/<stage>.py[:arg]")
  parser.add_argument("--root", required=True, help="the sweep's directory: one workdir per run below it")
  parser.add_argument("--grid", action="append", default=[], help="field=v1,v2 (repeat); default: sweep()")
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--run", action="store_true", help="run every point here, one after another")
  mode.add_argument("--print", action="store_true", help="print each run's command")
  mode.add_argument("--table", action="store_true", help="only the comparison table")
  parser.add_argument("--metrics", default="", help="comma-separated metric names for the table")
  parser.add_argument("--python", default="python", help="the interpreter in printed commands")
  parser.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
  parser.add_argument("--tpu", default="", help="--launcher=tpu: the TPU VM's name")
  parser.add_argument("--zone", default="", help="--launcher=tpu: its zone")
  args, fixed = parser.parse_known_args(argv)
  bad = [f for f in fixed if not f.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (fixed overrides are --config.<field>=<value>)")

  points = sweep.grid_points(args.grid) if args.grid else sweep.sweep_points(args.config)
  runs = sweep.expand(points, args.root)
  if args.print:
    for run in runs:
      argv = sweep.command(run, args.config, fixed, python=args.python)
      if args.launcher == "tpu":
        from launch import tpu

        print(tpu.shell(tpu.run_command(args.tpu, args.zone, argv[3:])))
      elif args.launcher == "slurm":
        print(sweep.shell(["sbatch", f"--job-name={run.name}", "launch/slurm.sbatch", *argv[3:]]))
      else:
        print(sweep.shell(argv))
    return 0
  if args.run:
    sweep.run_local(runs, args.config, fixed)
  columns, rows = sweep.compare(runs, [m for m in args.metrics.split(",") if m] or None)
  print(sweep.format_table(columns, rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
