"""The embedded InstructGPT lab: the whole method, in miniature, offline, on a CPU (the README's main job).

    python -m instructgpt_jax.main --config=configs/pipeline.py --workdir=runs/lab        # about 15 minutes
    python -m instructgpt_jax.main --config=configs/pipeline.py:lab_quick --workdir=W     # the tests' version
    python -m instructgpt_jax.main --config=configs/pipeline.py:compare --workdir=W       # methods side by side

A generated world (lab/world.py) gives a pretraining corpus of plain prose and instruction tasks with gold
answers (lab/tasks.py); simulated labelers (lab/labelers.py) write the demonstrations' ranking side. The
stages, each in its own folder of the workdir and each resumable:

  tokenizer   a BPE trained on the world's text
  pretrain    a small GPT on the prose (it knows the world but does not follow instructions)
  sft         the PPO-init SFT: demonstrations with 10% pretraining text mixed in
  labels      K = 4..9 samples of the SFT model per prompt, ranked by the training labelers
  rm          the reward model from the SFT model, on those rankings
  sft_baseline  the paper's SFT baseline (App. C.1): demonstrations alone, cosine, no warmup, from the
              pretrained model, its checkpoint chosen by the RM's score (so it trains after the RM)
  ppo         PPO (γ = 0) and ppo_ptx: PPO-ptx (γ = 27.8), from the SFT model against the RM
  evaluation  held-out prompts judged by held-out labelers: Figure 1 (GPT, GPT prompted with the lab's
              few-shot prefix, SFT, PPO, PPO-ptx, each against the SFT baseline) and each RL model against
              its start, with 95% intervals; gold quality, RM accuracy beside inter-labeler agreement, the
              alignment tax, success by constraint count
  report      report.md and plots in the workdir, a summary table on stdout

`--config.seeds=3` runs all of it once per seed (seed, seed + 1, ...) in <workdir>/seed_<seed>, and the report
in the workdir gives each figure's mean over seeds with its 95% interval over seeds, and which differences
the seeds tell from zero:

    python -m instructgpt_jax.main --config=configs/pipeline.py:lab_quick,compare --config.seeds=3 --workdir=W

`compare` (beyond the paper; `lab_quick,compare` for the quick scale) adds, from the same SFT model and RM:
GRPO (4 samples per prompt, KL as a k3 term in the loss) and RLOO (4 samples, KL in the reward), no critic
and no ptx term; DPO on the RM's comparisons; and best-of-n from the SFT model. stages/compare.py measures
them all the same way and lab/report.py writes compare.md with the over-optimization figure.

Every stage's config is a section of this one: `--config.stages.ppo.ppo.kl_coef=0.05` changes one run.
"""

import ml_collections

from configs import common, dpo, ppo, pretrain, rm, sft
from instructgpt_jax import config_lib

# The lab's model: a 4-layer GPT over the lab's BPE (about 0.9M parameters). A 1,024-token BPE holds every word
# of the world, so a prompt takes at most ~24 tokens and a demonstration with its prompt at most ~50.
LAB_MODEL = dict(n_layers=4, d_model=128, n_heads=4, d_ff=512, max_len=96, vocab_size=1024, dtype="float32")


