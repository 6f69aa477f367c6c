"""The losses of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155), as small pure functions.

Every loss takes arrays and explicit masks (never a model) and returns ``(loss, metrics)``: a float32
scalar and a dict of float32 scalar diagnostics. A mask is a bool or 0/1 float array, 1 on the tokens
that count; a "masked mean" is the mean over every unmasked token of the whole batch, so a minibatch of
long and short responses weights each token equally (the PPO loss; the ptx term's reduction is an option of
ppo_ptx_loss, docs/paper.md §5.4).

All functions are jit-able with no Python control flow on array values; string options
(``normalizer``, ``estimator``) select code at trace time, so jit them as static arguments. Under
``jax.jit`` with batch-sharded inputs the reductions are global, so values do not depend on the mesh.

docs/losses.md sets each function beside the paper's equation and lists the choices the paper leaves open.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]

# exp(20) ≈ 4.9e8 is far outside any PPO clip region, so capping log π/π_old there changes nothing a
# healthy run can see, while it keeps exp() and its gradient finite when a stale or padded log-prob
# makes the log-ratio huge (exp overflows float32 above ~88.7).
_MAX_LOG_RATIO = 20.0


def to_float32(x: jax.Array) -> jax.Array:
  """Upcasts bf16/fp16 to float32 (keeps float64 when x64 is on): losses accumulate in float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_sum_and_count(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ m·x, Σ m) over the entries where the mask m is nonzero.

  Masked-out entries of x may hold anything, even NaN (padding garbage never leaks). A non-finite mask
  value is invalid input and makes the result non-finite, so the trainer's NaN check sees it.
  """
  mask = jnp.asarray(mask)
  keep = mask.astype(bool)
  weight = mask.astype(x.dtype)
  return jnp.sum(jnp.where(keep, weight * x, 0.0)), jnp.sum(jnp.where(keep, weight, 0.0))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ_masked x / N_masked, and 0 (not NaN) when nothing is masked in."""
  total, count = _masked_sum_and_count(x, mask)
  return total / jnp.maximum(count, 1.0)


# ----------------------------------------------------------------------------------------------------
# Reward model: K-wise ranking loss (Eq. 1)
# ----------------------------------------------------------------------------------------------------


def ranking_loss(
  rewards: jax.Array,
  ranks: jax.Array,
  *,
  normalizer: Literal["binom_k", "valid_pairs"] = "binom_k",
) -> tuple[jax.Array, Metrics]:
  """InstructGPT Eq. 1, every comparison of one prompt in the same batch element.

      loss(θ) = −1/C(K,2) · E_{(x, y_w, y_l) ~ D} [ log σ( r_θ(x, y_w) − r_θ(x, y_l) ) ]

  For prompt b with K_b present responses and the set P_b of pairs (w, l) where w is ranked strictly
  better than l (tied pairs are skipped):

      L_b = Σ_{(w,l) ∈ P_b} −log σ(r_w − r_l) / Z_b,   Z_b = C(K_b, 2)   (normalizer="binom_k")
                                                         Z_b = |P_b|       (normalizer="valid_pairs")
      loss = mean of L_b over the prompts with |P_b| > 0.

  Args:
    rewards: [B, K] float, r_θ(x_b, y_bk) for every slot k.
    ranks: [B, K] int. 0 is the best response, larger is worse, equal ranks are a tie, and −1 marks an
      empty slot (prompts have 4..9 responses in the paper, padded to a common K).
    normalizer: "binom_k" (the paper's 1/C(K,2)) or "valid_pairs" (1/number of non-tied pairs; the two
      differ only when a prompt has ties, which the paper does not cover). Static under jit.

  Returns:
    (loss, metrics). metrics: "accuracy" (fraction of valid pairs with r_w > r_l), "num_pairs",
    "num_prompts" (prompts holding at least one valid pair), "margin" (mean r_w − r_l over pairs).
    A prompt without a valid pair contributes nothing and produces no NaN.
  """
  terms = ranking_prompt_terms(rewards, ranks, normalizer=normalizer)
  has_pairs_B = terms["num_pairs"] > 0
  loss = masked_mean(terms["loss"], has_pairs_B)
  num_pairs = jnp.sum(terms["num_pairs"])
  metrics = {
    "accuracy": jnp.sum(terms["correct"]) / jnp.maximum(num_pairs, 1.0),
    "num_pairs": num_pairs,
    "num_prompts": jnp.sum(has_pairs_B).astype(jnp.float32),
    "margin": jnp.sum(terms["margin_sum"]) / jnp.maximum(num_pairs, 1.0),
  }
  return loss, metrics


