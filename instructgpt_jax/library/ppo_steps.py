"""PPO-ptx's pieces (docs/paper.md §5, docs/ppo.md), module-level and pure: `stages/ppo.py` loops over them
and `aot.py` compiles the same ones.

    models = Models.build(config.ppo, ...)         the graphdefs and settings, fixed at setup
    abstract, shardings = abstract_state(models)   the checkpointed state, nothing allocated
    steps = jit_steps(models, shardings)           sample, score, train: one jitted program each

`score_rollout` turns a rollout into what training needs (old log-probs, values, rewards, GAE advantages)
and `minibatch_step` is one optimizer step of the clipped policy loss (+ ptx) and the value loss. Both
take the `Models` description as their first argument; `jit_steps` binds it and places them on the mesh.
The value function is chosen once, in `Models.build`: a separate critic (a scalar-head model with its own
optimizer, initialized from the RM), with `ppo.shared_trunk` a value head on the policy's own trunk, or none
at all for the critic-free advantage estimators (`ppo.advantage_estimator`, `rl.estimate_advantages`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from instructgpt_jax import generation, losses, models, rl, scoring, sharding, train_state
from instructgpt_jax.library import lm_steps, loop
from instructgpt_jax.models import lora

KL_CONTROLLERS = ("fixed", "adaptive")
KL_PLACES = ("reward", "loss")  # β·KL per token in the reward (Eq. 2), or β·k3 in the policy's loss (GRPO)
# ppo.kl_estimator, ppo.ptx_reduction, ppo.advantage_estimator and ppo.loss_aggregation name rows of the tables
# beside their math (losses.KL_ESTIMATORS, losses.PTX_REDUCTIONS, rl.ESTIMATORS, losses.AGGREGATIONS), which the
# config check reads when it runs. ppo.loss_aggregation also takes "auto": the estimator's paper_aggregation.
ROLLOUT_LAYOUTS = ("auto", "train", "decode")  # `rollout_layout`


@struct.dataclass
class PPOState:
  """Everything an iteration changes, checkpointed whole: step = iterations done."""

  step: jax.Array
  policy: train_state.TrainState  # with ppo.shared_trunk its params are {"lm": ..., "value_head": ...}
  critic: train_state.TrainState | None  # None with ppo.shared_trunk or a critic-free estimator
  kl: rl.KLControllerState


@struct.dataclass
class Scored:
  """A scored rollout, [B, R] unless noted; what the minibatch steps train on."""

  prompt_tokens: jax.Array  # [B, P]
  prompt_segment_ids: jax.Array  # [B, P]
  tokens: jax.Array
  mask: jax.Array
  old_logprobs: jax.Array
  ref_logprobs: jax.Array | None  # with ppo.kl_in="loss"
  old_values: jax.Array | None  # None without a value function

  advantages: jax.Array
  returns: jax.Array | None  # None without a value function


@dataclasses.dataclass(frozen=True)
class Models:
  """A PPO run's models and settings, fixed at setup; the steps read everything static from here.

  ppo: the config's ppo section. policy, reference, reward: graphdefs (language models and the RM);
  value_kind: "critic" (a separate scalar-head model), "head" (ppo.shared_trunk: a value head in the policy's
  params next to the language model) or "none" (a critic-free estimator); value: its graphdef (None for
  "none"). targets: abstract params carrying their shardings, per
  model ("policy" is the trainable tree, value head included). reward_bias: the RM's normalization bias.
  rollout_target: with the decode layout (`ppo.rollout_layout`, `sharding.DECODE_RULES`), the policy's
  params in that layout, which the sampler reshards them into once per rollout; None: sample in the
  training layout.
  """

  ppo: ml_collections.FrozenConfigDict
  policy: Any
  reference: Any
  reward: Any
  value_kind: str
  value: Any
  targets: dict[str, Any]
  settings: generation.SamplingSettings
  reward_bias: float
  policy_tx: optax.GradientTransformation
  policy_lr: optax.Schedule
  critic_tx: optax.GradientTransformation | None
  score_rows: int  # rows per scoring pass of the policy (`in_chunks`)
  mesh: Any
  rules: Any
  rollout_target: Any = None

  @property
  def rollout_rules(self):
    """The rules that lay out the rollout's activations and KV cache."""
    return self.rules if self.rollout_target is None else sharding.rules_dict(sharding.DECODE_RULES)

  @property
  def shared_trunk(self) -> bool:
    return self.value_kind == "head"

  @property
  def has_critic(self) -> bool:
    return self.value_kind == "critic"

  def lm(self, params):
    """The language model inside the policy's params (all of them without a shared value head)."""
    return params["lm"] if self.shared_trunk else params

  @classmethod
  def build(
    cls,
    ppo,
    *,
    policy_cfg,
    reference_cfg,
    reward_cfg,
    critic_cfg,
    reward_bias: float,
    eos_id: int,
    pad_id: int,
    policy_tx,
    policy_lr,
    critic_tx,
    mesh,
    rules,
  ) -> Models:
    """Graphdefs and sharded abstract params of every model; `critic_cfg`/`critic_tx` are used only with a
    separate critic (a critic-based estimator without ppo.shared_trunk). `reference_cfg` None: a LoRA policy's
    reference is its own base (`reference_params`), targets["reference"] None."""
    policy, lm_target = train_state.param_shardings_for(policy_cfg, mesh, rules)
    if reference_cfg is None:  # LoRA: the reference is the policy's base, its adapters off (no second copy)
      reference = models.abstract(dataclasses.replace(policy_cfg, lora=models.LoraConfig()))[0]
      reference_target = None
    else:
      reference, reference_target = train_state.param_shardings_for(reference_cfg, mesh, rules)
    reward, reward_target = train_state.param_shardings_for(reward_cfg, mesh, rules, kind="scalar")
    targets = {"policy": lm_target, "reference": reference_target, "reward": reward_target}
    value_kind = "critic" if rl.needs_critic(ppo.advantage_estimator) else "none"
    value_kind = "head" if value_kind == "critic" and ppo.shared_trunk else value_kind
    value = None
    if value_kind == "head":
      value, head_target = _value_head_target(policy_cfg, mesh, rules)
      targets["policy"] = {"lm": lm_target, "value_head": head_target}
    elif value_kind == "critic":
      value, targets["critic"] = train_state.param_shardings_for(critic_cfg, mesh, rules, kind="scalar")
    critic_tx = critic_tx if value_kind == "critic" else None
    settings = generation.SamplingSettings(eos_id=eos_id, pad_id=pad_id, temperature=ppo.temperature)
    # The policy scores its rollout in passes of `minibatch` rows in low precision (docs/ppo.md, "bfloat16
    # parity"), of the whole rollout in float32.
    score_rows = ppo.rollout_batch if jnp.dtype(policy_cfg.dtype) == jnp.float32 else ppo.minibatch
    rollout_target = None
    if rollout_layout(ppo.rollout_layout, mesh, policy_cfg) == "decode":
      # The embeddings stay whole where fsdp × tensor does not divide the vocabulary (50257 for GPT-2/3).
      rollout_target = train_state.param_shardings_for(policy_cfg, mesh, sharding.DECODE_RULES, check=False)[1]
    return cls(
      ppo=ml_collections.FrozenConfigDict(ppo),
      policy=policy,
      reference=reference,
      reward=reward,
      value_kind=value_kind,
      value=value,
      targets=targets,
      settings=settings,
      reward_bias=float(reward_bias),
      policy_tx=policy_tx,
      policy_lr=policy_lr,
      critic_tx=critic_tx,
      score_rows=score_rows,
      mesh=mesh,
      rules=rules,
      rollout_target=rollout_target,
    )


