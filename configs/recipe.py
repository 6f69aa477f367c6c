"""SFT → RM → PPO-ptx from a pretrained HuggingFace causal LM on HH-format preference data, in one command.

    python -m instructgpt_jax.main --workdir=runs/hh --config=configs/recipe.py:model=hf:/models/SmolLM2-360M,\
data=/data/hh-rlhf/harmless-base/train.jsonl.gz,ptx=/data/text/*.txt

`model`: an HF folder (hf:PATH, local or gs://) of any family models/hf.py reads; its tokenizer is used.
`data`: HH-RLHF-style `{"chosen", "rejected"}` dialogue pairs (.jsonl or .jsonl.gz; chat `messages` files
give demonstrations and prompts but no comparisons): converted into demonstrations (SFT, and the RM's bias),
comparisons (RM) and prompts (PPO), the last `data.eval_pairs` held out. `ptx`: pretraining text (.txt or
{"text"} .jsonl globs) for the PPO-init SFT's 10% mix and PPO-ptx's γ term; without it, SFT has no mix and
PPO runs with γ = 0 (plain PPO). `size`: "full" (a GPU/TPU host; docs/recipes.md) or "smoke" (a CPU check
of a 135M model in minutes; tests/recipe_test.py). `eval_tasks`: lm-eval tasks joined by `+` (e.g.
eval_tasks=hellaswag+truthfulqa_mc2; the [eval] extra): after the stages, the starting, SFT and PPO models
are evaluated on them and <workdir>/alignment_tax.md tabulates the alignment tax (docs/evaluation.md).
`lora`: a LoRA rank for every stage (e.g. lora=16; 0, the default: full fine-tuning; `with_lora`).

Settings for a model that was pretrained (not the GPT-3-from-scratch defaults of configs/sft.py): no dropout
anywhere, fine-tuning learning rates, bfloat16 compute, prompts truncated from the left to fit `seq_len`,
and an evaluation of the starting model (step 0) in every stage. Each stage runs in `<workdir>/<stage>`
and resumes; `<workdir>/export` is the EMA policy as an HF folder. Any field: `--config.stages.ppo.ppo.kl_coef=0.05`.
"""

import ml_collections