def get_config(arg: str = "lab") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, lab=False, lab_quick=False, compare=False)
  quick = a.lab_quick
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.seed = 0
  # With seeds > 1, the whole lab runs once per seed (seed, seed + 1, ...) in <workdir>/seed_<seed>, and the
  # report in <workdir> gives each figure's mean over seeds with a 95% interval over seeds.
  c.seeds = 1
  c.progress_bar = True
  c.compilation_cache_dir = common.DEFAULT_COMPILATION_CACHE  # every stage's (configs/common.py)
  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=LAB_MODEL["vocab_size"], documents=3000))
  scale = 0.4 if quick else 1.0

  def steps(n):
    return max(1, int(n * scale))

  # ---- pretraining on the world's prose
  c.stages = ml_collections.ConfigDict()
  pre = pretrain.get_config("tiny")
  pre.model.update(LAB_MODEL)
  pre.data.update(corpus="lab", lab_documents=4000, seq_len=64, batch_size=32)
  pre.total_steps = steps(1600)
  pre.checkpoint_every_steps = 200
  pre.log_every_steps = 20
  pre.optim = common.optim_config(lr=3e-3, warmup_steps=30, weight_decay=0.0)
  c.stages.pretrain = pre

  # ---- SFT (the PPO-init variant: 10% pretraining text)
  s = sft.get_config("tiny,variant=ppo_init")
  s.epochs = 0
  s.total_steps = steps(1200)
  s.model.resid_dropout = 0.0  # the paper's 0.2 is for 1.3B-175B models; it starves a model of 0.9M
  s.data.update(
    train="lab:demonstrations:train:3000",
    eval="lab:demonstrations:eval:100",
    seq_len=64,
    batch_size=32,
    pretrain_corpus="lab",
  )
  s.optim = common.optim_config(lr=2e-3, schedule="cosine", warmup_steps=20, final_lr_fraction=0.1)
  s.checkpoint_every_steps = 200
  c.stages.sft = s

  # ---- the SFT baseline (App. C.1; Figure 1 compares every model with it): demonstrations alone, cosine to 10%
  # without warmup, from the pretrained model, trained after the RM so that the RM's score on validation prompts
  # selects its checkpoint (the paper's RMs came from earlier rounds; docs/results.md). Its length is the lab's
  # analogue of 16 epochs: 1,200 steps of 32 are 12.8 passes over the 3,000 demonstrations.
  b = sft.get_config("tiny,variant=baseline")
  b.epochs = 0
  b.total_steps = steps(1200)
  b.model.resid_dropout = 0.0  # as the PPO-init SFT's: the paper's 0.2 starves a model of 0.9M
  b.data.update(train="lab:demonstrations:train:3000", eval="lab:demonstrations:eval:100", seq_len=64, batch_size=32)
  b.optim = common.optim_config(lr=2e-3, schedule="cosine", warmup_steps=0, final_lr_fraction=0.1)
  b.eval_every_steps = steps(150)
  b.checkpoint_every_steps = steps(150)
  b.eval_rm.update(prompts="lab:prompts:eval:64", num_prompts=64, max_new_tokens=24, batch_size=64)
  b.eval_rm.rm = "<workdir>/rm/export"  # the lab's RM: stages/pipeline.py puts its path here
  c.stages.sft_baseline = b

  # ---- labels: samples of the SFT model, ranked by the training labelers
  c.labels = ml_collections.ConfigDict(
    dict(
      prompts=int(1000 * scale),
      eval_prompts=200,
      k_min=4,
      k_max=9,
      temperature=1.0,
      max_new_tokens=24,
      agreement_pairs=2000,
    )
  )

  # ---- the reward model
  r = rm.get_config("tiny")
  r.epochs = 1  # the paper's: the RM overfits after one epoch (docs/paper.md §4.1)
  # A sampled response, decoded and encoded again, can take more tokens than it was sampled with; the rare
  # comparison that no longer fits is skipped and counted rather than stopping the pipeline.
  r.data.update(seq_len=64, max_responses=9, batch_size=16, on_error="skip")
  r.optim = common.optim_config(lr=5e-4, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
  r.checkpoint_every_steps = 100
  c.stages.rm = r

  # ---- PPO (γ = 0) and PPO-ptx (γ = 27.8), same seeds
  for name, gamma in (("ppo", 0.0), ("ppo_ptx", 27.8)):
    p = ppo.get_config("tiny")
    p.ppo.update(
      ptx_coef=gamma, episodes=steps(80) * 64, rollout_batch=64, minibatch=16, max_new_tokens=24, ptx_per_episode=1
    )
    p.data.update(
      train="lab:prompts:train:4000",
      eval="lab:prompts:eval:128",
      max_prompt_len=24,
      prompt_buckets="24",
      ptx_seq_len=64,
      eval_prompts=128,
    )
    # β = 0.1 rather than the paper's 0.02: a 0.9M-parameter RM is easy to fool, and at 0.02 the policy drifts
    # from the SFT model's content (held-out correctness falls) while it sheds the habits; at 0.1 it keeps the
    # content and sheds the habits (docs/results.md has both).
    p.ppo.kl_coef = 0.1
    p.eval_every_steps = 20
    p.checkpoint_every_steps = 10
    p.optim = common.optim_config(lr=2e-4, schedule="constant", warmup_steps=2, warmup_init_fraction=0.1, eps=1e-5)
    p.value_optim = common.optim_config(lr=3e-4, schedule="constant", eps=1e-5)
    c.stages[name] = p

  if a.compare:
    _add_comparison(c, steps)

  # ---- evaluation on held-out prompts, by held-out labelers
  c.evaluation = ml_collections.ConfigDict(
    dict(prompts=int(400 * scale), max_new_tokens=24, temperature=1.0, bootstrap=2000)
  )
  return c


def _add_comparison(c: ml_collections.ConfigDict, steps) -> None:
  """GRPO, RLOO and DPO beside PPO and PPO-ptx, and best-of-n (configs/pipeline.py:compare)."""
  for name, estimator, kl_in in (("grpo", "grpo", "loss"), ("rloo", "rloo", "reward")):
    p = c.stages.ppo.copy_and_resolve_references()
    p.ppo.update(advantage_estimator=estimator, samples_per_prompt=4, kl_in=kl_in, ptx_coef=0.0)
    c.stages[name] = p
  for name in ("ppo", "ppo_ptx", "grpo", "rloo"):  # curves for the over-optimization figure
    c.stages[name].eval_at_start = True
    c.stages[name].eval_every_steps = max(1, steps(80) // 8)
  d = dpo.get_config("tiny")
  d.model.update(LAB_MODEL)
  d.data.update(seq_len=64, max_responses=9, batch_size=16, on_error="skip")  # the RM's comparisons, as the RM
  d.epochs = 1
  d.dpo.beta = 0.1
  d.optim = common.optim_config(lr=5e-5, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
  d.checkpoint_every_steps = 100
  c.stages.dpo = d
  # best_of_n samples per prompt from the SFT model; the RM keeps its best of the first n, n in `n`; the table
  # shows n = table_n.
  c.compare = ml_collections.ConfigDict(dict(best_of_n=64, n="1,2,4,8,16,32,64", table_n=16))
