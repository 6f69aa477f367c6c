"""rl.py against the spec's worked examples, closed forms and slow pure-Python references."""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from instructgpt_jax import rl

from jax_checks import assert_batch_sharded_equals_single_device, count_traces

RTOL = 1e-5
ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# Slow references and random inputs
# ----------------------------------------------------------------------------------------------------


def reference_per_token_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
  rewards = np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    real = [t for t in range(mask.shape[1]) if mask[b, t]]
    for t in real:
      rewards[b, t] = -kl_coef * (float(logprobs[b, t]) - float(ref_logprobs[b, t]))
    if real:
      rewards[b, real[-1]] += float(score[b])
  return rewards


def reference_gae(rewards, values, mask, gamma, lam):
  """The explicit sum A_i = Σ_{j ≥ i} (γλ)^{j−i} δ_j over each row's real tokens, V = 0 past the last."""
  advantages, returns = np.zeros(mask.shape), np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    real = [t for t in range(mask.shape[1]) if mask[b, t]]
    deltas = []
    for i, t in enumerate(real):
      next_value = float(values[b, real[i + 1]]) if i + 1 < len(real) else 0.0
      deltas.append(float(rewards[b, t]) + gamma * next_value - float(values[b, t]))
    for i, t in enumerate(real):
      advantages[b, t] = sum((gamma * lam) ** (j - i) * deltas[j] for j in range(i, len(real)))
      returns[b, t] = advantages[b, t] + float(values[b, t])
  return advantages, returns


def reference_whiten(x, mask, shift_mean):
  real = [float(v) for v, m in zip(np.ravel(x), np.ravel(mask), strict=True) if m]
  n = max(len(real), 1)
  mean = sum(real) / n
  variance = sum((v - mean) ** 2 for v in real) / n
  out = (np.asarray(x, np.float64) - mean) / math.sqrt(variance + 1e-8)
  if not shift_mean:
    out += mean
  return np.where(mask, out, 0.0)


def random_mask(rng, batch, length, holes):
  """Right-padded rows (one empty, one with a single token); with holes, random gaps inside rows."""
  lengths = rng.integers(0, length + 1, size=batch)
  lengths[0], lengths[-1] = 0, 1
  mask = np.arange(length)[None, :] < lengths[:, None]
  if holes:
    mask &= rng.random((batch, length)) > 0.3
    mask[-1, 0] = True
  return mask


def poison_padding(x, mask):
  """Masked-out entries must not matter: fill them with NaN."""
  return np.where(mask, x, np.nan).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# per_token_rewards
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("holes", [False, True])
def test_per_token_rewards_matches_reference(holes):
  rng = np.random.default_rng(10)
  mask = random_mask(rng, 9, 7, holes)
  score = rng.normal(size=9).astype(np.float32)
  logprobs = poison_padding(-rng.exponential(size=(9, 7)), mask)
  ref_logprobs = poison_padding(-rng.exponential(size=(9, 7)), mask)
  rewards = jax.jit(functools.partial(rl.per_token_rewards, kl_coef=0.02))(score, logprobs, ref_logprobs, mask)
  expected = reference_per_token_rewards(score, logprobs, ref_logprobs, mask, 0.02)
  np.testing.assert_allclose(rewards, expected, rtol=RTOL, atol=1e-6)
  np.testing.assert_array_equal(rewards[0], 0.0)  # the empty row: no score, no NaN


