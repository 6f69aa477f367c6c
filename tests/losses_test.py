"""losses.py against the paper's numbers and slow pure-Python references.

The references below loop over prompts, pairs and tokens in float64 on purpose: they read like the
equations, so a disagreement points at the vectorised code.
"""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import losses

from jax_checks import assert_batch_sharded_equals_single_device, count_traces

RTOL = 1e-5
ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# Slow references
# ----------------------------------------------------------------------------------------------------


def reference_ranking_loss(rewards, ranks, normalizer):
  """(loss, num_pairs, accuracy) by explicit loops over prompts and ordered pairs."""
  prompt_losses, num_pairs, num_correct = [], 0, 0
  for r, k in zip(np.asarray(rewards, np.float64), np.asarray(ranks), strict=True):
    present = [i for i in range(len(k)) if k[i] >= 0]
    total, pairs = 0.0, 0
    for winner in present:
      for loser in present:
        if k[winner] < k[loser]:
          total += math.log1p(math.exp(-(r[winner] - r[loser])))
          pairs += 1
          num_correct += r[winner] > r[loser]
    if pairs == 0:
      continue
    z = math.comb(len(present), 2) if normalizer == "binom_k" else pairs
    prompt_losses.append(total / z)
    num_pairs += pairs
  loss = sum(prompt_losses) / len(prompt_losses) if prompt_losses else 0.0
  return loss, num_pairs, num_correct / max(num_pairs, 1)


def reference_token_logprobs_and_entropy(logits, targets, temperature=1.0):
  logits = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  batch, length, _ = logits.shape
  logprobs, entropy = np.zeros((batch, length)), np.zeros((batch, length))
  for b in range(batch):
    for t in range(length):
      z = logits[b, t] / temperature
      log_normalizer = z.max() + math.log(sum(math.exp(v - z.max()) for v in z))
      logprobs[b, t] = z[targets[b, t]] - log_normalizer
      entropy[b, t] = -sum(math.exp(v - log_normalizer) * (v - log_normalizer) for v in z)
  return logprobs, entropy


def reference_lm_loss(logits, targets, mask):
  logprobs, _ = reference_token_logprobs_and_entropy(logits, targets)
  nll, count = 0.0, 0
  for b in range(logprobs.shape[0]):
    for t in range(logprobs.shape[1]):
      if mask[b, t]:
        nll -= logprobs[b, t]
        count += 1
  return nll / max(count, 1), nll, count


def reference_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
  total, clipped, kl, ratios = 0.0, 0, 0.0, []
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if not mask[b, t]:
        continue
      log_ratio = float(logprobs[b, t]) - float(old_logprobs[b, t])
      ratio = math.exp(log_ratio)
      a = float(advantages[b, t])
      unclipped = -a * ratio
      clipped_term = -a * min(max(ratio, 1 - clip_eps), 1 + clip_eps)
      total += max(unclipped, clipped_term)
      clipped += clipped_term > unclipped
      kl += 0.5 * log_ratio**2
      ratios.append(ratio)
  n = max(len(ratios), 1)
  return total / n, {
    "clip_frac": clipped / n,
    "approx_kl": kl / n,
    "ratio_mean": sum(ratios) / n,
    "ratio_max": max(ratios, default=0.0),
  }


def reference_value_loss(values, old_values, returns, mask, clip_eps):
  total, clipped, mse, value_sum, n = 0.0, 0, 0.0, 0.0, 0
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if not mask[b, t]:
        continue
      v, v_old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
      v_clipped = v_old + min(max(v - v_old, -clip_eps), clip_eps)
      error, error_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
      total += 0.5 * max(error, error_clipped)
      clipped += error_clipped > error
      mse += error
      value_sum += v
      n += 1
  n = max(n, 1)
  return total / n, {"clip_frac": clipped / n, "value_mse": mse / n, "value_mean": value_sum / n}


# ----------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------


def random_ranks(rng, batch, max_k):
  """Ranks with 0..max_k present responses per prompt at random slots; half the prompts have ties."""
  ranks = np.full((batch, max_k), -1, np.int32)
  for b in range(batch):
    k = int(rng.integers(0, max_k + 1))
    slots = rng.permutation(max_k)[:k]
    ranks[b, slots] = rng.permutation(k) if b % 2 else rng.integers(0, max(k - 1, 1), size=k)
  return ranks


def random_mask(rng, batch, length):
  """Right-padded rows of random length, with an empty row and a single-token row included."""
  lengths = rng.integers(0, length + 1, size=batch)
  lengths[0], lengths[-1] = 0, 1
  return np.arange(length)[None, :] < lengths[:, None]


def jitted(fn, **options):
  return jax.jit(functools.partial(fn, **options))


# ----------------------------------------------------------------------------------------------------
# ranking_loss
# ----------------------------------------------------------------------------------------------------


def test_ranking_loss_spec_vector():
  """Spec §9.2: K = 4, s = [2, 1, 0, −1], ranked in slot order -> 0.20704."""
  expected = (3 * math.log1p(math.exp(-1)) + 2 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-3))) / 6
  rewards, ranks = jnp.array([[2.0, 1.0, 0.0, -1.0]]), jnp.array([[0, 1, 2, 3]])
  for normalizer in ("binom_k", "valid_pairs"):
    loss, metrics = jitted(losses.ranking_loss, normalizer=normalizer)(rewards, ranks)
    assert abs(float(loss) - 0.20704) < 1e-4
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["num_pairs"]) == 6.0
    assert float(metrics["accuracy"]) == 1.0
    np.testing.assert_allclose(metrics["margin"], (3 * 1 + 2 * 2 + 3) / 6, rtol=1e-6)