def ptx_rows(ppo) -> int:
  """Pretraining rows per minibatch step: ptx_per_episode × minibatch sequences (8 per episode, docs/paper.md
  §5.2), at least one."""
  return max(ppo.ptx_per_episode * ppo.minibatch, 1)


def rollout_layout(layout: str, mesh, policy_cfg) -> str:
  """The layout ("train" or "decode") that `ppo.rollout_layout` names. "auto" is "decode" where the mesh splits
  weights over fsdp (FSDP gathers them for the rollout) and the decode layout can split the KV cache as far:
  the policy's kv heads divide over fsdp × tensor (`decode_layout_error`); else "train" (without fsdp the
  layouts differ only in the batch)."""
  if layout != "auto":
    return layout
  return "decode" if mesh.shape["fsdp"] > 1 and not decode_layout_error(mesh, policy_cfg) else "train"


def decode_layout_error(mesh, policy_cfg) -> str:
  """Why the decode layout does not fit this mesh and model, in one line; "" where it does. It splits the KV
  cache over kv heads only (its rows are split over data alone), so a kv-head count that fsdp × tensor does
  not divide would leave the cache whole on those devices."""
  split = mesh.shape["fsdp"] * mesh.shape["tensor"]
  if policy_cfg.kv_heads % split == 0:
    return ""
  return (
    f"ppo.rollout_layout: 'decode' splits the KV cache's {policy_cfg.kv_heads} kv heads over fsdp × tensor = "
    f"{split}, which does not divide them; use 'train' or a mesh whose fsdp × tensor divides them"
  )


