"""Stage 3: PPO-ptx (docs/paper.md §5): the policy against the reward model, a per-token KL penalty to the SFT
policy, and the pretraining log-likelihood term. docs/ppo.md maps every step below to the paper.

    python -m instructgpt_jax.main --config=configs/ppo.py:tiny --workdir=W_PPO \
        --config.model.init_from=W_SFT --config.ppo.reward_model=W_RM/export

Four models at once, sharded by the same rules: the policy and the critic (value function, initialized
from the RM) train with their own optimizers; the reference (the PPO-init SFT model) and the RM are frozen
and hold no optimizer state. One iteration:

  rollout    sample a response to each of `rollout_batch` prompts (KV-cached, temperature 1)
  score      teacher-forced log-probs under the policy (old_logprobs) and the reference; values; the RM
             score minus its bias; per-token rewards r_t = -β·KL_t (+ score at the last token); GAE;
             advantage whitening over the whole rollout batch
  train      `epochs` passes over the batch in minibatches; each minibatch is one jitted step: the clipped
             policy loss + γ · the LM loss of a pretraining minibatch (one gradient, so the paper's
             accumulation of both), the clipped value loss on the critic, and the EMA of the policy
  control    the KL controller (fixed β by default)
"""

from __future__ import annotations

import json
import logging
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from instructgpt_jax import checkpoint, losses, models, optim, paths, rl, sampling, sharding, train_state
from instructgpt_jax.data import stage_data, text
from instructgpt_jax.trainers import common, judging, lm_steps, model_io

KL_CONTROLLERS = ("fixed", "adaptive")
KL_ESTIMATORS = ("k1", "k2", "k3")
PTX_REDUCTIONS = ("sequence_sum", "token_mean")


@struct.dataclass
class PPOState:
  """Everything an iteration changes, checkpointed whole: step = iterations done."""

  step: jax.Array
  policy: train_state.TrainState
  critic: train_state.TrainState | None  # None with ppo.shared_trunk
  kl: rl.KLControllerState


@struct.dataclass
class Scored:
  """A scored rollout, [B, R] unless noted; what the minibatch steps train on."""

  prompt_tokens: jax.Array  # [B, P]
  prompt_segment_ids: jax.Array  # [B, P]
  tokens: jax.Array
  mask: jax.Array
  old_logprobs: jax.Array
  old_values: jax.Array
  advantages: jax.Array
  returns: jax.Array


