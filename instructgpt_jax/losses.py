"""The losses of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155), as small pure functions.

Every loss takes arrays and explicit masks (never a model) and returns ``(loss, metrics)``: a float32
scalar and a dict of float32 scalar diagnostics. A mask is a bool or 0/1 float array, 1 on the tokens
that count; a "masked mean" is the mean over every unmasked token of the whole batch, so a minibatch of
long and short responses weights each token equally. How the policy loss reduces its tokens is `aggregate`'s
mode (the PPO default is that masked mean); the ptx term's reduction is an option of ppo_ptx_loss
(docs/paper.md §5.4).

All functions are jit-able with no Python control flow on array values; string options
(``normalizer``, ``estimator``, ``mode``, ``form``) select code at trace time, so jit them as static arguments. The
options of the first three, and ``ptx_reduction``, are the names of a table beside their math (PAIR_NORMALIZERS,
KL_ESTIMATORS, AGGREGATIONS, PTX_REDUCTIONS): the function and the config checks read the table. Under
``jax.jit`` with batch-sharded inputs the reductions are global, so values do not depend on the mesh.

docs/losses.md sets each function beside the paper's equation and lists the choices the paper leaves open.
"""

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal, NamedTuple

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


def _masked_sum_and_count(x: jax.Array, mask: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
  """(Σ m·x, Σ m) over the entries where the mask m is nonzero, over `axis` (None: all of them).

  Masked-out entries of x may hold anything, even NaN (padding garbage never leaks). A non-finite mask
  value is invalid input and makes the result non-finite, so the trainer's NaN check sees it.
  """
  mask = jnp.asarray(mask)
  keep = mask.astype(bool)
  weight = mask.astype(x.dtype)
  return jnp.sum(jnp.where(keep, weight * x, 0.0), axis=axis), jnp.sum(jnp.where(keep, weight, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ_masked x / N_masked, and 0 (not NaN) when nothing is masked in."""
  total, count = _masked_sum_and_count(x, mask)
  return total / jnp.maximum(count, 1.0)


# ----------------------------------------------------------------------------------------------------
# Loss aggregation: one number from a [B, T] per-token loss, as each policy-gradient method defines it
# ----------------------------------------------------------------------------------------------------


def _row_sums_and_counts(values_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(S_b = Σ_t m_bt·x_bt, T_b = Σ_t m_bt, T_b > 0), each [B]."""
  sums_B, counts_B = _masked_sum_and_count(to_float32(values_BxT), mask_BxT, axis=1)
  return sums_B, counts_B, counts_B > 0


def _sequences(nonempty_B: jax.Array, dtype) -> jax.Array:
  """B', the rows holding a real token (at least 1)."""
  return jnp.maximum(jnp.sum(nonempty_B.astype(dtype)), 1.0)


def _token_mean(values_BxT, mask_BxT, constant):
  del constant
  return masked_mean(to_float32(values_BxT), mask_BxT)


def _sequence_mean(values_BxT, mask_BxT, constant):
  del constant
  sums_B, counts_B, nonempty_B = _row_sums_and_counts(values_BxT, mask_BxT)
  sequences = _sequences(nonempty_B, sums_B.dtype)
  row_means_B = jnp.where(nonempty_B, sums_B / jnp.where(nonempty_B, counts_B, 1.0), 0.0)
  return jnp.sum(row_means_B) / sequences


def _sequence_sum_constant(values_BxT, mask_BxT, constant):
  sums_B, _, _ = _row_sums_and_counts(values_BxT, mask_BxT)
  return jnp.sum(sums_B) / (sums_B.shape[0] * constant)


def _sequence_sum(values_BxT, mask_BxT, constant):
  del constant
  sums_B, _, nonempty_B = _row_sums_and_counts(values_BxT, mask_BxT)
  sequences = _sequences(nonempty_B, sums_B.dtype)
  return jnp.sum(sums_B) / sequences


def _mean_length(mask_BxT, constant):
  del constant
  return jnp.maximum(jnp.sum(to_float32(mask_BxT)), 1.0) / mask_BxT.shape[0]


def _harmonic_mean_length(mask_BxT, constant):
  del constant
  _, counts_B, nonempty_B = _row_sums_and_counts(jnp.zeros(mask_BxT.shape, jnp.float32), mask_BxT)
  sequences = jnp.sum(nonempty_B.astype(jnp.float32))
  inverse_lengths = jnp.sum(jnp.where(nonempty_B, 1.0 / jnp.where(nonempty_B, counts_B, 1.0), 0.0))
  return jnp.where(sequences > 0, sequences / jnp.where(sequences > 0, inverse_lengths, 1.0), 1.0)


class Aggregation(NamedTuple):
  """One way to reduce a per-token loss: a row of AGGREGATIONS (see `aggregate` and `episode_divisor`)."""

  reduce: Callable[[jax.Array, jax.Array, float | None], jax.Array]  # (values_BxT, mask_BxT, C) -> scalar
  episode_divisor: Callable[[jax.Array, float | None], jax.Array]  # (mask_BxT, C) -> D
  takes_constant: bool  # C > 0 is required, and refused by the rows without it
  doc: str


# name -> Aggregation: `aggregate`, `episode_divisor` and the check of ppo.loss_aggregation read it at call time, so
# an entry added from a script (`losses.AGGREGATIONS["mine"] = losses.Aggregation(...)`) is an option like these.
# Each option table of this module and of rl.py is an OrderedDict: a dict whose fixed order the config check's
# message and hypothesis's sampled_from (which refuses a plain dict) rely on.
AGGREGATIONS: dict[str, Aggregation] = OrderedDict(
  token_mean=Aggregation(
    _token_mean, _mean_length, False, "Σ_b S_b / Σ_b T_b: every token weighs the same (PPO as this code reads it)"
  ),
  sequence_mean=Aggregation(
    _sequence_mean, _harmonic_mean_length, False, "(1/B') Σ_b S_b / T_b: every sequence the same (GRPO, Eq. 3)"
  ),
  sequence_sum_constant=Aggregation(
    _sequence_sum_constant,
    lambda mask_BxT, constant: jnp.float32(constant),
    True,
    "Σ_b S_b / (B · C), C the generation budget (Dr. GRPO)",
  ),
  sequence_sum=Aggregation(
    _sequence_sum,
    lambda mask_BxT, constant: jnp.float32(1.0),
    False,
    "(1/B') Σ_b S_b: each sequence's sum (RLOO: the sequence's log-prob)",
  ),
)


def aggregate(
  values_BxT: jax.Array,
  mask_BxT: jax.Array,
  mode: Literal["token_mean", "sequence_mean", "sequence_sum_constant", "sequence_sum"],
  *,
  constant: float | None = None,
) -> jax.Array:
  """A [B, T] per-token loss reduced to one float32 scalar, in one of the four ways the methods define it.

  With m the mask, T_b = Σ_t m_bt the real tokens of row b, S_b = Σ_t m_bt·x_bt its sum, B the rows and
  B' the rows with T_b > 0:

      "token_mean"              Σ_b S_b / Σ_b T_b               every token of the batch weighs the same
      "sequence_mean"           (1/B') Σ_{b: T_b > 0} S_b / T_b  every sequence weighs the same
                                                                 (GRPO: Shao et al. 2024, Eq. 3)
      "sequence_sum_constant"   Σ_b S_b / (B · C)               a constant normalizer, C = the generation budget
                                                                 (Dr. GRPO: Liu et al. 2025)
      "sequence_sum"            (1/B') Σ_b S_b                  each sequence's sum, mean over sequences
                                                                 (RLOO: Ahmadian et al. 2024, the sequence's log-prob)

  A row with no real token adds 0 to every numerator and never divides by 0: "sequence_mean" and
  "sequence_sum" average over the B' rows that hold a token (an empty row is not a sequence), while
  "sequence_sum_constant" divides by all B rows, since its normalizer is by design independent of the data.
  An all-empty batch gives 0. "token_mean" is `masked_mean`, the same operations.

  Args:
    values_BxT: [B, T] per-token values (any float dtype; reduced in float32). Masked-out entries may hold
      anything, even NaN.
    mask_BxT: [B, T] bool or 0/1, the real tokens.
    mode: one of AGGREGATIONS. Static under jit.
    constant: C > 0, required by "sequence_sum_constant" and refused by the other modes.

  Returns:
    float32 scalar.
  """
  if mode not in AGGREGATIONS:
    raise ValueError(f"aggregate: mode {mode!r} is not one of {tuple(AGGREGATIONS)}")
  row = AGGREGATIONS[mode]
  if row.takes_constant and not (constant is not None and constant > 0):
    raise ValueError(f"aggregate: {mode!r} needs a constant > 0 (the generation budget), got {constant}")
  if not row.takes_constant and constant is not None:
    raise ValueError(f"aggregate: mode {mode!r} takes no constant (got {constant})")
  return row.reduce(values_BxT, mask_BxT, constant)


def episode_divisor(
  mask_BxT: jax.Array,
  mode: Literal["token_mean", "sequence_mean", "sequence_sum_constant", "sequence_sum"],
  *,
  constant: float | None = None,
) -> jax.Array:
  """D such that `aggregate(x, mask, mode)` is (1/D) · (a mean over episodes of Σ_t x_t): what an episode's
  summed loss is divided by, so that a per-episode term (the ptx term of Eq. 2) can carry the same factor.

      "token_mean"              D = T̄ = Σ_b T_b / B       exact (the mean over all B rows)
      "sequence_sum"            D = 1                      exact (the mean over the B' non-empty rows)
      "sequence_sum_constant"   D = C                      exact (the mean over all B rows)
      "sequence_mean"           D = B' / Σ_{b: T_b>0} 1/T_b, the harmonic mean length: each episode's sum is
                                divided by its own T_b, so D is exact only when every non-empty row has the
                                same length, and otherwise the mean of the episodes' factors 1/T_b

  Returns a float32 scalar > 0, also for a batch without a real token (T̄ is floored at 1/B; the harmonic mean
  of no rows is 1), whose policy loss is 0 anyway.
  """
  if mode not in AGGREGATIONS:
    raise ValueError(f"episode_divisor: mode {mode!r} is not one of {tuple(AGGREGATIONS)}")
  row = AGGREGATIONS[mode]
  if row.takes_constant and (constant is None or not constant > 0):
    raise ValueError(f"episode_divisor: {mode!r} needs a constant > 0, got {constant}")
  return row.episode_divisor(jnp.asarray(mask_BxT), constant)


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
  return _mean_over_prompts(ranking_prompt_terms(rewards, ranks, normalizer=normalizer))


def _mean_over_prompts(terms: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
  """(the mean of the per-prompt losses over the prompts with a valid pair, ranking_loss's metrics)."""
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


# normalizer -> Z_b of Eq. 1 as a function of (K_b the prompt's present responses, |P_b| its non-tied pairs), each [B]:
# Eq. 1's C(K_b, 2), or the prompt's non-tied pairs. ranking_prompt_terms and the rm/dpo config checks read it.
PAIR_NORMALIZERS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = OrderedDict(
  binom_k=lambda num_present_B, num_pairs_B: num_present_B * (num_present_B - 1.0) / 2.0,
  valid_pairs=lambda num_present_B, num_pairs_B: num_pairs_B,
)


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
    raise ValueError(f"normalizer must be one of {tuple(PAIR_NORMALIZERS)}, got {normalizer!r}")
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
  denominator_B = PAIR_NORMALIZERS[normalizer](num_present_B, num_pairs_B)
  return {
    "loss": jnp.sum(pair_loss_BxKxK, axis=(1, 2)) / jnp.maximum(denominator_B, 1.0),
    "num_pairs": num_pairs_B,
    "correct": jnp.sum(is_pair_BxKxK & (margin_BxKxK > 0), axis=(1, 2)).astype(jnp.float32),
    "margin_sum": jnp.sum(jnp.where(is_pair_BxKxK, margin_BxKxK, 0.0), axis=(1, 2)),
    "num_present": num_present_B,
  }


def plackett_luce_prompt_loss(rewards: jax.Array, ranks: jax.Array) -> jax.Array:
  """−log of the Plackett-Luce probability of each prompt's ranking (Plackett 1975; Luce 1959).

  For a strict ranking τ of K present responses (τ(1) the best) with scores s:

      L_b = −log Π_{k=1..K} exp(s_τ(k)) / Σ_{j ≥ k} exp(s_τ(j))
          = Σ_i [ logsumexp_{j ∈ C_i} s_j − s_i ],   C_i = {i} ∪ {j present: rank_j > rank_i}

  the second line being the same sum written per response: the responses still to be placed when i is
  chosen are i and those ranked below it; the worst response's term is 0.

  Ties: the second line is what is computed for any ranks. Tied responses are never in each other's C_i, so
  no term orders them, as the pairwise form skips tied pairs; for a strict ranking it is the Plackett-Luce
  loss above, and with ties it is not the probability of any one ordering (it is the product of each
  response's probability of being chosen first among itself and the responses ranked strictly below it).
  A prompt whose present responses are all tied, or that has fewer than two, gets 0.

  Args:
    rewards: [B, K] float scores s.
    ranks: [B, K] int, as in ranking_loss (0 the best, equal ranks a tie, −1 an empty slot; empty slots
      are in no C_i and add no term).

  Returns:
    [B] float32 per-prompt losses L_b (a sum over the prompt's responses, not normalized by K).
  """
  ranks = jnp.asarray(ranks)
  present_BxK = ranks >= 0
  rewards_BxK = jnp.where(present_BxK, to_float32(rewards), 0.0)
  size = ranks.shape[1]
  # competes_BxKxK[b, i, j]: response j is still to be placed when response i is chosen.
  below_BxKxK = present_BxK[:, None, :] & (ranks[:, None, :] > ranks[:, :, None])
  competes_BxKxK = below_BxKxK | jnp.eye(size, dtype=bool)[None]
  scores_BxKxK = jnp.broadcast_to(rewards_BxK[:, None, :], competes_BxKxK.shape)
  log_denominator_BxK = jax.nn.logsumexp(jnp.where(competes_BxKxK, scores_BxKxK, -jnp.inf), axis=2)
  return jnp.sum(jnp.where(present_BxK, log_denominator_BxK - rewards_BxK, 0.0), axis=1)


DPO_FORMS = ("all_pairs", "plackett_luce")  # dpo_loss's `form`


def dpo_prompt_terms(
  policy_logps: jax.Array,
  ref_logps: jax.Array,
  ranks: jax.Array,
  *,
  beta: float,
  normalizer: Literal["binom_k", "valid_pairs"] = "binom_k",
  form: Literal["all_pairs", "plackett_luce"] = "all_pairs",
) -> dict[str, jax.Array]:
  """DPO per prompt, the pieces `dpo_loss` averages and an evaluation sums over a whole split:
  `ranking_prompt_terms` on the implicit rewards ρ_k = β·(log π(y_k|x) − log π_ref(y_k|x)), with "loss" the
  `form`'s L_b (see dpo_loss); each [B] float32."""
  if form not in DPO_FORMS:
    raise ValueError(f"dpo: form {form!r} is not one of {DPO_FORMS}")
  rewards = _implicit_rewards(policy_logps, ref_logps, beta)
  terms = ranking_prompt_terms(rewards, ranks, normalizer=normalizer)
  if form == "plackett_luce":
    terms["loss"] = plackett_luce_prompt_loss(rewards, ranks)
  return terms


def _implicit_rewards(policy_logps: jax.Array, ref_logps: jax.Array, beta: float) -> jax.Array:
  return beta * (to_float32(policy_logps) - to_float32(ref_logps))


def dpo_loss(
  policy_logps: jax.Array,
  ref_logps: jax.Array,
  ranks: jax.Array,
  *,
  beta: float,
  normalizer: Literal["binom_k", "valid_pairs"] = "binom_k",
  form: Literal["all_pairs", "plackett_luce"] = "all_pairs",
) -> tuple[jax.Array, Metrics]:
  """Direct preference optimization (Rafailov et al. 2023) on K-wise comparisons, on the implicit rewards of
  the policy against a reference,

      ρ_k = β · (log π(y_k | x) − log π_ref(y_k | x))

  in one of two forms (they agree at K = 2):

      "all_pairs"       the all-pairs Bradley-Terry generalization: Eq. 1 on ρ, as the RM trains,
                        L_b = Σ_{(w,l) ∈ P_b} −log σ(ρ_w − ρ_l) / Z_b   (ranking_loss; Z_b by `normalizer`)
      "plackett_luce"   DPO's own K-wise objective (Rafailov et al. 2023, App. A.3), for a ranking τ:
                        L_b = −log Π_{k=1..K} exp(ρ_τ(k)) / Σ_{j ≥ k} exp(ρ_τ(j))
                        (plackett_luce_prompt_loss: ties and empty slots as documented there; `normalizer`
                        is not used)

  loss = the mean of L_b over the prompts with at least one valid (non-tied) pair. For K = 2 both are
  DPO's loss, −log σ(β·((log π_w − log π_ref,w) − (log π_l − log π_ref,l))).

  Args:
    policy_logps, ref_logps: [B, K] sequence log-probabilities, summed over each response's tokens.
    ranks: [B, K] int, as in ranking_loss (0 best, equal ranks a tie, −1 an empty slot).
    beta: β, the strength of the implicit KL constraint.
    normalizer: as in ranking_loss ("all_pairs" only). Static under jit.
    form: "all_pairs" or "plackett_luce". Static under jit.

  Returns:
    (loss, metrics): ranking_loss's metrics on ρ whatever the form ("accuracy": the implicit-reward pair
    accuracy, "margin": the mean implicit-reward margin ρ_w − ρ_l, "num_pairs", "num_prompts"), and
    "reward_mean", the mean ρ over the present responses.
  """
  terms = dpo_prompt_terms(policy_logps, ref_logps, ranks, beta=beta, normalizer=normalizer, form=form)
  loss, metrics = _mean_over_prompts(terms)
  metrics["reward_mean"] = masked_mean(_implicit_rewards(policy_logps, ref_logps, beta), jnp.asarray(ranks) >= 0)
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
  """Masked mean negative log-likelihood: the SFT loss, and the per-token NLL `ppo_ptx_loss` builds its ptx term from.

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
  aggregation: Literal["token_mean", "sequence_mean", "sequence_sum_constant", "sequence_sum"] = "token_mean",
  aggregation_constant: float | None = None,
) -> tuple[jax.Array, Metrics]:
  """Clipped surrogate of PPO (Schulman et al. 2017, Eq. 7), per token, as a loss to minimise.

      ρ_t = π_φ(y_t | s_t) / π_φ_old(y_t | s_t) = exp(logprobs_t − old_logprobs_t)
      ℓ_t = max( −A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε) )
      L^CLIP = aggregate(ℓ, mask, aggregation)   (default "token_mean": the masked mean over the minibatch)

  log ρ is capped at ±20 before exp (see _MAX_LOG_RATIO): no effect within float32 for any run
  whose ratios are sane, and it keeps the gradient finite otherwise.

  Args:
    logprobs: [B, T] log π_φ of the sampled response tokens (differentiated).
    old_logprobs: [B, T] log π_φ_old from the rollout (treated as constants by the caller).
    advantages: [B, T] A_t, usually GAE and whitened (rl.gae, rl.whiten).
    mask: [B, T] bool or 0/1, the real response tokens.
    clip_eps: ε.
    aggregation: how ℓ is reduced, one of AGGREGATIONS (`aggregate`). Static under jit.
    aggregation_constant: C of "sequence_sum_constant" (None for the other modes).

  Returns:
    (loss, metrics). metrics, token means whatever the aggregation: "clip_frac" (fraction of tokens where
    the clipped term is the larger, i.e. that get no gradient), "approx_kl" 0.5·mean((log ρ)²),
    "ratio_mean", "ratio_max".
  """
  keep = jnp.asarray(mask).astype(bool)
  # Padding may hold any log-prob; a zero log-ratio there keeps exp() and its gradient finite.
  log_ratio_BxT = jnp.where(keep, to_float32(logprobs) - to_float32(old_logprobs), 0.0)
  ratio_BxT = jnp.exp(jnp.clip(log_ratio_BxT, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
  advantages_BxT = to_float32(advantages)
  unclipped_BxT = -advantages_BxT * ratio_BxT
  clipped_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = aggregate(jnp.maximum(unclipped_BxT, clipped_BxT), keep, aggregation, constant=aggregation_constant)
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


# name -> k(x), the per-token estimate as a function of the float32 log-ratio x_BxT (kl_penalty's docstring gives
# them with their properties); kl_penalty and the check of ppo.kl_estimator read it at call time.
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = OrderedDict(
  k1=lambda x_BxT: x_BxT,
  k2=lambda x_BxT: 0.5 * jnp.square(x_BxT),
  k3=lambda x_BxT: jnp.expm1(-x_BxT) + x_BxT,
)


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
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"estimator must be one of {tuple(KL_ESTIMATORS)}, got {estimator!r}")
  return KL_ESTIMATORS[estimator](to_float32(logprobs) - to_float32(ref_logprobs))


def _ptx_sequence_sum(nll, token_count, ptx_mask, mask, aggregation, aggregation_constant):
  """Eq. 2 as written: (1/P) Σ_x Σ_s −log π(x_s) / D, D = episode_divisor of the policy loss's aggregation."""
  ptx_mask = jnp.asarray(ptx_mask)
  sequences = jnp.maximum(jnp.sum(jnp.any(ptx_mask > 0, axis=1)), 1.0)
  divisor = episode_divisor(mask, aggregation, constant=aggregation_constant)
  return nll * token_count / sequences / divisor


# ptx_reduction -> L_ptx as a function of (the per-token mean NLL, N_ptx, ptx_mask [B_ptx, L], the policy loss's
# mask [B, T], its aggregation, its constant); ppo_ptx_loss's docstring gives both. ppo_ptx_loss and the check of
# ppo.ptx_reduction read it at call time.
PTX_REDUCTIONS: dict[str, Callable[..., jax.Array]] = OrderedDict(
  sequence_sum=_ptx_sequence_sum,
  token_mean=lambda nll, token_count, ptx_mask, mask, aggregation, aggregation_constant: nll,
)


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
  aggregation: Literal["token_mean", "sequence_mean", "sequence_sum_constant", "sequence_sum"] = "token_mean",
  aggregation_constant: float | None = None,
) -> tuple[jax.Array, Metrics]:
  """The full policy loss of one PPO-ptx minibatch (Eq. 2 with γ > 0), for one jitted step.

      L = L^CLIP(φ) + γ · L_ptx(φ; D_pretrain)

  L^CLIP (ppo_policy_loss, reduced by `aggregation`) is 1/D times a mean over the minibatch's episodes of
  each episode's summed per-token surrogate, with D = episode_divisor(mask, aggregation): for the default
  "token_mean", D = T̄ = Σ mask / B, the mean response length. Eq. 2 adds γ·E_x[log π(x)], a log-likelihood
  summed over each pretraining sequence x, to an objective per episode. With P pretraining sequences:

      "sequence_sum":  L_ptx = (1/P) Σ_x Σ_s −log π(x_s)  /  D
      "token_mean":    L_ptx = Σ_x Σ_s −log π(x_s) / N_ptx        (N_ptx = Σ ptx_mask)

  "sequence_sum" puts the same 1/D on both terms, so γ weighs a pretraining sequence's log-likelihood
  against an episode's summed surrogate Σ_t ρ_t·A_t (clipped) as Eq. 2 weighs it against the episode's
  return, provided A_t is in the reward's units. Advantage whitening (rl.whiten; ppo.whiten_advantages, on
  by default) divides A, and so L^CLIP, by A's standard deviation σ_A and not L_ptx, which multiplies γ's
  weight relative to the RL term by σ_A; GRPO's "group_std" scale and REINFORCE++'s whitening rescale A the
  same way. With unscaled advantages (gae with whiten_advantages=False, dr_grpo, rloo) and an aggregation
  whose D is exact ("token_mean", "sequence_sum", "sequence_sum_constant"; not "sequence_mean" with responses
  of unequal lengths), L = (1/D)·(−Eq. 2 per episode), the bracket's expectation taken by PPO's surrogate.

  The two reductions differ by the factor L̄/D, where L̄ = N_ptx / P is the loss tokens per pretraining
  sequence, so γ_token_mean = γ_sequence_sum · L̄ / D gives the same loss (e.g. with "token_mean" aggregation,
  27.8 · 2048 / 200 ≈ 285). The paper states neither reduction (docs/paper.md §5.4).

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
    aggregation, aggregation_constant: the policy loss's reduction (`aggregate`). Static under jit.

  Returns:
    (loss, metrics). metrics: "policy_loss", "ptx_loss" (the per-token mean NLL, comparable across
    reductions), "ptx_term" (L_ptx, what γ multiplies), the ppo_policy_loss metrics, and
    "ptx_token_count", "ptx_accuracy".
  """
  if ptx_reduction not in PTX_REDUCTIONS:
    raise ValueError(f"ptx_reduction must be one of {tuple(PTX_REDUCTIONS)}, got {ptx_reduction!r}")
  reduction = {"aggregation": aggregation, "aggregation_constant": aggregation_constant}
  policy, policy_metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps, **reduction)
  ptx, ptx_metrics = lm_loss(ptx_logits, ptx_targets, ptx_mask)
  reduce = PTX_REDUCTIONS[ptx_reduction]
  term = reduce(ptx, ptx_metrics["token_count"], ptx_mask, mask, aggregation, aggregation_constant)
  metrics = {
    "policy_loss": policy,
    "ptx_loss": ptx,
    "ptx_term": term,
    **policy_metrics,
    **{f"ptx_{name}": value for name, value in ptx_metrics.items()},
  }
  return policy + ptx_coef * term, metrics
