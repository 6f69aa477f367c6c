"""RL pieces of PPO-ptx (Ouyang et al. 2022, §3.5): per-token KL rewards, GAE, whitening, KL control; and the
critic-free advantage estimators that came after it (group baselines: GRPO, Dr. GRPO, RLOO; REINFORCE++), each a
row of one table, ESTIMATORS, that a script can add its own to (register_estimator).

The environment is a bandit (one prompt, one response, one reward-model score), turned into a
per-token return by spreading the KL penalty of Eq. 2 over the response tokens (docs/paper.md §5.1).

Arrays are [B, T]: B responses, T response positions, right-padded in practice. The mask is a bool or
0/1 float array, 1 on the real response tokens; masked-out entries may hold anything (even NaN) and do
not reach any output. Every function is pure and jit-able with no Python control flow on array values.

docs/losses.md sets each function beside its equation and lists the choices the paper leaves open.
"""

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from instructgpt_jax.losses import AGGREGATIONS, masked_mean, to_float32

AxisName = str | tuple[str, ...]

# The [NID]/lm-human-preferences constant (docs/paper.md §8.1); it keeps a constant input finite, not a variance floor.
_WHITEN_EPS = 1e-8


def per_token_rewards(
  score: jax.Array,
  logprobs: jax.Array,
  ref_logprobs: jax.Array,
  mask: jax.Array,
  *,
  kl_coef: float | jax.Array,
) -> jax.Array:
  """Per-token rewards whose sum over a response is the bracket of Eq. 2 (docs/paper.md §5.1).

      r_t = −β · (log π_φ^RL(y_t | x, y_<t) − log π^SFT(y_t | x, y_<t))   for real tokens t < T_b
      r_T = −β · (log π_φ^RL(y_T | …) − log π^SFT(y_T | …)) + r_θ(x, y)    at the last real token T_b
      so Σ_t r_t = r_θ(x, y) − β · log(π_φ^RL(y|x) / π^SFT(y|x)).

  The last real token is the last position where mask is 1, so right padding and masks with holes
  both work. A row with no real token gets all-zero rewards (its score is dropped). This is
  `penalty_rewards` with k_t the log-ratio (k1); another per-token estimate k_t goes to `penalty_rewards`.

  Args:
    score: [B] r_θ(x, y), the reward model's score of each response (after the demonstration bias).
    logprobs: [B, T] log π_φ^RL of the sampled tokens (the rollout policy's, at the sampling T).
    ref_logprobs: [B, T] log π^SFT of the same tokens, same temperature.
    mask: [B, T] bool or 0/1, the real response tokens.
    kl_coef: β, a float or a scalar array (e.g. a KLControllerState's kl_coef).

  Returns:
    [B, T] float32 rewards, 0 at masked positions.
  """
  return penalty_rewards(score, to_float32(logprobs) - to_float32(ref_logprobs), mask, kl_coef=kl_coef)


def penalty_rewards(
  score: jax.Array,
  penalty: jax.Array,
  mask: jax.Array,
  *,
  kl_coef: float | jax.Array,
) -> jax.Array:
  """Per-token rewards from a per-token KL estimate k_t (losses.kl_penalty; k1 is the log-ratio of Eq. 2):

      r_t = −β · k_t   on the real tokens,   + r_θ(x, y) at the last real token T_b

  Args:
    score: [B] r_θ(x, y).
    penalty: [B, T] k_t; masked-out entries may hold anything.
    mask: [B, T] bool or 0/1, the real response tokens.
    kl_coef: β, a float or a scalar array.

  Returns:
    [B, T] float32 rewards, 0 at masked positions (a row with no real token: all zero).
  """
  keep_BxT = jnp.asarray(mask).astype(bool)
  penalty_BxT = jnp.where(keep_BxT, to_float32(penalty), 0.0)
  positions_T = jnp.arange(keep_BxT.shape[1])
  # −1 when the row is empty, which matches no position.
  last_index_B = jnp.max(jnp.where(keep_BxT, positions_T, -1), axis=1)
  is_last_BxT = positions_T[None, :] == last_index_B[:, None]
  score_BxT = jnp.where(is_last_BxT, to_float32(score)[:, None], 0.0)
  return -kl_coef * penalty_BxT + score_BxT


