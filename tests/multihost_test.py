"""Two processes on one machine (jax.distributed over gloo) train like one process with the same global batch."""

import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from instructgpt_jax import checkpoint

from runs import read_metrics

FLAGS = [
  "--config=configs/pretrain.py:tiny",
  "--config.total_steps=4",
  "--config.log_every_steps=1",
  "--config.checkpoint_every_steps=2",
  "--config.model.dtype=float32",
  "--config.progress_bar=false",
]


def launch(workdir, devices_per_process: int, extra=()) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  cmd = [sys.executable, "-m", "instructgpt_jax.main", f"--workdir={workdir}", *FLAGS, *extra]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
  port = portpicker.pick_unused_port()
  workers = [
    launch(
      tmp_path / "two",
      4,
      [
        "--config.distributed.mode=manual",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}",
      ],
    )
    for i in range(2)
  ]
  single = launch(tmp_path / "one", 8)
  for proc in [*workers, single]:
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]

  two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
  assert [r["step"] for r in two] == [1, 2, 3, 4]  # only process 0 writes metrics
  # Each host fed its half of every global batch; the global batches hold the same rows, so the
  # losses agree up to the order of a float sum.
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)
  # Both processes wrote their shards into one checkpoint, which restores whole in this process.
  params_two = checkpoint.Checkpointer(str(tmp_path / "two")).restore_params(4)
  params_one = checkpoint.Checkpointer(str(tmp_path / "one")).restore_params(4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_two, params_one)
