"""ppo.loss_aggregation reaches the policy loss of PPO's jitted minibatch step (library/ppo_steps.py), and an
invalid value is a one-line config error.

The step runs a tiny random policy on a hand-made scored batch whose old log-probs are the policy's own, so
the ratio is 1 and the clipped loss is the aggregate of −A (plus β·k3 with ppo.kl_in="loss"): numbers worked
out here from the advantages and the mask alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo
from instructgpt_jax import errors, losses, main, models, optim, scoring, sharding, train_state
from instructgpt_jax.library import loop, ppo_steps

from runs import configured

ROWS, PROMPT, RESPONSE = 8, 6, 10
LENGTHS = np.array([10, 1, 4, 7, 2, 10, 5, 3])  # unequal, so the four aggregations differ


@pytest.fixture(scope="module")
def batch():
  """Prompts, responses and the tiny policy's params, shared by every case."""
  cfg = models.resolve({"size": "tiny", "vocab_size": 64, "n_layers": 2, "dtype": "float32"})
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 64, (ROWS, PROMPT)).astype(np.int32)
  segments = np.ones((ROWS, PROMPT), np.int32)
  mask = (np.arange(RESPONSE)[None] < LENGTHS[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(3, 64, (ROWS, RESPONSE)), 0).astype(np.int32)
  advantages = np.where(mask > 0, rng.normal(0, 1, (ROWS, RESPONSE)), 0.0).astype(np.float32)
  kl_offsets = np.where(mask > 0, rng.normal(0, 0.5, (ROWS, RESPONSE)), 0.0).astype(np.float32)
  return cfg, prompts, segments, tokens, mask, advantages, kl_offsets


def first_step_loss(batch, **overrides):
  """The `loss` and `kl_loss` metrics of one minibatch step over all ROWS rows, and (A, mask, k3)."""
  cfg, prompts, segments, tokens, mask, advantages, kl_offsets = batch
  config = configured(ppo, "tiny", **{f"ppo.{k}": v for k, v in overrides.items()})
  p = config.ppo
  p.update(rollout_batch=ROWS, minibatch=ROWS, max_new_tokens=RESPONSE, ptx_coef=0.0)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  m = ppo_steps.Models.build(
    p,
    policy_cfg=cfg,
    reference_cfg=cfg,
    reward_cfg=cfg,
    critic_cfg=None,
    reward_bias=0.0,
    eos_id=2,
    pad_id=0,
    policy_tx=optim.make_optimizer(config.optim, 10),
    policy_lr=optim.schedule(config.optim, 10),
    critic_tx=None,
    mesh=mesh,
    rules=rules,
  )
  _, shardings = ppo_steps.abstract_state(m)
  params = train_state.random_params(cfg, m.targets["policy"], jax.random.PRNGKey(1))
  state = ppo_steps.initial_state(m, shardings, params, None, jax.random.PRNGKey(2), jax.random.PRNGKey(3))
  old_logprobs = scoring.response_logprobs(m.policy, params, prompts, segments, tokens, mask)
  ref_logprobs = old_logprobs - kl_offsets  # x = log π − log π_ref = the offsets
  kl_in_loss = p.kl_in == "loss"
  scored = ppo_steps.Scored(
    *map(jnp.asarray, (prompts, segments, tokens, mask, old_logprobs)),
    ref_logprobs if kl_in_loss else None,
    None,
    jnp.asarray(advantages),
    None,
  )
  scored = jax.device_put(scored, loop.batch_sharding(mesh, rules))  # as score_rollout leaves it
  beta = float(state.kl.kl_coef)  # read before the step, which donates the state
  _, metrics = ppo_steps.jit_steps(m, shardings).train(state, scored, jnp.arange(ROWS, dtype=jnp.int32), {})
  k3 = np.expm1(-kl_offsets.astype(np.float64)) + kl_offsets
  return metrics, beta, k3


def by_hand(values, mode, constant=None):
  """The aggregation of a [ROWS, RESPONSE] array over the rows' LENGTHS, in float64."""
  sums = np.array([values[b, :n].astype(np.float64).sum() for b, n in enumerate(LENGTHS)])
  return {
    "token_mean": sums.sum() / LENGTHS.sum(),
    "sequence_mean": np.mean(sums / LENGTHS),
    "sequence_sum": sums.mean(),
    "sequence_sum_constant": sums.sum() / (ROWS * (constant or np.nan)),
  }[mode]


@pytest.mark.parametrize(
  "overrides, mode",
  [
    ({"advantage_estimator": "grpo", "samples_per_prompt": 2, "loss_aggregation": "token_mean"}, "token_mean"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 2, "loss_aggregation": "sequence_sum"}, "sequence_sum"),
    ({"advantage_estimator": "dr_grpo", "samples_per_prompt": 2}, "sequence_sum_constant"),  # auto: the budget
    ({"advantage_estimator": "grpo", "samples_per_prompt": 2, "kl_in": "loss"}, "sequence_mean"),  # auto
  ],
)
def test_loss_aggregation_reaches_the_policy_loss_of_the_minibatch_step(batch, overrides, mode):
  _, _, _, _, mask, advantages, _ = batch
  metrics, beta, k3 = first_step_loss(batch, **overrides)
  constant = RESPONSE if mode == "sequence_sum_constant" else None  # ppo.max_new_tokens
  policy = by_hand(-advantages, mode, constant)
  np.testing.assert_allclose(metrics["policy_loss"], policy, rtol=1e-5, atol=1e-6)
  assert float(metrics["ratio_max"]) == pytest.approx(1.0, abs=1e-5)  # the old log-probs are the policy's own
  if overrides.get("kl_in") == "loss":  # GRPO's KL term inside the same reduction (Shao et al. 2024, Eq. 3)
    np.testing.assert_allclose(metrics["kl_loss"], by_hand(k3, mode), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], policy + beta * by_hand(k3, mode), rtol=1e-5, atol=1e-6)
    assert abs(by_hand(k3, mode) - by_hand(k3, "token_mean")) > 1e-3  # a reduction that differs here
  else:
    np.testing.assert_allclose(metrics["loss"], policy, rtol=1e-5, atol=1e-6)
  others = [by_hand(-advantages, other, RESPONSE) for other in losses.AGGREGATIONS if other != mode]
  assert min(abs(policy - other) for other in others) > 1e-3  # the batch tells the four apart