def test_per_token_rewards_sum_is_the_eq2_bracket():
  """Spec §9.3: Σ_t r_t = r_θ(x, y) − β · Σ_t (log π − log π^SFT), with β a traced scalar."""
  rng = np.random.default_rng(11)
  mask = random_mask(rng, 12, 9, holes=True)
  score = rng.normal(scale=3.0, size=12).astype(np.float32)
  logprobs = -rng.exponential(size=(12, 9)).astype(np.float32)
  ref_logprobs = -rng.exponential(size=(12, 9)).astype(np.float32)
  beta = rl.kl_controller_init(0.15).kl_coef

  rewards = jax.jit(lambda *a: rl.per_token_rewards(*a[:4], kl_coef=a[4]))(score, logprobs, ref_logprobs, mask, beta)
  kl_sum = np.sum(np.where(mask, logprobs.astype(np.float64) - ref_logprobs, 0.0), axis=1)
  expected = np.where(mask.any(axis=1), score - 0.15 * kl_sum, 0.0)
  np.testing.assert_allclose(rewards.sum(axis=1), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# gae
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_reference(holes, gamma, lam):
  rng = np.random.default_rng(12)
  mask = random_mask(rng, 8, 6, holes)
  rewards = poison_padding(rng.normal(size=(8, 6)), mask)
  values = poison_padding(rng.normal(size=(8, 6)), mask)
  advantages, returns = jax.jit(functools.partial(rl.gae, gamma=gamma, lam=lam))(rewards, values, mask)
  expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(advantages, expected_advantages, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(returns, expected_returns, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(advantages[~mask], 0.0)


def test_gae_closed_forms():
  """λ = γ = 1: A_t = Σ_{s≥t} r_s − V_t (Monte Carlo). λ = 0: A_t = δ_t (one-step TD)."""
  rewards = np.array([[0.1, -0.2, 0.3, 1.5, 9.0]], np.float32)
  values = np.array([[0.5, 0.4, 0.3, 0.2, 9.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)

  advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  reward_to_go = [1.7, 1.6, 1.8, 1.5, 0.0]
  np.testing.assert_allclose(returns[0], reward_to_go, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(advantages[0], [1.2, 1.2, 1.5, 1.3, 0.0], rtol=1e-6, atol=1e-6)

  advantages, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=0.0)
  one_step = [0.1 + 0.4 - 0.5, -0.2 + 0.3 - 0.4, 0.3 + 0.2 - 0.3, 1.5 + 0.0 - 0.2, 0.0]
  np.testing.assert_allclose(advantages[0], one_step, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# whiten
# ----------------------------------------------------------------------------------------------------


def test_whiten_spec_vector():
  """Spec §8.1 ([NID], TF1 ground truth): population variance, shift_mean=False."""
  x = jnp.array([[1.2, 1.3, 1.4], [1.5, 1.6, 1.7], [1.8, 1.9, 2.0]])
  expected = [[0.0508, 0.4381, 0.8254], [1.2127, 1.6000, 1.9873], [2.3746, 2.7619, 3.1492]]
  np.testing.assert_allclose(rl.whiten(x, jnp.ones_like(x), shift_mean=False), expected, atol=1e-4)
  shifted = rl.whiten(x, jnp.ones_like(x))
  np.testing.assert_allclose(shifted, np.asarray(expected) - 1.6, atol=1e-4)
  np.testing.assert_allclose([np.mean(shifted), np.var(shifted)], [0.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_reference(shift_mean):
  rng = np.random.default_rng(13)
  mask = random_mask(rng, 8, 6, holes=True)
  x = poison_padding(rng.normal(loc=2.0, scale=3.0, size=(8, 6)), mask)
  out = jax.jit(functools.partial(rl.whiten, shift_mean=shift_mean))(x, mask)
  np.testing.assert_allclose(out, reference_whiten(x, mask, shift_mean), rtol=RTOL, atol=ATOL)


def test_whiten_degenerate_inputs():
  """All-masked gives zeros; a constant gives 0 (or the constant back) with a finite gradient."""
  whiten = jax.jit(rl.whiten, static_argnames="shift_mean")
  np.testing.assert_array_equal(whiten(jnp.full((2, 3), jnp.nan), jnp.zeros((2, 3))), 0.0)
  constant = jnp.full((2, 3), 4.0)
  np.testing.assert_allclose(whiten(constant, jnp.ones((2, 3))), 0.0, atol=1e-6)
  np.testing.assert_allclose(whiten(constant, jnp.ones((2, 3)), shift_mean=False), 4.0, atol=1e-6)
  for x in (constant, jnp.array([[1e4, -1e4, 3.0], [0.0, 2e3, -7e3]])):
    grad = jax.grad(lambda a: jnp.sum(rl.whiten(a, jnp.ones((2, 3))) ** 3))(x)
    assert np.all(np.isfinite(grad))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest forces 8 CPU devices"
  return Mesh(np.array(jax.devices()).reshape(8), ("data",))


def test_whiten_axis_name_takes_global_statistics_under_shard_map(mesh):
  rng = np.random.default_rng(14)
  mask = random_mask(rng, 16, 5, holes=True)
  x = rng.normal(loc=1.0, scale=2.0, size=(16, 5)).astype(np.float32)

  def per_shard(axis_name):
    whiten = functools.partial(rl.whiten, axis_name=axis_name)
    return jax.jit(jax.shard_map(whiten, mesh=mesh, in_specs=P("data"), out_specs=P("data")))

  global_stats = per_shard("data")(x, mask)
  np.testing.assert_allclose(global_stats, reference_whiten(x, mask, True), rtol=RTOL, atol=ATOL)
  local_stats = per_shard(None)(x, mask)
  shard_by_shard = np.concatenate([reference_whiten(x[i : i + 2], mask[i : i + 2], True) for i in range(0, 16, 2)])
  np.testing.assert_allclose(local_stats, shard_by_shard, rtol=RTOL, atol=ATOL)
  assert not np.allclose(local_stats, global_stats, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# KL controllers
# ----------------------------------------------------------------------------------------------------


def test_adaptive_kl_spec_step_and_clipping():
  """Spec §8.4: β 0.15, target 6, horizon 10,000, KL 9.0, n 512 -> 0.151536; e is clipped to ±0.2."""
  update = jax.jit(functools.partial(rl.adaptive_kl_update, target=6.0, horizon=10_000.0))
  state = rl.kl_controller_init(0.15)
  np.testing.assert_allclose(update(state, 9.0, 512).kl_coef, 0.151536, rtol=1e-6)
  np.testing.assert_allclose(update(state, 0.0, 512).kl_coef, 0.15 * (1 - 0.2 * 0.0512), rtol=1e-6)
  np.testing.assert_allclose(update(state, 6.6, 512).kl_coef, 0.15 * (1 + 0.1 * 0.0512), rtol=1e-6)
  np.testing.assert_allclose(update(state, 6.0, 512).kl_coef, 0.15, rtol=1e-7)


def test_fixed_kl_and_state_is_a_checkpointable_pytree():
  state = rl.kl_controller_init(0.02)
  assert rl.fixed_kl_update(state, jnp.float32(50.0), 512) is state
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 1 and leaves[0].dtype == jnp.float32 and float(leaves[0]) == pytest.approx(0.02)
  restored = jax.tree.unflatten(treedef, [np.float32(0.03)])
  assert isinstance(restored, rl.KLControllerState) and float(restored.kl_coef) == pytest.approx(0.03)


# ----------------------------------------------------------------------------------------------------
# One trace per shape, and mesh-independent values
# ----------------------------------------------------------------------------------------------------


def _rewards_args(rng, batch):
  mask = random_mask(rng, batch, 6, holes=True)
  return (
    rng.normal(size=batch).astype(np.float32),
    -rng.exponential(size=(batch, 6)).astype(np.float32),
    -rng.exponential(size=(batch, 6)).astype(np.float32),
    mask,
  )


def _gae_args(rng, batch):
  mask = random_mask(rng, batch, 6, holes=True)
  rewards_or_x = rng.normal(size=(batch, 6)).astype(np.float32)
  return rewards_or_x, rng.normal(size=(batch, 6)).astype(np.float32), mask


def _whiten_args(rng, batch):
  return _gae_args(rng, batch)[::2]


CASES = {
  "per_token_rewards": (functools.partial(rl.per_token_rewards, kl_coef=0.02), _rewards_args),
  "gae": (functools.partial(rl.gae, gamma=1.0, lam=0.95), _gae_args),
  "whiten/shift_mean": (functools.partial(rl.whiten, shift_mean=True), _whiten_args),
  "whiten/keep_mean": (functools.partial(rl.whiten, shift_mean=False), _whiten_args),
}


@pytest.mark.parametrize("name", list(CASES))
def test_jit_traces_once_per_shape(name):
  fn, make_args = CASES[name]
  rng = np.random.default_rng(15)
  traces, (first, second) = count_traces(fn, make_args(rng, 8), make_args(rng, 8))
  assert traces == 1
  assert not np.allclose(jax.tree.leaves(first)[0], jax.tree.leaves(second)[0])


def test_kl_update_traces_once():
  traces = []

  def counted(state, kl, n):
    traces.append(None)
    return rl.adaptive_kl_update(state, kl, n, target=6.0, horizon=10_000.0)

  step = jax.jit(counted)
  state = rl.kl_controller_init(0.15)
  for kl in (9.0, 3.0, 6.3):
    state = step(state, jnp.float32(kl), jnp.int32(512))
  assert len(traces) == 1
  np.testing.assert_allclose(
    state.kl_coef, 0.15 * (1 + 0.2 * 0.0512) * (1 - 0.2 * 0.0512) * (1 + 0.05 * 0.0512), rtol=1e-6
  )


@pytest.mark.parametrize("name", list(CASES))
def test_batch_sharded_on_8_devices_equals_one_device(name):
  fn, make_args = CASES[name]
  assert_batch_sharded_equals_single_device(fn, make_args(np.random.default_rng(16), 16), name=name)


def test_explained_variance_by_hand():
  returns = jnp.array([[1.0, 2.0, 3.0, 99.0]])
  mask = jnp.array([[1, 1, 1, 0]])  # the padded 99 is never seen
  assert float(rl.explained_variance(returns, returns, mask)) == pytest.approx(1.0)
  assert float(rl.explained_variance(jnp.full_like(returns, 2.0), returns, mask)) == pytest.approx(0.0, abs=1e-6)
  # V = R + (1, -1, 0): Var[R - V] = 2/3 against Var[R] = 2/3 -> 0; V = R + (1, 1, 1): a constant offset -> 1
  assert float(rl.explained_variance(returns + jnp.array([[1.0, -1.0, 0.0, 5.0]]), returns, mask)) == pytest.approx(
    0.0, abs=1e-6
  )
  assert float(rl.explained_variance(returns + 1.0, returns, mask)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# Critic-free estimators: group baselines (GRPO, Dr. GRPO, RLOO) and REINFORCE++
# ----------------------------------------------------------------------------------------------------


def reference_group_advantages(scores, group_size, baseline, scale, eps=1e-6):
  """Each response against the others of its group, looped in float64."""
  scores = np.asarray(scores, np.float64)
  out = np.zeros(len(scores))
  for start in range(0, len(scores), group_size):
    group = scores[start : start + group_size]
    mean = sum(group) / group_size
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
    for i, r in enumerate(group):
      others = [group[j] for j in range(group_size) if j != i]
      a = r - (mean if baseline == "mean" else sum(others) / len(others))
      out[start + i] = a / (std + eps) if scale == "group_std" else a
  return out


def test_group_advantages_by_hand():
  scores = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two groups of 4; the second all equal
  grpo = rl.group_advantages(scores, group_size=4)
  std = math.sqrt(14 / 3)  # deviations -2, -1, 0, 3 from the mean 3, ddof 1
  np.testing.assert_allclose(grpo[:4], np.array([-2, -1, 0, 3]) / (std + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(grpo[4:], 0.0)  # a group that scores the same everywhere teaches nothing
  rloo = rl.group_advantages(scores, group_size=4, baseline="leave_one_out", scale="none")
  np.testing.assert_allclose(rloo[:4], [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], rtol=1e-6)
  dr_grpo = rl.group_advantages(scores, group_size=4, scale="none")
  np.testing.assert_allclose(dr_grpo[:4], [-2, -1, 0, 3], rtol=1e-6)


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale", ["group_std", "none"])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_advantages_match_the_float64_reference_and_ignore_a_constant_per_group(baseline, scale, group_size):
  rng = np.random.default_rng(group_size)
  scores = rng.normal(0, 2, 4 * group_size).astype(np.float32)
  fn = jax.jit(functools.partial(rl.group_advantages, group_size=group_size, baseline=baseline, scale=scale))
  out = fn(scores)
  np.testing.assert_allclose(out, reference_group_advantages(scores, group_size, baseline, scale), rtol=1e-5, atol=1e-5)
  shift = np.repeat(rng.normal(0, 10, 4), group_size).astype(np.float32)  # one constant per group
  np.testing.assert_allclose(fn(scores + shift), out, rtol=1e-4, atol=1e-4)


def test_group_advantages_refuse_a_group_of_one_and_partial_groups():
  with pytest.raises(ValueError, match="group_size 1 has no baseline") as excinfo:
    rl.group_advantages(np.zeros(4), group_size=1)
  assert "\n" not in str(excinfo.value)
  with pytest.raises(ValueError, match="6 rows are not whole groups of 4"):
    rl.group_advantages(np.zeros(6), group_size=4)


def test_reinforce_pp_returns_to_go_whitened_over_the_batch():
  rng = np.random.default_rng(5)
  rewards = rng.normal(size=(4, 6)).astype(np.float32)
  mask = np.ones((4, 6), bool)
  mask[1, 4:] = False
  mask[3, 1:] = False
  gamma = 0.9
  advantages, returns = rl.reinforce_pp_advantages(rewards, mask, gamma=gamma)
  expected = np.zeros((4, 6))
  for b in range(4):
    real = [t for t in range(6) if mask[b, t]]
    for i, t in enumerate(real):
      expected[b, t] = sum(gamma ** (j - i) * float(rewards[b, s]) for j, s in enumerate(real) if j >= i)
  np.testing.assert_allclose(returns, expected, rtol=1e-5, atol=1e-6)
  values = expected[mask]
  whitened = (expected - values.mean()) / math.sqrt(values.var() + 1e-8)
  np.testing.assert_allclose(advantages, np.where(mask, whitened, 0.0), rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  scores=hnp.arrays(np.float32, 12, elements=st.floats(-50, 50, width=32)),
  group_size=st.sampled_from([2, 3, 4, 6]),
  estimator=st.sampled_from(sorted(rl.GROUP_ESTIMATORS)),
)
def test_group_advantages_match_the_float64_reference_hypothesis(scores, group_size, estimator):
  baseline, scale = rl.GROUP_ESTIMATORS[estimator]
  got = rl.group_advantages(scores, group_size=group_size, baseline=baseline, scale=scale)
  want = reference_group_advantages(scores, group_size, baseline, scale)
  # A group of (nearly) equal scores divides ~0 by ~eps under "group_std": compare relative to the spread.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(want)))))


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  rewards=hnp.arrays(np.float32, (3, 5), elements=st.floats(-10, 10, width=32)),
  lengths=hnp.arrays(np.int32, 3, elements=st.integers(0, 5)),
  gamma=st.sampled_from([1.0, 0.9]),
)
def test_reinforce_pp_matches_the_float64_reference_hypothesis(rewards, lengths, gamma):
  mask = np.arange(5)[None, :] < lengths[:, None]
  advantages, returns = rl.reinforce_pp_advantages(rewards, mask, gamma=gamma)
  expected = np.zeros((3, 5))
  for b in range(3):
    for t in range(lengths[b]):
      expected[b, t] = sum(gamma ** (s - t) * float(rewards[b, s]) for s in range(t, lengths[b]))
  np.testing.assert_allclose(returns, expected, rtol=1e-5, atol=1e-4)
  real = expected[mask]
  whitened = (expected - real.mean()) / math.sqrt(real.var() + 1e-8) if real.size else expected
  np.testing.assert_allclose(advantages, np.where(mask, whitened, 0.0), rtol=1e-4, atol=1e-3)


def test_loss_aggregation_auto_is_each_estimators_paper_and_a_setting_overrides_it():
  assert {estimator: rl.loss_aggregation(estimator, "auto") for estimator in rl.ESTIMATORS} == {
    "gae": "token_mean",  # unchanged from before the setting existed
    "reinforce_pp": "token_mean",
    "grpo": "sequence_mean",  # Shao et al. 2024, Eq. 3
    "dr_grpo": "sequence_sum_constant",  # Liu et al. 2025
    "rloo": "sequence_sum",  # Ahmadian et al. 2024
  }
  assert rl.loss_aggregation("grpo", "token_mean") == "token_mean"
  with pytest.raises(ValueError, match="'auto' knows no aggregation for estimator 'vtrace'"):
    rl.loss_aggregation("vtrace", "auto")
