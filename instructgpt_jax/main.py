"""Entry point: `python -m instructgpt_jax.main --config=configs/<stage>.py[:arg] --workdir=DIR`.

Any config field can be overridden with `--config.<field>=<value>`. On a multi-host cluster the JAX
distributed runtime is initialized first (`--config.distributed=true`, or automatically on TPU VMs).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from instructgpt_jax import errors

# Config files import `configs.common`; make the repository root importable when run from it.
sys.path.insert(0, os.getcwd())

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path of a config file, optionally with :arg.", lock_config=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")

STAGES = ("pretrain", "sft", "rm", "ppo")


DISTRIBUTED_MODES = ("off", "auto", "manual")


def initialize_distributed(dist) -> None:
  """jax.distributed.initialize from the config's `distributed` section (before any device is touched)."""
  if dist.mode not in DISTRIBUTED_MODES:
    raise errors.ConfigError(f"config.distributed.mode: {dist.mode!r} is not one of {DISTRIBUTED_MODES}")
  if dist.mode == "auto":  # TPU VMs, SLURM and other clusters JAX detects by itself
    jax.distributed.initialize()
  elif dist.mode == "manual":
    if not dist.coordinator_address:
      raise errors.ConfigError("config.distributed.coordinator_address: required with mode=manual (host:port)")
    jax.distributed.initialize(
      coordinator_address=dist.coordinator_address, num_processes=dist.num_processes, process_id=dist.process_id
    )


def run(config, workdir: str):
  """Runs the stage named by `config.stage` in `workdir`; returns that stage's final metrics."""
  if config.stage not in STAGES:
    raise errors.ConfigError(f"config.stage: {config.stage!r} is not one of {STAGES}")
  if config.get("distributed") and not jax.distributed.is_initialized():
    initialize_distributed(config.distributed)
  trainer = importlib.import_module(f"instructgpt_jax.trainers.{config.stage}")
  return trainer.train(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS report every save and every shard written at INFO; keep their warnings and errors only.
  chatty = ("orbax", "tensorflow_datasets", "array_record", "etils")
  logging.getLogger("absl").addFilter(
    lambda r: r.levelno >= logging.WARNING or not any(name in r.pathname for name in chatty)
  )
  try:
    final = run(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("final: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
