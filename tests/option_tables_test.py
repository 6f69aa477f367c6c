"""Each option set is one table beside its math (losses.py, rl.py) that the function dispatches through and the
config checks read when they run: every name of a table passes the check and any other name is one line listing
them; and an advantage estimator a researcher adds from their own script (docs/ppo.md, "Your own estimator"),
with no edit to the package, trains in a PPO run and plans in the AOT compile."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo
from instructgpt_jax import accelerators, checkpoint, config_lib, errors, losses, main, rl, stages
from instructgpt_jax.library import aot

from runs import configured, read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLACEHOLDERS = {  # inputs the config check wants given, never read by it
  "configs/ppo.py:tiny": ["--config.model.init_from=W", "--config.ppo.reward_model=R"],
  "configs/rm.py:tiny": ["--config.model.init_from=W"],
  "configs/dpo.py:tiny": ["--config.model.init_from=W"],
}

# (config argument, field, its table, names the check takes beyond the table's, overrides every name needs)
CHECKED = [
  ("configs/ppo.py:tiny", "ppo.advantage_estimator", lambda: rl.ESTIMATORS, (), ["--config.ppo.samples_per_prompt=2"]),
  ("configs/ppo.py:tiny", "ppo.kl_estimator", lambda: losses.KL_ESTIMATORS, (), []),
  ("configs/ppo.py:tiny", "ppo.ptx_reduction", lambda: losses.PTX_REDUCTIONS, (), []),
  ("configs/ppo.py:tiny", "ppo.loss_aggregation", lambda: losses.AGGREGATIONS, ("auto",), []),
  ("configs/rm.py:tiny", "rm.pair_normalizer", lambda: losses.PAIR_NORMALIZERS, (), []),
  ("configs/dpo.py:tiny", "dpo.pair_normalizer", lambda: losses.PAIR_NORMALIZERS, (), []),
]


@pytest.mark.parametrize("config_arg, field, table, extra, overrides", CHECKED, ids=[c[1] for c in CHECKED])
def test_the_check_takes_every_name_of_the_table_and_lists_them_for_any_other(
  config_arg, field, table, extra, overrides
):
  names = (*extra, *table())
  given = [*PLACEHOLDERS[config_arg], *overrides]
  for name in names:
    stages.load_checked(config_arg, [*given, f"--config.{field}={name}"])
  with pytest.raises(errors.ConfigError) as raised:
    stages.load_checked(config_arg, [*given, f"--config.{field}=bogus"])
  assert str(raised.value) == f"{field}: 'bogus' is not one of {names}"


def test_the_built_in_rows_are_the_functions_they_name():
  """The tables hold what the functions compute: the values the names gave before the tables (the same
  operations, so the same bits) and the estimators' properties the PPO stage reads."""
  x = jnp.asarray([[-3.0, -0.5, 0.0, 0.7, 4.0]])
  assert tuple(losses.KL_ESTIMATORS) == ("k1", "k2", "k3")
  for name, k in losses.KL_ESTIMATORS.items():
    assert np.array_equal(losses.kl_penalty(x, jnp.zeros_like(x), estimator=name), k(x)), name
  assert [(n, e.needs_critic, e.grouped, e.paper_aggregation) for n, e in rl.ESTIMATORS.items()] == [
    ("gae", True, False, "token_mean"),
    ("reinforce_pp", False, False, "token_mean"),
    ("grpo", False, True, "sequence_mean"),
    ("dr_grpo", False, True, "sequence_sum_constant"),
    ("rloo", False, True, "sequence_sum"),
  ]
  assert all(e.doc for e in rl.ESTIMATORS.values())
  assert dict(rl.PAPER_AGGREGATIONS) == {n: e.paper_aggregation for n, e in rl.ESTIMATORS.items()}
  assert {n for n in rl.ESTIMATORS if rl.is_grouped(n)} == set(rl.GROUP_ESTIMATORS)
  assert [n for n in rl.ESTIMATORS if rl.needs_critic(n)] == ["gae"]
  with pytest.raises(ValueError, match=r"'vtrace' is not one of \('gae', 'reinforce_pp', 'grpo'"):
    rl.estimate_advantages("vtrace", jnp.zeros(2), x, x, x > 0, kl_coef=0.1)


