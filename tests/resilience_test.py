"""Long-run hygiene: kill -9 and rerun, SIGTERM, a crash during an async save, and a NaN in a batch.

Each scenario runs the real command line in a subprocess and compares against one uninterrupted run:
the metrics of every later step and the final parameters must be identical (CPU, same seed).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from instructgpt_jax import checkpoint, main, metrics
from instructgpt_jax.data import text

from runs import read_metrics, tiny_config

STEPS = 24
COMPARED = ("loss", "grad_norm", "accuracy", "lr")
FLAGS = [
  "--config=configs/pretrain.py:tiny",
  f"--config.total_steps={STEPS}",
  "--config.log_every_steps=1",
  "--config.checkpoint_every_steps=4",
  "--config.progress_bar=false",
]


def command(workdir, *extra):
  return [sys.executable, "-m", "instructgpt_jax.main", f"--workdir={workdir}", *FLAGS, *extra]


def run_to_end(workdir):
  out = subprocess.run(command(workdir), capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]


def start_and_wait_for_rows(workdir, rows: int) -> subprocess.Popen:
  proc = subprocess.Popen(command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline:
    if os.path.exists(path) and sum(1 for _ in open(path)) >= rows:
      return proc
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.01)
  proc.kill()
  raise AssertionError(f"no {rows} metric rows within 120 s")


def assert_same_run(workdir, reference, *, after_step: int):
  want = {r["step"]: r for r in read_metrics(reference)}
  got = read_metrics(workdir)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one row per step: no gaps, no repeats
  for row in got:
    if row["step"] > after_step:
      assert {k: row[k] for k in COMPARED} == {k: want[row["step"]][k] for k in COMPARED}, row["step"]
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.Checkpointer(str(workdir)).restore_params(STEPS),
    checkpoint.Checkpointer(str(reference)).restore_params(STEPS),
  )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  run_to_end(workdir)
  return workdir


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_rerun_matches_the_uninterrupted_run(tmp_path, uninterrupted):
  kill_after = int(np.random.default_rng().integers(6, STEPS - 2))
  proc = start_and_wait_for_rows(tmp_path, kill_after)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # None when the kill came before the first async save finished: the rerun then starts over, also fine.
  resumed_from = checkpoint.Checkpointer(str(tmp_path)).latest_step() or 0
  assert resumed_from < STEPS, (kill_after, resumed_from)
  run_to_end(tmp_path)
  assert_same_run(tmp_path, uninterrupted, after_step=resumed_from)


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_rerun_resumes(tmp_path, uninterrupted):
  proc = start_and_wait_for_rows(tmp_path, 7)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)  # generous: CI machines can be loaded
  assert proc.returncode == 0, stderr[-3000:]
  saved = checkpoint.Checkpointer(str(tmp_path)).latest_step()
  assert "preempted (SIGTERM) at step" in stderr and 7 <= saved < STEPS
  assert saved % 4 != 0 or f"at step {saved}" in stderr  # saved where it stopped, not only on the cadence
  run_to_end(tmp_path)
  assert_same_run(tmp_path, uninterrupted, after_step=saved)


# The crash: the process kills itself right after starting the async save of step 8, so the save's
# background thread never finishes. Orbax writes into a temporary folder and renames it only when complete.
CRASH_DURING_SAVE = """
import os, signal, sys
from instructgpt_jax import checkpoint, main
from absl import app
save = checkpoint.Checkpointer.save
def save_then_crash(self, step, *args, **kwargs):
  out = save(self, step, *args, **kwargs)
  if step == 8:
    os.kill(os.getpid(), signal.SIGKILL)
  return out
checkpoint.Checkpointer.save = save_then_crash
sys.argv = ["main"] + sys.argv[1:]
main.flags.mark_flags_as_required(["config"])
app.run(main.main)
"""


@pytest.mark.slow
def test_crash_during_an_async_save_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
  out = subprocess.run(
    [sys.executable, "-c", CRASH_DURING_SAVE, *command(tmp_path)[3:]], capture_output=True, text=True
  )
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 4  # step 8 was never finalized
  leftovers = [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("8")]
  assert all("tmp" in n for n in leftovers)
  state = ckpt.restore_params(4)  # the previous checkpoint loads
  assert jax.tree.leaves(state)
  ckpt.close()
  run_to_end(tmp_path)
  assert_same_run(tmp_path, uninterrupted, after_step=4)


def test_nan_in_a_batch_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  build = text.build_text_data

  def build_with_nan(*args, **kwargs):
    data = build(*args, **kwargs)
    real_next = type(data).__next__

    class Poisoned(type(data)):
      def __next__(self):
        batch = real_next(self)
        if self.get_state()["next_batch"] == 6:  # the batch of step 6
          batch["mask"] = batch["mask"] * np.float32("nan")
        return batch

    data.__class__ = Poisoned
    return data

  monkeypatch.setattr(text, "build_text_data", build_with_nan)
  config = tiny_config(total_steps=12, log_every_steps=10, checkpoint_every_steps=4)
  with pytest.raises(metrics.NonFiniteError, match=r"^step 6: loss=nan.* is not finite"):
    main.run(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 4
  params = ckpt.restore_params(4)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_markdown_table_is_one_line_per_row_in_column_order():
  rows = [{"b": 1.5, "a": "x"}, {"b": None, "a": "y"}]
  assert metrics.markdown_table(["a", "b"], rows) == "| a | b |\n|---|---|\n| x | 1.5 |\n| y | None |"
  cell = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else v  # noqa: E731
  assert metrics.markdown_table(["b"], rows, cell).splitlines()[2:] == ["| 1.50 |", "| - |"]
