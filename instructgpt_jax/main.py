"""Entry point: `python -m instructgpt_jax.main --config=configs/<stage>.py[:arg] --workdir=DIR`.

Any config field can be overridden with `--config.<field>=<value>`. The config file may be given by any path,
from any folder. Before anything else the whole config is checked (`stages.check_config`): a field that does
not exist (with the nearest name), a value of the wrong type or out of range, a bad config argument, two
fields that contradict each other, or an override the stage cannot use is one line each (exit 2). On a
multi-host cluster the JAX distributed runtime is initialized next (`--config.distributed.mode=auto` or
`manual`, stages/__init__.py).

    python -m instructgpt_jax.main --config=configs/ppo.py:tiny --print_config    # the resolved config, as JSON

`--print_config` prints the config the run would use, the model's resolved shape included (from
`model.init_from` where one is given), and exits; `--workdir` is not needed for it, nor are the inputs a run
requires (data files, the models PPO starts from) checked for being given. `--check_config` checks the config
and that a `--workdir` is given, as a run does first, and exits (launch/slurm.sbatch runs it before srun).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from instructgpt_jax import config_lib, errors, stages

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path of a config file, optionally with :arg.", lock_config=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (JSON) and exit.")
_CHECK_CONFIG = flags.DEFINE_bool("check_config", False, "Check the whole config, as a run does first, and exit.")

run = stages.run  # `main.run(config, workdir)` runs a stage from Python


def fail(error: errors.UserError):
  """Reports a user's mistake, one line per problem (`error: ...`), no traceback; exit status 2."""
  for line in str(error).splitlines():
    print(f"error: {line}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax, TFDS and the GCS clients report every save, shard and read at INFO; keep their warnings and errors.
  chatty = ("orbax", "tensorflow_datasets", "array_record", "etils", "fsspec", "gcsfs")
  logging.getLogger("absl").addFilter(
    lambda r: r.levelno >= logging.WARNING or not any(name in r.pathname for name in chatty)
  )
  config = _CONFIG.value
  try:
    overridden = config_flags.get_override_values(flags.FLAGS["config"])
    stages.check_config(config, overridden, inputs=not _PRINT_CONFIG.value)
    if _PRINT_CONFIG.value:
      print(json.dumps(stages.resolved_config(config), indent=2))
      return
    if not _WORKDIR.value:
      raise errors.UserError("--workdir: required (where the run keeps its checkpoints and metrics)")
    if _CHECK_CONFIG.value:
      print(f"config checked: {config.stage}, no problems")
      return
    final = run(config, _WORKDIR.value)
  except errors.UserError as e:  # bad input: one line per problem, no traceback
    fail(e)
  except errors.Preempted as e:  # saved; exit 0 so a scheduler that resubmits the job resumes it
    logging.warning("%s", e)
    return
  print("final: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a missing config file, a bad config argument (`:tinyy`), a field that does not
  exist or a value of the wrong type reported as one line (exit 2)."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    if config_arg:
      config_lib.check_config_arg(config_arg)
    return flags.FLAGS(argv)
  except errors.UserError as e:
    fail(e)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    fail(errors.ConfigError(config_lib.override_error(e, argv)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
