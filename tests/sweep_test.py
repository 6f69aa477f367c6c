"""launch/sweep.py and instructgpt_jax/sweep.py: sweep expansion, printed commands, every run's config checked
before anything happens, and the table of the runs under a root (written here by hand as the trainers write
them: config.json and metrics.jsonl): its columns, ranking, reductions, formats and seed pooling. A 2×2 tiny
PPO sweep run here must give a table that holds each run's own metrics."""

import csv
import io
import json
import time

import pytest

from instructgpt_jax import config_lib, sweep, sweep_table
from launch import sweep as sweep_cli
from launch import tpu

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
  argv.append("--config.ppo.reward_model=/w/rm/export")
  assert sweep_cli.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[3] == (
    "python -m instructgpt_jax.main --config=configs/ppo.py:tiny --workdir=/runs/ptx_coef=27.8+kl_coef=0.02 "
    "--config.model.init_from=/w/sft --config.ppo.reward_model=/w/rm/export --config.ppo.ptx_coef=27.8 "
    "--config.ppo.kl_coef=0.02"
  )
  assert sweep_cli.main([*argv, "--launcher=tpu", "--tpu=igpt", f"--zone={ZONE}"]) == 0
  main_args = [  # the first run's main.py arguments; launch/tpu.py's tests check the ssh line around them
    "--config=configs/ppo.py:tiny",
    "--workdir=/runs/ptx_coef=0.0+kl_coef=0.01",
    "--config.model.init_from=/w/sft",
    "--config.ppo.reward_model=/w/rm/export",
    "--config.ppo.ptx_coef=0.0",
    "--config.ppo.kl_coef=0.01",
  ]
  assert capsys.readouterr().out.splitlines()[0] == tpu.shell(tpu.run_command("igpt", ZONE, main_args))
  assert sweep_cli.main([*argv, "--launcher=slurm"]) == 0
  assert capsys.readouterr().out.splitlines()[0] == (
    "sbatch --job-name=ptx_coef=0.0+kl_coef=0.01 launch/slurm.sbatch " + " ".join(main_args)
  )


def test_load_config_applies_overrides_like_the_command_line():
  c = config_lib.load_config("configs/ppo.py:tiny", ["--config.ppo.kl_coef=0.05", "--config.mesh.fsdp=2"])
  assert (c.ppo.kl_coef, c.mesh.fsdp, c.ppo.rollout_batch) == (0.05, 2, 32)


# ------------------------------------------------------------------------------------------ checked first

