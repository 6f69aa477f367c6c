"""The DPO stage: sequence log-probs against the teacher-forced scorer, the start at the reference (every implicit
reward 0), learning on the lab's comparisons, and kill -9 then resume exactly."""

import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import dpo
from instructgpt_jax import checkpoint, errors, main, models, optim, scoring, stages, train_state
from instructgpt_jax.data import batching
from instructgpt_jax.library import model_io
from instructgpt_jax.stages import dpo as dpo_trainer

from runs import configured, read_metrics


def test_sequence_logprobs_equal_the_scorers_summed_response_logprobs():
  cfg = models.resolve({"size": "tiny", "vocab_size": 256, "n_layers": 2})
  graphdef, params = models.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompt = rng.integers(2, 256, 7)
  responses = [rng.integers(2, 256, n) for n in (5, 1, 9)]
  record = {
    "prompt_ids": prompt,
    "response_ids": np.concatenate(responses),
    "response_lengths": np.array([len(r) for r in responses]),
    "ranks": np.array([0, 1, 2]),
  }
  element = batching.comparison_element(record, 0, seq_len=24, max_responses=4, pad_id=0)
  got = scoring.sequence_logprobs(
    graphdef,
    params,
    element["tokens"][None],
    element["segment_ids"][None],
    element["prompt_lengths"][None, None],
    element["response_lengths"][None],
  )[0]
  # The same responses in the rollout layout (prompt left-padded, response right-padded), scored token by token.
  width = 12
  for k, response in enumerate(responses):
    prompt_tokens = np.zeros((1, 8), np.int32)
    prompt_tokens[0, 1:] = prompt
    prompt_segments = (np.arange(8) >= 1).astype(np.int32)[None]
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(response)] = response
    mask = (np.arange(width) < len(response)).astype(np.int32)[None]
    per_token = scoring.response_logprobs(graphdef, params, prompt_tokens, prompt_segments, tokens, mask)
    np.testing.assert_allclose(got[k], float(np.sum(per_token)), rtol=1e-5, atol=1e-5)
  assert float(got[3]) == 0.0  # the empty slot


def test_dpo_form_reaches_the_training_step_and_the_evaluation_terms():
  """The policy as its own reference: every implicit reward is 0. Prompt 1 ranks 3 responses strictly, prompt 2
  ties its best two over a third (a fourth slot empty). Plackett-Luce: log 3! and 2·log 2 (each tied best against
  itself and the worst); all pairs (1/C(3,2)): 3·log 2 / 3 and 2·log 2 / 3."""
  cfg = models.resolve({"size": "tiny", "vocab_size": 256, "n_layers": 2})
  graphdef, params = models.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(1)
  elements = []
  for ranks in ([0, 1, 2], [0, 0, 1]):
    responses = [rng.integers(2, 256, n) for n in (3, 5, 2)]
    record = {
      "prompt_ids": rng.integers(2, 256, 4),
      "response_ids": np.concatenate(responses),
      "response_lengths": np.array([len(r) for r in responses]),
      "ranks": np.array(ranks),
    }
    elements.append(batching.comparison_element(record, 0, seq_len=12, max_responses=4, pad_id=0))
  batch = {k: np.stack([e[k] for e in elements]) for k in ("tokens", "segment_ids", "ranks", "prompt_lengths")}
  batch["response_lengths"] = np.stack([e["response_lengths"] for e in elements])
  batch["ref_logps"] = dpo_trainer.sequence_logps(graphdef, params, batch)
  log2 = math.log(2)
  expected = {"plackett_luce": [math.log(6), 2 * log2], "all_pairs": [log2, 2 * log2 / 3]}
  config = dpo.get_config("tiny")
  tx = optim.make_optimizer(config.optim, 10)
  for form, per_prompt in expected.items():
    options = {"beta": 0.1, "normalizer": "binom_k", "form": form}
    terms = dpo_trainer.prompt_terms(graphdef, params, batch, **options)
    np.testing.assert_allclose(terms["loss"], per_prompt, rtol=1e-5)
    np.testing.assert_array_equal(terms["num_pairs"], [3, 2])
    step = dpo_trainer.make_train_step(graphdef, tx, optim.schedule(config.optim, 10), 1, **options)
    _, metrics = jax.jit(step)(train_state.TrainState.create(params, tx, jax.random.key(2)), batch)
    np.testing.assert_allclose(metrics["loss"], np.mean(per_prompt), rtol=1e-5)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"dpo.form": "listwise"}, "dpo.form: 'listwise' is not one of ('all_pairs', 'plackett_luce')"),
    (
      {"dpo.form": "plackett_luce", "dpo.pair_normalizer": "valid_pairs"},
      "dpo.pair_normalizer: given, but dpo.form is 'plackett_luce', whose loss has no pair normalizer; drop it",
    ),
  ],
)
def test_dpo_form_mistakes_are_one_line_config_errors(overrides, message):
  config = configured(dpo, "tiny", **{"model.init_from": "W_SFT", **overrides})
  with pytest.raises(errors.ConfigError) as raised:
    stages.check_config(config, list(overrides))
  assert str(raised.value) == message


