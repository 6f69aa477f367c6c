"""What every stage's trainer does the same way: validation before compiling, the workdir, the batch sharding."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from instructgpt_jax import sharding


class ConfigError(ValueError):
  """A config that cannot run (on this mesh, with this data), reported in one line before any compile."""


def check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def check_batch(name: str, batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the batch-parallel mesh axes (data × fsdp) and the hosts."""
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  check(
    batch_size % parallel == 0,
    f"{name}: {batch_size} does not divide over data×fsdp = {parallel} devices of mesh {dict(mesh.shape)}",
  )
  check(
    batch_size % jax.process_count() == 0, f"{name}: {batch_size} does not divide over {jax.process_count()} processes"
  )


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] array: the batch over data × fsdp, the rest replicated."""
  names = ("batch",) + (None,) * (ndim - 1)
  return NamedSharding(mesh, sharding.logical_to_spec(names, rules))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Host-local numpy batch (this process's rows) -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v) for k, v in batch.items()}


def write_config(workdir: str, config) -> None:
  """Process 0 writes the resolved config as JSON next to the checkpoints."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