TYPO = "error: --config.optim.lrr: no such config field 'lrr'; did you mean 'lr'?"
MISTAKES = {  # each: (config, grid, fixed override) -> the one line on stderr
  "grid typo": (("configs/sft.py:tiny", "optim.lrr=1e-4,3e-4", ""), TYPO),
  "fixed typo": (("configs/sft.py:tiny", "optim.lr=1e-4,3e-4", "--config.optim.lrr=1"), TYPO),
  "bad value": (
    ("configs/sft.py:tiny", "optim.lr=1e-4,abc", ""),
    "error: run lr=abc: flag --config.optim.lr=abc: could not convert string to float: 'abc'",
  ),
  "bad value everywhere": (
    ("configs/sft.py:tiny", "optim.lr=1e-4,3e-4", "--config.data.batch_size=big"),
    "error: flag --config.data.batch_size=big: invalid literal for int() with base 10: 'big'",
  ),
  "out of range": (
    ("configs/sft.py:tiny", "optim.lr=1e-4,-1", ""),
    "error: run lr=-1: optim.lr: -1.0 must be > 0",
  ),
  "unused override": (
    ("configs/sft.py:tiny", "optim.lr=1e-4,3e-4", "--config.model.size=gpt3-125m"),
    "error: model.size: given, but model.init_from (/w/base) decides the model's shape; drop it",
  ),
  "bad config arg": (
    ("configs/sft.py:tinyy", "optim.lr=1e-4,3e-4", ""),
    "error: config arg 'tinyy': not one of ['size', 'tiny', 'variant']",
  ),
  "no config file": (
    ("configs/sftt.py:tiny", "optim.lr=1e-4,3e-4", ""),
    "error: --config: configs/sftt.py: no such config file",
  ),
}
MODES = {
  "print": ["--print"],
  "print tpu": ["--print", "--launcher=tpu", "--tpu=igpt", f"--zone={ZONE}"],
  "print slurm": ["--print", "--launcher=slurm"],
  "run": ["--run"],
  "table": ["--table"],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mistake", MISTAKES)
def test_every_mode_refuses_a_mistake_in_any_run_with_one_line_before_anything_happens(
  mode, mistake, tmp_path, capsys, monkeypatch
):
  from instructgpt_jax import stages

  monkeypatch.setattr(stages, "run", lambda config, workdir: pytest.fail("a run started"))
  (config, grid, fixed), line = MISTAKES[mistake]
  root = tmp_path / "sweep"
  argv = [f"--config={config}", f"--root={root}", f"--grid={grid}", *MODES[mode], "--config.model.init_from=/w/base"]
  argv += [fixed] if fixed else []
  assert sweep_cli.main(argv) == 2
  out, err = capsys.readouterr()
  assert (out, err) == ("", line + "\n")
  assert not root.exists()


def test_a_mistake_in_the_table_flags_is_one_line_before_the_runs_start(tmp_path, capsys, monkeypatch):
  from instructgpt_jax import stages

  monkeypatch.setattr(stages, "run", lambda config, workdir: pytest.fail("a run started"))
  argv = ["--config=configs/sft.py:tiny", f"--root={tmp_path / 'r'}", "--grid=optim.lr=1e-4", "--run"]
  for extra, line in [
    ("--reduce=median", "error: --reduce=median: expected last, best, best:K, mean or mean:K (K ≥ 1)"),
    ("--reduce=mean:0", "error: --reduce=mean:0: expected last, best, best:K, mean or mean:K (K ≥ 1)"),
    (
      "--sort=entropy",
      "error: --sort=entropy: entropy has no known better direction; write --sort=-entropy (descending) or "
      "+entropy (ascending)",
    ),
  ]:
    assert sweep_cli.main([*argv, extra]) == 2
    assert capsys.readouterr() == ("", line + "\n")
  assert sweep_cli.main(["--root=/r", "--print"]) == 2
  assert capsys.readouterr() == ("", "error: --config: required with --run and --print\n")
  assert sweep_cli.main(["--root=/r", "--table", "--grid=seed=0,1"]) == 2
  assert capsys.readouterr() == ("", "error: --grid and --config.<field> overrides need --config\n")
  assert sweep_cli.main(["--config=configs/sft.py:tiny", "--root=/r", "--print", "--launcher=tpu"]) == 2
  assert capsys.readouterr() == ("", "error: --launcher=tpu: give the TPU VM's --tpu=NAME and --zone=ZONE\n")


def test_run_creates_the_root_runs_each_checked_config_and_tables_what_is_on_disk(tmp_path, capsys, monkeypatch):
  from instructgpt_jax import stages

  ran = []

  def fake_run(config, workdir):  # what a trainer leaves: the resolved config and one metrics row
    assert root.is_dir()  # made before the first run
    ran.append((workdir, config.optim.lr))
    write_run(tmp_path / "new" / "root", workdir.rsplit("/", 1)[-1], config.to_dict(), [{"step": 3, "loss": 1 / 3}])
    return {"loss": 1 / 3}

  monkeypatch.setattr(stages, "run", fake_run)
  root = tmp_path / "new" / "root"
  argv = ["--config=configs/sft.py:tiny", f"--root={root}", "--grid=optim.lr=1e-4,3e-4", "--run"]
  assert sweep_cli.main([*argv, "--config.total_steps=3"]) == 0
  assert ran == [(f"{root}/lr=0.0001", 1e-4), (f"{root}/lr=0.0003", 3e-4)]
  out = capsys.readouterr().out.splitlines()
  assert out[0] == (
    f"== lr=0.0001: python -m instructgpt_jax.main --config=configs/sft.py:tiny --workdir={root}/lr=0.0001 "
    "--config.total_steps=3 --config.optim.lr=0.0001"
  )
  assert out[2:] == [
    "| run | optim.lr | step | loss (last) |",
    "|---|---|---|---|",
    "| lr=0.0001 | 0.0001 | 3 | 0.333333 |",
    "| lr=0.0003 | 0.0003 | 3 | 0.333333 |",
  ]


# ------------------------------------------------------------------------------------------ runs on disk


def write_run(root, name, config, rows):
  """A run as the trainers leave it: config.json (paths.write_json's form) and metrics.jsonl (MetricWriter's)."""
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  return workdir


def ppo_config(root, name, *, kl_coef, ptx_coef=0.0, kl_in="reward", seed=0):
  return {
    "stage": "ppo",
    "seed": seed,
    "ppo": {"kl_coef": kl_coef, "ptx_coef": ptx_coef, "kl_in": kl_in, "episodes": 64},
    "data": {"train": f"{root}/{name}/data/prompts.jsonl"},  # names its own folder: not a difference
    "git_commit": f"c0ffee{kl_coef}",  # a build stamp: ignored
    "instructgpt_jax_version": "0.1",
  }


@pytest.fixture
def ppo_sweep(tmp_path):
  """Three PPO runs: β 0.01 (no ptx), β 0.02 (PPO-ptx: policy_loss logged), β 0.05 (KL in the loss)."""
  root = tmp_path / "sweep"
  rows = {
    "kl=0.01": [
      {"step": 1, "score": 0.1, "kl": 1.0, "entropy": 2.0, "loss": 0.5, "steps_per_sec": 1.5},
      {"step": 2, "score": 0.3, "kl": 2.0, "entropy": 1.0, "loss": 0.4, "steps_per_sec": 2.0, "eval_win_rate_rm": 0.55},
    ],
    "kl=0.02": [
      {"step": 1, "score": 0.2, "kl": 0.5, "entropy": 3.0, "loss": 3.0, "policy_loss": 0.25, "ptx_loss": 2.9},
      {"step": 2, "score": 0.25, "kl": 0.8, "entropy": 4.0, "loss": 2.5, "policy_loss": 0.2, "ptx_loss": 2.4},
      {"step": 2, "eval_win_rate_rm": 0.6},  # the final evaluation's row
    ],
    "kl=0.05": [
      {"step": 1, "score": 0.05, "kl": 0.2, "entropy": 1.5, "loss": 0.7, "kl_coef": 0.05, "kl_loss": 2.0},
      {"step": 2, "score": 0.15, "kl": 0.3, "entropy": 2.5, "loss": 0.6, "kl_coef": 0.05, "kl_loss": 1.0},
    ],
  }
  configs = {
    "kl=0.01": ppo_config(root, "kl=0.01", kl_coef=0.01),
    "kl=0.02": ppo_config(root, "kl=0.02", kl_coef=0.02, ptx_coef=27.8),
    "kl=0.05": ppo_config(root, "kl=0.05", kl_coef=0.05, kl_in="loss"),
  }
  for name in rows:
    write_run(root, name, configs[name], rows[name])
  (root / "kl=0.02" / "export").mkdir()  # an export inside a run has its own config.json: not a run
  (root / "kl=0.02" / "export" / "config.json").write_text('{"model_type": "llama"}')
  (root / "notes.txt").write_text("not a run")
  return root


def table(capsys, *argv):
  assert sweep_cli.main(list(argv)) == 0
  return capsys.readouterr().out.splitlines()


def test_table_lists_the_runs_under_the_root_with_the_fields_that_differ_and_ppo_headline_metrics(ppo_sweep, capsys):
  assert table(capsys, f"--root={ppo_sweep}", "--table") == [
    "| run | ppo.kl_coef | ppo.kl_in | ppo.ptx_coef | step | score (last) | kl (last) | eval_win_rate_rm (last) "
    "| policy_loss (last) |",
    "|---|---|---|---|---|---|---|---|---|",
    "| kl=0.01 | 0.01 | reward | 0 | 2 | 0.3 | 2 | 0.55 | 0.4 |",
    "| kl=0.02 | 0.02 | reward | 27.8 | 2 | 0.25 | 0.8 | 0.6 | 0.2 |",
    "| kl=0.05 | 0.05 | loss | 0 | 2 | 0.15 | 0.3 | - | 0.55 |",  # 0.6 - 0.05 · 1.0
  ]
  runs = sweep_table.find_runs(str(ppo_sweep))
  assert [r.name for r in runs] == ["kl=0.01", "kl=0.02", "kl=0.05"]
  assert runs[0].fields["data.train"] == "<run>/data/prompts.jsonl"
  assert "git_commit" not in runs[0].fields
  assert [row.get("policy_loss") for row in runs[2].rows] == [0.7 - 0.05 * 2.0, 0.6 - 0.05 * 1.0]


def test_table_checks_a_given_config_but_not_the_inputs_only_a_run_needs(ppo_sweep, capsys):
  argv = ["--config=configs/ppo.py:tiny", f"--root={ppo_sweep}", "--grid=ppo.kl_coef=0.01"]
  assert len(table(capsys, *argv, "--table")) == 5  # no model.init_from, no ppo.reward_model: nothing runs
  assert sweep_cli.main([*argv, "--print", "--config.model.init_from=/w/sft"]) == 2
  assert capsys.readouterr() == ("", "error: ppo.reward_model: required: the rm stage's <workdir>/export\n")
  assert sweep_cli.main([*argv, "--table", "--config.ppo.kl_coeff=1"]) == 2
  assert capsys.readouterr() == (
    "",
    "error: --config.ppo.kl_coeff: no such config field 'kl_coeff'; did you mean 'kl_coef'?\n",
  )


def test_sort_best_first_by_the_metric_meaning_or_by_its_sign(ppo_sweep, capsys):
  def order(*flags):
    lines = table(capsys, f"--root={ppo_sweep}", "--table", *flags)
    return [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]]

  assert order("--sort=score") == ["kl=0.01", "kl=0.02", "kl=0.05"]  # higher is better: 0.3, 0.25, 0.15
  assert order("--sort=+score") == ["kl=0.05", "kl=0.02", "kl=0.01"]
  assert order("--sort=kl") == ["kl=0.05", "kl=0.02", "kl=0.01"]  # lower is better: 0.3, 0.8, 2
  assert order("--sort=-kl") == ["kl=0.01", "kl=0.02", "kl=0.05"]
  assert order("--sort=eval_win_rate_rm") == ["kl=0.02", "kl=0.01", "kl=0.05"]  # no value: last
  assert order("--sort=-entropy") == ["kl=0.02", "kl=0.05", "kl=0.01"]  # 4, 2.5, 1; no direction: a sign
  header = table(capsys, f"--root={ppo_sweep}", "--table", "--sort=-entropy", "--metrics=score")[0]
  assert header == "| run | ppo.kl_coef | ppo.kl_in | ppo.ptx_coef | step | score (last) | entropy (last) |"
  assert table(capsys, f"--root={ppo_sweep}", "--best=score") == [f"kl=0.01\t{ppo_sweep}/kl=0.01"]
  assert table(capsys, f"--root={ppo_sweep}", "--best=kl") == [f"kl=0.05\t{ppo_sweep}/kl=0.05"]
  assert table(capsys, f"--root={ppo_sweep}", "--best=-entropy", "--reduce=mean") == [f"kl=0.02\t{ppo_sweep}/kl=0.02"]