def _value_head_target(cfg, mesh, rules):
  """(graphdef, abstract params with shardings) of a value head for the policy's own trunk (shared_trunk)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.ScalarHead(cfg.d_model, rngs=nnx.Rngs(0))))
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  shardings = sharding.tree_shardings(shapes, sharding.logical_axes(state), mesh, rules)
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _init_value_head(cfg, target, key):
  """A fresh value head, N(0, 1/sqrt(d + 1)) like the RM's head (docs/paper.md §4.3), in `target`'s shardings."""
  shardings = jax.tree.map(lambda t: t.sharding, target)
  init = lambda k: nnx.to_pure_dict(nnx.split(models.ScalarHead(cfg.d_model, rngs=nnx.Rngs(params=k)))[1])  # noqa: E731
  return jax.jit(init, out_shardings=shardings)(key)


def critic_init_params(value_source, target, cfg, seed: int):
  """The critic's first params: the value model (by default the RM, App. C.4) with the RM's normalization
  bias folded into its head's bias, so that its value at a response's last token is the normalized score
  r_θ(x, y) − b that the rollout receives (docs/paper.md §5.1), not the raw score."""
  params = model_io.load(value_source, "scalar", target, cfg, seed)
  reward_bias = float(value_source.metadata.get("reward_bias", 0.0))
  head = params["head"]["proj"]
  return {**params, "head": {**params["head"], "proj": {**head, "bias": head["bias"] - reward_bias}}}


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


def make_minibatch_step(
  p, policy_graphdef, policy_tx, policy_lr, *, critic_graphdef=None, critic_tx=None, head_graphdef=None
):
  """The PPO minibatch step (state, scored, rows, ptx_batch) -> (state, metrics): the clipped policy loss
  (+ γ · the LM loss of `ptx_batch` when p.ptx_coef), the clipped value loss, Adam and the policy's EMA; the
  step `train` runs and `aot` compiles. `p`: the config's ppo section. A separate critic: `critic_graphdef`
  and `critic_tx`; a shared trunk (p.shared_trunk): `head_graphdef`, the value head inside the policy's
  params, trained with the policy's optimizer on policy + vf_coef · value."""
  shared = bool(p.shared_trunk)
  if shared and head_graphdef is None:
    raise ValueError("make_minibatch_step: ppo.shared_trunk needs head_graphdef")
  if not shared and (critic_graphdef is None or critic_tx is None):
    raise ValueError("make_minibatch_step: a separate critic needs critic_graphdef and critic_tx")

  def minibatch_step(state: PPOState, scored: Scored, rows: jax.Array, ptx_batch):
    mb = jax.tree.map(lambda x: sharding.constrain(jnp.take(x, rows, axis=0), ("batch",)), scored)
    seq = (mb.prompt_tokens, mb.prompt_segment_ids, mb.tokens, mb.mask)

    def policy_objective(params, logprobs):
      """The clipped policy loss, plus γ · the LM loss of the pretraining minibatch (PPO-ptx)."""
      if not p.ptx_coef:
        return losses.ppo_policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, clip_eps=p.clip)
      ptx_logits = lm_steps.forward_logits(policy_graphdef, params, ptx_batch)
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
      )

    def value_objective(values):
      return losses.value_loss(values, mb.old_values, mb.returns, mb.mask, clip_eps=p.value_clip)

    if shared:  # one forward pass, one loss: policy (+ ptx) + vf_coef · value, one optimizer

      def shared_loss(params):
        model, hidden = sampling.response_hidden(policy_graphdef, params["lm"], *seq)
        logprobs = sampling.logprobs_from_hidden(model, hidden, mb.tokens, mb.mask, temperature=p.temperature)
        loss, policy_metrics = policy_objective(params["lm"], logprobs)
        vf_loss, value_metrics = value_objective(head_values(head_graphdef, params["value_head"], hidden, mb.mask))
        return loss + p.vf_coef * vf_loss, (loss, policy_metrics, vf_loss, value_metrics)

      (_, (loss, policy_metrics, vf_loss, value_metrics)), policy_grads = jax.value_and_grad(shared_loss, has_aux=True)(
        state.policy.params
      )
      critic, critic_grads = None, policy_grads["value_head"]
    else:

      def policy_loss(params):
        return policy_objective(
          params, sampling.response_logprobs(policy_graphdef, params, *seq, temperature=p.temperature)
        )

      def value_loss(params):
        return value_objective(sampling.response_values(critic_graphdef, params, *seq)[0])

      (loss, policy_metrics), policy_grads = jax.value_and_grad(policy_loss, has_aux=True)(state.policy.params)
      (vf_loss, value_metrics), critic_grads = jax.value_and_grad(value_loss, has_aux=True)(state.critic.params)
      critic = state.critic.apply_gradients(critic_grads, critic_tx)
    policy = state.policy.apply_gradients(policy_grads, policy_tx, ema_decay=p.ema_decay)
    metrics = {
      "loss": loss,
      **policy_metrics,
      "value_loss": vf_loss,
      "value_clip_frac": value_metrics["clip_frac"],
      "policy_grad_norm": optax.tree.norm(policy_grads),
      "value_grad_norm": optax.tree.norm(critic_grads),
      "lr": policy_lr(state.policy.step),
    }
    return state.replace(policy=policy, critic=critic), metrics

  return minibatch_step