def test_ranking_loss_ties_and_normalizers_by_hand():
  """One tie among K = 3: two valid pairs, divided by C(3,2) = 3 or by 2."""
  rewards, ranks = jnp.array([[1.0, 0.0, 0.5]]), jnp.array([[0, 1, 1]])
  pair_sum = math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.5))
  binom, _ = jitted(losses.ranking_loss, normalizer="binom_k")(rewards, ranks)
  valid, metrics = jitted(losses.ranking_loss, normalizer="valid_pairs")(rewards, ranks)
  np.testing.assert_allclose(binom, pair_sum / 3, rtol=1e-6)
  np.testing.assert_allclose(valid, pair_sum / 2, rtol=1e-6)
  assert float(metrics["num_pairs"]) == 2.0


@pytest.mark.parametrize("normalizer", ["binom_k", "valid_pairs"])
@pytest.mark.parametrize("batch,max_k", [(1, 4), (6, 9), (16, 5)])
def test_ranking_loss_matches_reference(normalizer, batch, max_k):
  rng = np.random.default_rng(batch * 100 + max_k)
  rewards = rng.normal(scale=2.0, size=(batch, max_k)).astype(np.float32)
  ranks = random_ranks(rng, batch, max_k)
  if batch == 1:
    ranks[0] = rng.permutation(max_k)
  loss, metrics = jitted(losses.ranking_loss, normalizer=normalizer)(rewards, ranks)
  expected_loss, num_pairs, accuracy = reference_ranking_loss(rewards, ranks, normalizer)
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  assert float(metrics["num_pairs"]) == num_pairs
  np.testing.assert_allclose(metrics["accuracy"], accuracy, rtol=RTOL)


_ranking_loss_binom = jitted(losses.ranking_loss, normalizer="binom_k")


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  rewards=hnp.arrays(np.float32, (3, 6), elements=st.floats(-30, 30, width=32)),
  ranks=hnp.arrays(np.int32, (3, 6), elements=st.integers(-1, 5)),
)
def test_ranking_loss_matches_reference_hypothesis(rewards, ranks):
  """Arbitrary rank patterns: ties, gaps in the rank values, empty and one-response prompts."""
  loss, metrics = _ranking_loss_binom(rewards, ranks)
  expected_loss, num_pairs, _ = reference_ranking_loss(rewards, ranks, "binom_k")
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  assert float(metrics["num_pairs"]) == num_pairs


def test_ranking_loss_invariances():
  """Shifting one prompt's rewards, or permuting its slots together with their ranks, changes nothing."""
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(8, 7)).astype(np.float32)
  ranks = random_ranks(rng, 8, 7)
  loss_fn = jitted(losses.ranking_loss, normalizer="binom_k")
  base, _ = loss_fn(rewards, ranks)
  assert float(base) > 0.0

  shifted = rewards + rng.normal(scale=5.0, size=(8, 1)).astype(np.float32)
  np.testing.assert_allclose(loss_fn(shifted, ranks)[0], base, rtol=1e-5)

  permutation = np.stack([rng.permutation(7) for _ in range(8)])
  permuted_rewards = np.take_along_axis(rewards, permutation, axis=1)
  permuted_ranks = np.take_along_axis(ranks, permutation, axis=1)
  np.testing.assert_allclose(loss_fn(permuted_rewards, permuted_ranks)[0], base, rtol=1e-6)


def test_ranking_loss_prompts_without_pairs_are_ignored():
  """All-tied, empty and one-response prompts add no NaN and do not dilute the mean."""
  valid_rewards, valid_ranks = [2.0, 1.0, 0.0, -1.0], [0, 1, 2, 3]
  rewards = jnp.array([valid_rewards, [5.0, 5.0, 1.0, 1.0], [np.nan] * 4, [3.0, 0.0, 0.0, 0.0]])
  ranks = jnp.array([valid_ranks, [1, 1, 1, 1], [-1] * 4, [0, -1, -1, -1]])
  loss_fn = jax.jit(losses.ranking_loss)
  loss, metrics = loss_fn(rewards, ranks)
  np.testing.assert_allclose(loss, 0.2070381, rtol=1e-5)
  assert float(metrics["num_prompts"]) == 1.0

  grads = jax.jit(jax.grad(lambda r: losses.ranking_loss(r, ranks)[0]))(rewards)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[1:], 0.0)

  empty_loss, empty_metrics = loss_fn(rewards[1:], ranks[1:])
  assert float(empty_loss) == 0.0 and float(empty_metrics["accuracy"]) == 0.0


def test_ranking_loss_rejects_unknown_normalizer():
  with pytest.raises(ValueError, match="normalizer"):
    losses.ranking_loss(jnp.zeros((1, 2)), jnp.array([[0, 1]]), normalizer="binom_K")


# ----------------------------------------------------------------------------------------------------
# token_logprobs, token_entropy, lm_loss
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_reference(dtype, temperature):
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(scale=3.0, size=(2, 5, 13)), dtype)
  targets = rng.integers(0, 13, size=(2, 5))
  logprobs = jitted(losses.token_logprobs, temperature=temperature)(logits, targets)
  entropy = jitted(losses.token_entropy, temperature=temperature)(logits)
  expected_logprobs, expected_entropy = reference_token_logprobs_and_entropy(logits, targets, temperature)
  assert logprobs.dtype == jnp.float32 and entropy.dtype == jnp.float32
  np.testing.assert_allclose(logprobs, expected_logprobs, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(entropy, expected_entropy, rtol=RTOL, atol=ATOL)


def test_token_entropy_of_uniform_and_one_hot():
  logits = jnp.array([[[0.0] * 8, [1e4] + [-1e4] * 7]])
  np.testing.assert_allclose(losses.token_entropy(logits)[0], [math.log(8), 0.0], atol=1e-6)


def test_lm_loss_matches_reference_and_accumulates_exactly():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 7, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(6, 7))
  mask = random_mask(rng, 6, 7)
  loss, metrics = jax.jit(losses.lm_loss)(logits, targets, mask)
  expected_loss, expected_sum, expected_count = reference_lm_loss(logits, targets, mask)
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
  assert float(metrics["token_count"]) == expected_count
  argmax_correct = (logits.argmax(-1) == targets)[mask]
  np.testing.assert_allclose(metrics["accuracy"], argmax_correct.mean(), rtol=RTOL)

  # Micro-batches of different token counts: summing (nll, count) reproduces the full-batch mean.
  lm_loss_sum = jax.jit(losses.lm_loss_sum)
  nll_a, count_a = lm_loss_sum(logits[:3], targets[:3], mask[:3])
  nll_b, count_b = lm_loss_sum(logits[3:], targets[3:], mask[3:])
  assert float(count_a) != float(count_b)
  np.testing.assert_allclose(nll_a + nll_b, expected_sum, rtol=RTOL)
  np.testing.assert_allclose((nll_a + nll_b) / (count_a + count_b), expected_loss, rtol=RTOL)