def test_reduce_takes_the_last_the_best_or_the_mean_of_the_last_k_values(ppo_sweep, capsys):
  argv = [f"--root={ppo_sweep}", "--table", "--metrics=score,kl,steps_per_sec"]
  assert table(capsys, *argv, "--reduce=mean:2", "--by_seed")[0].endswith(
    "| score (mean of last 2) | kl (mean of last 2) | steps_per_sec (mean of last 2) |"
  )
  runs = sweep_table.find_runs(str(ppo_sweep))
  cells = {
    reduce: [
      row.cells for row in sweep_table.comparison(runs, ["score", "kl"], reduce=sweep_table.parse_reduce(reduce)).rows
    ]
    for reduce in ("last", "mean", "mean:1", "best", "best:1")
  }
  assert [(c["score (last)"], c["kl (last)"]) for c in cells["last"]] == [(0.3, 2.0), (0.25, 0.8), (0.15, 0.3)]
  assert [(c["score (mean of all)"], c["kl (mean of all)"]) for c in cells["mean"]] == [
    ((0.1 + 0.3) / 2, 1.5),
    ((0.2 + 0.25) / 2, (0.5 + 0.8) / 2),
    ((0.05 + 0.15) / 2, (0.2 + 0.3) / 2),
  ]
  assert [c["score (mean of last 1)"] for c in cells["mean:1"]] == [0.3, 0.25, 0.15]
  # best: the highest score, the lowest KL
  assert [(c["score (best of all)"], c["kl (best of all)"]) for c in cells["best"]] == [
    (0.3, 1.0),
    (0.25, 0.5),
    (0.15, 0.2),
  ]
  assert [(c["score (best of last 1)"], c["kl (best of last 1)"]) for c in cells["best:1"]] == [
    (0.3, 2.0),
    (0.25, 0.8),
    (0.15, 0.3),
  ]
  assert sweep_cli.main([*argv, "--metrics=entropy", "--reduce=best:2"]) == 2
  assert capsys.readouterr() == ("", "error: --reduce=best: no known better direction for entropy; use last or mean\n")


