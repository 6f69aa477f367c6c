"""The embedded lab: tasks and their gold judge, the simulated labelers, and the pipeline end to end."""

import json
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import pipeline
from instructgpt_jax import errors, main
from instructgpt_jax.lab import datasets, labelers, tasks, world
from instructgpt_jax.stages import chain

from doc_examples import README_MAIN_JOB, argv, run_main, shrink
from runs import configured

NO_BAR = ("--config.progress_bar=false",)


def test_gold_answers_score_one_and_flawed_answers_less():
  w, rng = world.make_world(0), random.Random(0)
  worse = total = 0
  for _ in range(500):
    task = tasks.make_task(w, rng)
    assert tasks.quality(task, task.answer) == pytest.approx(1.0)
    for text, stopped in tasks.flawed_responses(task, w, rng):
      worse += tasks.quality(task, text, stopped=stopped) < 1.0
      total += 1
  assert worse / total > 0.99  # a flawed response can be right by accident (prose that states the fact)


def test_features_weigh_into_the_gold_quality():
  task = tasks.make_task(world.make_world(0), random.Random(3), "attribute")
  f = tasks.features(task, "I think maybe " + task.answer, stopped=False)
  assert f["direct"] == 0.0 and f["stopped"] == 0.0 and f["contains_answer"] == 1.0
  assert tasks.quality(task, "I think maybe " + task.answer, stopped=False) == pytest.approx(
    sum(tasks.GOLD_WEIGHTS[k] * v for k, v in f.items())
  )


def test_labelers_agree_about_three_times_in_four_and_follow_quality():
  w, rng = world.make_world(0), random.Random(1)
  pairs = []
  for _ in range(1500):
    task = tasks.make_task(w, rng)
    a, b = rng.sample([(task.answer, True), *tasks.flawed_responses(task, w, rng)], 2)
    pairs.append((task, a, b))
  for group in (labelers.TRAINING_LABELERS, labelers.HELD_OUT_LABELERS):
    assert 0.68 <= labelers.agreement(group, pairs) <= 0.85
  # A labeler prefers the gold answer to a flawed one most of the time, but not always (noise).
  choices = [
    labelers.TRAINING_LABELERS[0].prefers(t, (t.answer, True), b, rng) for t, _, b in pairs if b[0] != t.answer
  ]
  assert 0.75 < np.mean(choices) < 1.0


def test_rankings_are_plackett_luce_draws_with_ties_for_identical_responses():
  task = tasks.make_task(world.make_world(0), random.Random(2), "repeat")
  responses = [(task.answer, True), ("no", True), (task.answer, True)]
  ranks = labelers.TRAINING_LABELERS[0].rank(task, responses, random.Random(0))
  assert ranks[0] == ranks[2] and sorted(set(ranks)) == sorted(set(ranks)) and len(ranks) == 3


def test_lab_splits_never_share_a_prompt_and_kinds_draw_their_own():
  w = world.make_world(0)
  train = {t.prompt for t in datasets.sample_tasks(400, split="train", seed=0, world=w, kind="prompts")}
  evals = {t.prompt for t in datasets.sample_tasks(100, split="eval", seed=0, world=w, kind="prompts")}
  demos = [t.prompt for t in datasets.sample_tasks(50, split="train", seed=0, world=w, kind="demonstrations")]
  assert not train & evals
  assert demos != [t.prompt for t in datasets.sample_tasks(50, split="train", seed=0, world=w, kind="prompts")]


MICRO = {
  "stages.pretrain.total_steps": 20,
  "stages.sft.total_steps": 16,
  "stages.sft_baseline.total_steps": 16,
  "stages.sft_baseline.eval_rm.num_prompts": 16,
  "labels.prompts": 32,
  "labels.eval_prompts": 16,
  "stages.rm.epochs": 1,
  "stages.ppo.ppo.episodes": 2 * 64,
  "stages.ppo_ptx.ppo.episodes": 2 * 64,
  "stages.ppo.eval_every_steps": 0,
  "stages.ppo_ptx.eval_every_steps": 0,
  "evaluation.prompts": 32,
  "evaluation.bootstrap": 200,
  "progress_bar": False,
}