def test_dpo_plackett_luce_leaves_only_the_pair_normalizer_unused():
  listwise = configured(dpo, "tiny", **{"model.init_from": "W_SFT", "dpo.form": "plackett_luce"})
  stages.check_config(listwise, ["dpo.form"])  # raises on any problem
  assert dpo_trainer.unused_fields(listwise) == {
    "dpo.pair_normalizer": "dpo.form is 'plackett_luce', whose loss has no pair normalizer"
  }
  assert dpo.get_config("tiny").dpo.form == "all_pairs" and dpo_trainer.unused_fields(dpo.get_config("tiny")) == {}


def dpo_flags(ppo_models, **overrides):
  return {
    "model.init_from": str(ppo_models / "sft"),
    "data.train": "lab:comparisons:train:400",
    "data.eval": "lab:comparisons:eval:48",
    "eval_at_start": True,
    "eval_every_steps": 0,
    **overrides,
  }


@pytest.mark.slow
def test_dpo_starts_at_the_reference_and_learns_the_labelers_preferences(ppo_models, tmp_path):
  main.run(configured(dpo, "tiny", **dpo_flags(ppo_models, total_steps=25)), str(tmp_path))
  rows = read_metrics(tmp_path)
  start, end = rows[0], rows[-1]
  # Step 0: the policy is its reference, so every implicit reward β·log(π/π_ref) is exactly 0: no pair is
  # ranked right (0 > 0 is false), the margin is 0, and each pair costs log 2 (a prompt's loss is
  # |P_b| log 2 / C(K_b, 2), at most log 2).
  assert start["step"] == 0 and start["eval_accuracy"] == 0.0 and start["eval_margin"] == 0.0
  assert 0.5 * math.log(2) < start["eval_loss"] <= math.log(2) + 1e-6
  assert end["step"] == 25 and end["eval_loss"] < start["eval_loss"] and end["eval_accuracy"] > 0.6, end
  assert end["eval_margin"] > 0
  exported = model_io.read_source(str(tmp_path / "export"))  # the policy, for sampling or a later stage
  assert exported.kind == "lm" and exported.config.n_layers == models.resolve({"size": "tiny"}).n_layers


@pytest.mark.slow
def test_dpo_kill_9_then_rerun_matches_the_uninterrupted_run(ppo_models, tmp_path):
  flags = dpo_flags(ppo_models, total_steps=10, checkpoint_every_steps=2, log_every_steps=1, eval_at_start=False)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def command(workdir):
    cmd = [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/dpo.py:tiny", f"--workdir={workdir}"]
    return cmd + [f"--config.{k}={v}" for k, v in flags.items()] + ["--config.progress_bar=false"]

  straight, killed = tmp_path / "straight", tmp_path / "killed"
  done = subprocess.run(command(straight), env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  path, deadline = killed / "metrics.jsonl", time.time() + 180
  while time.time() < deadline and not (path.exists() and sum(1 for _ in open(path)) >= 5):
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (checkpoint.Checkpointer(str(killed)).latest_step() or 0) < 10
  done = subprocess.run(command(killed), env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  a, b = read_metrics(straight), read_metrics(killed)
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
  for x, y in zip(a, b):
    for key in ("loss", "accuracy", "margin", "grad_norm", "eval_loss", "eval_accuracy"):
      assert x.get(key) == y.get(key), (x["step"], key)
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.Checkpointer(str(straight)).restore_params(10),
    checkpoint.Checkpointer(str(killed)).restore_params(10),
  )
