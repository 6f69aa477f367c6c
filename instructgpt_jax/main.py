"""Entry point: `python -m instructgpt_jax.main --config=configs/<stage>.py[:arg] --workdir=DIR`.

Any config field can be overridden with `--config.<field>=<value>` (a field that does not exist is one line
with the nearest name). The config file may be given by any path, from any folder. On a multi-host cluster
the JAX distributed runtime is initialized first (`--config.distributed.mode=auto` or `manual`, stages.py).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from instructgpt_jax import config_lib, errors, stages

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path of a config file, optionally with :arg.", lock_config=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")

run = stages.run  # `main.run(config, workdir)` runs a stage from Python


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax, TFDS and the GCS clients report every save, shard and read at INFO; keep their warnings and errors.
  chatty = ("orbax", "tensorflow_datasets", "array_record", "etils", "fsspec", "gcsfs")
  logging.getLogger("absl").addFilter(
    lambda r: r.levelno >= logging.WARNING or not any(name in r.pathname for name in chatty)
  )
  try:
    final = run(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except errors.Preempted as e:  # saved; exit 0 so a scheduler that resubmits the job resumes it
    logging.warning("%s", e)
    return
  print("final: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override reported as one line (exit 2)."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg:
    if not os.path.isfile(config_arg.split(":", 1)[0]):  # a config file is local Python code
      print(f"error: --config: {config_arg.split(':', 1)[0]}: no such config file", file=sys.stderr)
      sys.exit(2)
    config_lib.make_config_importable(config_arg)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    print(f"error: {config_lib.override_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