def test_csv_and_json_read_back_to_the_table_values(ppo_sweep, capsys):
  argv = [f"--root={ppo_sweep}", "--table", "--metrics=score,eval_win_rate_rm"]
  rows = list(csv.DictReader(io.StringIO("\n".join(table(capsys, *argv, "--format=csv")))))
  assert rows == [
    {"run": "kl=0.01", "ppo.kl_coef": "0.01", "ppo.kl_in": "reward", "ppo.ptx_coef": "0.0", "step": "2",
     "score (last)": "0.3", "eval_win_rate_rm (last)": "0.55"},
    {"run": "kl=0.02", "ppo.kl_coef": "0.02", "ppo.kl_in": "reward", "ppo.ptx_coef": "27.8", "step": "2",
     "score (last)": "0.25", "eval_win_rate_rm (last)": "0.6"},
    {"run": "kl=0.05", "ppo.kl_coef": "0.05", "ppo.kl_in": "loss", "ppo.ptx_coef": "0.0", "step": "2",
     "score (last)": "0.15", "eval_win_rate_rm (last)": ""},
  ]  # fmt: skip
  doc = json.loads("\n".join(table(capsys, *argv, "--format=json")))
  assert doc["columns"] == [
    "run", "ppo.kl_coef", "ppo.kl_in", "ppo.ptx_coef", "step", "score (last)", "eval_win_rate_rm (last)"
  ]  # fmt: skip
  assert doc["rows"][2] == {
    "run": "kl=0.05",
    "ppo.kl_coef": 0.05,
    "ppo.kl_in": "loss",
    "ppo.ptx_coef": 0.0,
    "step": 2,
    "score (last)": 0.15,
    "eval_win_rate_rm (last)": None,
    "workdirs": [f"{ppo_sweep}/kl=0.05"],
  }
  assert [r["score (last)"] for r in doc["rows"]] == [0.3, 0.25, 0.15]