def train(config, workdir: str) -> dict[str, float]:
  # ---------------------------------------------------------------- setup and validation (no compile yet)
  p = config.ppo
  stage = common.setup_stage(config, workdir)
  policy_cfg, source, tokenizer, mesh, rules, data_cfg = stage
  data_cfg["batch_size"] = p.rollout_batch
  common.check(source is not None, "model.init_from: PPO starts from the PPO-init SFT model (docs/paper.md §1); set it")
  common.check(bool(p.reward_model), "ppo.reward_model: required (the rm stage's <workdir>/export)")
  for field in ("reward_model", "value_init", "reference"):  # every model path resolves before anything is built
    model_io.read_source(p[field], f"ppo.{field}")
  common.check(p.kl_controller in KL_CONTROLLERS, f"ppo.kl_controller: {p.kl_controller!r} not in {KL_CONTROLLERS}")
  common.check(p.kl_estimator in KL_ESTIMATORS, f"ppo.kl_estimator: {p.kl_estimator!r} not in {KL_ESTIMATORS}")
  common.check(p.rollout_batch % p.minibatch == 0, f"ppo.minibatch: {p.minibatch} does not divide {p.rollout_batch}")
  common.check(not (p.ptx_coef and not config.data.ptx_corpus), "data.ptx_corpus: required when ppo.ptx_coef > 0")
  common.check(
    p.ptx_reduction in PTX_REDUCTIONS, f"ppo.ptx_reduction: {p.ptx_reduction!r} is not one of {PTX_REDUCTIONS}"
  )
  common.check_batch("ppo.minibatch", p.minibatch, mesh)
  data_dir = paths.join(workdir, "data")
  buckets = stage_data.prompt_buckets(data_cfg)
  if policy_cfg.family == "gpt":
    common.check(
      max(buckets) + p.max_new_tokens - 1 <= policy_cfg.max_len,
      f"data.max_prompt_len + ppo.max_new_tokens exceed the model's max_len {policy_cfg.max_len}",
    )
  process = stage.process
  prompts = stage_data.build_prompt_data(data_cfg, tokenizer, seed=config.seed, **process)
  minibatches = p.rollout_batch // p.minibatch
  ptx_rows = p.ptx_per_episode * p.minibatch  # pretraining sequences per minibatch (8 per episode, docs/paper.md §5.2)
  ptx = None
  if p.ptx_coef or config.data.ptx_corpus:
    ptx_cfg = ml_collections.ConfigDict(
      dict(
        corpus=data_cfg.ptx_corpus,
        seq_len=config.data.ptx_seq_len,
        batch_size=max(ptx_rows, 1),
        eval_fraction=0.05,
      )
    )
    ptx = text.build_text_data(ptx_cfg, tokenizer, seed=config.seed, **process)
  iterations = config.total_steps or p.episodes // p.rollout_batch
  config.total_steps = iterations
  common.write_config(workdir, config)
  params_keys = ("policy", "params", "lm") if p.shared_trunk else ("policy", "params")
  ema_keys = ("policy", "ema", "lm") if p.shared_trunk else ("policy", "ema")  # what a later stage loads
  model_io.write_model_json(workdir, "lm", policy_cfg, params_keys=params_keys, ema_keys=ema_keys)

  # ---------------------------------------------------------------- four models: init or restore
  optimizer_steps = iterations * minibatches * p.epochs
  # The 10-iteration warmup (docs/paper.md §5.2) in optimizer steps.
  policy_optim = config.optim.copy_and_resolve_references()
  policy_optim.warmup_steps = config.optim.warmup_steps * minibatches * p.epochs
  policy_tx = optim.make_optimizer(policy_optim, optimizer_steps)
  policy_lr = optim.schedule(policy_optim, optimizer_steps)
  shared = p.shared_trunk  # one trunk for policy and value: a value head on the policy, one optimizer
  reference_source = model_io.read_source(p.reference) if p.reference else source
  judge = judging.Judge.load(p.reward_model, mesh, rules, seed=config.seed)
  common.check(
    judge.model_cfg.vocab_size == policy_cfg.vocab_size, "ppo: the RM's vocabulary differs from the policy's"
  )
  if not shared:
    critic_tx = optim.make_optimizer(config.value_optim, optimizer_steps)
    value_source = model_io.read_source(p.value_init or p.reward_model)
    critic_cfg = value_source.config
  ref_graphdef, ref_target = train_state.param_shardings_for(reference_source.config, mesh, rules)
  ref_params = model_io.load(reference_source, "lm", ref_target, reference_source.config, config.seed)

  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  policy_graphdef, lm_target = train_state.param_shardings_for(policy_cfg, mesh, rules)
  policy_target = lm_target
  critic_graphdef = critic_abstract = critic_sh = head_graphdef = None
  if shared:
    head_graphdef, head_target = _value_head_target(policy_cfg, mesh, rules)
    policy_target = {"lm": lm_target, "value_head": head_target}
  else:
    critic_graphdef, critic_abstract, critic_sh = train_state.abstract_state(
      critic_cfg, critic_tx, mesh, rules, kind="scalar"
    )
  policy_abstract, policy_sh = train_state.abstract_state_for(policy_target, policy_tx, mesh, ema=True)
  replicated = train_state.replicated(mesh)

  def lm_params(params):
    """The language model inside the policy's params (all of them without a shared value head)."""
    return params["lm"] if shared else params

  state_sh = PPOState(step=replicated, policy=policy_sh, critic=critic_sh, kl=rl.KLControllerState(replicated))
  if ckpt.latest_step() is not None:
    abstract = PPOState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      policy=policy_abstract,
      critic=critic_abstract,
      kl=rl.KLControllerState(jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)),
    )
    state, data_state = ckpt.restore(abstract)
    prompts.set_state(data_state["prompts"])
    if ptx is not None:
      ptx.set_state(data_state["ptx"])
    logging.info("resumed at iteration %d", int(state.step))
  else:
    params_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = model_io.load(source, "lm", lm_target, policy_cfg, config.seed)
    if shared:
      params = {"lm": params, "value_head": _init_value_head(policy_cfg, head_target, params_key)}
    policy = train_state.create_from_params(params, policy_tx, state_key, policy_sh, ema=True)
    critic = None
    if not shared:
      _, critic, _ = train_state.create_sharded(
        critic_cfg,
        critic_tx,
        config.seed + 1,
        mesh,
        rules,
        kind="scalar",
        load_params=lambda t: critic_init_params(value_source, t, critic_cfg, config.seed),
      )
    kl = jax.device_put(rl.kl_controller_init(p.kl_coef), replicated)
    state = PPOState(step=jax.device_put(jnp.int32(0), replicated), policy=policy, critic=critic, kl=kl)
  start_iteration = int(state.step)

  def data_state():
    return {"prompts": prompts.get_state(), "ptx": ptx.get_state() if ptx is not None else {}}

  # ---------------------------------------------------------------- rollout and scoring
  score_rows = p.rollout_batch if jnp.dtype(policy_cfg.dtype) == jnp.float32 else p.minibatch
  settings = sampling.SamplingSettings(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=p.temperature)
  sampler = sampling.Sampler(policy_graphdef, settings, response_buckets=(p.max_new_tokens,), mesh=mesh, rules=rules)

  def score_rollout(
    policy_params,
    critic_params,
    ref_params,
    rm_params,
    kl_coef,
    prompt_tokens,
    prompt_segments,
    rollout: sampling.Rollout,
  ):
    """Everything one rollout needs before training (docs/paper.md §5.4 steps 2-5), and its metrics."""
    seq = (prompt_tokens, prompt_segments, rollout.tokens, rollout.mask)
    mask = rollout.mask

    def policy_pass(*seq):
      model, hidden = sampling.response_hidden(policy_graphdef, lm_params(policy_params), *seq)
      logprobs, entropy = sampling.logprobs_from_hidden(
        model, hidden, seq[2], seq[3], temperature=p.temperature, with_entropy=True
      )
      values = head_values(head_graphdef, policy_params["value_head"], hidden, seq[3]) if shared else None
      return logprobs, entropy, values

    # π_old at the minibatch's shape: the training forward recomputes these log-probs on `minibatch` rows, and
    # in bfloat16 a forward at another batch shape (another partition of the mesh, other kernels) rounds
    # differently, by up to 0.2 in a log-prob on SmolLM2 (docs/ppo.md, "bfloat16 parity"). In float32 the
    # shapes agree to ~1e-6 and the whole rollout is one pass.
    old_logprobs, entropy, values = in_chunks(policy_pass, score_rows, *seq)
    ref_logprobs = sampling.response_logprobs(ref_graphdef, ref_params, *seq, temperature=p.temperature)
    if not shared:
      values, _ = sampling.response_values(critic_graphdef, critic_params, *seq)
    _, raw_score = sampling.response_values(judge.graphdef, rm_params, *seq)
    score = raw_score - judge.bias
    ended = jnp.any((rollout.tokens == tokenizer.eos_id) & (mask > 0), axis=1)
    if p.missing_eos_penalty:  # the "EOS trick" (docs/paper.md §8 row 6): a fixed score for responses that never stop
      score = jnp.where(ended, score, p.missing_eos_penalty)
    # The per-token penalty -β·k_t; with k1 it is the paper's log-ratio (docs/paper.md §5.1). per_token_rewards takes
    # the log-ratio as logprobs - ref_logprobs, so the chosen estimator goes in as logprobs against zeros.
    penalty = losses.kl_penalty(old_logprobs, ref_logprobs, estimator=p.kl_estimator)
    rewards = rl.per_token_rewards(score, penalty, jnp.zeros_like(penalty), mask, kl_coef=kl_coef)
    if p.whiten_rewards:
      rewards = rl.whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
    if p.whiten_advantages:  # over the whole rollout batch (docs/paper.md §8.5: our default, not per minibatch)
      advantages = rl.whiten(advantages, mask)
    log_ratio = old_logprobs - ref_logprobs
    length = jnp.sum(mask, axis=1)
    metrics = {
      "score": jnp.mean(score),
      "raw_score": jnp.mean(raw_score),
      "kl": jnp.mean(jnp.sum(jnp.where(mask > 0, log_ratio, 0.0), axis=1)),  # k1 summed over the response
      "kl_k3": jnp.mean(jnp.sum(losses.kl_penalty(old_logprobs, ref_logprobs, estimator="k3") * mask, axis=1)),
      "entropy": losses.masked_mean(entropy, mask),
      "response_length": jnp.mean(length),
      "ended_with_eos": jnp.mean(ended),
      # The sampler's log-probs against the teacher-forced ones: numerical drift only (docs/paper.md §9 item 8).
      "logprob_gap": jnp.max(jnp.abs(jnp.where(mask > 0, rollout.logprobs - old_logprobs, 0.0))),
      "value_mean": losses.masked_mean(values, mask),
      "explained_variance": rl.explained_variance(values, returns, mask),
      "kl_coef": kl_coef,
    }
    scored = Scored(prompt_tokens, prompt_segments, rollout.tokens, mask, old_logprobs, values, advantages, returns)
    return scored, metrics

  score_fn = sampling.jit_on_mesh(score_rollout, mesh=mesh, rules=rules)

  # ---------------------------------------------------------------- one minibatch: policy, ptx, critic, EMA
  minibatch_step = make_minibatch_step(
    p,
    policy_graphdef,
    policy_tx,
    policy_lr,
    critic_graphdef=critic_graphdef,
    critic_tx=None if shared else critic_tx,
    head_graphdef=head_graphdef,
  )

  batch_sh = common.batch_sharding(mesh, rules)
  step_fn = jax.jit(
    sharding.traced_with_rules(minibatch_step, mesh, rules),
    in_shardings=(state_sh, batch_sh, replicated, batch_sh),
    out_shardings=(state_sh, replicated),
    donate_argnums=(0,),
  )

  def kl_update(kl_state, kl_value):
    if p.kl_controller == "adaptive":
      return rl.adaptive_kl_update(kl_state, kl_value, p.rollout_batch, target=p.kl_target, horizon=p.kl_horizon)
    return rl.fixed_kl_update(kl_state, kl_value, p.rollout_batch)

  # ---------------------------------------------------------------- evaluation on held-out prompts
  evaluation = _Evaluation(
    config,
    tokenizer,
    mesh,
    rules,
    data_dir,
    data_cfg.data_dir,
    sampler,
    judge,
    ref_params,
    policy_graphdef,
    ptx,
    workdir,
    lm_params,
  )

  # ---------------------------------------------------------------- the iteration loop
  base_rng = jax.random.PRNGKey(config.seed + 17)
  loop = common.LoopIO(config, workdir, ckpt, types.SimpleNamespace(get_state=data_state), start_step=start_iteration)
  with loop, common.Preemption() as preemption:
    loop.begin(state, evaluation)
    for iteration in range(start_iteration, iterations):
      rng = jax.random.fold_in(base_rng, iteration)  # an iteration is a pure function of (state, seed, i)
      t0 = time.perf_counter()
      batch = common.to_global(next(prompts), mesh, rules)
      rollout = jax.block_until_ready(
        sampler(
          lm_params(state.policy.params),
          batch["tokens"],
          batch["segment_ids"],
          jax.random.fold_in(rng, 0),
          max_new_tokens=p.max_new_tokens,
        )
      )
      t1 = time.perf_counter()
      scored, rollout_metrics = jax.block_until_ready(
        score_fn(
          state.policy.params,
          None if shared else state.critic.params,
          ref_params,
          judge.params,
          state.kl.kl_coef,
          batch["tokens"],
          batch["segment_ids"],
          rollout,
        )
      )
      t2 = time.perf_counter()
      train_metrics = []
      for epoch in range(p.epochs):
        order = jax.random.permutation(jax.random.fold_in(rng, 1 + epoch), p.rollout_batch)
        for m in range(minibatches):
          ptx_batch = common.to_global(next(ptx), mesh, rules) if p.ptx_coef else {}
          state, metrics = step_fn(state, scored, order[m * p.minibatch : (m + 1) * p.minibatch], ptx_batch)
          train_metrics.append(metrics)
      kl_state = kl_update(state.kl, rollout_metrics["kl"])
      state = state.replace(step=state.step + 1, kl=kl_state)
      train_metrics = jax.block_until_ready(train_metrics)
      t3 = time.perf_counter()
      tokens = float(jnp.sum(rollout.mask)) + float(p.rollout_batch * batch["tokens"].shape[1])
      row = {
        **rollout_metrics,
        **{k: jnp.mean(jnp.stack([m[k] for m in train_metrics])) for k in train_metrics[0]},
        # The first minibatch trains on the rollout policy itself: its ratio must be 1 (docs/paper.md §9 item 8).
        "first_minibatch_approx_kl": train_metrics[0]["approx_kl"],
        "first_minibatch_ratio_max": train_metrics[0]["ratio_max"],
        "time_rollout": t1 - t0,
        "time_scoring": t2 - t1,
        "time_training": t3 - t2,
        "rollout_tokens_per_sec": tokens / max(t1 - t0, 1e-9),
        "episodes_per_sec": p.rollout_batch / max(t3 - t0, 1e-9),
      }
      loop.end_of_step(iteration + 1, state, row, evaluation, preempted=preemption.stop_requested(iteration + 1))
    final = loop.finish(state, evaluation)

  # ---------------------------------------------------------------- export (EMA weights, docs/paper.md §5.2)
  export_dir = paths.join(workdir, "export")
  model_io.export(
    export_dir, lm_params(state.policy.ema), "lm", policy_cfg, ema_decay=p.ema_decay, tokenizer=config.data.tokenizer
  )
  common.print_summary("PPO-ptx" if p.ptx_coef else "PPO", final, export=export_dir)
  return final