def _value_head_target(cfg, mesh, rules):
  """(graphdef, abstract params with shardings) of a value head for the policy's own trunk (shared_trunk)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.ScalarHead(cfg.d_model, rngs=nnx.Rngs(0))))
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  shardings = sharding.tree_shardings(shapes, sharding.logical_axes(state), mesh, rules)
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_value_head(cfg, target, key):
  """A fresh value head, N(0, 1/sqrt(d + 1)) like the RM's head (docs/paper.md §4.3), in `target`'s shardings."""
  shardings = jax.tree.map(lambda t: t.sharding, target)
  init = lambda k: nnx.to_pure_dict(nnx.split(models.ScalarHead(cfg.d_model, rngs=nnx.Rngs(params=k)))[1])  # noqa: E731
  return jax.jit(init, out_shardings=shardings)(key)


def abstract_state(m: Models) -> tuple[PPOState, PPOState]:
  """(the abstract PPOState carrying shardings, its shardings): the restore target; nothing allocated."""
  policy, policy_sh = train_state.abstract_state_for(m.targets["policy"], m.policy_tx, m.mesh, ema=True)
  critic = critic_sh = None
  if m.has_critic:
    critic, critic_sh = train_state.abstract_state_for(m.targets["critic"], m.critic_tx, m.mesh)
  replicated = train_state.replicated(m.mesh)
  shardings = PPOState(step=replicated, policy=policy_sh, critic=critic_sh, kl=rl.KLControllerState(replicated))
  abstract = PPOState(
    step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    policy=policy,
    critic=critic,
    kl=rl.KLControllerState(jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)),
  )
  return abstract, shardings


def initial_state(m: Models, shardings: PPOState, policy_params, critic_params, policy_key, critic_key) -> PPOState:
  """Iteration 0: the policy (with its EMA) and the critic around their first params, β = ppo.kl_coef; the
  keys become their TrainStates' RNG keys."""
  policy = train_state.create_from_params(policy_params, m.policy_tx, policy_key, shardings.policy, ema=True)
  critic = None
  if m.has_critic:
    critic = train_state.create_from_params(critic_params, m.critic_tx, critic_key, shardings.critic)
  replicated = train_state.replicated(m.mesh)
  kl = jax.device_put(rl.kl_controller_init(m.ppo.kl_coef), replicated)
  return PPOState(step=jax.device_put(jnp.int32(0), replicated), policy=policy, critic=critic, kl=kl)


def head_values(head_graphdef, head_params, hidden, mask):
  """Values [B, R] of the shared trunk's value head on the policy's response hidden states, 0 off the mask."""
  values = nnx.merge(head_graphdef, head_params)(hidden)
  return sharding.constrain(jnp.where(mask > 0, values, 0.0), ("batch", "length"))