def test_a_metric_no_run_logged_and_a_root_without_runs_are_one_line(ppo_sweep, tmp_path, capsys):
  logged = ("eval_win_rate_rm, entropy, kl, kl_coef, kl_loss, loss, policy_loss, ptx_loss, score, steps_per_sec").split(
    ", "
  )
  for argv, line in [
    (
      ["--table", "--metrics=score,scroe"],
      f"--metrics: no run logged 'scroe' (did you mean score?); the runs logged: {', '.join(sorted(logged))}",
    ),
    (["--table", "--sort=-gold"], f"--sort: no run logged 'gold'; the runs logged: {', '.join(sorted(logged))}"),
    (["--best=eval_gold"], f"--best: no run logged 'eval_gold'; the runs logged: {', '.join(sorted(logged))}"),
    (["--table", "--stage=sft"], f"--stage=sft: no sft run under {ppo_sweep} (stages: ppo)"),
  ]:
    assert sweep_cli.main([f"--root={ppo_sweep}", *argv]) == 2
    assert capsys.readouterr() == ("", f"error: {line}\n")
  (tmp_path / "empty").mkdir()
  for root, line in [
    (tmp_path / "missing", f"--root: {tmp_path / 'missing'}: no such folder"),
    (tmp_path / "empty", f"--root: {tmp_path / 'empty'}: no runs (no folder below it holds a config.json)"),
  ]:
    assert sweep_cli.main([f"--root={root}", "--table"]) == 2
    assert capsys.readouterr() == ("", f"error: {line}\n")


def test_lab_pipeline_workdirs_are_searched_one_level_down_and_a_stage_is_picked(tmp_path, capsys):
  root = tmp_path / "labs"
  for seed in (0, 1):
    lab = f"seed={seed}"
    sft = {"stage": "sft", "seed": seed, "data": {"tokenizer": f"{root}/{lab}/tokenizer/tokenizer.json"}}
    write_run(root, f"{lab}/sft", sft, [{"step": 5, "loss": 2.0 + seed, "eval_loss": 2.5 + seed}])
    for name, ptx in (("ppo", 0.0), ("ppo_ptx", 27.8)):
      ppo = {"stage": "ppo", "seed": seed, "ppo": {"ptx_coef": ptx}, "model": {"init_from": f"{root}/{lab}/sft"}}
      write_run(root, f"{lab}/{name}", ppo, [{"step": 4, "score": seed + ptx, "kl": 1.0}])
  assert sweep_cli.main([f"--root={root}", "--table"]) == 2
  assert capsys.readouterr().err == (
    f"error: --root: {root} holds runs of several stages (ppo: 4, sft: 2); pick one with --stage=NAME\n"
  )
  assert table(capsys, f"--root={root}", "--table", "--stage=ppo", "--by_seed", "--metrics=score") == [
    "| run | ppo.ptx_coef | seed | step | score (last) |",  # model.init_from is each lab's own sft: the same
    "|---|---|---|---|---|",
    "| seed=0/ppo | 0 | 0 | 4 | 0 |",
    "| seed=1/ppo | 0 | 1 | 4 | 1 |",
    "| seed=0/ppo_ptx | 27.8 | 0 | 4 | 27.8 |",
    "| seed=1/ppo_ptx | 27.8 | 1 | 4 | 28.8 |",
  ]
  pooled = table(capsys, f"--root={root}", "--table", "--stage=ppo", "--metrics=score")
  assert pooled[:4] == [
    "| run | ppo.ptx_coef | seeds | step | score (last) |",
    "|---|---|---|---|---|",
    "| seed=*/ppo | 0 | 2 | 4 | 0.5 ± 0.7071 [-5.853, 6.853] (n=2) |",
    "| seed=*/ppo_ptx | 27.8 | 2 | 4 | 28.3 ± 0.7071 [21.95, 34.65] (n=2) |",
  ]
  assert table(capsys, f"--root={root}", "--table", "--stage=sft", "--by_seed") == [
    "| run | seed | step | eval_loss (last) | loss (last) |",
    "|---|---|---|---|---|",
    "| seed=0/sft | 0 | 5 | 2.5 | 2 |",
    "| seed=1/sft | 1 | 5 | 3.5 | 3 |",
  ]