class _Evaluation:
  """Held-out prompts: RM score of the policy (EMA weights) and of the SFT reference, the win rate between
  them judged by the RM and, on the lab's prompts, by the gold scorer; the pretraining loss; sample dumps."""

  def __init__(
    self,
    config,
    tokenizer,
    mesh,
    rules,
    data_dir,
    tfds_dir,
    sampler,
    judge,
    ref_params,
    graphdef,
    ptx,
    workdir,
    lm_params,
  ):
    self.config, self.tokenizer, self.mesh, self.rules = config, tokenizer, mesh, rules
    self.sampler, self.judge, self.ref_params, self.ptx, self.workdir = sampler, judge, ref_params, ptx, workdir
    self.texts, self.prompts, self.tasks = [], [], {}
    if config.data.eval:
      spec = config.data.eval
      files = common.resolve_lab_files({"train": spec}, data_dir, seed=config.seed)["train"]
      texts, prompts = judging.load_prompts(
        files, tokenizer, data_dir=tfds_dir, max_prompt_len=config.data.max_prompt_len
      )
      self.texts, self.prompts = texts[: config.data.eval_prompts], prompts[: config.data.eval_prompts]
      if spec.startswith("lab:"):
        from instructgpt_jax.lab import datasets

        self.tasks = datasets.tasks_of(spec, seed=config.seed)
    self.ptx_eval = None
    if ptx is not None:
      self.ptx_eval = jax.jit(sharding.traced_with_rules(lm_steps.make_eval_step(graphdef), mesh, rules))
    self.sft = {}  # the reference's numbers: computed once, at the first evaluation
    self.lm_params = lm_params

  def _ptx_loss(self, params) -> float:
    loss = lm_steps.eval_loss(self.ptx_eval, params, self.ptx.eval_batches(4), self.mesh, self.rules)
    return 0.0 if loss is None else loss

  def _sample(self, params):
    c = self.config
    return judging.sample_and_score(
      self.sampler,
      params,
      self.judge,
      self.prompts,
      jax.random.PRNGKey(c.seed + 99),
      batch_size=c.ppo.minibatch,
      max_new_tokens=c.ppo.max_new_tokens,
      pad_id=self.tokenizer.pad_id,
      buckets=stage_data.prompt_buckets(c.data),
    )

  def _gold(self, samples) -> np.ndarray:
    """The lab's gold quality of each sampled response (NaN where a prompt is not a lab task)."""
    from instructgpt_jax.lab import tasks as tasks_lib

    out = []
    for prompt_text, (_, response) in zip(self.texts, samples):
      task = self.tasks.get(prompt_text)
      stopped = len(response) > 0 and int(response[-1]) == self.tokenizer.eos_id
      out.append(tasks_lib.quality(task, self.tokenizer.decode(response), stopped=stopped) if task else np.nan)
    return np.array(out)

  def __call__(self, state: PPOState) -> dict[str, float]:
    row = {}
    params = self.lm_params(state.policy.ema)  # evaluation and export use the EMA weights (docs/paper.md §5.2)
    if self.ptx_eval is not None:
      if "ptx_loss" not in self.sft:
        self.sft["ptx_loss"] = self._ptx_loss(self.ref_params)
      row.update(eval_ptx_loss=self._ptx_loss(params), eval_ptx_loss_sft=self.sft["ptx_loss"])
    if not self.prompts:
      return row
    scores, samples = self._sample(params)
    if "scores" not in self.sft:
      self.sft["scores"], self.sft["samples"] = self._sample(self.ref_params)
    sft_scores = self.sft["scores"]
    row.update(
      eval_rm_score=float(scores.mean()),
      eval_rm_score_sft=float(sft_scores.mean()),
      eval_win_rate_rm=float(np.mean((scores > sft_scores) + 0.5 * (scores == sft_scores))),
    )
    if self.tasks:
      if "gold" not in self.sft:
        self.sft["gold"] = self._gold(self.sft["samples"])
      gold, sft_gold = self._gold(samples), self.sft["gold"]
      row.update(
        eval_gold=float(np.nanmean(gold)),
        eval_gold_sft=float(np.nanmean(sft_gold)),
        eval_win_rate_gold=float(np.nanmean((gold > sft_gold) + 0.5 * (gold == sft_gold))),
      )
    self._dump(int(state.step), samples, scores)
    return row

  def _dump(self, step: int, samples, scores) -> None:
    if jax.process_index() != 0:
      return
    lines = []
    for i, (prompt_text, (_, response)) in enumerate(zip(self.texts, samples)):
      record = {
        "prompt": prompt_text,
        "policy": self.tokenizer.decode(response),
        "policy_score": float(scores[i]),
        "sft": self.tokenizer.decode(self.sft["samples"][i][1]),
        "sft_score": float(self.sft["scores"][i]),
      }
      lines.append(json.dumps(record) + "\n")
    paths.write_text(paths.join(self.workdir, "samples", f"iteration_{step:06d}.jsonl"), "".join(lines))
