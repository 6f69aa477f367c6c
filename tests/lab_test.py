"""The embedded lab: tasks and their gold judge, the simulated labelers, and the pipeline end to end."""

import json
import math
import os
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
from instructgpt_jax.trainers import chain

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
  stage = str(np.random.default_rng().choice(["pretrain", "sft", "labels", "rm", "ppo", "ppo_ptx"]))
  kill_9_inside(stage, tmp_path / "b")
  run_micro(tmp_path / "b")
  second = main.run(micro_config(), str(tmp_path / "b"))
  assert first == second, f"killed inside {stage}"
  report = (tmp_path / "a" / "report.md").read_text()
  evaluation = json.loads((tmp_path / "a" / "evaluation" / "done.json").read_text())
  assert f"{100 * evaluation['win_rate_PPO-ptx']:.1f}%" in report  # the report prints what was computed
  for name in ("reward_vs_kl.png", "win_rates.png", "learning_curves.png"):
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
  """The paper's findings, in direction, from `lab_quick` (the README's `lab` shows them in size): the README's
  main job (doc_examples.README_MAIN_JOB) at the quick scale, after its install (tests/run.sh installs the same)."""
  command = shrink(
    README_MAIN_JOB.split(" && ")[-1], {"pipeline.py": "pipeline.py:lab_quick", "runs/lab": str(tmp_path)}
  )
  done = subprocess.run([sys.executable, *argv(command)[1:], *NO_BAR], env=ONE_DEVICE, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  found = run_main(command)  # the finished pipeline again: it reads every stage's results and reports them
  evaluation = json.loads((tmp_path / "evaluation" / "done.json").read_text())
  # Held-out labelers prefer PPO-ptx to SFT, beyond the interval's reach of a coin flip.
  assert evaluation["win_rate_PPO-ptx_interval"][0] > 0.5, evaluation
  assert found["gold_ppo_ptx"] > found["gold_sft"]
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
