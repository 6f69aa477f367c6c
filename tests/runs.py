"""Helpers for tests that run whole stages: small configs and reading what a run wrote."""

from configs import pretrain
from instructgpt_jax import config_lib, metrics


def read_metrics(workdir):
  """The rows of `workdir/metrics.jsonl` (a local folder or gs://)."""
  return metrics.read_rows(str(workdir))


def tiny_config(**overrides):
  """The tiny pretraining config with dotted overrides."""
  return configured(pretrain, "tiny", **overrides)


def configured(module, arg: str, **overrides):
  """`module.get_config(arg)` with dotted overrides, the progress bar off."""
  return config_lib.with_values(module.get_config(arg), {"progress_bar": False, **overrides})
