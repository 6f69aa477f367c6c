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

Beyond the paper, `ppo.advantage_estimator` replaces GAE by a critic-free estimator (docs/losses.md): "grpo",
"dr_grpo", "rloo" compare the `ppo.samples_per_prompt` responses sampled for each prompt, "reinforce_pp"
whitens returns-to-go; none of them builds a critic. `ppo.kl_in="loss"` moves the KL from the reward into
the policy's loss (β·k3, as GRPO). The ptx term works with every estimator.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax import checkpoint, generation, losses, optim, paths, rl, train_state
from instructgpt_jax.data import schemes, stage_data, text
from instructgpt_jax.library import judging, lm_steps, loop, model_io, ppo_steps
from instructgpt_jax.models import lora, sizes


def critic_init_params(value_source, target, cfg, seed: int):
  """The critic's first params: the value model (by default the RM, App. C.4) with the RM's normalization
  bias folded into its head's bias, so that its value at a response's last token is the normalized score
  r_θ(x, y) − b that the rollout receives (docs/paper.md §5.1), not the raw score."""
  params = model_io.load(value_source, "scalar", target, cfg, seed)
  reward_bias = float(value_source.metadata.get("reward_bias", 0.0))
  head = params["head"]["proj"]
  return {**params, "head": {**params["head"], "proj": {**head, "bias": head["bias"] - reward_bias}}}


def check_config(config, checks) -> None:
  """Every PPO setting by itself and against the others, without reading a file (stages.check_config)."""

  p, d = config.ppo, config.data
  # The tables are read now, so a row a script added (e.g. rl.register_estimator) is an option too.
  for field, allowed in (
    ("kl_controller", ppo_steps.KL_CONTROLLERS),
    ("kl_estimator", tuple(losses.KL_ESTIMATORS)),
    ("ptx_reduction", tuple(losses.PTX_REDUCTIONS)),
    ("advantage_estimator", tuple(rl.ESTIMATORS)),
    ("kl_in", ppo_steps.KL_PLACES),
    ("rollout_layout", ppo_steps.ROLLOUT_LAYOUTS),
    ("loss_aggregation", ("auto", *losses.AGGREGATIONS)),
  ):
    checks.one_of(f"ppo.{field}", p[field], allowed)
  for field in ("kl_coef", "ptx_coef", "vf_coef", "ptx_per_episode"):
    checks.at_least(f"ppo.{field}", p[field], 0)
  for field in ("clip", "value_clip", "temperature", "kl_target", "kl_horizon"):
    checks.positive(f"ppo.{field}", p[field])
  for field in ("gamma", "lam"):
    checks.fraction(f"ppo.{field}", p[field])
  checks.fraction("ppo.ema_decay", p.ema_decay, below_one=True)
  for field in ("epochs", "max_new_tokens", "samples_per_prompt"):
    checks.at_least(f"ppo.{field}", p[field], 1)
  if checks.at_least("ppo.rollout_batch", p.rollout_batch, 1) and checks.at_least("ppo.minibatch", p.minibatch, 1):
    checks.require(
      p.rollout_batch % p.minibatch == 0,
      "ppo.minibatch",
      f"{p.minibatch} does not divide ppo.rollout_batch {p.rollout_batch}",
    )
    checks.require(
      p.rollout_batch % max(p.samples_per_prompt, 1) == 0,
      "ppo.samples_per_prompt",
      f"{p.samples_per_prompt} does not divide ppo.rollout_batch {p.rollout_batch} (it counts responses)",
    )
    checks.require(
      config.total_steps > 0 or p.episodes >= p.rollout_batch,
      "ppo.episodes",
      f"{p.episodes} is less than one rollout batch ({p.rollout_batch}): no iteration would run",
    )
    loop.check_batch_values("ppo.minibatch", p.minibatch, config.mesh, checks)
  checks.require(
    p.samples_per_prompt >= 2 or p.advantage_estimator not in rl.ESTIMATORS or not rl.is_grouped(p.advantage_estimator),
    "ppo.samples_per_prompt",
    f"{p.advantage_estimator} compares the responses to one prompt; set it to 2 or more",
  )
  checks.require(
    not p.shared_trunk or p.advantage_estimator not in rl.ESTIMATORS or rl.needs_critic(p.advantage_estimator),
    "ppo.shared_trunk",
    f"{p.advantage_estimator} has no value function to put on the policy's trunk; set it False",
  )
  if p.ptx_coef:
    checks.require_input(d.ptx_corpus, "data.ptx_corpus", "pretraining text ('lab' or globs) when ppo.ptx_coef > 0")
  loop.check_data_values(d, checks)
  checks.require_input(
    config.model.init_from, "model.init_from", "PPO starts from the PPO-init SFT model (docs/paper.md §1)"
  )
  checks.require_input(p.reward_model, "ppo.reward_model", "the rm stage's <workdir>/export")
  checks.require_input(d.train, "data.train", "prompt JSONL files, or lab:prompts:train:N")