def in_chunks(fn, rows: int, *xs):
  """fn over the leading axis of xs in chunks of `rows` (one compiled body under lax.map), outputs rejoined:
  fn sees the shapes it sees on a minibatch of `rows`. A whole batch when it has `rows` rows or fewer."""
  batch = xs[0].shape[0]
  if batch <= rows:
    return fn(*xs)
  # Chunk c holds rows c, c + n, c + 2n, ... (n chunks): each chunk spans the batch-sharded axis the way a
  # minibatch does, so every device computes rows / devices of each chunk.
  chunked = [jnp.swapaxes(x.reshape(rows, batch // rows, *x.shape[1:]), 0, 1) for x in xs]
  out = jax.lax.map(lambda args: fn(*args), chunked)
  return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(batch, *y.shape[2:]), out)


def _policy_pass(m: Models, params, prompt_tokens, prompt_segments, tokens, mask, *, with_entropy: bool):
  """(log-probs, entropies or None, values or None) of the policy on a response; values from the shared
  trunk's value head (None with a separate critic)."""
  model, hidden = scoring.response_hidden(m.policy, m.lm(params), prompt_tokens, prompt_segments, tokens, mask)
  out = scoring.logprobs_from_hidden(
    model, hidden, tokens, mask, temperature=m.ppo.temperature, with_entropy=with_entropy
  )
  logprobs, entropy = out if with_entropy else (out, None)
  values = head_values(m.value, params["value_head"], hidden, mask) if m.shared_trunk else None
  return logprobs, entropy, values


def reference_params(m: Models, policy_params, ref_params):
  """The reference's params: `ref_params`, or with None (a LoRA policy and no ppo.reference) the policy's
  base, the same arrays with the adapters dropped (lora.without_adapters), run with the rank-0 graphdef."""
  return lora.without_adapters(m.lm(policy_params)) if ref_params is None else ref_params


def score_rollout(
  m: Models, policy_params, critic_params, ref_params, rm_params, kl_coef, prompt_tokens, prompt_segments, rollout
):
  """Everything one rollout needs before training (docs/paper.md §5.4 steps 2-5): a Scored batch and its metrics."""
  p = m.ppo
  seq = (prompt_tokens, prompt_segments, rollout.tokens, rollout.mask)
  mask = rollout.mask
  # π_old at the minibatch's shape: the training forward recomputes these log-probs on `minibatch` rows, and
  # in bfloat16 a forward at another batch shape (another partition of the mesh, other kernels) rounds
  # differently, by up to 0.2 in a log-prob on SmolLM2 (docs/ppo.md, "bfloat16 parity"). In float32 the
  # shapes agree to ~1e-6 and the whole rollout is one pass.
  pass_fn = lambda *seq: _policy_pass(m, policy_params, *seq, with_entropy=True)  # noqa: E731
  old_logprobs, entropy, values = in_chunks(pass_fn, m.score_rows, *seq)
  ref_params = reference_params(m, policy_params, ref_params)
  ref_logprobs = scoring.response_logprobs(m.reference, ref_params, *seq, temperature=p.temperature)
  if m.has_critic:
    values, _ = scoring.response_values(m.value, critic_params, *seq)
  elif values is None:  # critic-free
    values = jnp.zeros_like(old_logprobs)
  _, raw_score = scoring.response_values(m.reward, rm_params, *seq)
  score = raw_score - m.reward_bias
  ended = jnp.any((rollout.tokens == m.settings.eos_id) & (mask > 0), axis=1)
  if p.missing_eos_penalty:  # the "EOS trick" (docs/paper.md §8 row 6): a fixed score for responses that never stop
    score = jnp.where(ended, score, p.missing_eos_penalty)
  # The per-token penalty k_t; with k1 it is the paper's log-ratio (docs/paper.md §5.1). In the reward it is
  # −β·k_t; with ppo.kl_in="loss" the reward holds the score alone and minibatch_step adds β·k3.
  penalty = losses.kl_penalty(old_logprobs, ref_logprobs, estimator=p.kl_estimator)
  advantages, returns = rl.estimate_advantages(
    p.advantage_estimator,
    score,
    penalty,
    values,
    mask,
    kl_coef=kl_coef if p.kl_in == "reward" else 0.0,
    gamma=p.gamma,
    lam=p.lam,
    group_size=p.samples_per_prompt,
    whiten_rewards=p.whiten_rewards,
    whiten_advantages=p.whiten_advantages,
  )
  log_ratio = old_logprobs - ref_logprobs
  metrics = {
    "score": jnp.mean(score),
    "raw_score": jnp.mean(raw_score),
    "kl": jnp.mean(jnp.sum(jnp.where(mask > 0, log_ratio, 0.0), axis=1)),  # k1 summed over the response
    "kl_k3": jnp.mean(jnp.sum(losses.kl_penalty(old_logprobs, ref_logprobs, estimator="k3") * mask, axis=1)),
    "entropy": losses.masked_mean(entropy, mask),
    "response_length": jnp.mean(jnp.sum(mask, axis=1)),
    "ended_with_eos": jnp.mean(ended),
    # The sampler's log-probs against the teacher-forced ones: numerical drift only (docs/paper.md §9 item 8).
    "logprob_gap": jnp.max(jnp.abs(jnp.where(mask > 0, rollout.logprobs - old_logprobs, 0.0))),
    "kl_coef": kl_coef,
  }
  if m.value_kind != "none":
    metrics["value_mean"] = losses.masked_mean(values, mask)
    metrics["explained_variance"] = rl.explained_variance(values, returns, mask)
  # Only what the minibatch step reads (jit drops unused arguments, so the AOT plan counts exactly these).
  critic_free = m.value_kind == "none"
  scored = Scored(
    prompt_tokens,
    prompt_segments,
    rollout.tokens,
    mask,
    old_logprobs,
    ref_logprobs if p.kl_in == "loss" else None,
    None if critic_free else values,
    advantages,
    None if critic_free else returns,
  )
  scored = jax.tree.map(lambda x: sharding.constrain(x, ("batch",)), scored)  # as the minibatch step takes it
  return scored, metrics


def policy_loss_aggregation(ppo) -> tuple[str, int | None]:
  """(mode, constant) of `losses.aggregate` for the policy loss: ppo.loss_aggregation, "auto" being the
  advantage estimator's paper's (rl.PAPER_AGGREGATIONS); the constant of "sequence_sum_constant" (Dr. GRPO)
  is the generation budget, ppo.max_new_tokens."""
  mode = rl.loss_aggregation(ppo.advantage_estimator, ppo.loss_aggregation)
  return mode, (ppo.max_new_tokens if losses.AGGREGATIONS[mode].takes_constant else None)


def _policy_objective(m: Models, mb: Scored, lm_params, logprobs, ptx_batch, kl_coef):
  """The clipped policy loss, plus γ · L_ptx of the pretraining minibatch (PPO-ptx, Eq. 2; ppo.ptx_reduction), plus
  β · the k3 estimate of KL(π ‖ π_ref) with ppo.kl_in="loss" (GRPO's form: inside the same reduction as the
  clipped loss, Shao et al. 2024, Eq. 3). Both per-token terms are reduced by `policy_loss_aggregation`."""
  p = m.ppo
  mode, constant = policy_loss_aggregation(p)
  loss, metrics = _clipped_and_ptx(m, mb, lm_params, logprobs, ptx_batch, mode, constant)
  if p.kl_in == "loss":
    kl = losses.aggregate(
      losses.kl_penalty(logprobs, mb.ref_logprobs, estimator="k3"), mb.mask, mode, constant=constant
    )
    loss, metrics = loss + kl_coef * kl, dict(metrics, kl_loss=kl)
  return loss, metrics


def _clipped_and_ptx(m: Models, mb: Scored, lm_params, logprobs, ptx_batch, mode: str, constant):
  p = m.ppo
  aggregation = {"aggregation": mode, "aggregation_constant": constant}
  if not p.ptx_coef:  # the loss is the clipped policy loss alone, logged under the name PPO-ptx gives it too
    loss, metrics = losses.ppo_policy_loss(
      logprobs, mb.old_logprobs, mb.advantages, mb.mask, clip_eps=p.clip, **aggregation
    )
    return loss, dict(metrics, policy_loss=loss)
  ptx_logits = lm_steps.forward_logits(m.policy, lm_params, ptx_batch)
  return losses.ppo_ptx_loss(
    logprobs,
    mb.old_logprobs,
    mb.advantages,
    mb.mask,
    ptx_logits,
    ptx_batch["targets"],
    ptx_batch["mask"],
    clip_eps=p.clip,
    ptx_coef=p.ptx_coef,
    ptx_reduction=p.ptx_reduction,
    **aggregation,
  )


def minibatch_step(m: Models, state: PPOState, scored: Scored, rows: jax.Array, ptx_batch):
  """One minibatch (rows of `scored`) -> (state, metrics): the clipped policy loss (+ γ · L_ptx of `ptx_batch`
  when ppo.ptx_coef, losses.ppo_ptx_loss), the clipped value loss, Adam and the policy's EMA. A separate critic
  trains with its own optimizer; a shared trunk minimizes policy + vf_coef · value with the policy's."""
  p = m.ppo
  mb = jax.tree.map(lambda x: sharding.constrain(jnp.take(x, rows, axis=0), ("batch",)), scored)
  seq = (mb.prompt_tokens, mb.prompt_segment_ids, mb.tokens, mb.mask)

  def value_objective(values):
    return losses.value_loss(values, mb.old_values, mb.returns, mb.mask, clip_eps=p.value_clip)

  if m.shared_trunk:  # one forward pass, one loss: policy (+ ptx) + vf_coef · value, one optimizer

    def shared_loss(params):
      logprobs, _, values = _policy_pass(m, params, *seq, with_entropy=False)
      loss, policy_metrics = _policy_objective(m, mb, params["lm"], logprobs, ptx_batch, state.kl.kl_coef)
      vf_loss, value_metrics = value_objective(values)
      return loss + p.vf_coef * vf_loss, (loss, policy_metrics, vf_loss, value_metrics)

    grad_fn, train = train_state.trainable_grad(shared_loss, state.policy.params)
    (_, (loss, policy_metrics, vf_loss, value_metrics)), policy_grads = grad_fn(train)
    critic, critic_grads = None, policy_grads["value_head"]
  else:

    def policy_loss(params):
      logprobs = scoring.response_logprobs(m.policy, params, *seq, temperature=p.temperature)
      return _policy_objective(m, mb, params, logprobs, ptx_batch, state.kl.kl_coef)

    grad_fn, train = train_state.trainable_grad(policy_loss, state.policy.params)
    (loss, policy_metrics), policy_grads = grad_fn(train)
    critic = None
    if m.has_critic:

      def value_loss(params):
        return value_objective(scoring.response_values(m.value, params, *seq)[0])

      grad_fn, train = train_state.trainable_grad(value_loss, state.critic.params)
      (vf_loss, value_metrics), critic_grads = grad_fn(train)
      critic = state.critic.apply_gradients(critic_grads, m.critic_tx)
  policy = state.policy.apply_gradients(policy_grads, m.policy_tx, ema_decay=p.ema_decay)
  metrics = {"loss": loss, **policy_metrics}
  if m.value_kind != "none":
    metrics.update(
      value_loss=vf_loss, value_clip_frac=value_metrics["clip_frac"], value_grad_norm=optax.tree.norm(critic_grads)
    )
  metrics.update(policy_grad_norm=optax.tree.norm(policy_grads), lr=m.policy_lr(state.policy.step))
  return state.replace(policy=policy, critic=critic), metrics


def kl_update(m: Models, kl_state: rl.KLControllerState, kl_value) -> rl.KLControllerState:
  """The KL controller after an iteration (fixed β by default, docs/paper.md §5.1; adaptive: Ziegler et al.)."""
  p = m.ppo
  if p.kl_controller == "adaptive":
    return rl.adaptive_kl_update(kl_state, kl_value, p.rollout_batch, target=p.kl_target, horizon=p.kl_horizon)
  return rl.fixed_kl_update(kl_state, kl_value, p.rollout_batch)


class Steps(NamedTuple):
  """The three jitted programs of an iteration."""

  sample: generation.Sampler  # (policy lm params, prompts, segment ids, key, max_new_tokens) -> Rollout
  score: Any  # score_rollout with the models bound
  train: Any  # minibatch_step with the models bound; donates the state


def jit_steps(m: Models, shardings: PPOState) -> Steps:
  """The rollout sampler, `score_rollout` and `minibatch_step` jitted onto the models' mesh."""
  p = m.ppo
  layout = None if m.rollout_target is None else jax.tree.map(lambda t: t.sharding, m.rollout_target)
  sampler = generation.Sampler(
    m.policy,
    m.settings,
    response_buckets=(p.max_new_tokens,),
    mesh=m.mesh,
    rules=m.rollout_rules,
    param_shardings=layout,
  )
  score = sharding.jit_on_mesh(functools.partial(score_rollout, m), mesh=m.mesh, rules=m.rules)
  replicated = train_state.replicated(m.mesh)
  batch = loop.batch_sharding(m.mesh, m.rules)
  train = jax.jit(
    sharding.traced_with_rules(functools.partial(minibatch_step, m), m.mesh, m.rules),
    in_shardings=(shardings, batch, replicated, batch),
    out_shardings=(shardings, replicated),
    donate_argnums=(0,),
  )
  return Steps(sampler, score, train)