def test_the_config_default_is_auto_and_dr_grpos_constant_is_the_generation_budget():
  assert ppo.get_config("tiny").ppo.loss_aggregation not in losses.AGGREGATIONS  # "auto": the estimator's row
  assert ppo.get_config("tiny").ppo.loss_aggregation == "auto"
  p = ppo.get_config("tiny").ppo
  assert ppo_steps.policy_loss_aggregation(p) == ("token_mean", None)  # PPO: today's masked token mean
  p.update(advantage_estimator="dr_grpo")
  assert ppo_steps.policy_loss_aggregation(p) == ("sequence_sum_constant", p.max_new_tokens)
  p.update(loss_aggregation="sequence_sum")
  assert ppo_steps.policy_loss_aggregation(p) == ("sequence_sum", None)


def test_an_unknown_loss_aggregation_is_a_one_line_config_error(tmp_path):
  flags = {
    "model.init_from": str(tmp_path / "sft"),
    "ppo.reward_model": str(tmp_path / "rm"),
    "ppo.loss_aggregation": "seq_mean",
  }
  with pytest.raises(errors.ConfigError) as raised:
    main.run(configured(ppo, "tiny", **flags), str(tmp_path))
  assert str(raised.value) == (
    "ppo.loss_aggregation: 'seq_mean' is not one of "
    "('auto', 'token_mean', 'sequence_mean', 'sequence_sum_constant', 'sequence_sum')"
  )