def unused_fields(config) -> dict[str, str]:
  p = config.ppo
  unused = {}
  if p.advantage_estimator in rl.ESTIMATORS and not rl.needs_critic(p.advantage_estimator):
    why = f"ppo.advantage_estimator={p.advantage_estimator} trains no value function"
    unused.update({"value_optim": why, "ppo.value_clip": why, "ppo.vf_coef": why, "ppo.value_init": why})
  elif p.shared_trunk:
    unused["value_optim"] = "with ppo.shared_trunk the value head trains with the policy's optimizer (optim)"
  else:
    unused["ppo.vf_coef"] = "it weighs the value loss of a shared trunk (ppo.shared_trunk=False: a separate critic)"
  if p.kl_controller == "fixed":
    why = "ppo.kl_controller is 'fixed'"
    unused.update({"ppo.kl_target": why, "ppo.kl_horizon": why})
  if not p.ptx_coef:
    unused["ppo.ptx_reduction"] = "ppo.ptx_coef is 0 (no pretraining term)"
  if not config.data.eval:
    unused["eval.baseline"] = "data.eval is empty (no held-out prompts to compare on)"
  return unused


class Inputs(NamedTuple):
  """PPO's models as sources, each read from disk once (`read_inputs`); every later step takes them from here."""

  reference: model_io.Source  # ppo.reference, else model.init_from (the PPO-init SFT model)
  reward: model_io.Source  # ppo.reward_model
  value: model_io.Source | None  # where a separate critic starts: ppo.value_init, else the RM; None without one
  baseline: model_io.Source | None  # eval.baseline, or None


def read_inputs(config, setup: loop.Setup) -> Inputs:
  """Every model path resolves (read once, before anything is built)."""
  p = config.ppo
  reward = model_io.read_source(p.reward_model, "ppo.reward_model")
  loop.check(
    reward.kind == "scalar", f"ppo.reward_model: {p.reward_model} is a {reward.kind} model, not a reward model"
  )
  reference = model_io.read_source(p.reference, "ppo.reference") if p.reference else setup.source
  value_init = model_io.read_source(p.value_init, "ppo.value_init")
  separate_critic = rl.needs_critic(p.advantage_estimator) and not p.shared_trunk
  value = (value_init or reward) if separate_critic else None
  return Inputs(reference, reward, value, model_io.read_source(config.eval.baseline, "eval.baseline"))


def check_setup(config, setup: loop.Setup, inputs: Inputs) -> None:
  """What needs the files and the devices: the models agree with the policy, the mesh fits the layout and the
  minibatch, prompts and responses fit the model."""
  p, policy_cfg = config.ppo, setup.model_cfg  # model.init_from and ppo.reward_model are given: check_config
  baseline = inputs.baseline
  if baseline is not None:
    changed = [f for f in model_io.SHAPE_FIELDS if getattr(baseline.config, f) != getattr(policy_cfg, f)]
    loop.check(
      not changed,
      f"eval.baseline: its {', '.join(changed)} differ from the policy's (the evaluation samples it with the "
      "policy's sampler): give a model of the policy's shape",
    )
  _check_value_lr(config, policy_cfg)
  layout_error = p.rollout_layout == "decode" and ppo_steps.decode_layout_error(setup.mesh, policy_cfg)
  loop.check(not layout_error, layout_error)
  loop.check_batch("ppo.minibatch", p.minibatch, setup.mesh)
  loop.check(
    inputs.reward.config.vocab_size == policy_cfg.vocab_size, "ppo: the RM's vocabulary differs from the policy's"
  )
  cache_length = generation.cache_length_for(max(stage_data.prompt_buckets(setup.data_cfg)), p.max_new_tokens)
  loop.check(
    policy_cfg.positions_fit(cache_length),
    f"data.max_prompt_len + ppo.max_new_tokens exceed the model's max_len {policy_cfg.max_len}",
  )