def test_penalty_rewards_take_the_penalty_itself():
  """The estimators hand k_t to rl.penalty_rewards; per_token_rewards is it on the log-ratio (k1)."""
  rng = np.random.default_rng(0)
  logprobs, ref = rng.normal(size=(2, 3, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
  score = np.array([1.5, -0.5, 2.0], np.float32)
  k3 = losses.kl_penalty(logprobs, ref, estimator="k3")
  rewards = rl.penalty_rewards(score, k3, mask, kl_coef=0.1)
  expected = np.where(mask, -0.1 * np.asarray(k3), 0.0)
  expected[0, 2] += 1.5
  expected[1, 5] -= 0.5  # the score at the last real token; the empty row gets none
  np.testing.assert_allclose(rewards, expected, rtol=1e-6)
  k1 = losses.kl_penalty(logprobs, ref)
  assert np.array_equal(
    rl.per_token_rewards(score, logprobs, ref, mask, kl_coef=0.1), rl.penalty_rewards(score, k1, mask, kl_coef=0.1)
  )
  # One reward per response for the group estimators: the score (kept by an empty row too) minus β·Σ_t k_t.
  summed = np.sum(np.where(mask, np.asarray(k3), 0.0), axis=1)
  np.testing.assert_allclose(rl.sequence_rewards(score, k3, mask, kl_coef=0.1), score - 0.1 * summed, rtol=1e-6)


def _documented(language: str) -> str:
  """The `language` code block of docs/ppo.md's "Your own estimator" section."""
  section = (ROOT / "docs" / "ppo.md").read_text().split("## Your own estimator", 1)[1].split("\n## ", 1)[0]
  (block,) = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
  return block


@pytest.fixture
def reinforce_mean():
  """docs/ppo.md's script, run as a module (not as __main__): it registers "reinforce_mean"; taken out after."""
  exec(compile(_documented("python"), "reinforce_mean.py", "exec"), {"__name__": "reinforce_mean"})
  try:
    yield rl.ESTIMATORS["reinforce_mean"]
  finally:
    rl.ESTIMATORS.pop("reinforce_mean", None)


def test_a_registered_estimator_is_an_option_until_it_is_taken_out(reinforce_mean):
  assert (reinforce_mean.needs_critic, reinforce_mean.grouped, reinforce_mean.paper_aggregation) == (
    False,
    False,
    "token_mean",
  )
  given = [*PLACEHOLDERS["configs/ppo.py:tiny"], "--config.ppo.advantage_estimator=reinforce_mean"]
  stages.load_checked("configs/ppo.py:tiny", given)
  # It trains no value function, so the value fields are unused, as for the built-in critic-free estimators.
  with pytest.raises(errors.ConfigError, match="ppo.vf_coef: given, but ppo.advantage_estimator=reinforce_mean"):
    stages.load_checked("configs/ppo.py:tiny", [*given, "--config.ppo.vf_coef=0.5"])
  with pytest.raises(ValueError, match="'reinforce_mean' is already an estimator"):
    rl.register_estimator("reinforce_mean", reinforce_mean.fn, needs_critic=False)
  rl.ESTIMATORS.pop("reinforce_mean")
  with pytest.raises(errors.ConfigError, match="ppo.advantage_estimator: 'reinforce_mean' is not one of"):
    stages.load_checked("configs/ppo.py:tiny", given)


def test_the_documented_command_runs_the_script_through_mains_check(tmp_path):
  """The command line of docs/ppo.md: the script registers its estimator, then main.py's flags and config check
  take `--config.ppo.advantage_estimator=reinforce_mean` (--check_config: checked, not run)."""
  script = tmp_path / "reinforce_mean.py"
  script.write_text(_documented("python"))
  command = " ".join(line.rstrip("\\").strip() for line in _documented("bash").strip().splitlines()).split()
  assert command[:2] == ["python", "reinforce_mean.py"]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
  out = subprocess.run(
    [sys.executable, str(script), *command[2:], "--check_config"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "config checked: ppo, no problems"


@pytest.mark.slow
def test_a_registered_estimator_trains_in_a_ppo_run_without_a_critic(ppo_models, reinforce_mean, tmp_path):
  """2 tiny PPO iterations with docs/ppo.md's estimator, recorded as it runs: its advantages are R minus the
  batch's mean R (mean 0), R is the logged score minus β times the logged KL, and no value function exists."""
  seen = []

  def recorded(**inputs):
    advantages, returns = reinforce_mean.fn(**inputs)
    reward = rl.sequence_rewards(inputs["score"], inputs["penalty"], inputs["mask"], kl_coef=inputs["kl_coef"])
    jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]), advantages, reward, inputs["mask"])
    return advantages, returns

  rl.ESTIMATORS["reinforce_mean"] = reinforce_mean._replace(fn=recorded)
  flags = {
    "model.init_from": str(ppo_models / "sft"),
    "ppo.reward_model": str(ppo_models / "rm" / "export"),
    "ppo.episodes": 2 * 32,
    "ppo.advantage_estimator": "reinforce_mean",
    "checkpoint_every_steps": 2,
    "eval_every_steps": 0,
    "data.eval": "",
  }
  main.run(configured(ppo, "tiny", **flags), str(tmp_path))
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  assert len(seen) == 2  # one scored rollout per iteration
  for r, (advantages, reward, mask) in zip(rows, seen, strict=True):
    assert np.isfinite(r["policy_loss"]) and r["policy_grad_norm"] > 0, r
    assert r["first_minibatch_approx_kl"] <= 1e-5, r  # the first minibatch trains on the rollout policy itself
    assert not any(k.startswith(("value_", "explained_variance")) for k in r), sorted(r)  # no value function
    keep = mask.astype(bool)
    assert advantages.shape == keep.shape and keep.any(axis=1).all(), (advantages.shape, keep.sum(axis=1))
    per_response = advantages.sum(axis=1) / keep.sum(axis=1)  # the one A of each response
    np.testing.assert_allclose(advantages, np.where(keep, per_response[:, None], 0.0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(per_response, reward - reward.mean(), rtol=1e-5, atol=1e-5)
    assert abs(per_response.mean()) < 1e-5 and per_response.std() > 0
    # R = score − β·Σ_t k1_t: its batch mean is the logged score minus β times the logged KL (kl_estimator k1).
    assert reward.mean() == pytest.approx(r["score"] - r["kl_coef"] * r["kl"], rel=1e-4, abs=1e-4)
  saved = checkpoint._saved_tree(checkpoint.Checkpointer(str(tmp_path)).directory / "2" / "state")
  assert saved.get("critic") in (None, {}), "a critic-free run checkpoints no critic"


PPO_SMALL = [  # tests/aot_test.py's tiny PPO config on 8 devices, small enough to compile in seconds
  "--config.mesh.fsdp=8",
  "--config.ppo.rollout_batch=16",
  "--config.ppo.minibatch=8",
  "--config.ppo.max_new_tokens=8",
  "--config.data.max_prompt_len=16",
  "--config.data.ptx_seq_len=32",
]


def test_a_registered_estimator_plans_no_critic(reinforce_mean):
  config = config_lib.load_config(
    "configs/ppo.py:tiny", [*PPO_SMALL, "--config.ppo.advantage_estimator=reinforce_mean"]
  )
  r = aot.report(config, accelerators.parse_target("cpu-8"), rm_size="tiny")
  assert set(r.plan.models) == {"policy", "reference", "reward model"}
  state = r.plan.programs[1].args[0]
  assert state.critic is None
  assert [(p.name, p.error) for p in r.programs] == [("rollout", ""), ("train_step", "")]
  assert r.programs[1].aliased == aot.device_bytes(state)  # the whole state (policy alone) is donated