def micro_config():
  return configured(pipeline, "lab_quick", **MICRO)


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


# The lab's commands run on one device in a subprocess, as a user runs them: 8 fake CPU devices on 2 cores make
# them several times slower.
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
MICRO_COMMAND = [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/pipeline.py:lab_quick", *flags(MICRO)]


def run_micro(workdir) -> None:
  done = subprocess.run([*MICRO_COMMAND, f"--workdir={workdir}"], env=ONE_DEVICE, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]


def kill_9_inside(stage: str, workdir) -> None:
  """Runs the micro pipeline's command line and SIGKILLs it once `stage` has started (its folder exists)."""
  command = [*MICRO_COMMAND, f"--workdir={workdir}"]
  proc = subprocess.Popen(command, env=ONE_DEVICE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while not (workdir / stage).exists():
    assert proc.poll() is None and time.time() < deadline, (stage, proc.stderr.read()[-3000:])
    time.sleep(0.05)
  time.sleep(float(np.random.default_rng().uniform(0.0, 1.0)))  # somewhere inside the stage
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "evaluation" / "done.json").exists(), "the run finished before the kill"


@pytest.mark.slow
def test_pipeline_runs_end_to_end_writes_a_computed_report_and_is_deterministic(tmp_path):
  run_micro(tmp_path / "a")
  # A finished pipeline run again recomputes nothing: it reads every stage's results and reports them.
  first = main.run(micro_config(), str(tmp_path / "a"))
  # The same pipeline again, killed with SIGKILL inside a random stage and rerun: the same numbers, so two runs
  # agree (same seed, same machine) and a run resumes from any stage.
  stage = str(np.random.default_rng().choice(["pretrain", "sft", "labels", "rm", "sft_baseline", "ppo", "ppo_ptx"]))
  kill_9_inside(stage, tmp_path / "b")
  run_micro(tmp_path / "b")
  second = main.run(micro_config(), str(tmp_path / "b"))
  assert first == second, f"killed inside {stage}"
  report = (tmp_path / "a" / "report.md").read_text()
  evaluation = json.loads((tmp_path / "a" / "evaluation" / "done.json").read_text())
  assert f"{100 * evaluation['win_rate_PPO-ptx']:.1f}%" in report  # the report prints what was computed
  assert f"{100 * evaluation['baseline_win_rate_PPO-ptx']:.1f}%" in report  # Figure 1's, against the SFT baseline
  for name in ("figure1.png", "reward_vs_kl.png", "win_rates.png", "learning_curves.png"):
    assert (tmp_path / "a" / name).stat().st_size > 1000
  assert 0.0 <= first["win_rate_ppo_ptx_vs_sft"] <= 1.0 and evaluation["prompts"] == 32
  assert main.run(micro_config(), str(tmp_path / "a")) == first


def test_a_preempted_stage_is_not_recorded_as_done(tmp_path):
  def preempted(directory):
    raise errors.Preempted(7)

  with pytest.raises(errors.Preempted, match="step 7"):
    chain.once(str(tmp_path), "sft", preempted)
  assert not (tmp_path / "sft" / "done.json").exists()
  # The rerun runs the stage (it resumes from its checkpoint) and only then records it.
  assert chain.once(str(tmp_path), "sft", lambda d: {"loss": 1.5}) == {"loss": 1.5}
  assert chain.once(str(tmp_path), "sft", preempted) == {"loss": 1.5}


@pytest.mark.slow
def test_lab_quick_shows_each_finding_in_its_direction(tmp_path):
  """The paper's findings that hold at `lab_quick`'s scale in one seed (docs/results.md: which ones hold over
  seeds), in direction: the README's main job (doc_examples.README_MAIN_JOB) at the quick scale, after its
  install (tests/run.sh installs the same)."""
  command = shrink(
    README_MAIN_JOB.split(" && ")[-1], {"pipeline.py": "pipeline.py:lab_quick", "runs/lab": str(tmp_path)}
  )
  done = subprocess.run([sys.executable, *argv(command)[1:], *NO_BAR], env=ONE_DEVICE, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  found = run_main(command)  # the finished pipeline again: it reads every stage's results and reports them
  evaluation = json.loads((tmp_path / "evaluation" / "done.json").read_text())
  # Figure 1's order: GPT, prompted or not, below the SFT baseline and PPO above it, beyond their intervals;
  # PPO-ptx above it on average (over seeds its margin is the smallest: docs/results.md).
  for name in ("GPT", "GPT prompted"):
    assert evaluation[f"baseline_win_rate_{name}_interval"][1] < 0.5, (name, evaluation)
  assert evaluation["baseline_win_rate_PPO_interval"][0] > 0.5, evaluation
  assert found["fig1_ppo_ptx"] > 0.5, found
  # Held-out labelers prefer PPO to its start, the PPO-init SFT, beyond the interval's reach of a coin flip,
  # and PPO's gold quality is the higher.
  assert evaluation["win_rate_PPO_interval"][0] > 0.5, evaluation
  assert evaluation["gold_PPO"] > found["gold_sft"]
  # The RM agrees with held-out labelers better than chance, and not far below how they agree with each other.
  assert (
    0.5 < found["rm_accuracy_held_out_labelers"]
    and found["labeler_agreement"] - found["rm_accuracy_held_out_labelers"] < 0.10
  )
  # The pretraining mix pays less alignment tax than plain PPO.
  assert found["alignment_tax_ppo_ptx"] < found["alignment_tax_ppo"]


MICRO_COMPARE = {
  **MICRO,
  "stages.grpo.ppo.episodes": 2 * 64,
  "stages.rloo.ppo.episodes": 2 * 64,
  "stages.ppo.eval_every_steps": 1,
  "stages.ppo_ptx.eval_every_steps": 1,
  "stages.grpo.eval_every_steps": 1,
  "stages.rloo.eval_every_steps": 1,
  "stages.dpo.total_steps": 4,
  "compare.best_of_n": 8,
  "compare.n": "1,2,4,8",
  "compare.table_n": 4,
}


@pytest.mark.slow
def test_compare_measures_every_method_alike_and_writes_its_table_and_figure_from_the_run(tmp_path):
  # One device in a subprocess, as a user runs it (8 fake devices on 2 cores make it several times slower).
  command = [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/pipeline.py:lab_quick,compare"]
  command += flags(MICRO_COMPARE)
  done = subprocess.run([*command, f"--workdir={tmp_path}"], env=ONE_DEVICE, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "== the lab's comparison ==" in done.stdout
  evaluation = json.loads((tmp_path / "evaluation" / "done.json").read_text())
  compare = json.loads((tmp_path / "compare" / "done.json").read_text())
  methods = compare["methods"]
  assert list(methods) == ["SFT", "PPO", "PPO-ptx", "GRPO", "RLOO", "DPO"]
  # One estimator for all: the SFT model's KL to itself is the sampler-vs-scorer drift only, and a PPO run's
  # change of pretraining loss is the one its own evaluation measured (same prose, same EMA weights).
  assert abs(methods["SFT"]["kl"]) < 1e-4 and methods["SFT"]["pretraining_loss_change"] == 0.0
  for stage, name in (("ppo", "PPO"), ("ppo_ptx", "PPO-ptx"), ("grpo", "GRPO")):
    done = json.loads((tmp_path / stage / "done.json").read_text())
    tax = done["eval_ptx_loss"] - done["eval_ptx_loss_sft"]
    assert methods[name]["pretraining_loss_change"] == pytest.approx(tax, abs=1e-6), name
    assert methods[name]["wall_time_s"] == done["wall_time_s"] > 0
  assert [p["n"] for p in compare["best_of_n"]] == [1, 2, 4, 8]
  for p in compare["best_of_n"]:
    assert p["kl"] == pytest.approx(math.log(p["n"]) - (p["n"] - 1) / p["n"])
  proxies = [p["proxy"] for p in compare["best_of_n"]]
  assert proxies == sorted(proxies)  # the RM's best of more samples scores at least as high
  # The table prints what was computed, and the figure exists.
  table = (tmp_path / "compare.md").read_text()
  for name in ("PPO", "PPO-ptx", "GRPO", "RLOO", "DPO"):
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    assert f"| {100 * evaluation[f'win_rate_{name}']:.1f}% |" in row
    assert f"| {methods[name]['kl']:.2f} |" in row
  assert "| best-of-4 (SFT + RM) |" in table
  assert (tmp_path / "overoptimization.png").stat().st_size > 1000


def test_the_few_shot_prefix_is_three_training_tasks_with_their_gold_answers():
  w = world.make_world(0)
  found = {t.prompt: t for t in datasets.sample_tasks(400, split="train", seed=5, world=w, kind="fewshot")}
  for prompt, answer in datasets.FEW_SHOT_EXAMPLES:
    assert datasets.split_of(prompt) == "train" and found[prompt].answer == answer
    assert tasks.quality(found[prompt], answer) == pytest.approx(1.0)
  assert datasets.FEW_SHOT_PREFIX == "".join(f"{p}{a}\n" for p, a in datasets.FEW_SHOT_EXAMPLES)


def fake_results(rate: float, tax: float) -> dict:
  """One seed's results as the report reads them: every Figure-1 model's win rate against the baseline `rate`
  less a fixed step per model, intervals ±5 points."""
  from instructgpt_jax.lab import report

  e = {"prompts": 8}
  for i, (key, _) in enumerate((*report.FIGURE1, report.PPO_INIT)):
    r = rate - 0.1 * (4 - i) if key != "SFT" else rate - 0.15
    e.update({f"baseline_win_rate_{key}": r, f"baseline_win_rate_{key}_interval": [r - 0.05, r + 0.05]})
    e.update({f"gold_{key}": r / 2, f"win_rate_{key}": r})
  methods = {n: {"kl": 2 * rate, "pretraining_loss_change": tax} for n in ("SFT", "PPO", "PPO-ptx")}
  best_of_n = [{"n": 1, "kl": 0.0, "gold": 0.1}, {"n": 4, "kl": 0.8863, "gold": rate, "win_rate": rate}]
  return {
    "evaluation": e,
    "compare": {"methods": methods, "best_of_n": best_of_n},
    "rm": {"eval_accuracy": 0.6},
    "labels": {"agreement_held_out_labelers": 0.7},
    "ppo": {"eval_ptx_loss": 2.0 + tax, "eval_ptx_loss_sft": 2.0},
    "ppo_ptx": {"eval_ptx_loss": 2.0 + tax / 2, "eval_ptx_loss_sft": 2.0},
  }


def test_the_report_over_seeds_gives_means_with_t_intervals_and_which_differences_survive(tmp_path):
  from instructgpt_jax.lab import report

  runs = {0: fake_results(0.6, 0.01), 1: fake_results(0.7, 0.02), 2: fake_results(0.8, 0.03)}
  summary = report.write_seeds(str(tmp_path), runs, {"ppo": "PPO", "ppo_ptx": "PPO-ptx"})
  text = (tmp_path / "report.md").read_text()
  # PPO-ptx: 0.6, 0.7, 0.8 -> mean 70%, s = 0.1, half width t(0.975, 2) · 0.1 / √3 = 4.302653 · 0.057735 = 0.24841
  assert "| PPO-ptx (InstructGPT) | 70.0% [45.2%, 94.8%] | 60.0% / 70.0% / 80.0% | 55.0%-65.0%; 65.0%-75.0%; " in text
  assert "| SFT | 50.0% (the baseline itself) | 50.0% / 50.0% / 50.0% | - |" in text
  # PPO-ptx minus PPO: 0.1 in every seed (s = 0): the interval is a point, away from 0.
  assert "| PPO-ptx − PPO | +10.0 | [+10.0, +10.0] | yes |" in text
  # PPO-ptx minus the baseline: 0.1, 0.2, 0.3 -> +20.0 ± 24.8: the seeds cannot tell it from 0.
  assert "| PPO-ptx − SFT baseline | +20.0 | [-4.8, +44.8] | no |" in text
  assert "| pretraining loss change, PPO (γ = 0) | +0.020 [-0.005, +0.045] |" in text
  assert "PPO-ptx (InstructGPT)" in summary and (tmp_path / "figure1.png").stat().st_size > 1000
  # The comparison, pooled the same way: PPO's KL 1.2, 1.4, 1.6 -> 1.40 ± 0.497.
  assert "| PPO | 60.0% [35.2%, 84.8%] | 60.0% [35.2%, 84.8%] | 0.300 [0.176, 0.424] | 1.40 [0.90, 1.90] |" in text
  assert "| best-of-4 (SFT + RM) | 70.0% [45.2%, 94.8%] | - | 0.700 [0.452, 0.948] | 0.89 | +0.000 |" in text
  assert report.pooled_headline(runs)["fig1_ppo_ptx"] == pytest.approx(0.7)


def test_seeds_run_the_lab_once_per_seed_in_its_own_folder(tmp_path, monkeypatch):
  from instructgpt_jax.stages import pipeline as pipeline_trainer

  ran = []

  def run_seed(config, workdir):
    ran.append((config.seed, config.seeds, workdir))
    return fake_results(0.5 + 0.1 * config.seed, 0.0), ""

  monkeypatch.setattr(pipeline_trainer, "run_seed", run_seed)
  config = configured(pipeline, "lab_quick", seed=3, seeds=2)
  headline = pipeline_trainer.train(config, str(tmp_path))
  assert ran == [(3, 1, str(tmp_path / "seed_3")), (4, 1, str(tmp_path / "seed_4"))]
  assert headline["fig1_ppo_ptx"] == pytest.approx(0.85)  # the mean of 0.8 and 0.9
  assert (tmp_path / "report.md").read_text().startswith("# The InstructGPT lab over 2 seeds")


def test_the_findings_are_read_from_the_runs_numbers():
  from instructgpt_jax.lab import report

  # GPT 30% [25, 35], GPT prompted 40% [35, 45], PPO 60% [55, 65], PPO-ptx 70% [65, 75]; taxes +0.02 / +0.01;
  # RM 60% against agreement 70%.
  found = report.findings(fake_results(0.7, 0.02))
  assert [held for _, held, _ in found] == [True, True, True, False, True, True, True]
  assert found[0][2] == "70.0% [65.0%, 75.0%]" and found[3][2] == "40.0% against 30.0%"
  assert found[5][2] == "+0.010 against +0.020 nats per token" and found[6][2] == "60.0% against 70.0%"
  # GPT prompted's interval [35, 45] touches GPT's [25, 35]: not shown; PPO-ptx below 50% is not shown either.
  assert [held for _, held, _ in report.findings(fake_results(0.45, -0.01))][:2] == [False, False]


# docs/results.md "Over seeds" runs this command as written (3 seeds of lab_quick with the comparison, 45 min).
SEEDS_COMMAND = (
  "python -m instructgpt_jax.main --config=configs/pipeline.py:lab_quick,compare --config.seeds=3 "
  "--workdir=runs/compare3 --config.progress_bar=false"
)


@pytest.mark.slow
def test_the_documented_seeds_command_pools_the_seeds_runs(tmp_path):
  """The documented 3-seed command, shrunk to 2 seeds of the micro comparison: one lab per seed in its own
  folder, and a report whose Figure-1 cells are the mean over those runs."""
  docs = " ".join((pathlib.Path(__file__).parents[1] / "docs" / "results.md").read_text().split())
  assert SEEDS_COMMAND in docs
  command = shrink(
    SEEDS_COMMAND, {"--config.seeds=3": "--config.seeds=2", "runs/compare3": str(tmp_path)}, tuple(flags(MICRO_COMPARE))
  )
  done = subprocess.run([sys.executable, *argv(command)[1:]], env=ONE_DEVICE, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  rates = [
    json.loads((tmp_path / f"seed_{s}" / "evaluation" / "done.json").read_text())["baseline_win_rate_PPO"]
    for s in (0, 1)
  ]
  report = (tmp_path / "report.md").read_text()
  assert report.startswith("# The InstructGPT lab over 2 seeds")
  assert f"| PPO | {100 * sum(rates) / 2:.1f}% [" in report and "## The comparison of methods over seeds" in report
