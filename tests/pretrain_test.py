"""The pretraining stage end to end: the command line, learning, metrics, checkpoints and resuming."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import instructgpt_jax
from instructgpt_jax import checkpoint, errors, main

from runs import read_metrics, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_learns(workdir, fraction=0.3):
  rows = read_metrics(workdir)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 200
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  print(f"\n{workdir}: loss {first:.3f} (first 5 steps) -> {last:.3f} (last 5), a drop of {1 - last / first:.0%}")
  assert last <= (1 - fraction) * first, (first, last)
  assert all(np.isfinite(losses))
  return first, last


@pytest.mark.slow
def test_tiny_bf16_pretraining_on_the_generated_corpus_cuts_the_loss_by_30_percent(tmp_path):
  config = tiny_config(log_every_steps=1)
  assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32"
  final = main.run(config, str(tmp_path))
  first, last = assert_learns(tmp_path)
  assert first > 5.0  # near ln(320) = 5.77 at initialization
  assert final["eval_loss"] < 0.6 * first
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 200


@pytest.mark.slow
def test_tiny_bf16_pretraining_on_tinyshakespeare_cuts_the_loss_by_30_percent(tmp_path, shared_data):
  config = tiny_config(log_every_steps=1, **{"data.corpus": str(shared_data / "tinyshakespeare.txt")})
  main.run(config, str(tmp_path))
  assert_learns(tmp_path)


def test_command_line_run_writes_metrics_config_and_checkpoint(tmp_path):
  """The command writes its metrics, one checkpoint, a config.json with the resolved model, the version and the
  commit, and the programs it compiled into the persistent compilation cache the config names."""
  workdir, cache = tmp_path / "run", tmp_path / "jax_cache"
  cmd = [
    sys.executable,
    "-m",
    "instructgpt_jax.main",
    "--config=configs/pretrain.py:tiny",
    f"--workdir={workdir}",
    "--config.total_steps=20",
    "--config.log_every_steps=5",
    "--config.progress_bar=false",
    f"--config.compilation_cache_dir={cache}",
  ]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the tests' shared cache: off
  out = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert all({"step", "loss", "grad_norm", "lr"} <= set(r) for r in rows) and "eval_loss" in rows[-1]
  config = json.load(open(workdir / "config.json"))
  assert config["total_steps"] == 20
  assert (config["model"]["n_layers"], config["model"]["d_model"], config["model"]["vocab_size"]) == (2, 64, 320)
  assert config["instructgpt_jax_version"] == instructgpt_jax.__version__
  head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
  assert config["git_commit"] in (head, head + "-dirty")
  assert len(list(cache.iterdir())) >= 2, "the train and eval steps are in the cache"
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20"]
  assert "final:" in out.stdout


def test_rerun_resumes_from_the_newest_checkpoint_bit_exactly(tmp_path):
  # A run interrupted after its step-8 checkpoint (simulated by deleting the final one) is rerun with the
  # same command: it resumes at step 8 and must repeat steps 9..12 exactly as the uninterrupted run did.
  base = dict(total_steps=12, log_every_steps=1, checkpoint_every_steps=4)
  main.run(tiny_config(**base), str(tmp_path / "straight"))
  main.run(tiny_config(**base), str(tmp_path / "resumed"))
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "12")
  # Resuming with another schedule is refused before anything is built, naming each changed field.
  for changed, message in (
    ({"total_steps": 16}, "total_steps 12 -> 16"),
    ({"optim.lr": 1e-3, "optim.warmup_steps": 5}, "optim.lr 0.003 -> 0.001; optim.warmup_steps 10 -> 5"),
  ):
    with pytest.raises(errors.ConfigError, match="resumes a run whose schedule this config changes") as excinfo:
      main.run(tiny_config(**{**base, **changed}), str(tmp_path / "resumed"))
    assert message in str(excinfo.value) and "--config.allow_schedule_change=true" in str(excinfo.value)
  main.run(tiny_config(**base), str(tmp_path / "resumed"))
  # The rerun drops the interrupted run's rows after its checkpoint and writes them again: one per step.
  assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == list(range(1, 13))
  rerun = [r for r in read_metrics(tmp_path / "resumed") if r["step"] > 8]
  straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
  for r in rerun:
    assert r["loss"] == straight[r["step"]]
  straight_params = checkpoint.Checkpointer(str(tmp_path / "straight")).restore_params(12)
  resumed_params = checkpoint.Checkpointer(str(tmp_path / "resumed")).restore_params(12)
  jax.tree.map(np.testing.assert_array_equal, straight_params, resumed_params)


def test_invalid_configs_fail_in_one_line_before_compiling(tmp_path):
  from instructgpt_jax.errors import ConfigError

  with pytest.raises(ConfigError, match=r"data.seq_len: 512 exceeds the model's max_len 256"):
    main.run(tiny_config(**{"data.seq_len": 512}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"data.batch_size: 12 does not divide over data×fsdp = 8"):
    main.run(tiny_config(**{"data.batch_size": 12}), str(tmp_path))
  with pytest.raises(
    ValueError, match=r"mesh: ici sizes \{'data': 3, 'fsdp': 1, 'tensor': 1\} need 3 devices, but 8 are present"
  ):
    main.run(tiny_config(**{"mesh.data": 3, "data.batch_size": 3}), str(tmp_path))
  with pytest.raises(
    ConfigError, match="data.tokenizer: bytes has 258 ids, more than the model's vocabulary of 100; raise model.vocab"
  ):
    main.run(tiny_config(**{"model.vocab_size": 100}), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_eval_at_start_evaluates_the_starting_model_at_step_0(tmp_path):
  final = main.run(tiny_config(total_steps=2, log_every_steps=1, eval_at_start=True), str(tmp_path))
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert set(rows[0]) == {"step", "eval_loss"} and rows[0]["eval_loss"] > 5.0  # near ln(320): a random model
  assert final["eval_loss"] < rows[0]["eval_loss"]
  # Resumed with more steps (the schedule changes, which the flag accepts): no row 0.
  main.run(tiny_config(total_steps=4, log_every_steps=1, eval_at_start=True, allow_schedule_change=True), str(tmp_path))
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
