"""Stage 3: PPO-ptx against the reward model, with a per-token KL penalty to the SFT policy (docs/paper.md §5).

The paper's values (App. C.4): β = 0.02 fixed, γ = 27.8 (γ = 0 is plain "PPO"), 256k episodes in rollout
batches of 512 (500 iterations), minibatch 64 (8 per batch), 1 inner epoch, clip 0.2, GAE discount 1,
temperature 1, prompts ≤ 1k and responses ≤ 1k tokens, a constant policy lr after a 10-iteration warmup
from 0.1×, a value function initialized from the RM (its normalization bias included) with its own lr 9e-6
(5e-6 for the 175B policy), EMA of the policy weights 0.992, and 8 pretraining examples per episode whose
γ-scaled gradient is added to every minibatch's.

γ = 27.8 is read as Eq. 2 writes it (`ppo.ptx_reduction="sequence_sum"`, the default): the ptx term is the
summed log-likelihood of each pretraining sequence, weighed against the per-episode objective; since the
PPO loss is a per-token mean, the code divides the ptx term by the minibatch's mean response length
(losses.episode_divisor). Advantage whitening (`ppo.whiten_advantages`, on) divides the PPO term, not the ptx
term, by std(A); `--config.ppo.whiten_advantages=false` gives Eq. 2's exact weighting (docs/paper.md §5.4).
"token_mean" makes γ a weight on the per-token mean instead; the same run then needs γ_token = γ_paper ·
(pretraining tokens per sequence) / (mean response tokens) (docs/losses.md, docs/paper.md §5.4). The paper
states neither reduction, so 27.8 in the first reading is our best reading, not a measured equivalence.

Not in the paper (our choices, docs/paper.md §5.2-§5.3): λ = 0.95, the policy lr (the paper only gives its
sweep, 2.55e-6..2.55e-5; we use 5e-6), Adam ε 1e-5, gradients clipped to global norm 1.0, no weight decay,
no dropout, the KL penalty's estimator k1.

    python -m instructgpt_jax.main --config=configs/ppo.py:size=1.3b --workdir=W_PPO \
        --config.model.init_from=W_SFT_PPO_INIT --config.ppo.reward_model=W_RM/export \
        --config.data.train='prompts/train*.jsonl' --config.data.ptx_corpus='/data/pretrain/*.txt'
CPU variant after configs/sft.py:tiny,variant=ppo_init and configs/rm.py:tiny:
    python -m instructgpt_jax.main --config=configs/ppo.py:tiny --workdir=W_PPO \
        --config.model.init_from=W_SFT --config.ppo.reward_model=W_RM/export
"""

import ml_collections

