"""Two processes on one machine (jax.distributed over gloo): they train like one process with the same global
batch, and a SIGTERM (a preemption notice) sent to only one of them makes both save the same step and exit 0,
after which the same command resumes exactly (pretraining and PPO)."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from instructgpt_jax import checkpoint

from runs import read_metrics

STEPS = 24
PRETRAIN = [
  "--config=configs/pretrain.py:tiny",
  f"--config.total_steps={STEPS}",
  "--config.log_every_steps=1",
  "--config.checkpoint_every_steps=1000",  # only the preemption's checkpoint and the final one
  "--config.model.dtype=float32",
  "--config.progress_bar=false",
]
PREEMPTED = re.compile(r"preempted \(SIGTERM\) at step (\d+): checkpoint saved")


def launch(workdir, devices_per_process: int, flags, extra=()) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  cmd = [sys.executable, "-m", "instructgpt_jax.main", f"--workdir={workdir}", *flags, *extra]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def launch_two(workdir, flags, devices_per_process: int = 4) -> list[subprocess.Popen]:
  port = portpicker.pick_unused_port()
  distributed = [
    "--config.distributed.mode=manual",
    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
    "--config.distributed.num_processes=2",
  ]
  extra = lambda i: [*distributed, f"--config.distributed.process_id={i}"]
  return [launch(workdir, devices_per_process, flags, extra(i)) for i in range(2)]


def finish(procs) -> list[str]:
  """Waits for every process; each must exit 0. Returns their stderr."""
  outputs = []
  for proc in procs:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    outputs.append(stderr)
  return outputs


def preempt_one_of_two(workdir, flags, *, after_rows: int, devices_per_process: int = 4) -> int:
  """Starts two processes, sends SIGTERM to process 1 alone once process 0 has logged `after_rows` rows; both
  must save the same step and exit 0. Returns that step."""
  procs = launch_two(workdir, flags, devices_per_process)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= after_rows):
    for proc in procs:
      assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, f"no {after_rows} metric rows within 300 s"
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  saved = [PREEMPTED.findall(stderr) for stderr in finish(procs)]
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved  # both processes stopped at the same step
  return int(saved[0][0])


def assert_resumed_equals_uninterrupted(resumed, straight, *, steps, keys, params_keys=("params",)):
  got, want = read_metrics(resumed), {r["step"]: r for r in read_metrics(straight)}
  assert [r["step"] for r in got] == list(range(1, steps + 1))  # every step once: no gaps, no repeats
  for row in got:
    assert {k: row[k] for k in keys} == {k: want[row["step"]][k] for k in keys}, row["step"]
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.Checkpointer(str(resumed)).restore_params(steps, keys=params_keys),
    checkpoint.Checkpointer(str(straight)).restore_params(steps, keys=params_keys),
  )


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
  """The same pretraining run, uninterrupted, in two processes (4 devices each) and in one (8 devices)."""
  root = tmp_path_factory.mktemp("pretrain_runs")
  finish([*launch_two(root / "two", PRETRAIN), launch(root / "one", 8, PRETRAIN)])
  return root


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(pretrain_runs):
  two, one = read_metrics(pretrain_runs / "two"), read_metrics(pretrain_runs / "one")
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # only process 0 writes metrics
  # Each host fed its half of every global batch; the global batches hold the same rows, so the
  # losses agree up to the order of a float sum.
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)
  # Both processes wrote their shards into one checkpoint, which restores whole in this process. (Adam divides
  # by sqrt(v): over 24 steps a sum-order difference in a near-zero gradient moves a weight by ~1e-6.)
  params_two = checkpoint.Checkpointer(str(pretrain_runs / "two")).restore_params(STEPS)
  params_one = checkpoint.Checkpointer(str(pretrain_runs / "one")).restore_params(STEPS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_two, params_one)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_and_resumes_exactly(pretrain_runs, tmp_path):
  workdir = tmp_path / "preempted"
  step = preempt_one_of_two(workdir, PRETRAIN, after_rows=3)
  assert 3 <= step < STEPS
  assert checkpoint.Checkpointer.steps_in(workdir) == [step]
  finish(launch_two(workdir, PRETRAIN))
  assert_resumed_equals_uninterrupted(
    workdir, pretrain_runs / "two", steps=STEPS, keys=("loss", "grad_norm", "accuracy", "lr")
  )


@pytest.mark.slow
def test_sigterm_to_one_of_two_ppo_processes_saves_one_iteration_and_resumes_exactly(ppo_models, tmp_path):
  iterations = 4
  flags = [
    "--config=configs/ppo.py:tiny",
    f"--config.model.init_from={ppo_models / 'sft'}",
    f"--config.ppo.reward_model={ppo_models / 'rm' / 'export'}",
    f"--config.ppo.episodes={iterations * 16}",
    "--config.ppo.rollout_batch=16",
    "--config.ppo.max_new_tokens=16",
    "--config.checkpoint_every_steps=1000",
    "--config.eval_every_steps=0",
    "--config.data.eval=",
    "--config.progress_bar=false",
  ]
  # One device per process (a global mesh of two): the processes and their agreement are what is tested, and
  # 8 fake devices on 2 cores make PPO's many small programs several times slower.
  finish(launch_two(tmp_path / "straight", flags, 1))
  step = preempt_one_of_two(tmp_path / "preempted", flags, after_rows=1, devices_per_process=1)
  assert 1 <= step < iterations
  assert checkpoint.Checkpointer.steps_in(tmp_path / "preempted") == [step]
  finish(launch_two(tmp_path / "preempted", flags, 1))
  assert_resumed_equals_uninterrupted(
    tmp_path / "preempted",
    tmp_path / "straight",
    steps=iterations,
    keys=("score", "kl", "loss", "value_loss", "entropy"),
    params_keys=("policy", "params"),
  )