PAIR_NORMALIZERS = ("binom_k", "valid_pairs")  # Eq. 1's 1/C(K,2), or 1/(the prompt's non-tied pairs)


def ranking_prompt_terms(
  rewards: jax.Array,
  ranks: jax.Array,
  *,
  normalizer: Literal["binom_k", "valid_pairs"] = "binom_k",
) -> dict[str, jax.Array]:
  """Eq. 1 per prompt, the pieces `ranking_loss` averages and an evaluation sums over a whole split.

  Args: as `ranking_loss`.

  Returns:
    {"loss": L_b (0 without pairs), "num_pairs": |P_b|, "correct": pairs with r_w > r_l, "margin_sum":
    Σ (r_w − r_l) over P_b, "num_present": K_b}, each [B] float32.
  """
  if normalizer not in PAIR_NORMALIZERS:
    raise ValueError(f"normalizer must be one of {PAIR_NORMALIZERS}, got {normalizer!r}")
  ranks = jnp.asarray(ranks)
  present_BxK = ranks >= 0
  # Empty slots hold whatever the RM produced for padding; zeroing keeps it out of values and grads.
  rewards_BxK = jnp.where(present_BxK, to_float32(rewards), 0.0)

  # Pair (i, j) counts when slot i is ranked strictly better (smaller rank) than slot j.
  is_pair_BxKxK = present_BxK[:, :, None] & present_BxK[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
  margin_BxKxK = rewards_BxK[:, :, None] - rewards_BxK[:, None, :]
  pair_loss_BxKxK = jnp.where(is_pair_BxKxK, -jax.nn.log_sigmoid(margin_BxKxK), 0.0)

  num_pairs_B = jnp.sum(is_pair_BxKxK, axis=(1, 2)).astype(jnp.float32)
  num_present_B = jnp.sum(present_BxK, axis=1).astype(jnp.float32)
  denominator_B = num_present_B * (num_present_B - 1.0) / 2.0 if normalizer == "binom_k" else num_pairs_B
  return {
    "loss": jnp.sum(pair_loss_BxKxK, axis=(1, 2)) / jnp.maximum(denominator_B, 1.0),
    "num_pairs": num_pairs_B,
    "correct": jnp.sum(is_pair_BxKxK & (margin_BxKxK > 0), axis=(1, 2)).astype(jnp.float32),
    "margin_sum": jnp.sum(jnp.where(is_pair_BxKxK, margin_BxKxK, 0.0), axis=(1, 2)),
    "num_present": num_present_B,
  }


def dpo_loss(
  policy_logps: jax.Array,
  ref_logps: jax.Array,
  ranks: jax.Array,
  *,
  beta: float,
  normalizer: Literal["binom_k", "valid_pairs"] = "binom_k",
) -> tuple[jax.Array, Metrics]:
  """Direct preference optimization (Rafailov et al. 2023) on K-wise comparisons: Eq. 1 applied to the
  implicit rewards of the policy against a reference,

      ρ_k = β · (log π(y_k | x) − log π_ref(y_k | x))
      loss = ranking_loss(ρ, ranks)   (every C(K,2) pair of a prompt in one batch element, as the RM)

  For K = 2 this is DPO's loss, −log σ(β·((log π_w − log π_ref,w) − (log π_l − log π_ref,l))).

  Args:
    policy_logps, ref_logps: [B, K] sequence log-probabilities, summed over each response's tokens.
    ranks: [B, K] int, as in ranking_loss (0 best, −1 an empty slot).
    beta: β, the strength of the implicit KL constraint.
    normalizer: as in ranking_loss. Static under jit.

  Returns:
    (loss, metrics): ranking_loss's metrics on ρ ("accuracy": the implicit-reward accuracy, "margin": the
    mean implicit-reward margin r_w − r_l), and "reward_mean", the mean ρ over the present responses.
  """
  rewards = beta * (to_float32(policy_logps) - to_float32(ref_logps))
  loss, metrics = ranking_loss(rewards, ranks, normalizer=normalizer)
  metrics["reward_mean"] = masked_mean(rewards, jnp.asarray(ranks) >= 0)
  return loss, metrics


# ----------------------------------------------------------------------------------------------------
# Language modelling: SFT loss and the ptx term of Eq. 2
# ----------------------------------------------------------------------------------------------------


def token_logprobs(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Per-token log-probabilities of the given tokens at a sampling temperature T.

      log π(y_t | x, y_<t) = log softmax(z_t / T)[y_t]

  The division by T must match the sampler's, in the rollout, the re-forward and the reference
  pass alike (docs/paper.md §8 row 13); otherwise the first PPO ratio is not 1.

  Args:
    logits: [B, L, V], any float dtype; the softmax is computed in float32.
    targets: [B, L] int, the token whose probability is read at each position (already shifted).
    temperature: T > 0.

  Returns:
    [B, L] float32 log-probabilities.
  """
  scaled_BxLxV = to_float32(logits) / temperature
  log_normalizer_BxL = jax.nn.logsumexp(scaled_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(scaled_BxLxV, targets[..., None], axis=-1)[..., 0]
  return target_logit_BxL - log_normalizer_BxL


def token_entropy(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Per-token entropy of the next-token distribution at temperature T.

      H_t = −Σ_v π(v | x, y_<t) log π(v | x, y_<t),   π = softmax(z_t / T)

  Written with log-softmax so that a token of zero probability adds 0 rather than 0·(−∞);
  logits must be finite (mask a vocabulary entry with a large negative number, not −inf).

  Args:
    logits: [B, L, V], any float dtype; computed in float32.
    temperature: T > 0.

  Returns:
    [B, L] float32 entropies in nats.
  """
  logp_BxLxV = jax.nn.log_softmax(to_float32(logits) / temperature, axis=-1)
  return -jnp.sum(jnp.exp(logp_BxLxV) * logp_BxLxV, axis=-1)


def lm_loss_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood and token count, for exact accumulation.

      (Σ_t m_t · −log π(y_t | y_<t),  Σ_t m_t)

  Summing both parts over micro-batches (or ``psum``-ing them over hosts) and dividing once gives
  exactly the masked mean of the full batch, which averaging per-micro-batch means does not when
  micro-batches hold different numbers of tokens.

  Args:
    logits: [B, L, V], any float dtype; log-softmax in float32.
    targets: [B, L] int, aligned with logits (targets[:, t] is the token after position t).
    mask: [B, L] bool or 0/1, the tokens that count.

  Returns:
    (nll_sum, token_count), float32 scalars.
  """
  return _masked_sum_and_count(-token_logprobs(logits, targets), mask)


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
  """Masked mean negative log-likelihood: the SFT loss and the ptx term of Eq. 2.

      L_LM = −(1/N) Σ_{b,t} m_bt · log π(y_bt | y_b,<t),   N = Σ_{b,t} m_bt

  Used for SFT and for the ptx term when `ppo_ptx_loss(ptx_reduction="token_mean")`; Eq. 2's own reading of
  the ptx term sums over each sequence (see ppo_ptx_loss).

  Args:
    logits: [B, L, V], any float dtype; log-softmax in float32.
    targets: [B, L] int, aligned with logits (already shifted).
    mask: [B, L] bool or 0/1.

  Returns:
    (loss, metrics). metrics: "token_count", "accuracy" (masked mean of argmax == target).
  """
  nll_sum, token_count = lm_loss_sum(logits, targets, mask)
  correct_BxL = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"token_count": token_count, "accuracy": masked_mean(correct_BxL, mask)}
  return nll_sum / jnp.maximum(token_count, 1.0), metrics


# ----------------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017) and the PPO-ptx objective (Eq. 2)
# ----------------------------------------------------------------------------------------------------


def ppo_policy_loss(
  logprobs: jax.Array,
  old_logprobs: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  clip_eps: float = 0.2,
) -> tuple[jax.Array, Metrics]:
  """Clipped surrogate of PPO (Schulman et al. 2017, Eq. 7), per token, as a loss to minimise.

      ρ_t = π_φ(y_t | s_t) / π_φ_old(y_t | s_t) = exp(logprobs_t − old_logprobs_t)
      L^CLIP = masked mean of max( −A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε) )

  log ρ is capped at ±20 before exp (see _MAX_LOG_RATIO): no effect within float32 for any run
  whose ratios are sane, and it keeps the gradient finite otherwise.

  Args:
    logprobs: [B, T] log π_φ of the sampled response tokens (differentiated).
    old_logprobs: [B, T] log π_φ_old from the rollout (treated as constants by the caller).
    advantages: [B, T] A_t, usually GAE and whitened (rl.gae, rl.whiten).
    mask: [B, T] bool or 0/1, the real response tokens.
    clip_eps: ε.

  Returns:
    (loss, metrics). metrics: "clip_frac" (fraction of tokens where the clipped term is the larger,
    i.e. that get no gradient), "approx_kl" 0.5·mean((log ρ)²), "ratio_mean", "ratio_max".
  """
  keep = jnp.asarray(mask).astype(bool)
  # Padding may hold any log-prob; a zero log-ratio there keeps exp() and its gradient finite.
  log_ratio_BxT = jnp.where(keep, to_float32(logprobs) - to_float32(old_logprobs), 0.0)
  ratio_BxT = jnp.exp(jnp.clip(log_ratio_BxT, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
  advantages_BxT = to_float32(advantages)
  unclipped_BxT = -advantages_BxT * ratio_BxT
  clipped_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped_BxT, clipped_BxT), keep)
  metrics = {
    "clip_frac": masked_mean((clipped_BxT > unclipped_BxT).astype(jnp.float32), keep),
    "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio_BxT), keep),
    "ratio_mean": masked_mean(ratio_BxT, keep),
    # ρ > 0, so 0 is a neutral fill and an all-masked batch reports 0.
    "ratio_max": jnp.max(jnp.where(keep, ratio_BxT, 0.0)),
  }
  return loss, metrics


def value_loss(
  values: jax.Array,
  old_values: jax.Array,
  returns: jax.Array,
  mask: jax.Array,
  *,
  clip_eps: float = 0.2,
) -> tuple[jax.Array, Metrics]:
  """Clipped value loss (the form of openai/lm-human-preferences; the paper does not give one).

      V_clip,t = clip(V_t, V_old,t − ε, V_old,t + ε)
      L^V = ½ · masked mean of max( (V_t − R_t)², (V_clip,t − R_t)² )

  Args:
    values: [B, T] V_t from the critic being trained (differentiated).
    old_values: [B, T] V_old,t from the rollout.
    returns: [B, T] R_t = A_t + V_old,t (rl.gae).
    mask: [B, T] bool or 0/1, the real response tokens.
    clip_eps: ε, in reward units.

  Returns:
    (loss, metrics). metrics: "clip_frac" (fraction of tokens where the clipped error is the larger),
    "value_mse" (masked mean of the unclipped (V − R)²), "value_mean".
  """
  keep = jnp.asarray(mask).astype(bool)
  values_BxT, old_values_BxT, returns_BxT = map(to_float32, (values, old_values, returns))
  values_clipped_BxT = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip_eps, clip_eps)
  error_BxT = jnp.square(values_BxT - returns_BxT)
  error_clipped_BxT = jnp.square(values_clipped_BxT - returns_BxT)
  loss = 0.5 * masked_mean(jnp.maximum(error_BxT, error_clipped_BxT), keep)
  metrics = {
    "clip_frac": masked_mean((error_clipped_BxT > error_BxT).astype(jnp.float32), keep),
    "value_mse": masked_mean(error_BxT, keep),
    "value_mean": masked_mean(values_BxT, keep),
  }
  return loss, metrics


def kl_penalty(
  logprobs: jax.Array,
  ref_logprobs: jax.Array,
  *,
  estimator: Literal["k1", "k2", "k3"] = "k1",
) -> jax.Array:
  """Per-token estimators of KL(π_φ ‖ π^SFT) from the sampled tokens (Schulman 2020, "Approximating
  KL divergence"), with x_t = log π_φ(y_t | s_t) − log π^SFT(y_t | s_t) and y_t ~ π_φ:

      k1 = x                   unbiased; the per-token term of Eq. 2 (docs/paper.md §5.1)
      k2 = x² / 2              biased, low variance, always ≥ 0
      k3 = e^{−x} − 1 + x      unbiased, always ≥ 0

  k3 is computed as expm1(−x) + x, accurate for small x; for x < −88 its true value exceeds the
  float32 range and it is +inf. Use it as a diagnostic, not as a reward, at such ratios.

  Args:
    logprobs: [B, T] log π_φ of the sampled tokens.
    ref_logprobs: [B, T] log π^SFT of the same tokens (same temperature).
    estimator: "k1", "k2" or "k3". Static under jit.

  Returns:
    [B, T] float32 per-token estimates; mask them as needed.
  """
  x_BxT = to_float32(logprobs) - to_float32(ref_logprobs)
  if estimator == "k1":
    return x_BxT
  if estimator == "k2":
    return 0.5 * jnp.square(x_BxT)
  if estimator == "k3":
    return jnp.expm1(-x_BxT) + x_BxT
  raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def ppo_ptx_loss(
  logprobs: jax.Array,
  old_logprobs: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  ptx_logits: jax.Array,
  ptx_targets: jax.Array,
  ptx_mask: jax.Array,
  *,
  clip_eps: float = 0.2,
  ptx_coef: float = 27.8,
  ptx_reduction: Literal["sequence_sum", "token_mean"] = "sequence_sum",
) -> tuple[jax.Array, Metrics]:
  """The full policy loss of one PPO-ptx minibatch (Eq. 2 with γ > 0), for one jitted step.

      L = L^CLIP(φ) + γ · L_ptx(φ; D_pretrain)

  L^CLIP is a mean over the minibatch's response tokens. Eq. 2 adds γ·E_x[log π(x)], a log-likelihood
  summed over each pretraining sequence x, to an objective per episode. With B episodes of T̄ response
  tokens on average (T̄ = Σ mask / B) and P pretraining sequences:

      "sequence_sum":  L_ptx = (1/P) Σ_x Σ_s −log π(x_s)  /  T̄
      "token_mean":    L_ptx = Σ_x Σ_s −log π(x_s) / N_ptx        (N_ptx = Σ ptx_mask)

  "sequence_sum" is Eq. 2 exactly, up to the positive factor 1/T̄ that the per-token PPO loss already
  carries: L = (1/T̄)·(−Eq. 2 per episode). The two differ by the factor L̄/T̄, where L̄ = N_ptx / P is the
  loss tokens per pretraining sequence, so γ_token_mean = γ_sequence_sum · L̄ / T̄ gives the same loss
  (e.g. 27.8 · 2048 / 200 ≈ 285). The paper states neither reduction (docs/paper.md §5.4).

  The paper computes the PPO gradient and the γ-scaled pretraining gradient in consecutive steps
  and accumulates both in one buffer (App. C.4); by linearity of ∇ that buffer equals ∇L. The
  KL term of Eq. 2 is not here: it lives in the rewards (rl.per_token_rewards). γ = 0 is plain PPO.

  Args:
    logprobs, old_logprobs, advantages, mask: [B, T], as in ppo_policy_loss.
    ptx_logits: [B_ptx, L, V] the policy's logits on pretraining text.
    ptx_targets: [B_ptx, L] int, aligned with ptx_logits.
    ptx_mask: [B_ptx, L] bool or 0/1.
    clip_eps: ε of the clipped surrogate.
    ptx_coef: γ (27.8 in the paper).
    ptx_reduction: "sequence_sum" (Eq. 2) or "token_mean" (above). Static under jit.

  Returns:
    (loss, metrics). metrics: "policy_loss", "ptx_loss" (the per-token mean NLL, comparable across
    reductions), "ptx_term" (L_ptx, what γ multiplies), the ppo_policy_loss metrics, and
    "ptx_token_count", "ptx_accuracy".
  """
  if ptx_reduction not in ("sequence_sum", "token_mean"):
    raise ValueError(f"ptx_reduction must be 'sequence_sum' or 'token_mean', got {ptx_reduction!r}")
  policy, policy_metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps)
  ptx, ptx_metrics = lm_loss(ptx_logits, ptx_targets, ptx_mask)
  if ptx_reduction == "token_mean":
    term = ptx
  else:
    ptx_mask = jnp.asarray(ptx_mask)
    sequences = jnp.maximum(jnp.sum(jnp.any(ptx_mask > 0, axis=1)), 1.0)
    mean_response_tokens = jnp.maximum(jnp.sum(to_float32(mask)), 1.0) / mask.shape[0]
    term = ptx * ptx_metrics["token_count"] / sequences / mean_response_tokens
  metrics = {
    "policy_loss": policy,
    "ptx_loss": ptx,
    "ptx_term": term,
    **policy_metrics,
    **{f"ptx_{name}": value for name, value in ptx_metrics.items()},
  }
  return policy + ptx_coef * term, metrics