def test_the_runs_under_a_bucket_root_are_found_and_tabled(gcs, capsys):
  from instructgpt_jax import paths

  root = f"gs://{gcs.make_bucket()}/sweep"
  for name, seed, eval_loss in (("a/sft", 0, 1.0), ("b/sft", 1, 3.0), ("c", 2, 2.0)):  # 2 labs, 1 plain run
    workdir = f"{root}/{name}"
    top = f"{root}/{name.split('/')[0]}"
    config = {"stage": "sft", "seed": seed, "data": {"tokenizer": f"{top}/tokenizer/tokenizer.json"}}
    paths.write_json(f"{workdir}/config.json", config)
    paths.write_text(f"{workdir}/metrics.jsonl", json.dumps({"step": 5, "eval_loss": eval_loss}) + "\n")
  paths.write_json(f"{root}/a/sft/export/config.json", {"model_type": "llama"})
  assert table(capsys, f"--root={root}", "--table", "--by_seed", "--sort=eval_loss") == [
    "| run | seed | step | eval_loss (last) |",
    "|---|---|---|---|",
    "| a/sft | 0 | 5 | 1 |",
    "| c | 2 | 5 | 2 |",
    "| b/sft | 1 | 5 | 3 |",
  ]
  assert table(capsys, f"--root={root}", "--best=eval_loss", "--by_seed") == [f"a/sft\t{root}/a/sft"]
  assert sweep_cli.main([f"--root={root}/nothing", "--table"]) == 2
  assert capsys.readouterr().err == f"error: --root: {root}/nothing: no such folder\n"


# ------------------------------------------------------------------------------------------ seeds

T_975 = {1: 12.706205, 3: 3.182446}  # Student t quantiles t_{0.975, ν} from a table


@pytest.fixture
def seed_sweep(tmp_path):
  """lr=1e-3 with 4 seeds (last eval_loss 1.0, 1.2, 1.1, 1.5), lr=3e-3 with 2 (2.0, 3.0; seed 1 logged no
  eval_loss yet and stopped at step 10), as `--grid=optim.lr=1e-3,3e-3 --grid=seed=...` names them."""
  root = tmp_path / "seeds"
  values = {(0.001, 0): 1.0, (0.001, 1): 1.2, (0.001, 2): 1.1, (0.001, 3): 1.5, (0.003, 0): 2.0, (0.003, 2): 3.0}
  for (lr, seed), eval_loss in values.items():
    config = {"stage": "pretrain", "seed": seed, "optim": {"lr": lr}, "total_steps": 20}
    write_run(root, f"lr={lr}+seed={seed}", config, [{"step": 10, "loss": 9.0}, {"step": 20, "eval_loss": eval_loss}])
  write_run(
    root, "lr=0.003+seed=1", {"stage": "pretrain", "seed": 1, "optim": {"lr": 0.003}, "total_steps": 20},
    [{"step": 10, "loss": 7.0}],
  )  # fmt: skip
  return root


def hand_pooled(values):
  n = len(values)
  mean = sum(values) / n
  std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
  half = T_975[n - 1] * std / n**0.5
  return mean, std, mean - half, mean + half, n