def _check_value_lr(config, policy_cfg) -> None:
  """The value lr that configs/ppo.py:size picked is the paper's for that size (App. C.4: 9e-6 for 1.3B and
  6B policies, 5e-6 for 175B); a policy of the other class from model.init_from would silently get the wrong
  one, so that is a one-line error (an lr set to any other value is the user's and passes)."""
  big = sizes.lookup("gpt3-175b")
  loaded = "gpt3-175b" if (policy_cfg.n_layers, policy_cfg.d_model) == (big["n_layers"], big["d_model"]) else ""
  configured, wanted = sizes.paper_value_lr(config.model.size or ""), sizes.paper_value_lr(loaded)
  loop.check(
    not (config.model.init_from and config.value_optim.lr == configured != wanted),
    f"value_optim.lr: {configured:g} is the paper's for a {config.model.size} policy (configs/ppo.py:size), but "
    f"model.init_from is {'' if loaded else 'not '}175B-shaped, for which App. C.4 uses {wanted:g}: pass "
    f"configs/ppo.py:size={'175b' if loaded else '1.3b'} or --config.value_optim.lr",
  )


class RolloutData:
  """The loop's data (loop.train_loop): each `next` is one iteration's prompts, each repeated
  samples_per_prompt times in consecutive rows (a group of rl.group_advantages); its state, checkpointed with
  the run, is the prompts' and the pretraining text's."""

  def __init__(self, prompts, ptx, samples_per_prompt: int):
    self.prompts, self.ptx, self.copies = prompts, ptx, samples_per_prompt

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: np.repeat(v, self.copies, axis=0) for k, v in next(self.prompts).items()}

  def get_state(self) -> dict:
    return {"prompts": self.prompts.get_state(), "ptx": self.ptx.get_state() if self.ptx is not None else {}}

  def set_state(self, state: dict) -> None:
    self.prompts.set_state(state["prompts"])
    if self.ptx is not None:
      self.ptx.set_state(state["ptx"])


def build_data(config, setup: loop.Setup):
  """(the rollout prompts, the pretraining data or None): `rollout_batch` prompts per batch; the ptx corpus
  in batches of ppo_steps.ptx_rows (ppo.ptx_per_episode × ppo.minibatch sequences: 8 per episode,
  docs/paper.md §5.2)."""
  p = config.ppo
  data_cfg = setup.data_cfg.copy_and_resolve_references()
  data_cfg.batch_size = p.rollout_batch // p.samples_per_prompt  # prompts; each sampled samples_per_prompt times
  prompts = stage_data.build_prompt_data(data_cfg, setup.tokenizer, seed=config.seed, **setup.process)
  if not (p.ptx_coef or config.data.ptx_corpus):
    return prompts, None
  ptx_cfg = ml_collections.ConfigDict(
    dict(
      corpus=data_cfg.ptx_corpus, seq_len=config.data.ptx_seq_len, batch_size=ppo_steps.ptx_rows(p), eval_fraction=0.05
    )
  )
  return prompts, text.build_text_data(ptx_cfg, setup.tokenizer, seed=config.seed, **setup.process)


def lora_reference(config, setup: loop.Setup) -> bool:
  """Whether the KL reference is the policy's own base with its adapters off (a LoRA policy, no ppo.reference:
  the reference is the model the policy starts from), held once, not loaded a second time."""
  return bool(setup.model_cfg.lora.rank) and not config.ppo.reference


def critic_config(setup: loop.Setup, inputs: Inputs):
  """A separate critic's config: its source's, with the policy's adapters (model.lora; the frozen RM has none)."""
  return None if inputs.value is None else dataclasses.replace(inputs.value.config, lora=setup.model_cfg.lora)