from configs import common
from instructgpt_jax import config_lib
from instructgpt_jax.models import sizes


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="1.3b", tiny=False, ptx=True)
  size = sizes.ALIASES.get(a.size, a.size)
  c = common.run_config(
    stage="ppo",
    size="tiny" if a.tiny else size,
    total_steps=0,  # iterations; 0: episodes / rollout_batch (256k / 512 = 500)
    checkpoint_every_steps=10,
    log_every_steps=1,
    dtype="bfloat16",
    param_dtype="float32",
    resid_dropout=0.0,  # dropout off in PPO (our choice, docs/paper.md §8 row 14)
  )
  c.eval_every_steps = 25
  # The held-out evaluation compares the policy (EMA) with its reference (the PPO-init SFT: metrics *_sft,
  # eval_win_rate_rm, eval_win_rate_gold) and, with `baseline` (a workdir or export of a model of the policy's
  # shape, e.g. the SFT baseline of configs/sft.py:variant=baseline), with that model too (*_baseline,
  # *_vs_baseline): the paper's Figure 1 compares every model with the SFT baseline.
  c.eval = ml_collections.ConfigDict(dict(baseline=""))
  c.ppo = ml_collections.ConfigDict(
    dict(
      episodes=256_000,
      rollout_batch=512,
      minibatch=64,
      epochs=1,
      clip=0.2,  # ε of the clipped surrogate
      value_clip=0.2,
      gamma=1.0,  # GAE discount: none (App. C.4)
      lam=0.95,  # GAE λ: not reported; lm-human-preferences' value
      kl_coef=0.02,  # β
      kl_controller="fixed",  # "fixed" (paper) or "adaptive" (Ziegler et al. 2019, docs/paper.md §8.4)
      kl_target=6.0,
      kl_horizon=10_000,
      kl_estimator="k1",  # the per-token penalty: k1 (the paper's log-ratio), k2 or k3
      ptx_coef=27.8 if a.ptx else 0.0,  # γ
      ptx_reduction="sequence_sum",  # how γ is read: "sequence_sum" (Eq. 2) or "token_mean" (docstring)
      ptx_per_episode=8,  # pretraining sequences per RL episode, added to every minibatch
      temperature=1.0,
      max_new_tokens=1024,  # responses capped at 1k tokens (App. C)
      whiten_rewards=False,
      whiten_advantages=True,
      missing_eos_penalty=0.0,  # 0: off; else the score of a response that never emitted EOS (e.g. -1)
      ema_decay=0.992,
      # Beyond the paper (docs/losses.md): "gae" (PPO with a critic, the paper's), or the critic-free "grpo",
      # "dr_grpo", "rloo" (each prompt's samples_per_prompt responses compared with each other) and
      # "reinforce_pp"; kl_in: "reward" (−β·KL per token, Eq. 2) or "loss" (β·k3 in the policy loss, GRPO).
      advantage_estimator="gae",
      samples_per_prompt=1,  # responses sampled per prompt; rollout_batch counts responses
      kl_in="reward",
      # How the per-token policy loss is reduced (losses.aggregate): "token_mean", "sequence_mean" (GRPO),
      # "sequence_sum_constant" (Dr. GRPO, over max_new_tokens), "sequence_sum" (RLOO); "auto": the estimator's paper's.
      loss_aggregation="auto",
      # One trunk for policy and value (a value head on the policy, one optimizer): half the memory of a
      # separate critic; the value loss enters the policy's loss with vf_coef (Ziegler et al.: 0.1).
      shared_trunk=False,
      vf_coef=0.1,
      # The rollout's weight layout (docs/scaling.md): "train" samples in the training shardings (under FSDP each
      # decode step all-gathers every layer's weights); "decode" reshards the policy once per rollout into
      # tensor parallelism over fsdp × tensor (sharding.DECODE_RULES); "auto": "decode" when mesh.fsdp > 1 and
      # fsdp × tensor divides the policy's kv heads (ppo_steps.rollout_layout), else "train".
      rollout_layout="auto",
      reward_model="",  # an exported RM (rm stage's <workdir>/export); its bias is applied
      value_init="",  # "" = the reward model (docs/paper.md §5.1)
      reference="",  # "" = model.init_from, the PPO-init SFT model (docs/paper.md §1)
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      train="",  # prompt JSONL files, or lab:prompts:train:N
      eval="",  # held-out prompts for evaluation
      data_dir="",
      tokenizer="",  # "": the model's own (model.init_from's), else "bytes"; or a tokenizer.json / HF folder
      template="plain",
      on_error="raise",
      max_prompt_len=1024,  # longer prompts are dropped and counted (App. C)
      prompt_buckets="",  # "" = powers of two up to max_prompt_len
      ptx_corpus="",  # pretraining text ("lab" or globs); required when ptx_coef > 0
      ptx_seq_len=2048,
      eval_prompts=256,
    )
  )
  # The policy's lr is not reported (App. E.9: swept 2.55e-6 .. 2.55e-5; above 8.05e-6 diverged without ptx).
  # ε 1e-5, clip 1.0, no weight decay: our choice for policy and critic (the paper gives none).
  c.optim = common.optim_config(
    lr=5e-6, schedule="constant", warmup_steps=10, warmup_init_fraction=0.1, weight_decay=0.0, eps=1e-5, clip_norm=1.0
  )  # warmup_steps counts iterations; the trainer turns it into optimizer steps
  c.value_optim = common.optim_config(
    lr=sizes.paper_value_lr(size), schedule="constant", weight_decay=0.0, eps=1e-5, clip_norm=1.0
  )  # the trainer refuses it where model.init_from is of another size class (stages/ppo.py check_setup)
  if a.tiny:
    c.model.dtype = "float32"
    c.checkpoint_every_steps = 5
    c.eval_every_steps = 10
    c.ppo.update(episodes=40 * 32, rollout_batch=32, minibatch=8, max_new_tokens=64, ptx_per_episode=1)
    c.data.update(
      train="lab:prompts:train:2000",
      eval="lab:prompts:eval:64",
      max_prompt_len=128,
      prompt_buckets="64,128",
      ptx_corpus="lab",
      ptx_seq_len=128,
      eval_prompts=64,
    )
    c.optim = common.optim_config(
      lr=1e-4, schedule="constant", warmup_steps=2, warmup_init_fraction=0.1, weight_decay=0.0, eps=1e-5
    )
    c.value_optim = common.optim_config(lr=3e-4, schedule="constant", eps=1e-5)
  return c


def sweep():
  """The E.6 / E.7 ablations in miniature: γ (pretraining coefficient) × β (KL coefficient)."""
  return [{"ppo.ptx_coef": ptx, "ppo.kl_coef": kl} for ptx in (0.0, 27.8) for kl in (0.01, 0.02)]
