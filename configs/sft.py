"""Stage 1: supervised fine-tuning on demonstrations (docs/paper.md §3).

Two variants with the paper's values:
  variant=baseline   the "SFT" baseline (App. C.1): 16 epochs, cosine to 10%, no warmup, residual dropout
                     0.2, lr 9.65e-6 and batch 32 (1.3B, 6B) or 5.03e-6 and batch 8 (175B). The paper
                     selects its checkpoint by the RM score of sampled responses on validation prompts: set
                     `eval_rm.rm` (an exported RM) and `eval_rm.prompts`, and the best-scoring evaluated
                     checkpoint is kept and named in selected.json; without them the lowest validation loss
                     selects (our fallback).
  variant=ppo_init   the PPO-init SFT (App. C.3; also the KL reference of PPO): 2 epochs over the
                     demonstrations with 10% pretraining rows mixed in, lr 5e-6 / 1.04e-5 / 2.45e-6 and
                     batch 32 / 32 / 8. App. C.3 lists no dropout: we train it without (our choice; it is
                     the KL reference and PPO's start, both run without dropout). "10%" is of the loss
                     tokens (`data.pretrain_mix_by="loss_tokens"`: pretraining rows are drawn so that they
                     carry 10% of the loss tokens); "rows" makes 10% of the rows pretraining text, which with
                     2,048-token rows is most of the loss tokens (docs/paper.md §3.3). It keeps its last
                     step (`select_checkpoint=False`; the paper trains it 2 epochs, choosing only its lr).
Our choices where the paper is silent (docs/paper.md §2, §3.3): Adam ε 1e-8, gradients clipped to global
norm 1.0, no weight decay, loss on response tokens only, EOS appended to every response.

    python -m instructgpt_jax.main --config=configs/sft.py:size=1.3b,variant=ppo_init --workdir=W_SFT \
        --config.model.init_from=hf:/models/gpt3-like --config.data.train='demos/train*.jsonl' \
        --config.data.pretrain_corpus='/data/pretrain/*.txt'
The CPU variant on the lab's generated demonstrations (a few minutes):
    python -m instructgpt_jax.main --config=configs/sft.py:tiny --workdir=W_SFT
"""

import ml_collections

from configs import common
from instructgpt_jax import config_lib, errors
from instructgpt_jax.models import sizes

# (epochs, pretraining mix) and {size: (lr, batch)} per variant (docs/paper.md §3.1, §3.2).
VARIANTS = {
  "baseline": ((16, 0.0), {"gpt3-1.3b": (9.65e-6, 32), "gpt3-6.7b": (9.65e-6, 32), "gpt3-175b": (5.03e-6, 8)}),
  "ppo_init": ((2, 0.1), {"gpt3-1.3b": (5e-6, 32), "gpt3-6.7b": (1.04e-5, 32), "gpt3-175b": (2.45e-6, 8)}),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="1.3b", variant="baseline", tiny=False)
  if a.variant not in VARIANTS:
    raise errors.ConfigError(f"config arg variant: {a.variant!r} is not one of {sorted(VARIANTS)}")
  (epochs, mix), by_size = VARIANTS[a.variant]
  size = sizes.ALIASES.get(a.size, a.size)
  lr, batch = by_size.get(size, by_size["gpt3-1.3b"])
  c = common.run_config(
    stage="sft",
    size="tiny" if a.tiny else size,
    total_steps=0,  # 0: derived from epochs and the number of demonstrations
    checkpoint_every_steps=200,
    log_every_steps=10,
    dtype="bfloat16",
    param_dtype="float32",
    resid_dropout=0.2 if a.variant == "baseline" else 0.0,  # 0.2: App. C.1; C.3 names none (docstring)
  )
  c.variant = a.variant
  c.epochs = epochs
  # The baseline's checkpoint is chosen (by RM score with eval_rm.rm, else by validation loss); the PPO-init SFT
  # keeps its last step: the paper trains it for 2 epochs and tunes only its lr (docs/paper.md §3.3).
  c.select_checkpoint = a.variant == "baseline"
  c.eval_every_steps = 200
  c.data = ml_collections.ConfigDict(
    dict(
      train="",  # demonstration JSONL files, or lab:demonstrations:train:N
      eval="",
      eval_examples=0,
      data_dir="",  # "" = <workdir>/tfds
      tokenizer="",  # "": the model's own (model.init_from's), else "bytes"; or a tokenizer.json / HF folder
      template="plain",  # the paper's format: the prompt, then the response (docs/paper.md §7.1)
      on_error="raise",
      truncate_prompt="none",  # "left": an over-long example keeps the end of its prompt (counted)
      batch_size=batch,
      seq_len=2048,  # the paper's context (docs/paper.md §2)
      pack=False,
      loss_on_prompt=False,  # loss on response tokens only (docs/paper.md §3.3, our default)
      pretrain_mix=mix,  # PPO-init SFT: 10% pretraining text (App. C.3); epochs count demonstrations only
      pretrain_mix_by="loss_tokens",  # 10% of the loss tokens; "rows": 10% of the rows (docs/paper.md §3.3)
      pretrain_corpus="",  # "lab" or globs of .txt / .jsonl files
      eval_batches=0,  # 0: the whole eval split
    )
  )
  # Adam (0.9, 0.95) (App. C); ε 1e-8, clip 1.0, no weight decay: our choice (the paper gives none).
  c.optim = common.optim_config(
    lr=lr, schedule="cosine", warmup_steps=0, final_lr_fraction=0.1, eps=1e-8, clip_norm=1.0, weight_decay=0.0
  )
  # Checkpoint selection by reward-model score (docs/paper.md §3.1): every eval, sample responses to validation
  # prompts and score them with this exported RM.
  c.eval_rm = ml_collections.ConfigDict(
    dict(rm="", prompts="", num_prompts=64, max_new_tokens=256, temperature=1.0, batch_size=16)
  )
  if a.tiny:
    c.model.dtype = "float32"
    c.epochs = 4 if a.variant == "baseline" else 2
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 0
    c.data.update(
      train="lab:demonstrations:train:2000",
      eval="lab:demonstrations:eval:100",
      batch_size=16,
      seq_len=256,
      pretrain_corpus="lab",
    )
    c.optim = common.optim_config(lr=2e-3, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
    c.eval_rm.update(prompts="lab:prompts:eval:32", num_prompts=32, max_new_tokens=96, batch_size=16)
  return c