def build_models(config, setup: loop.Setup, inputs: Inputs, iterations: int) -> ppo_steps.Models:
  """The four models' description: the policy's optimizer over every minibatch step (the 10-iteration
  warmup of docs/paper.md §5.2 in optimizer steps), the critic's (from ppo.value_init, else the RM)."""
  p = config.ppo
  per_iteration = p.rollout_batch // p.minibatch * p.epochs
  policy_optim = config.optim.copy_and_resolve_references()
  policy_optim.warmup_steps = config.optim.warmup_steps * per_iteration
  return ppo_steps.Models.build(
    p,
    policy_cfg=setup.model_cfg,
    reference_cfg=None if lora_reference(config, setup) else inputs.reference.config,
    reward_cfg=inputs.reward.config,
    critic_cfg=critic_config(setup, inputs),
    reward_bias=float(inputs.reward.metadata.get("reward_bias", 0.0)),
    eos_id=setup.tokenizer.eos_id,
    pad_id=setup.tokenizer.pad_id,
    policy_tx=optim.make_optimizer(policy_optim, iterations * per_iteration),
    policy_lr=optim.schedule(policy_optim, iterations * per_iteration),
    critic_tx=optim.make_optimizer(config.value_optim, iterations * per_iteration),
    mesh=setup.mesh,
    rules=setup.rules,
  )


def start_state(config, setup: loop.Setup, inputs: Inputs, m: ppo_steps.Models, shardings) -> ppo_steps.PPOState:
  """Iteration 0: the policy from model.init_from (a fresh value head on it with ppo.shared_trunk), the
  critic from ppo.value_init or the RM (critic_init_params)."""
  params_key, policy_key = jax.random.split(jax.random.PRNGKey(config.seed))
  lm_target = m.targets["policy"]["lm"] if m.shared_trunk else m.targets["policy"]
  params = model_io.load(setup.source, "lm", lm_target, setup.model_cfg, config.seed)
  critic_params = None
  if m.shared_trunk:
    head = ppo_steps.init_value_head(setup.model_cfg, m.targets["policy"]["value_head"], params_key)
    params = {"lm": params, "value_head": head}
  elif m.has_critic:
    critic_params = critic_init_params(inputs.value, m.targets["critic"], critic_config(setup, inputs), config.seed)
  critic_key = jax.random.split(jax.random.PRNGKey(config.seed + 1))[1]
  return ppo_steps.initial_state(m, shardings, params, critic_params, policy_key, critic_key)


def iterate(m: ppo_steps.Models, steps: ppo_steps.Steps, state, batch, ptx, frozen, rng):
  """One PPO iteration on a global prompt batch: rollout, scoring, `epochs` passes of minibatch steps, the
  KL controller. frozen: (reference params, RM params). -> (state, the iteration's metrics row)."""
  p = m.ppo
  t0 = time.perf_counter()
  rollout = steps.sample(
    m.lm(state.policy.params),
    batch["tokens"],
    batch["segment_ids"],
    jax.random.fold_in(rng, 0),
    max_new_tokens=p.max_new_tokens,
  )
  rollout = jax.block_until_ready(rollout)
  t1 = time.perf_counter()
  critic_params = state.critic.params if m.has_critic else None
  scored, rollout_metrics = jax.block_until_ready(
    steps.score(
      state.policy.params, critic_params, *frozen, state.kl.kl_coef, batch["tokens"], batch["segment_ids"], rollout
    )
  )
  t2 = time.perf_counter()
  train_metrics = []
  for epoch in range(p.epochs):
    order = jax.random.permutation(jax.random.fold_in(rng, 1 + epoch), p.rollout_batch)
    for start in range(0, p.rollout_batch, p.minibatch):
      ptx_batch = loop.to_global(next(ptx), m.mesh, m.rules) if p.ptx_coef else {}
      state, metrics = steps.train(state, scored, order[start : start + p.minibatch], ptx_batch)
      train_metrics.append(metrics)
  state = state.replace(step=state.step + 1, kl=ppo_steps.kl_update(m, state.kl, rollout_metrics["kl"]))
  train_metrics = jax.block_until_ready(train_metrics)
  t3 = time.perf_counter()
  tokens = float(jnp.sum(rollout.mask)) + float(p.rollout_batch * batch["tokens"].shape[1])
  return state, {
    **rollout_metrics,
    **{k: jnp.mean(jnp.stack([row[k] for row in train_metrics])) for k in train_metrics[0]},
    # The first minibatch trains on the rollout policy itself: its ratio must be 1 (docs/paper.md §9 item 8).
    "first_minibatch_approx_kl": train_metrics[0]["approx_kl"],
    "first_minibatch_ratio_max": train_metrics[0]["ratio_max"],
    "time_rollout": t1 - t0,
    "time_scoring": t2 - t1,
    "time_training": t3 - t2,
    "rollout_tokens_per_sec": tokens / max(t1 - t0, 1e-9),
    "episodes_per_sec": p.rollout_batch / max(t3 - t0, 1e-9),
  }


