"""Helpers for tests that run whole stages: small configs and reading what a run wrote."""

import json
import os

from configs import pretrain


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tiny_config(**overrides):
  """The tiny pretraining config with dotted overrides."""
  return configured(pretrain, "tiny", **overrides)


def configured(module, arg: str, **overrides):
  """`module.get_config(arg)` with dotted overrides, the progress bar off."""
  c = module.get_config(arg)
  c.progress_bar = False
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c