def test_lm_loss_all_masked_is_zero_not_nan():
  logits = jnp.full((2, 3, 5), jnp.nan)
  loss, metrics = jax.jit(losses.lm_loss)(logits, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
  assert float(loss) == 0.0 and float(metrics["token_count"]) == 0.0
  assert float(metrics["accuracy"]) == 0.0


# ----------------------------------------------------------------------------------------------------
# PPO policy loss, value loss, KL estimators, PPO-ptx
# ----------------------------------------------------------------------------------------------------


def random_ppo_batch(rng, batch, length):
  old = -rng.exponential(2.0, size=(batch, length)).astype(np.float32)
  new = (old + rng.normal(scale=0.3, size=(batch, length))).astype(np.float32)
  advantages = rng.normal(size=(batch, length)).astype(np.float32)
  return new, old, advantages, random_mask(rng, batch, length)


@pytest.mark.parametrize("clip_eps", [0.2, 0.05])
def test_ppo_policy_loss_matches_reference(clip_eps):
  rng = np.random.default_rng(3)
  new, old, advantages, mask = random_ppo_batch(rng, 9, 6)
  loss, metrics = jitted(losses.ppo_policy_loss, clip_eps=clip_eps)(new, old, advantages, mask)
  expected_loss, expected_metrics = reference_ppo_policy_loss(new, old, advantages, mask, clip_eps)
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  assert 0.0 < expected_metrics["clip_frac"] < 1.0
  for name, value in expected_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
  """First minibatch of an iteration: ρ = 1, nothing clipped, the loss is −mean(A) (docs/paper.md §9.8)."""
  rng = np.random.default_rng(4)
  _, old, advantages, mask = random_ppo_batch(rng, 4, 5)
  loss, metrics = jax.jit(losses.ppo_policy_loss)(old, old, advantages, mask)
  np.testing.assert_allclose(loss, -advantages[mask].mean(), rtol=1e-6)
  assert float(metrics["clip_frac"]) == 0.0 and float(metrics["approx_kl"]) == 0.0
  assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["ratio_max"]) == 1.0