def train(config, workdir: str) -> dict[str, float]:
  # ---------------------------------------------------------------- setup and validation (no compile yet)
  setup = loop.setup(config, workdir)
  config, p = setup.config, setup.config.ppo
  inputs = read_inputs(config, setup)
  check_setup(config, setup, inputs)
  prompts, ptx = build_data(config, setup)
  data = RolloutData(prompts, ptx, p.samples_per_prompt)
  iterations = config.total_steps or p.episodes // p.rollout_batch
  lm_key = ("lm",) if p.shared_trunk else ()  # where a later stage finds the policy and its EMA
  params_keys, ema_keys = ("policy", "params", *lm_key), ("policy", "ema", *lm_key)
  loop.record_run(setup, workdir, iterations, "lm", params_keys=params_keys, ema_keys=ema_keys)
  judge = judging.Judge.from_source(inputs.reward, setup.mesh, setup.rules, seed=config.seed)
  m = build_models(config, setup, inputs, iterations)
  ref_params = None  # ppo_steps.reference_params: the policy's base
  if not lora_reference(config, setup):
    _, ref_params = model_io.load_frozen(inputs.reference, "lm", setup.mesh, setup.rules, seed=config.seed)

  # ---------------------------------------------------------------- init or resume
  abstract, shardings = ppo_steps.abstract_state(m)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = loop.resume_or_start(ckpt, abstract, data, lambda: start_state(config, setup, inputs, m, shardings))
  steps = ppo_steps.jit_steps(m, shardings)
  baseline = inputs.baseline
  # Not load_frozen: the policy's sampler samples the baseline too, so it takes the policy's layout and dtypes.
  lm_target = m.targets["policy"]["lm"] if m.shared_trunk else m.targets["policy"]
  baseline_params = baseline and model_io.load(baseline, "lm", lm_target, baseline.config, config.seed)
  evaluation = _Evaluation(setup, workdir, m, steps.sample, judge, ref_params, ptx, baseline_params)

  # ---------------------------------------------------------------- the iteration loop
  base_rng = jax.random.PRNGKey(config.seed + 17)

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_rng, int(state.step))  # an iteration is a pure function of (state, seed, i)
    return iterate(m, steps, state, batch, ptx, (ref_params, judge.params), rng)

  state, final = loop.train_loop(setup, workdir, ckpt, data, state, step_fn, evaluation)

  # ---------------------------------------------------------------- export (EMA weights, docs/paper.md §5.2)
  export_dir = paths.join(workdir, "export")
  model_io.export(
    export_dir,
    m.lm(train_state.ema_params(state.policy)),
    "lm",
    setup.model_cfg,
    ema_decay=p.ema_decay,
    tokenizer=config.data.tokenizer,
  )
  loop.print_summary("PPO-ptx" if p.ptx_coef else "PPO", final, export=export_dir)
  return final


def _win_rate(ours: np.ndarray, theirs: np.ndarray) -> float:
  """The fraction of prompts where `ours` beats `theirs`, a tie counting half (NaN prompts left out)."""
  wins = (ours > theirs) + 0.5 * (ours == theirs)
  return float(np.nanmean(np.where(np.isnan(ours) | np.isnan(theirs), np.nan, wins)))