def test_runs_that_differ_only_in_seed_pool_into_one_row_with_mean_std_and_t_interval(seed_sweep, capsys):
  lines = table(capsys, f"--root={seed_sweep}", "--table")
  # lr=1e-3: mean 1.2, std sqrt(0.14/3) = 0.216025, half-width 3.182446 · 0.216025 / 2 = 0.343743
  # lr=3e-3: mean 2.5, std 0.707107, half-width 12.706205 · 0.707107 / sqrt(2) = 6.353102
  assert lines == [
    "| run | optim.lr | seeds | step | eval_loss (last) | loss (last) |",
    "|---|---|---|---|---|---|",
    "| lr=0.001+seed=* | 0.001 | 4 | 20 | 1.2 ± 0.216 [0.8563, 1.544] (n=4) | 9 ± 0 [9, 9] (n=4) |",
    "| lr=0.003+seed=* | 0.003 | 3 | 10 | 2.5 ± 0.7071 [-3.853, 8.853] (n=2) | 8.333 ± 1.155 [5.465, 11.2] (n=3) |",
    "Metrics of a row with several seeds: mean ± std (ddof=1) [95% Student-t interval of the mean] (n: the seeds "
    "that logged it), 4 significant digits.",
  ]
  doc = json.loads("\n".join(table(capsys, f"--root={seed_sweep}", "--table", "--format=json")))
  for row, values in zip(doc["rows"], ([1.0, 1.2, 1.1, 1.5], [2.0, 3.0])):
    cell = row["eval_loss (last)"]
    mean, std, low, high, n = hand_pooled(values)
    assert (cell["mean"], cell["std"], cell["n"]) == (pytest.approx(mean), pytest.approx(std), n)
    assert cell["ci95"] == [pytest.approx(low, rel=1e-6), pytest.approx(high, rel=1e-6)]
    assert row["seeds"] == {1.0: 4, 2.0: 3}[values[0]]
  assert doc["rows"][1]["workdirs"] == [f"{seed_sweep}/lr=0.003+seed={s}" for s in (0, 1, 2)]
  rows = list(csv.DictReader(io.StringIO("\n".join(table(capsys, f"--root={seed_sweep}", "--table", "--format=csv")))))
  assert list(rows[0])[:8] == [
    "run", "optim.lr", "seeds", "step", "eval_loss (last) mean", "eval_loss (last) std", "eval_loss (last) ci95_low",
    "eval_loss (last) ci95_high",
  ]  # fmt: skip
  mean, std, low, high, n = hand_pooled([1.0, 1.2, 1.1, 1.5])
  got = [float(rows[0][f"eval_loss (last) {part}"]) for part in ("mean", "std", "ci95_low", "ci95_high", "n")]
  assert got == [
    pytest.approx(mean),
    pytest.approx(std),
    pytest.approx(low, rel=1e-6),
    pytest.approx(high, rel=1e-6),
    4,
  ]
  # the best configuration: each of its seeds, name and workdir
  assert table(capsys, f"--root={seed_sweep}", "--best=eval_loss") == [
    f"lr=0.001+seed={s}\t{seed_sweep}/lr=0.001+seed={s}" for s in range(4)
  ]


def test_by_seed_shows_the_seeds_apart(seed_sweep, capsys):
  assert table(capsys, f"--root={seed_sweep}", "--table", "--by_seed", "--sort=eval_loss") == [
    "| run | optim.lr | seed | step | eval_loss (last) | loss (last) |",
    "|---|---|---|---|---|---|",
    "| lr=0.001+seed=0 | 0.001 | 0 | 20 | 1 | 9 |",
    "| lr=0.001+seed=2 | 0.001 | 2 | 20 | 1.1 | 9 |",
    "| lr=0.001+seed=1 | 0.001 | 1 | 20 | 1.2 | 9 |",
    "| lr=0.001+seed=3 | 0.001 | 3 | 20 | 1.5 | 9 |",
    "| lr=0.003+seed=0 | 0.003 | 0 | 20 | 2 | 9 |",
    "| lr=0.003+seed=2 | 0.003 | 2 | 20 | 3 | 9 |",
    "| lr=0.003+seed=1 | 0.003 | 1 | 10 | - | 7 |",
  ]
  assert table(capsys, f"--root={seed_sweep}", "--best=eval_loss", "--by_seed") == [
    f"lr=0.001+seed=0\t{seed_sweep}/lr=0.001+seed=0"
  ]