def test_ppo_policy_loss_caps_log_ratio_and_ignores_padding():
  """A runaway ratio with A < 0 costs |A|·e^20 instead of overflowing; padding never reaches exp."""
  logprobs = jnp.array([[0.0, 500.0]])
  old_logprobs = jnp.array([[-1e4, -500.0]])
  mask = jnp.array([[1.0, 0.0]])
  loss, metrics = jax.jit(losses.ppo_policy_loss)(logprobs, old_logprobs, jnp.array([[-1.0, 1.0]]), mask)
  np.testing.assert_allclose(loss, math.exp(20.0), rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_max"], math.exp(20.0), rtol=1e-6)


@pytest.mark.parametrize("clip_eps", [0.2, 0.1])
def test_value_loss_matches_reference(clip_eps):
  rng = np.random.default_rng(5)
  old_values = rng.normal(size=(7, 6)).astype(np.float32)
  values = (old_values + rng.normal(scale=0.4, size=(7, 6))).astype(np.float32)
  returns = rng.normal(size=(7, 6)).astype(np.float32)
  mask = random_mask(rng, 7, 6)
  loss, metrics = jitted(losses.value_loss, clip_eps=clip_eps)(values, old_values, returns, mask)
  expected_loss, expected_metrics = reference_value_loss(values, old_values, returns, mask, clip_eps)
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  assert 0.0 < expected_metrics["clip_frac"] < 1.0
  for name, value in expected_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def test_kl_penalty_estimators():
  x = np.array([[-3.0, -0.5, 0.0, 0.7, 4.0]])
  ref = np.full_like(x, -2.0)
  logprobs = (ref + x).astype(np.float32)
  x32 = logprobs.astype(np.float64) - ref  # the exact difference the function sees
  np.testing.assert_allclose(losses.kl_penalty(logprobs, ref), x32, rtol=1e-6)
  np.testing.assert_allclose(losses.kl_penalty(logprobs, ref, estimator="k2"), 0.5 * x32**2, rtol=1e-6)
  k3 = losses.kl_penalty(logprobs, ref, estimator="k3")
  np.testing.assert_allclose(k3, np.expm1(-x32) + x32, rtol=1e-5)
  assert np.all(np.asarray(k3) >= 0.0)
  with pytest.raises(ValueError, match="estimator"):
    losses.kl_penalty(logprobs, ref, estimator="k4")


def test_kl_penalty_k3_small_ratio_is_accurate():
  """expm1 keeps k3 ≈ x²/2 for tiny x, where exp(−x) − 1 + x in float32 would be rounding noise."""
  x = jnp.array([1e-3, -1e-3, 3e-4])
  k3 = losses.kl_penalty(x, jnp.zeros_like(x), estimator="k3")
  np.testing.assert_allclose(k3, np.asarray(x, np.float64) ** 2 / 2, rtol=2e-3)


def test_ppo_ptx_loss_is_policy_plus_gamma_lm_and_matches_accumulated_gradients():
  """One toy linear policy produces both terms; ∇(L_CLIP + γ L_LM) = ∇L_CLIP + γ ∇L_LM (App. C.4)."""
  rng = np.random.default_rng(6)
  features = rng.normal(size=(4, 5, 3)).astype(np.float32)
  ptx_features = rng.normal(size=(4, 6, 3)).astype(np.float32)
  weights = rng.normal(size=(3, 9)).astype(np.float32)
  tokens = rng.integers(0, 9, size=(4, 5))
  ptx_targets = rng.integers(0, 9, size=(4, 6))
  ptx_mask = random_mask(rng, 4, 6)
  _, _, advantages, mask = random_ppo_batch(rng, 4, 5)
  old = np.asarray(losses.token_logprobs(features @ (weights + 0.1), tokens))

  def policy_loss(w):
    return losses.ppo_policy_loss(losses.token_logprobs(features @ w, tokens), old, advantages, mask)

  def ptx_loss(w):
    return losses.lm_loss(ptx_features @ w, ptx_targets, ptx_mask)

  def full_loss(w):
    logprobs = losses.token_logprobs(features @ w, tokens)
    return losses.ppo_ptx_loss(
      logprobs,
      old,
      advantages,
      mask,
      ptx_features @ w,
      ptx_targets,
      ptx_mask,
      ptx_coef=27.8,
      ptx_reduction="token_mean",
    )

  (loss, metrics), grad = jax.jit(jax.value_and_grad(full_loss, has_aux=True))(weights)
  policy_value, policy_grad = jax.jit(jax.value_and_grad(lambda w: policy_loss(w)[0]))(weights)
  ptx_value, ptx_grad = jax.jit(jax.value_and_grad(lambda w: ptx_loss(w)[0]))(weights)
  np.testing.assert_allclose(loss, policy_value + 27.8 * ptx_value, rtol=1e-6)
  np.testing.assert_allclose(grad, policy_grad + 27.8 * ptx_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["policy_loss"], policy_value, rtol=1e-6)
  np.testing.assert_allclose(metrics["ptx_loss"], ptx_value, rtol=1e-6)
  assert float(metrics["ptx_token_count"]) == ptx_mask.sum()
  assert set(metrics) >= {"clip_frac", "approx_kl", "ratio_mean", "ratio_max", "ptx_accuracy"}
  logprobs = losses.token_logprobs(features @ weights, tokens)
  gamma_zero, _ = jitted(losses.ppo_ptx_loss, ptx_coef=0.0)(
    logprobs, old, advantages, mask, ptx_features @ weights, ptx_targets, ptx_mask
  )
  np.testing.assert_allclose(gamma_zero, policy_value, rtol=1e-6)


def test_ptx_reduction_changes_the_ptx_term_by_loss_tokens_per_sequence_over_response_tokens():
  """A hand-built minibatch: uniform logits over 2 ids, so every pretraining token costs log 2.
  Pretraining rows hold 4, 2 and 0 loss tokens (P = 2 sequences, 6 tokens: L̄ = 3); responses hold 5 and 3
  tokens (T̄ = 4). token_mean: L_ptx = log 2. sequence_sum: (6·log 2 / 2) / 4 = 0.75·log 2 = L̄/T̄ · log 2."""
  ptx_logits = jnp.zeros((3, 4, 2))
  ptx_targets = jnp.zeros((3, 4), jnp.int32)
  ptx_mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32)
  advantages = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, -2.0, -3.0, 9.0, 9.0]])
  logprobs = jnp.full((2, 5), -0.7)  # = old: ratio 1, so L^CLIP = −mean(A) over the 8 tokens = −9/8
  args = (logprobs, logprobs, advantages, mask, ptx_logits, ptx_targets, ptx_mask)
  by_token, token_metrics = losses.ppo_ptx_loss(*args, ptx_coef=27.8, ptx_reduction="token_mean")
  by_sequence, sequence_metrics = losses.ppo_ptx_loss(*args, ptx_coef=27.8, ptx_reduction="sequence_sum")
  log2 = math.log(2.0)
  assert float(token_metrics["policy_loss"]) == pytest.approx(-9 / 8, rel=1e-6)
  assert float(token_metrics["ptx_term"]) == pytest.approx(log2, rel=1e-6)
  assert float(sequence_metrics["ptx_term"]) == pytest.approx(0.75 * log2, rel=1e-6)
  assert float(sequence_metrics["ptx_loss"]) == pytest.approx(log2, rel=1e-6)  # the per-token NLL, either way
  assert float(by_token) == pytest.approx(-9 / 8 + 27.8 * log2, rel=1e-6)
  assert float(by_sequence) == pytest.approx(-9 / 8 + 27.8 * 0.75 * log2, rel=1e-6)
  # γ converted by L̄ / T̄ makes the two readings one loss.
  converted, _ = losses.ppo_ptx_loss(*args, ptx_coef=27.8 * 3 / 4, ptx_reduction="token_mean")
  assert float(converted) == pytest.approx(float(by_sequence), rel=1e-6)
  with pytest.raises(ValueError, match="ptx_reduction must be"):
    losses.ppo_ptx_loss(*args, ptx_reduction="per_token")


# ----------------------------------------------------------------------------------------------------
# Properties shared by every function: finite gradients, one trace per shape, mesh-independent values
# ----------------------------------------------------------------------------------------------------


def _uniform(rng, shape, scale):
  return rng.uniform(-scale, scale, size=shape).astype(np.float32)


def _ranking_args(rng, batch, scale):
  return _uniform(rng, (batch, 5), scale), random_ranks(rng, batch, 5)


def _lm_args(rng, batch, scale):
  return _uniform(rng, (batch, 4, 7), scale), rng.integers(0, 7, (batch, 4)), random_mask(rng, batch, 4)


def _logits_targets_args(rng, batch, scale):
  return _uniform(rng, (batch, 4, 7), scale), rng.integers(0, 7, (batch, 4))


def _ppo_args(rng, batch, scale):
  """Three [B, T] float arrays (log-probs/advantages, or values/old values/returns) and a mask."""
  return (*(_uniform(rng, (batch, 6), scale) for _ in range(3)), random_mask(rng, batch, 6))


def _kl_args(rng, batch, scale):
  return _uniform(rng, (batch, 6), scale), _uniform(rng, (batch, 6), scale)


def _ppo_ptx_args(rng, batch, scale):
  return (*_ppo_args(rng, batch, scale), *_lm_args(rng, batch, scale))