class _Evaluation:
  """Held-out prompts: RM score of the policy (EMA weights) and of the SFT reference, the win rate between
  them judged by the RM and, on the lab's prompts, by the gold scorer; the pretraining loss; sample dumps.
  With `eval.baseline`, the same against that model (`*_baseline`, `*_vs_baseline`)."""

  def __init__(
    self,
    setup: loop.Setup,
    workdir: str,
    m: ppo_steps.Models,
    sampler,
    judge,
    ref_params,
    ptx,
    baseline_params=None,
  ):
    config = setup.config
    self.config, self.tokenizer, self.mesh, self.rules = config, setup.tokenizer, setup.mesh, setup.rules
    self.sampler, self.judge, self.ref_params, self.ptx, self.workdir = sampler, judge, ref_params, ptx, workdir
    self.others = {"sft": ref_params} | ({"baseline": baseline_params} if baseline_params is not None else {})
    self.lora_reference = ref_params is None  # the policy's base: its adapters with B = 0 (lora.zero_adapters)
    self.texts, self.prompts, self.gold_of = [], [], None
    if config.data.eval:
      spec = config.data.eval
      files = schemes.resolve({"train": spec}, paths.join(workdir, "data"), seed=config.seed)["train"]
      texts, prompts = judging.load_prompts(
        files, setup.tokenizer, data_dir=setup.data_cfg.data_dir, max_prompt_len=config.data.max_prompt_len
      )
      self.texts, self.prompts = texts[: config.data.eval_prompts], prompts[: config.data.eval_prompts]
      self.gold_of = schemes.gold_scorer(spec, seed=config.seed)  # the lab's prompts have one
    self.ptx_eval = None
    if ptx is not None:
      self.ptx_eval = train_state.jit_eval(lm_steps.make_eval_step(m.policy), setup.mesh, setup.rules)
    self.fixed = {name: {} for name in self.others}  # the reference's (baseline's) numbers: computed once
    self.sft = self.fixed["sft"]
    self.lm_params = m.lm

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
    """The gold quality of each sampled response by the prompts' scheme (the lab's), NaN where it has none."""
    out = []
    for prompt_text, (_, response) in zip(self.texts, samples):
      stopped = len(response) > 0 and int(response[-1]) == self.tokenizer.eos_id
      out.append(self.gold_of(prompt_text, self.tokenizer.decode(response), stopped))
    return np.array(out)

  def __call__(self, state: ppo_steps.PPOState) -> dict[str, float]:
    row = {}
    if self.lora_reference:  # this state's base arrays (the last state's were donated to the train step)
      self.ref_params = self.others["sft"] = lora.zero_adapters(self.lm_params(state.policy.params))
    # evaluation and export use the EMA weights (docs/paper.md §5.2)
    params = self.lm_params(train_state.ema_params(state.policy))
    if self.ptx_eval is not None:
      if "ptx_loss" not in self.sft:
        self.sft["ptx_loss"] = self._ptx_loss(self.ref_params)
      row.update(eval_ptx_loss=self._ptx_loss(params), eval_ptx_loss_sft=self.sft["ptx_loss"])
    if not self.prompts:
      return row
    scores, samples = self._sample(params)
    row["eval_rm_score"] = float(scores.mean())
    gold = self._gold(samples) if self.gold_of else None
    if gold is not None:
      row["eval_gold"] = float(np.nanmean(gold))
    for name, other_params in self.others.items():  # the reference ("sft"), and the baseline where given
      fixed, vs = self.fixed[name], "" if name == "sft" else "_vs_baseline"
      if "scores" not in fixed:
        fixed["scores"], fixed["samples"] = self._sample(other_params)
        fixed["gold"] = self._gold(fixed["samples"]) if self.gold_of else None
      row[f"eval_rm_score_{name}"] = float(fixed["scores"].mean())
      row[f"eval_win_rate_rm{vs}"] = _win_rate(scores, fixed["scores"])
      if gold is not None:
        row[f"eval_gold_{name}"] = float(np.nanmean(fixed["gold"]))
        row[f"eval_win_rate_gold{vs}"] = _win_rate(gold, fixed["gold"])
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
