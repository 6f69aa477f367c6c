"""launch/sweep.py: sweep expansion, printed commands, and a 2×2 tiny PPO sweep run here whose comparison table
must hold each run's own metrics."""

import time

import pytest

from instructgpt_jax import sweep
from launch import sweep as sweep_cli

from runs import read_metrics

ZONE = "us-central2-b"


def test_sweep_expands_the_config_sweep_into_named_runs(capsys):
  runs = sweep.expand(sweep.sweep_points("configs/ppo.py:tiny"), "/runs")
  assert [r.name for r in runs] == [
    "ptx_coef=0.0+kl_coef=0.01",
    "ptx_coef=0.0+kl_coef=0.02",
    "ptx_coef=27.8+kl_coef=0.01",
    "ptx_coef=27.8+kl_coef=0.02",
  ]
  assert runs[2].workdir == "/runs/ptx_coef=27.8+kl_coef=0.01"
  grid = sweep.grid_points(["optim.lr=1e-3,2e-3", "config.value_optim.lr=3e-4", "data.template=plain"])
  assert grid == [
    {"optim.lr": 1e-3, "value_optim.lr": 3e-4, "data.template": "plain"},
    {"optim.lr": 2e-3, "value_optim.lr": 3e-4, "data.template": "plain"},
  ]
  assert sweep.run_name(grid[0]) == "optim.lr=0.001+value_optim.lr=0.0003+template=plain"  # shared leaf: full name
  argv = ["--config=configs/ppo.py:tiny", "--root=/runs", "--print", "--config.model.init_from=/w/sft"]
  assert sweep_cli.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[3] == (
    "python -m instructgpt_jax.main --config=configs/ppo.py:tiny --workdir=/runs/ptx_coef=27.8+kl_coef=0.02 "
    "--config.model.init_from=/w/sft --config.ppo.ptx_coef=27.8 --config.ppo.kl_coef=0.02"
  )
  assert sweep_cli.main([*argv, "--launcher=tpu", "--tpu=igpt", f"--zone={ZONE}"]) == 0
  assert capsys.readouterr().out.splitlines()[0] == (
    "gcloud compute tpus tpu-vm ssh igpt --zone=us-central2-b --worker=all '--command=cd ~/instructgpt_jax && "
    ".venv/bin/python -m instructgpt_jax.main --config=configs/ppo.py:tiny --workdir=/runs/ptx_coef=0.0+kl_coef=0.01 "
    "--config.model.init_from=/w/sft --config.ppo.ptx_coef=0.0 --config.ppo.kl_coef=0.01 "
    "--config.distributed.mode=auto 2>&1 | tee -a ~/run.log'"
  )


def test_load_config_applies_overrides_like_the_command_line():
  c = sweep.load_config("configs/ppo.py:tiny", ["--config.ppo.kl_coef=0.05", "--config.mesh.fsdp=2"])
  assert (c.ppo.kl_coef, c.mesh.fsdp, c.ppo.rollout_batch) == (0.05, 2, 32)


@pytest.mark.slow
def test_estimator_by_beta_ppo_sweep_runs_here_and_its_table_holds_each_runs_metrics(ppo_models, tmp_path, capsys):
  chain = ppo_models
  grid = ["ppo.advantage_estimator=gae,grpo", "ppo.kl_coef=0.01,0.02"]
  fixed = [
    f"--config.model.init_from={chain / 'sft'}",
    f"--config.ppo.reward_model={chain / 'rm' / 'export'}",
    "--config.ppo.episodes=64",  # 2 iterations of 32 rollouts
    "--config.ppo.samples_per_prompt=2",  # GRPO's groups (GAE samples each prompt twice too)
    "--config.eval_every_steps=0",
    "--config.data.eval=",
    "--config.progress_bar=false",
  ]
  start = time.perf_counter()
  argv = ["--config=configs/ppo.py:tiny", f"--root={tmp_path}", "--run", *(f"--grid={g}" for g in grid), *fixed]
  assert sweep_cli.main(argv) == 0
  out = capsys.readouterr().out
  print(f"\n2x2 tiny PPO sweep: {time.perf_counter() - start:.1f} s\n" + out[out.index("| run |") :])
  table = [line for line in out.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in table[0].strip("|").split("|")]
  assert header[:4] == ["run", "ppo.advantage_estimator", "ppo.kl_coef", "step"] and "score" in header
  rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[1:]]
  runs = sweep.expand(sweep.grid_points(grid), str(tmp_path))
  assert [r["run"] for r in rows] == [r.name for r in runs]
  for row in rows:
    metrics = read_metrics(tmp_path / row["run"])
    assert [m["step"] for m in metrics] == [1, 2]
    last = metrics[-1]
    assert last["kl_coef"] == pytest.approx(float(row["ppo.kl_coef"]), rel=1e-6)  # the override reached the run
    for key in header[4:]:
      if key in last:
        assert row[key] == f"{last[key]:.6g}", (row["run"], key)
      else:
        assert row[key] == "-", (row["run"], key)
    assert (row["value_loss"] != "-") == (row["ppo.advantage_estimator"] == "gae")  # only GAE trains a critic
  _, structured = sweep.compare(runs)
  for r in structured:
    assert r["score"] == read_metrics(tmp_path / r["run"])[-1]["score"]