# name -> (function with its static options bound, argument maker, indices of float arguments)
CASES = {
  "ranking_loss/binom_k": (functools.partial(losses.ranking_loss, normalizer="binom_k"), _ranking_args, (0,)),
  "ranking_loss/valid_pairs": (
    functools.partial(losses.ranking_loss, normalizer="valid_pairs"),
    _ranking_args,
    (0,),
  ),
  "token_logprobs": (functools.partial(losses.token_logprobs, temperature=0.7), _logits_targets_args, (0,)),
  "token_entropy": (losses.token_entropy, lambda rng, b, s: _lm_args(rng, b, s)[:1], (0,)),
  "lm_loss": (losses.lm_loss, _lm_args, (0,)),
  "lm_loss_sum": (losses.lm_loss_sum, _lm_args, (0,)),
  "ppo_policy_loss": (losses.ppo_policy_loss, _ppo_args, (0, 1, 2)),
  "value_loss": (losses.value_loss, _ppo_args, (0, 1, 2)),
  "kl_penalty/k1": (functools.partial(losses.kl_penalty, estimator="k1"), _kl_args, (0, 1)),
  "kl_penalty/k2": (functools.partial(losses.kl_penalty, estimator="k2"), _kl_args, (0, 1)),
  "kl_penalty/k3": (functools.partial(losses.kl_penalty, estimator="k3"), _kl_args, (0, 1)),
  "ppo_ptx_loss": (losses.ppo_ptx_loss, _ppo_ptx_args, (0, 1, 2, 4)),
  "ppo_ptx_loss/sequence_mean": (
    functools.partial(losses.ppo_ptx_loss, aggregation="sequence_mean"),
    _ppo_ptx_args,
    (0, 1, 2, 4),
  ),
  **{
    f"aggregate/{mode}": (
      functools.partial(losses.aggregate, mode=mode, constant=6.0 if mode == "sequence_sum_constant" else None),
      lambda rng, b, s: (_uniform(rng, (b, 6), s), random_mask(rng, b, 6)),
      (0,),
    )
    for mode in losses.AGGREGATIONS
  },
  **{
    f"dpo_loss/{form}": (
      functools.partial(losses.dpo_loss, beta=0.5, form=form),
      lambda rng, b, s: (_uniform(rng, (b, 5), s), _uniform(rng, (b, 5), s), random_ranks(rng, b, 5)),
      (0, 1),
    )
    for form in losses.DPO_FORMS
  },
}


def _scalar(output):
  """The loss of a (loss, metrics) or (sum, count) pair, or the sum of a per-token array."""
  return output[0] if isinstance(output, tuple) else jnp.sum(output)


@pytest.mark.parametrize("name", [n for n in CASES if n != "kl_penalty/k3"])
def test_gradients_are_finite_for_extreme_inputs(name):
  fn, make_args, float_args = CASES[name]
  args = make_args(np.random.default_rng(7), 4, 1e4)
  grads = jax.jit(jax.grad(lambda *a: _scalar(fn(*a)), argnums=float_args))(*args)
  for grad in grads:
    assert np.all(np.isfinite(grad)), name


def test_k3_gradient_is_finite_where_k3_is_representable():
  """k3 = e^{−x} − 1 + x exceeds float32 for x < −88 (a true value, not a bug); check up to there."""
  x = jnp.array([-80.0, -1.0, 0.0, 1.0, 1e4])
  grad = jax.grad(lambda a: jnp.sum(losses.kl_penalty(a, jnp.zeros_like(a), estimator="k3")))(x)
  np.testing.assert_allclose(grad, -np.expm1(-np.asarray(x, np.float64)), rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_jit_traces_once_per_shape(name):
  fn, make_args, _ = CASES[name]
  rng = np.random.default_rng(8)
  traces, (first, second) = count_traces(fn, make_args(rng, 4, 1.0), make_args(rng, 4, 1.0))
  assert traces == 1
  assert not np.allclose(_scalar(first), _scalar(second))


@pytest.mark.parametrize("name", list(CASES))
def test_batch_sharded_on_8_devices_equals_one_device(name):
  fn, make_args, _ = CASES[name]
  assert_batch_sharded_equals_single_device(fn, make_args(np.random.default_rng(9), 16, 3.0), name=name)


# ----------------------------------------------------------------------------------------------------
# DPO on K-wise comparisons
# ----------------------------------------------------------------------------------------------------


def reference_dpo_loss(policy_logps, ref_logps, ranks, beta):
  """Eq. 1 on the implicit rewards β(π − π_ref), looped over prompts and pairs in float64."""
  rewards = beta * (np.asarray(policy_logps, np.float64) - np.asarray(ref_logps, np.float64))
  return reference_ranking_loss(rewards, ranks, "binom_k")


def test_dpo_loss_with_k_2_is_rafailovs_loss_by_hand():
  # β = 0.1; π_w − ref_w = 1, π_l − ref_l = −1: −log σ(0.1 · 2) = log(1 + e^{−0.2}) = 0.598139...
  loss, metrics = losses.dpo_loss(np.array([[-10.0, -12.0]]), np.array([[-11.0, -11.0]]), np.array([[0, 1]]), beta=0.1)
  np.testing.assert_allclose(loss, math.log1p(math.exp(-0.2)), rtol=1e-6)
  np.testing.assert_allclose(metrics["margin"], 0.2, rtol=1e-6)
  assert float(metrics["accuracy"]) == 1.0 and abs(float(metrics["reward_mean"])) < 1e-7
  # The loser ranked first: the same pair, the other way round.
  flipped, metrics = losses.dpo_loss(
    np.array([[-10.0, -12.0]]), np.array([[-11.0, -11.0]]), np.array([[1, 0]]), beta=0.1
  )
  np.testing.assert_allclose(flipped, math.log1p(math.exp(0.2)), rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.0


_dpo_loss = jitted(losses.dpo_loss, beta=0.3, normalizer="binom_k")


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  policy=hnp.arrays(np.float32, (3, 5), elements=st.floats(-80, 0, width=32)),
  ref=hnp.arrays(np.float32, (3, 5), elements=st.floats(-80, 0, width=32)),
  ranks=hnp.arrays(np.int32, (3, 5), elements=st.integers(-1, 4)),
)
def test_dpo_loss_matches_the_float64_reference_hypothesis(policy, ref, ranks):
  loss, metrics = _dpo_loss(policy, ref, ranks)
  expected, num_pairs, accuracy = reference_dpo_loss(policy, ref, ranks, 0.3)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)
  assert float(metrics["num_pairs"]) == num_pairs