from configs import common, ppo, rm, sft
from instructgpt_jax import config_lib, errors


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, model="", data="", ptx="", size="full", eval_tasks="", lora=0)
  if a.size not in ("full", "smoke"):
    raise errors.ConfigError(f"config arg size: {a.size!r} is not 'full' or 'smoke'")
  smoke = a.size == "smoke"
  c = ml_collections.ConfigDict()
  c.stage = "recipe"
  c.seed = 0
  c.progress_bar = True
  c.compilation_cache_dir = common.DEFAULT_COMPILATION_CACHE  # every stage's (configs/common.py)
  c.model = a.model  # hf:PATH
  c.data = ml_collections.ConfigDict(
    # bias_demonstrations: how many training demonstrations set the RM's bias (0: all, as the paper)
    dict(pairs=a.data, ptx_corpus=a.ptx, eval_pairs=16 if smoke else 500, bias_demonstrations=32 if smoke else 0)
  )
  # The alignment tax (paper §4.2): lm-eval tasks (names or task YAML paths; `+` between them in the config
  # arg, commas in --config.eval.tasks) run on the starting model, the SFT model and the PPO policy after the
  # stages, into <workdir>/alignment_tax.md (docs/evaluation.md). Empty: no evaluation.
  c.eval = ml_collections.ConfigDict(
    dict(
      tasks=a.eval_tasks.replace("+", ","),
      limit=0,  # examples per task (0: all)
      num_fewshot=-1,  # -1: each task's own
      batch_size=16,
      dtype="bfloat16",  # the stages' compute dtype; "float32" for exact scores
      max_length=0,  # the window (0: the model's)
      ppo_without_ptx="",  # a PPO run's workdir trained without ptx (e.g. this recipe with no ptx=): a column
    )
  )
  c.stages = ml_collections.ConfigDict()

  def pretrained(stage, *, seq_len: int | None = None):
    """What every stage changes for a pretrained model."""
    stage.model.update(resid_dropout=0.0, dtype="bfloat16", param_dtype="float32", scan_layers=True)
    stage.eval_at_start = True
    stage.data.template = "plain"  # HH dialogues are already "\n\nHuman: ... \n\nAssistant:" text
    if seq_len is not None:
      stage.data.update(seq_len=seq_len, truncate_prompt="left")
    return stage

  # ---- SFT: the PPO-init variant (2 epochs, 10% pretraining rows when there is pretraining text)
  s = pretrained(sft.get_config("size=1.3b,variant=ppo_init"), seq_len=256 if smoke else 1024)
  # on_error=skip: HH holds a few replies longer than seq_len by themselves; they are skipped and counted.
  s.data.update(batch_size=8 if smoke else 32, pretrain_mix=0.1 if a.ptx else 0.0, on_error="skip")
  s.optim.lr = 1e-5
  s.eval_every_steps, s.checkpoint_every_steps = (0, 1000) if smoke else (200, 200)
  s.total_steps = 3 if smoke else 0  # 0: 2 epochs
  c.stages.sft = s

  # ---- RM: from the SFT model, 1 epoch, the paper's lr (App. C.2); HH gives K = 2
  r = pretrained(rm.get_config("size=1.3b"), seq_len=256 if smoke else 1024)
  r.data.update(batch_size=8 if smoke else 64, max_responses=2, on_error="skip")
  r.eval_every_steps, r.checkpoint_every_steps = (0, 1000) if smoke else (100, 100)
  r.total_steps = 3 if smoke else 0  # 0: 1 epoch
  c.stages.rm = r

  # ---- PPO-ptx: from the SFT model against the RM (β = 0.02, γ = 27.8 per sequence, App. C.4)
  p = pretrained(ppo.get_config("size=1.3b" if a.ptx else "size=1.3b,ptx=false"))
  p.ppo.update(
    rollout_batch=8 if smoke else 512,
    minibatch=8 if smoke else 64,
    episodes=(2 * 8) if smoke else 64_000,
    max_new_tokens=24 if smoke else 256,
    ptx_per_episode=1 if smoke else 8,
  )
  p.data.update(
    max_prompt_len=128 if smoke else 512,
    prompt_buckets="128" if smoke else "",
    ptx_seq_len=128 if smoke else 1024,
    eval_prompts=8 if smoke else 256,
  )
  p.optim.lr = 1e-6
  p.eval_every_steps, p.checkpoint_every_steps = (0, 1000) if smoke else (25, 10)
  c.stages.ppo = p
  if a.lora:
    with_lora(c, a.lora)
  return c


# With LoRA the adapters start at zero and only they train: larger steps than full fine-tuning. These are
# starting points (Hu et al. 2021 tuned 2e-4 for GPT-2 and 1e-4 to 2e-4 for GPT-3 adapters), not rates tuned here.
LORA_LR = {"sft": 2e-4, "rm": 1e-4, "ppo": 1e-5}


def with_lora(c: ml_collections.ConfigDict, rank: int) -> None:
  """`lora=R`: every stage trains rank-R adapters on every attention and MLP projection (alpha 16, so the
  update is scaled by 16/R), the RM's and critic's heads fully; PPO's KL reference is the SFT model as the
  policy's own base with the adapters off; the learning rates are LoRA_LR's."""
  if not isinstance(rank, int) or rank < 0:
    raise errors.ConfigError(f"config arg lora: {rank!r} is not a rank (an integer > 0; 0: full fine-tuning)")
  for name, stage in c.stages.items():
    stage.model.lora.rank = rank
    stage.optim.lr = LORA_LR[name]