def gae(
  rewards: jax.Array,
  values: jax.Array,
  mask: jax.Array,
  *,
  gamma: float = 1.0,
  lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation (Schulman et al. 2016, §3), per response, backwards in t.

      δ_t = r_t + γ · V_{t+1} − V_t,      V_{T_b + 1} = 0 (the episode ends after the last real token)
      A_t = δ_t + γ · λ · A_{t+1},        A_{T_b + 1} = 0
      R_t = A_t + V_t

  Masked positions are not steps of the episode: they get A_t = R_t = 0, and the recursion passes
  over them, so t+1 means the next real token (for right padding, simply t+1). InstructGPT uses
  γ = 1 (App. C.4); λ is not reported, 0.95 follows lm-human-preferences (docs/paper.md §5.2).

  Args:
    rewards: [B, T] r_t (per_token_rewards, optionally whitened).
    values: [B, T] V_t, the critic's value of the state before token t.
    mask: [B, T] bool or 0/1, the real response tokens.
    gamma: γ, discount.
    lam: λ, the GAE bias-variance trade-off.

  Returns:
    (advantages, returns), each [B, T] float32, 0 at masked positions.
  """
  keep_BxT = jnp.asarray(mask).astype(bool)
  values_BxT = to_float32(values)

  def backward_step(carry, step):
    next_value_B, next_advantage_B = carry
    reward_B, value_B, keep_B = step
    delta_B = reward_B + gamma * next_value_B - value_B
    advantage_B = delta_B + gamma * lam * next_advantage_B
    carry = (
      jnp.where(keep_B, value_B, next_value_B),
      jnp.where(keep_B, advantage_B, next_advantage_B),
    )
    return carry, jnp.where(keep_B, advantage_B, 0.0)

  batch_size = keep_BxT.shape[0]
  zeros_B = jnp.zeros((batch_size,), values_BxT.dtype)
  # scan walks the leading axis, so feed it time-major [T, B].
  _, advantages_TxB = jax.lax.scan(
    backward_step,
    (zeros_B, zeros_B),
    (to_float32(rewards).T, values_BxT.T, keep_BxT.T),
    reverse=True,
  )
  advantages_BxT = advantages_TxB.T
  returns_BxT = jnp.where(keep_BxT, advantages_BxT + values_BxT, 0.0)
  return advantages_BxT, returns_BxT


def group_advantages(
  scores: jax.Array,
  *,
  group_size: int,
  baseline: Literal["mean", "leave_one_out"] = "mean",
  scale: Literal["group_std", "none"] = "group_std",
  eps: float = 1e-6,
) -> jax.Array:
  """Critic-free advantages of G responses sampled for the same prompt, one number per response.

  `scores` [B] holds B = prompts × G rows, each prompt's G responses consecutive. For response i of a
  group g with scores r_1..r_G:

      baseline "mean":            A_i = r_i − mean_g r                          (GRPO, Dr. GRPO)
      baseline "leave_one_out":   A_i = r_i − 1/(G−1) Σ_{j≠i} r_j = G/(G−1) · (r_i − mean_g r)
                                                                                (RLOO, Ahmadian et al. 2024)
      scale "group_std":          A_i ← A_i / (std_g r + eps),  std with ddof = 1   (GRPO, Shao et al. 2024)
      scale "none":               no division                    (Dr. GRPO, Liu et al. 2025; RLOO)

  Adding a constant to a group's scores leaves its advantages unchanged; a group whose responses all
  score the same gets zeros.

  Args:
    scores: [B] float, each response's (sequence-level) reward.
    group_size: G ≥ 2, the responses per prompt (static). B must be a multiple of G.
    baseline, scale: as above (static).
    eps: added to the standard deviation with scale "group_std".

  Returns:
    [B] float32 advantages, in the rows' order.
  """
  if group_size < 2:
    raise ValueError(
      f"group_advantages: group_size {group_size} has no baseline; it needs at least 2 responses per prompt"
    )
  if baseline not in ("mean", "leave_one_out"):
    raise ValueError(f"group_advantages: baseline {baseline!r} is not 'mean' or 'leave_one_out'")
  if scale not in ("group_std", "none"):
    raise ValueError(f"group_advantages: scale {scale!r} is not 'group_std' or 'none'")
  scores = to_float32(scores)
  if scores.shape[0] % group_size:
    raise ValueError(f"group_advantages: {scores.shape[0]} rows are not whole groups of {group_size}")
  groups_GxN = scores.reshape(-1, group_size)
  centred = groups_GxN - jnp.mean(groups_GxN, axis=1, keepdims=True)
  advantages = centred * (group_size / (group_size - 1.0)) if baseline == "leave_one_out" else centred
  if scale == "group_std":
    advantages = advantages / (jnp.std(groups_GxN, axis=1, ddof=1, keepdims=True) + eps)
  return advantages.reshape(-1)


def reinforce_pp_advantages(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """REINFORCE++ (Hu et al. 2025): per-token rewards (KL penalty in the reward, `per_token_rewards`) summed into
  returns-to-go, then whitened over every real token of the batch; no critic:

      G_t = Σ_{s ≥ t} γ^{s−t} r_s,      A_t = whiten(G)_t

  G is `gae` with V ≡ 0 and λ = 1 (then δ_t = r_t and A_t = Σ_s (γλ)^{s−t} δ_s is the return-to-go).

  Returns:
    (advantages, returns G), each [B, T] float32, 0 at masked positions.
  """
  returns, _ = gae(rewards, jnp.zeros_like(to_float32(rewards)), mask, gamma=gamma, lam=1.0)
  return whiten(returns, mask), returns


# ----------------------------------------------------------------------------------------------------
# Advantage estimators: the table ESTIMATORS, whose names ppo.advantage_estimator takes
# ----------------------------------------------------------------------------------------------------


class Estimator(NamedTuple):
  """A row of ESTIMATORS: how a scored rollout becomes per-token advantages, and what that needs.

  fn: called with keywords only, as `estimate_advantages` calls it,
        fn(score=[B], penalty=[B, T], values=[B, T], mask=[B, T], kl_coef=β, gamma=γ, lam=λ, group_size=G,
           whiten_rewards=bool, whiten_advantages=bool) -> (advantages [B, T], returns [B, T])
      float32 and 0 at masked positions; returns are the value targets (read only with needs_critic). An
      estimator names the keywords it reads and takes the rest as `**_`. kl_coef is 0 when the KL is in the
      loss (ppo.kl_in="loss") instead of the reward.
  needs_critic: PPO trains a value function (a critic, or a head with ppo.shared_trunk) whose V_t arrive as
      `values`; False: none is built or checkpointed and `values` holds zeros.
  grouped: it compares the ppo.samples_per_prompt responses sampled for one prompt (consecutive rows), so the
      config check asks for 2 or more.
  paper_aggregation: the policy loss's `losses.aggregate` mode that ppo.loss_aggregation="auto" takes.
  doc: one line: what it computes and whose it is.
  """

  fn: Callable[..., tuple[jax.Array, jax.Array]]
  needs_critic: bool
  grouped: bool
  paper_aggregation: str
  doc: str


def sequence_rewards(score: jax.Array, penalty: jax.Array, mask: jax.Array, *, kl_coef: float | jax.Array) -> jax.Array:
  """One reward per response, the bracket of Eq. 2 with the KL estimate summed: R = score − β·Σ_t k_t, [B] float32
  (masked-out k_t do not count)."""
  keep = jnp.asarray(mask).astype(bool)
  return to_float32(score) - kl_coef * jnp.sum(jnp.where(keep, to_float32(penalty), 0.0), axis=1)


def _token_rewards(score, penalty, mask, kl_coef, whiten_rewards: bool) -> jax.Array:
  rewards = penalty_rewards(score, penalty, mask, kl_coef=kl_coef)
  if whiten_rewards:  # scale only (lm-human-preferences)
    rewards = whiten(rewards, mask, shift_mean=False)
  return rewards


def gae_estimator(*, score, penalty, values, mask, kl_coef, gamma, lam, whiten_rewards, whiten_advantages, **_):
  """The paper's: r_t = penalty_rewards (−β·k_t, + score at the last token), optionally whitened (scale only); GAE
  on the critic's `values`; advantages whitened over the whole batch with `whiten_advantages` (docs/paper.md §8.5)."""
  advantages, returns = gae(
    _token_rewards(score, penalty, mask, kl_coef, whiten_rewards), values, mask, gamma=gamma, lam=lam
  )
  if whiten_advantages:
    advantages = whiten(advantages, mask)
  return advantages, returns


def reinforce_pp_estimator(*, score, penalty, mask, kl_coef, gamma, whiten_rewards, **_):
  """The same r_t as gae_estimator; A = the whitened returns-to-go (`reinforce_pp_advantages`), returns G."""
  return reinforce_pp_advantages(_token_rewards(score, penalty, mask, kl_coef, whiten_rewards), mask, gamma=gamma)


def group_estimator(baseline: str, scale: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """An estimator that compares the responses to one prompt: R = `sequence_rewards`, `group_advantages` with
  (baseline, scale) over groups of `group_size` rows, A_t = A on every real token of the response; returns zeros."""

  def estimate(*, score, penalty, mask, kl_coef, group_size, **_):
    keep = jnp.asarray(mask).astype(bool)
    reward = sequence_rewards(score, penalty, keep, kl_coef=kl_coef)
    advantage = group_advantages(reward, group_size=group_size, baseline=baseline, scale=scale)
    return jnp.where(keep, advantage[:, None], 0.0), jnp.zeros(keep.shape, jnp.float32)

  return estimate


# The built-in group estimators' (baseline, scale) of group_advantages.
GROUP_ESTIMATORS = {"grpo": ("mean", "group_std"), "dr_grpo": ("mean", "none"), "rloo": ("leave_one_out", "none")}

# name -> Estimator: the advantage estimators PPO can train with (ppo.advantage_estimator). estimate_advantages, the
# PPO config check, the choice of value function (ppo_steps.Models.build, the AOT plan) and
# ppo.loss_aggregation="auto" read it at call time, so a row added from a script is an option like these:
#     rl.register_estimator("mine", fn, needs_critic=False)    (docs/ppo.md, "Your own estimator").
# paper_aggregation is how the estimator's paper reduces the per-token policy loss; docs/losses.md, "Loss
# aggregation", gives the equations and where a paper is not explicit.
ESTIMATORS: dict[str, Estimator] = OrderedDict(
  gae=Estimator(
    gae_estimator,
    needs_critic=True,
    grouped=False,
    # InstructGPT does not state its reduction (docs/paper.md §5.4): this code's reading.
    paper_aggregation="token_mean",
    doc="GAE on a learned critic, the KL in the reward (InstructGPT, App. C.4; Schulman et al. 2016)",
  ),
  reinforce_pp=Estimator(
    reinforce_pp_estimator,
    needs_critic=False,
    grouped=False,
    # Hu et al. 2025 write PPO's clipped objective over tokens with no reduction: PPO's.
    paper_aggregation="token_mean",
    doc="whitened returns-to-go of the per-token rewards, no critic (REINFORCE++, Hu et al. 2025)",
  ),
  grpo=Estimator(
    group_estimator(*GROUP_ESTIMATORS["grpo"]),
    needs_critic=False,
    grouped=True,
    paper_aggregation="sequence_mean",  # Shao et al. 2024, Eq. 3: (1/G) Σ_i (1/|o_i|) Σ_t
    doc="(R − group mean) / group std (GRPO, Shao et al. 2024)",
  ),
  dr_grpo=Estimator(
    group_estimator(*GROUP_ESTIMATORS["dr_grpo"]),
    needs_critic=False,
    grouped=True,
    paper_aggregation="sequence_sum_constant",  # Liu et al. 2025: Σ_t over the response, / a constant (the budget)
    doc="R − group mean, unscaled (Dr. GRPO, Liu et al. 2025)",
  ),
  rloo=Estimator(
    group_estimator(*GROUP_ESTIMATORS["rloo"]),
    needs_critic=False,
    grouped=True,
    # Ahmadian et al. 2024: the response is one action, log π(y|x) = Σ_t log π(y_t|·).
    paper_aggregation="sequence_sum",
    doc="R − the mean of the group's other responses (RLOO, Ahmadian et al. 2024)",
  ),
)


def register_estimator(
  name: str,
  fn: Callable[..., tuple[jax.Array, jax.Array]],
  *,
  needs_critic: bool,
  grouped: bool = False,
  paper_aggregation: str = "token_mean",
  doc: str = "",
) -> Estimator:
  """Adds an estimator to ESTIMATORS (see Estimator for fn's keywords) and returns its row; from then on
  `--config.ppo.advantage_estimator=<name>` trains with it. `del rl.ESTIMATORS[name]` takes it out again."""
  if name in ESTIMATORS:
    raise ValueError(f"register_estimator: {name!r} is already an estimator; `del rl.ESTIMATORS[{name!r}]` first")
  if paper_aggregation not in AGGREGATIONS:
    raise ValueError(f"register_estimator: paper_aggregation {paper_aggregation!r} is not one of {tuple(AGGREGATIONS)}")
  ESTIMATORS[name] = Estimator(fn, needs_critic, grouped, paper_aggregation, doc)
  return ESTIMATORS[name]


class _Column(Mapping):
  """One field of ESTIMATORS by name, read when it is looked up (so a registered row is in it too)."""

  def __init__(self, field: str):
    self._field = field

  def __getitem__(self, name: str):
    return getattr(ESTIMATORS[name], self._field)

  def __iter__(self):
    return iter(ESTIMATORS)

  def __len__(self) -> int:
    return len(ESTIMATORS)

  def __repr__(self) -> str:
    return repr(dict(self))


PAPER_AGGREGATIONS: Mapping[str, str] = _Column("paper_aggregation")  # name -> ESTIMATORS[name].paper_aggregation


def _row(estimator: str) -> Estimator:
  if estimator not in ESTIMATORS:
    raise ValueError(f"advantage estimator {estimator!r} is not one of {tuple(ESTIMATORS)}")
  return ESTIMATORS[estimator]


def loss_aggregation(estimator: str, setting: str) -> str:
  """The policy loss's `losses.aggregate` mode: `setting`, or for "auto" the estimator's paper's
  (ESTIMATORS[estimator].paper_aggregation)."""
  if setting != "auto":
    return setting
  if estimator not in ESTIMATORS:
    raise ValueError(f"loss_aggregation: 'auto' knows no aggregation for estimator {estimator!r}")
  return ESTIMATORS[estimator].paper_aggregation


def needs_critic(estimator: str) -> bool:
  """Whether the estimator trains with a value function (ESTIMATORS[estimator].needs_critic)."""
  return _row(estimator).needs_critic


def is_grouped(estimator: str) -> bool:
  """Whether the estimator compares the responses sampled for one prompt (ESTIMATORS[estimator].grouped)."""
  return _row(estimator).grouped


def estimate_advantages(
  estimator: str,
  score: jax.Array,
  penalty: jax.Array,
  values: jax.Array,
  mask: jax.Array,
  *,
  kl_coef: float | jax.Array,
  gamma: float = 1.0,
  lam: float = 0.95,
  group_size: int = 1,
  whiten_rewards: bool = False,
  whiten_advantages: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Per-token advantages and returns of a scored rollout, by `estimator` (static), a name of ESTIMATORS:

      "gae"            r_t = penalty_rewards (−β·k_t, + score at the last token), optionally whitened
                       (`whiten_rewards`, scale only); GAE on the critic's `values`; advantages whitened over
                       the batch with `whiten_advantages` (the paper's method, docs/paper.md §5)
      "reinforce_pp"   the same r_t; A = whitened returns-to-go (`reinforce_pp_advantages`); `values` unused
      "grpo", "dr_grpo", "rloo"
                       one reward per response, R = score − β·Σ_t k_t (`sequence_rewards`), compared within its
                       group of `group_size` responses to one prompt (`group_advantages`); A_t = A for every
                       real token of the response; `values` unused
      a registered name  its Estimator.fn, called with these same arguments as keywords

  Args:
    score: [B] the RM's score of each response (bias removed).
    penalty: [B, T] the per-token KL estimate k_t (losses.kl_penalty); kl_coef β multiplies it (0: the KL
      is not in the reward).
    values: [B, T] the value function's V_t (read by the estimators with needs_critic; zeros otherwise).
    mask: [B, T] the real response tokens.

  Returns:
    (advantages, returns), [B, T] float32, 0 at masked positions; returns are the value targets (zeros for
    the group estimators, the returns-to-go for "reinforce_pp").
  """
  return _row(estimator).fn(
    score=score,
    penalty=penalty,
    values=values,
    mask=mask,
    kl_coef=kl_coef,
    gamma=gamma,
    lam=lam,
    group_size=group_size,
    whiten_rewards=whiten_rewards,
    whiten_advantages=whiten_advantages,
  )


def _sum_over_devices(x: jax.Array, axis_name: AxisName | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def whiten(
  x: jax.Array,
  mask: jax.Array,
  *,
  shift_mean: bool = True,
  axis_name: AxisName | None = None,
) -> jax.Array:
  """Masked whitening with population statistics (docs/paper.md §8.1).

      μ = Σ m·x / Σ m,   σ² = Σ m·(x − μ)² / Σ m   (ddof 0, as TF1 and jnp.var)
      whiten(x) = (x − μ) · rsqrt(σ² + 1e-8)        (+ μ when shift_mean=False)

  μ and σ² are over every real token of the batch. Under jax.jit with sharded inputs the sums are
  already global. Inside shard_map or pmap, where each device sees only its shard, pass the mapped
  axis name(s): the sums and counts are then psum-ed, so every device uses the global μ and σ².

  Args:
    x: [B, T] (any shape works) values to whiten, e.g. advantages (shift_mean=True) or rewards
      (shift_mean=False, the lm-human-preferences reward whitening).
    mask: same shape as x, bool or 0/1.
    shift_mean: False adds μ back, keeping the mean and rescaling only. Static under jit.
    axis_name: mapped axis name(s) to take the statistics across, or None.

  Returns:
    float32 array shaped like x, 0 at masked positions.
  """
  keep = jnp.asarray(mask).astype(bool)
  x = to_float32(x)
  count = jnp.maximum(_sum_over_devices(jnp.sum(keep).astype(x.dtype), axis_name), 1.0)
  mean = _sum_over_devices(jnp.sum(jnp.where(keep, x, 0.0)), axis_name) / count
  # Two passes (mean, then squared deviations) avoid the cancellation of E[x²] − E[x]².
  squared_deviation = jnp.where(keep, jnp.square(x - mean), 0.0)
  variance = _sum_over_devices(jnp.sum(squared_deviation), axis_name) / count
  whitened = (x - mean) * jax.lax.rsqrt(variance + _WHITEN_EPS)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(keep, whitened, 0.0)


class KLControllerState(NamedTuple):
  """β of Eq. 2. A NamedTuple is a pytree, so the state lives in the train state and its checkpoint."""

  kl_coef: jax.Array


def kl_controller_init(kl_coef: float) -> KLControllerState:
  """β₀ as a float32 scalar state (InstructGPT: β = 0.02, fixed)."""
  return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


def fixed_kl_update(state: KLControllerState, kl: jax.Array, n_steps: int | jax.Array) -> KLControllerState:
  """The paper's controller: β stays fixed (App. C.4). Same signature as adaptive_kl_update.

  Args:
    state: current β.
    kl: ignored (kept so the two controllers are interchangeable).
    n_steps: ignored.
  """
  del kl, n_steps
  return state


def adaptive_kl_update(
  state: KLControllerState,
  kl: jax.Array,
  n_steps: int | jax.Array,
  *,
  target: float,
  horizon: float,
) -> KLControllerState:
  """Proportional β controller of Ziegler et al. 2019 (lm-human-preferences; docs/paper.md §8 row 12, §8.4).

      e = clip(KL / KL_target − 1, −0.2, 0.2)
      β ← β · (1 + e · n / horizon)

  Worked example (docs/paper.md §8.4): β = 0.15, target 6, horizon 10,000, KL = 9.0, n = 512 → 0.151536.

  Args:
    state: current β.
    kl: scalar, the measured KL: the batch mean over responses of Σ_t (log π_φ − log π^SFT).
    n_steps: n, the number of episodes in this update (the rollout batch, 512 in InstructGPT).
    target: KL_target (nats per response).
    horizon: the number of episodes over which a constant error would change β by a factor ~e^e.

  Returns:
    The new state.
  """
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return state._replace(kl_coef=state.kl_coef * (1.0 + error * n_steps / horizon))


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """How much of the returns' variance the value function explains, over the real tokens:

      EV = 1 − Var_m[R − V] / Var_m[R],   Var_m[x] = mean_m[(x − mean_m[x])²]

  1 is a perfect critic, 0 one that predicts the mean, below 0 worse than that (Var[R] floored at 1e-8).
  """

  def var(x):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def best_of_n_kl(n: int) -> float:
  """The KL of best-of-n sampling to the policy it samples from, as Stiennon et al. (2020, App. G.3) and Gao
  et al. (2022, §2) give it: log n − (n − 1)/n nats, whatever the reward. Beirami et al. (2024) show it is an
  upper bound on the actual KL(π_bon ‖ π). n = 1: 0."""
  if n < 1:
    raise ValueError(f"best_of_n_kl: n {n} must be at least 1")
  return math.log(n) - (n - 1) / n