def test_dpo_loss_k_wise_equals_the_mean_of_its_pairs_and_ignores_a_shared_reference_shift():
  rng = np.random.default_rng(3)
  policy, ref = rng.normal(-20, 3, (4, 4)), rng.normal(-20, 3, (4, 4))
  ranks = np.array([[0, 1, 2, 3]] * 4)
  loss, _ = losses.dpo_loss(policy, ref, ranks, beta=0.5)
  pairs = [(w, lo) for w in range(4) for lo in range(4) if w < lo]
  by_pair = [
    np.mean(
      [math.log1p(math.exp(-0.5 * ((policy[b, w] - ref[b, w]) - (policy[b, lo] - ref[b, lo])))) for w, lo in pairs]
    )
    for b in range(4)
  ]
  np.testing.assert_allclose(loss, np.mean(by_pair), rtol=1e-5)
  # A per-prompt constant in the policy's (or the reference's) log-probs cancels in every pair.
  shifted, _ = losses.dpo_loss(policy + rng.normal(0, 5, (4, 1)), ref, ranks, beta=0.5)
  np.testing.assert_allclose(shifted, loss, rtol=1e-5)


def reference_plackett_luce(rewards, ranks):
  """Per prompt, −log Π_k exp(s_τ(k)) / Σ_{j≥k} exp(s_τ(j)) with τ the ranking read off `ranks`, in float64:
  the present responses sorted best first, then the suffix sums of Rafailov et al. (2023, App. A.3) literally.
  Only for strict rankings (ties have no single τ)."""
  out = []
  for s, k in zip(np.asarray(rewards, np.float64), np.asarray(ranks), strict=True):
    order = sorted((i for i in range(len(k)) if k[i] >= 0), key=lambda i: k[i])
    assert len({k[i] for i in order}) == len(order), "strict rankings only"
    total = 0.0
    for position, chosen in enumerate(order):
      rest = [s[j] for j in order[position:]]
      top = max(rest)
      total -= s[chosen] - (top + math.log(sum(math.exp(v - top) for v in rest)))
    out.append(total)
  return np.array(out)


def reference_plackett_luce_with_ties(rewards, ranks):
  """The documented tie rule, looped: each present response i against itself and every present response
  ranked strictly below it."""
  out = []
  for s, k in zip(np.asarray(rewards, np.float64), np.asarray(ranks), strict=True):
    total = 0.0
    for i in range(len(k)):
      if k[i] < 0:
        continue
      rest = [s[i]] + [s[j] for j in range(len(k)) if k[j] >= 0 and k[j] > k[i]]
      top = max(rest)
      total += top + math.log(sum(math.exp(v - top) for v in rest)) - s[i]
    out.append(total)
  return np.array(out)


def _strict_ranks(draw_permutation, present):
  """Ranks 0..n−1 in the slots where `present` holds, a permutation chosen by `draw_permutation`, −1 elsewhere."""
  ranks = np.full(present.shape, -1, np.int32)
  for b in range(present.shape[0]):
    slots = np.flatnonzero(present[b])
    ranks[b, slots] = draw_permutation(len(slots))
  return ranks


_plackett_luce = jax.jit(losses.plackett_luce_prompt_loss)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  rewards=hnp.arrays(np.float32, (4, 6), elements=st.floats(-30, 30, width=32)),
  present=hnp.arrays(np.bool_, (4, 6)),
  seed=st.integers(0, 2**31 - 1),
)
def test_plackett_luce_matches_the_literal_float64_formula_on_strict_rankings_hypothesis(rewards, present, seed):
  rng = np.random.default_rng(seed)
  ranks = _strict_ranks(rng.permutation, present)
  np.testing.assert_allclose(
    _plackett_luce(rewards, ranks), reference_plackett_luce(rewards, ranks), rtol=1e-5, atol=1e-4
  )


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  rewards=hnp.arrays(np.float32, (4, 6), elements=st.floats(-30, 30, width=32)),
  ranks=hnp.arrays(np.int32, (4, 6), elements=st.integers(-1, 3)),
)
def test_plackett_luce_with_ties_and_empty_slots_matches_the_float64_loop_hypothesis(rewards, ranks):
  np.testing.assert_allclose(
    _plackett_luce(rewards, ranks), reference_plackett_luce_with_ties(rewards, ranks), rtol=1e-5, atol=1e-4
  )