# ------------------------------------------------------------------------------------------ end to end


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
  root = tmp_path / "sweep"  # --run creates it
  metrics = "score,kl,policy_loss,value_loss,ptx_loss"
  start = time.perf_counter()
  argv = ["--config=configs/ppo.py:tiny", f"--root={root}", "--run", *(f"--grid={g}" for g in grid), *fixed]
  assert sweep_cli.main([*argv, f"--metrics={metrics}"]) == 0
  out = capsys.readouterr().out
  print(f"\n2x2 tiny PPO sweep: {time.perf_counter() - start:.1f} s\n" + out[out.index("| run |") :])
  table = [line for line in out.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in table[0].strip("|").split("|")]
  assert header == [
    "run", "ppo.advantage_estimator", "ppo.kl_coef", "step", *(f"{m} (last)" for m in metrics.split(","))
  ]  # fmt: skip
  rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[1:]]
  runs = sweep.expand(sweep.grid_points(grid), str(root))
  assert [r["run"] for r in rows] == [r.name for r in runs]  # gae before grpo, then β
  for row in rows:
    metrics_rows = read_metrics(root / row["run"])
    assert [m["step"] for m in metrics_rows] == [1, 2]
    last = metrics_rows[-1]
    assert last["kl_coef"] == pytest.approx(float(row["ppo.kl_coef"]), rel=1e-6)  # the override reached the run
    for column in header[4:]:
      key = column.removesuffix(" (last)")
      assert row[column] == (f"{last[key]:.6g}" if key in last else "-"), (row["run"], key)
    assert (row["value_loss (last)"] != "-") == (row["ppo.advantage_estimator"] == "gae")  # only GAE has a critic
    assert row["ptx_loss (last)"] != "-" and "policy_loss" in last  # tiny PPO is PPO-ptx: both logged apart
  found = sweep_table.find_runs(str(root))
  for r in sweep_table.comparison(found, ["score"]).rows:
    assert r.cells["score (last)"] == read_metrics(r.runs[0].workdir)[-1]["score"]
  default = sweep_table.comparison(found).columns
  assert default[3:] == ["step", "score (last)", "kl (last)", "policy_loss (last)"]  # no evaluation: no win rate


def test_a_fixed_override_some_points_cannot_use_is_left_out_of_theirs(tmp_path, capsys):
  """--config.ppo.ptx_reduction in a sweep over γ: the γ = 0 run has no pretraining term (main.py would refuse the
  override there), so its command goes without it and a note says so; one that no point can use is an error."""
  base = ["--config=configs/ppo.py:tiny", f"--root={tmp_path}", "--print", "--grid=ppo.ptx_coef=0,27.8"]
  inputs = ["--config.model.init_from=W", "--config.ppo.reward_model=R"]
  assert sweep_cli.main([*base, *inputs, "--config.ppo.ptx_reduction=token_mean"]) == 0
  out, err = capsys.readouterr()
  without, with_it = out.splitlines()
  assert "ptx_reduction" not in without and "--config.ppo.ptx_coef=0 " in without + " "
  assert "--config.ppo.ptx_reduction=token_mean" in with_it and "--config.ppo.ptx_coef=27.8" in with_it
  assert (
    err == "note: --config.ppo.ptx_reduction is left out of run ptx_coef=0: ppo.ptx_coef is 0 (no pretraining term)\n"
  )
  assert sweep_cli.main([*base, *inputs, "--config.ppo.kl_target=3"]) == 2  # the controller is fixed in every run
  out, err = capsys.readouterr()
  assert out == "" and err == "error: ppo.kl_target: given, but ppo.kl_controller is 'fixed'; drop it\n"


def test_launcher_flags_go_with_print_only(tmp_path, capsys):
  argv = ["--config=configs/pretrain.py:tiny", f"--root={tmp_path / 'r'}", "--run", "--grid=seed=0,1"]
  assert sweep_cli.main([*argv, "--launcher=tpu", "--tpu=igpt", "--zone=z"]) == 2
  out, err = capsys.readouterr()
  assert (
    out == ""
    and err == "error: --launcher, --tpu, --zone: go with --print (the commands for elsewhere); --run runs here\n"
  )
  assert not (tmp_path / "r").exists()


def test_an_hf_export_beside_a_recipes_stages_is_not_a_run(tmp_path, capsys):
  """The recipe's workdir holds sft/, rm/, ppo/ (runs) and export/ (an HF folder whose config.json names no stage)."""
  for stage in ("sft", "rm", "ppo"):
    (tmp_path / "hh" / stage).mkdir(parents=True)
    (tmp_path / "hh" / stage / "config.json").write_text(json.dumps({"stage": stage, "seed": 0}))
  (tmp_path / "hh" / "export").mkdir()
  (tmp_path / "hh" / "export" / "config.json").write_text(json.dumps({"model_type": "llama"}))
  names = [run.name for run in sweep_table.find_runs(str(tmp_path), "ppo")]
  assert names == ["hh/ppo"]
  with pytest.raises(Exception, match=r"several stages \(ppo: 1, rm: 1, sft: 1\)"):
    sweep_table.find_runs(str(tmp_path))
