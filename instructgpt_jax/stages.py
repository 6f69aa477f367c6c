"""Which trainer runs a config: `run(config, workdir)` dispatches on `config.stage`.

Kept apart from main.py (the command line) so that Python code, the lab pipeline included, runs stages
without importing the flag definitions a second time.
"""

from __future__ import annotations

import importlib

import jax

from instructgpt_jax import errors

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "pipeline", "recipe")


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