def test_dpo_plackett_luce_by_hand():
  """At the reference (every ρ = 0) a strict ranking of K costs log K!; with ranks [0, 0, 1] the two tied
  best each face {itself, the worst}: 2·log 2; all tied: no term, and the prompt is left out of the mean."""
  zeros = np.zeros((3, 4))
  ranks = np.array([[0, 1, 2, -1], [0, 0, 1, -1], [1, 1, 1, 1]])
  per_prompt = losses.plackett_luce_prompt_loss(zeros, ranks)
  np.testing.assert_allclose(per_prompt, [math.log(6), 2 * math.log(2), 0.0], rtol=1e-6)
  loss, metrics = losses.dpo_loss(zeros, zeros, ranks, beta=0.1, form="plackett_luce")
  np.testing.assert_allclose(loss, (math.log(6) + 2 * math.log(2)) / 2, rtol=1e-6)
  assert float(metrics["num_prompts"]) == 2 and float(metrics["num_pairs"]) == 3 + 2
  # K = 3, ρ = β·Δ = (2, 1, 0) ranked in that order: −log(e²/(e²+e+1)) − log(e/(e+1)).
  policy = np.array([[2.0, 1.0, 0.0]]) / 0.5
  loss, _ = losses.dpo_loss(policy, np.zeros((1, 3)), np.array([[0, 1, 2]]), beta=0.5, form="plackett_luce")
  e = math.e
  np.testing.assert_allclose(loss, -math.log(e**2 / (e**2 + e + 1)) - math.log(e / (e + 1)), rtol=1e-6)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  policy=hnp.arrays(np.float32, (5, 2), elements=st.floats(-80, 0, width=32)),
  ref=hnp.arrays(np.float32, (5, 2), elements=st.floats(-80, 0, width=32)),
  ranks=hnp.arrays(np.int32, (5, 2), elements=st.integers(-1, 1)),
  normalizer=st.sampled_from(losses.PAIR_NORMALIZERS),
)
def test_dpo_plackett_luce_equals_the_pairwise_form_at_k_2_hypothesis(policy, ref, ranks, normalizer):
  """Ties ([0, 0]) and empty slots included: both forms then skip the prompt."""
  pairwise, pairwise_metrics = losses.dpo_loss(policy, ref, ranks, beta=0.3, normalizer=normalizer)
  listwise, listwise_metrics = losses.dpo_loss(policy, ref, ranks, beta=0.3, form="plackett_luce")
  np.testing.assert_allclose(listwise, pairwise, rtol=1e-5, atol=1e-6)
  assert float(listwise_metrics["num_prompts"]) == float(pairwise_metrics["num_prompts"])


def test_dpo_plackett_luce_ignores_slot_order_and_a_shared_shift_and_differs_from_all_pairs_at_k_4():
  rng = np.random.default_rng(11)
  policy, ref = rng.normal(-20, 3, (4, 4)), rng.normal(-20, 3, (4, 4))
  ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2], [2, 3, 0, 1]])
  loss, _ = losses.dpo_loss(policy, ref, ranks, beta=0.5, form="plackett_luce")
  np.testing.assert_allclose(loss, np.mean(reference_plackett_luce(0.5 * (policy - ref), ranks)), rtol=1e-5)
  slots = rng.permutation(4)
  permuted, _ = losses.dpo_loss(policy[:, slots], ref[:, slots], ranks[:, slots], beta=0.5, form="plackett_luce")
  shifted, _ = losses.dpo_loss(policy + rng.normal(0, 5, (4, 1)), ref, ranks, beta=0.5, form="plackett_luce")
  np.testing.assert_allclose(permuted, loss, rtol=1e-5)
  np.testing.assert_allclose(shifted, loss, rtol=1e-5)
  all_pairs, _ = losses.dpo_loss(policy, ref, ranks, beta=0.5)
  assert abs(float(all_pairs) - float(loss)) > 0.1  # K = 4: two different losses
  with pytest.raises(ValueError, match="dpo: form 'listwise' is not one of"):
    losses.dpo_loss(policy, ref, ranks, beta=0.5, form="listwise")


# ----------------------------------------------------------------------------------------------------
# Loss aggregation
# ----------------------------------------------------------------------------------------------------


def reference_aggregate(values, mask, mode, constant=None):
  """The four reductions by loops over rows and tokens, in float64."""
  sums, counts = [], []
  for row, keep in zip(np.asarray(values, np.float64), np.asarray(mask), strict=True):
    sums.append(sum(float(v) for v, k in zip(row, keep, strict=True) if k))
    counts.append(int(sum(bool(k) for k in keep)))
  sequences = [b for b in range(len(sums)) if counts[b] > 0]
  if mode == "token_mean":
    return sum(sums) / sum(counts) if sum(counts) else 0.0
  if mode == "sequence_sum_constant":
    return sum(sums) / (len(sums) * constant)
  if not sequences:
    return 0.0
  if mode == "sequence_sum":
    return sum(sums) / len(sequences)
  return sum(sums[b] / counts[b] for b in sequences) / len(sequences)


def test_aggregate_by_hand():
  """Rows of 3, 1 and 0 real tokens (the padding holds NaN): S = (6, 4, 0), T = (3, 1, 0)."""
  values = np.array([[1.0, 2.0, 3.0, np.nan], [4.0, np.nan, np.nan, np.nan], [np.nan] * 4], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  expected = {
    "token_mean": 10 / 4,
    "sequence_mean": (6 / 3 + 4 / 1) / 2,  # the empty row is not a sequence
    "sequence_sum_constant": 10 / (3 * 4),  # C = 4 over all 3 rows
    "sequence_sum": 10 / 2,
  }
  for mode, value in expected.items():
    constant = 4.0 if mode == "sequence_sum_constant" else None
    assert float(losses.aggregate(values, mask, mode, constant=constant)) == pytest.approx(value, rel=1e-6), mode
    # an all-empty batch: 0, and a finite gradient
    empty = losses.aggregate(values, np.zeros_like(mask), mode, constant=constant)
    grad = jax.grad(lambda v, m=mode, c=constant: losses.aggregate(v, np.zeros_like(mask), m, constant=c))(values)
    assert float(empty) == 0.0 and np.all(np.isfinite(grad)), mode
  assert set(expected) == set(losses.AGGREGATIONS)


_aggregate = {
  mode: jax.jit(
    functools.partial(losses.aggregate, mode=mode, constant=7.0 if mode == "sequence_sum_constant" else None)
  )
  for mode in losses.AGGREGATIONS
}


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
@hypothesis.given(
  shape=st.tuples(st.integers(1, 6), st.integers(1, 7)),
  data=st.data(),
  mode=st.sampled_from(losses.AGGREGATIONS),
)
def test_aggregate_matches_the_float64_loop_hypothesis(shape, data, mode):
  """Random shapes and masks, empty rows included; masked-out values are NaN and must not leak."""
  values = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
  mask = data.draw(hnp.arrays(np.bool_, shape))
  values = np.where(mask, values, np.nan).astype(np.float32)
  constant = 7.0 if mode == "sequence_sum_constant" else None
  got = _aggregate[mode](values, mask)
  np.testing.assert_allclose(got, reference_aggregate(values, mask, mode, constant), rtol=1e-5, atol=1e-4)


def test_aggregate_token_mean_is_masked_mean_bit_for_bit_and_refuses_bad_arguments():
  rng = np.random.default_rng(12)
  values, mask = _uniform(rng, (5, 9), 3.0), random_mask(rng, 5, 9)
  assert float(losses.aggregate(values, mask, "token_mean")) == float(losses.masked_mean(values, mask))
  with pytest.raises(ValueError, match="mode 'per_token' is not one of"):
    losses.aggregate(values, mask, "per_token")
  with pytest.raises(ValueError, match="'sequence_sum_constant' needs a constant > 0"):
    losses.aggregate(values, mask, "sequence_sum_constant")
  with pytest.raises(ValueError, match="mode 'sequence_mean' takes no constant"):
    losses.aggregate(values, mask, "sequence_mean", constant=3.0)


def test_episode_divisor_turns_each_aggregation_into_a_mean_of_episode_sums():
  """aggregate = (1/D) · mean over episodes of Σ_t x_t, for the modes where D is exact; the harmonic mean
  length for sequence_mean, exact when the rows are equally long."""
  rng = np.random.default_rng(13)
  values = _uniform(rng, (4, 6), 2.0)
  mask = np.arange(6)[None] < np.array([[6], [2], [5], [3]])
  sums = np.where(mask, values, 0.0).astype(np.float64).sum(axis=1)
  for mode, constant in (("token_mean", None), ("sequence_sum", None), ("sequence_sum_constant", 6.0)):
    divisor = losses.episode_divisor(mask, mode, constant=constant)
    aggregated = losses.aggregate(values, mask, mode, constant=constant)
    np.testing.assert_allclose(aggregated, sums.mean() / float(divisor), rtol=1e-5, err_msg=mode)
  assert float(losses.episode_divisor(mask, "token_mean")) == pytest.approx(16 / 4)
  harmonic = 4 / (1 / 6 + 1 / 2 + 1 / 5 + 1 / 3)
  assert float(losses.episode_divisor(mask, "sequence_mean")) == pytest.approx(harmonic, rel=1e-6)
  equal = np.arange(6)[None] < np.full((4, 1), 4)
  np.testing.assert_allclose(
    losses.aggregate(values, equal, "sequence_mean"),
    np.where(equal, values, 0.0).sum(axis=1).mean() / float(losses.episode_divisor(equal, "sequence_mean")),
    rtol=1e-5,
  )
  assert float(losses.episode_divisor(np.zeros((2, 3)), "sequence_mean")) == 1.0  # no rows: no division by 0


def test_ppo_policy_loss_aggregation_on_policy_by_hand():
  """ρ = 1: ℓ_t = −A_t. Rows of 3 and 1 tokens, A = (1, 2, 3) and (4): token mean −10/4, sequence mean
  −(2 + 4)/2, per-sequence sum −10/2, over a budget of 8 tokens −10/(2·8). The metrics stay token means."""
  advantages = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 0, 0]])
  logprobs = np.full((2, 3), -1.3, np.float32)
  expected = {"token_mean": -10 / 4, "sequence_mean": -3.0, "sequence_sum": -5.0, "sequence_sum_constant": -10 / 16}
  for mode, value in expected.items():
    constant = 8.0 if mode == "sequence_sum_constant" else None
    loss, metrics = losses.ppo_policy_loss(
      logprobs, logprobs, advantages, mask, aggregation=mode, aggregation_constant=constant
    )
    assert float(loss) == pytest.approx(value, rel=1e-6), mode
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_frac"]) == 0.0


def test_ptx_sequence_sum_carries_the_policy_losss_divisor_per_aggregation():
  """The hand-built batch of the ptx_reduction test (responses of 5 and 3 tokens; pretraining: 6 tokens of
  log 2 over P = 2 sequences): L_ptx = (6·log 2 / 2) / D with D = T̄ = 4 (token_mean), 1 (sequence_sum),
  C = 5 (sequence_sum_constant), the harmonic mean 2/(1/5 + 1/3) = 3.75 (sequence_mean)."""
  ptx_logits = jnp.zeros((3, 4, 2))
  ptx_targets = jnp.zeros((3, 4), jnp.int32)
  ptx_mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32)
  advantages = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, -2.0, -3.0, 9.0, 9.0]])
  logprobs = jnp.full((2, 5), -0.7)
  args = (logprobs, logprobs, advantages, mask, ptx_logits, ptx_targets, ptx_mask)
  log2 = math.log(2.0)
  # mode -> (D, L^CLIP = aggregate(−A)): row sums of A are 15 and −6
  cases = {
    "token_mean": (4.0, -9 / 8),
    "sequence_sum": (1.0, -9 / 2),
    "sequence_sum_constant": (5.0, -9 / 10),
    "sequence_mean": (3.75, -(15 / 5 - 6 / 3) / 2),
  }
  for mode, (divisor, policy) in cases.items():
    constant = 5.0 if mode == "sequence_sum_constant" else None
    loss, metrics = losses.ppo_ptx_loss(
      *args, ptx_coef=27.8, aggregation=mode, aggregation_constant=constant, ptx_reduction="sequence_sum"
    )
    assert float(metrics["policy_loss"]) == pytest.approx(policy, rel=1e-6), mode
    assert float(metrics["ptx_term"]) == pytest.approx(3 * log2 / divisor, rel=1e-6), mode
    assert float(loss) == pytest.approx(policy + 27.8 * 3 * log2 / divisor, rel=1e-6), mode
    _, token_metrics = losses.ppo_ptx_loss(
      *args, ptx_coef=27.8, aggregation=mode, aggregation_constant=constant, ptx_reduction="token_mean"
    )
    assert float(token_metrics["ptx_term"]) == pytest.approx(log2, rel=1e-6), mode  # no divisor per token
