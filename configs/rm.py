"""Stage 2: the reward model, trained with the K-wise ranking loss (InstructGPT Eq. 1, docs/paper.md §4).

The paper's values (§3.5, App. C.2): one 6B RM (the GPT-3 6.7B shape) started from the SFT model, 1 epoch,
Adam (0.9, 0.95), lr 9e-6 with a cosine schedule to 10%, batch 64 prompts with all of a prompt's K = 4..9
responses in one batch element (at most 64 × C(9,2) = 2,304 comparisons); Eq. 1's 1/C(K,2) per prompt
(`rm.pair_normalizer="binom_k"`; tied pairs add no loss but count in C(K,2)); afterwards a bias so that the
labeler demonstrations score 0 on average. Our choices where the paper is silent (docs/paper.md §2, §4.3):
no dropout, Adam ε 1e-8, gradients clipped to global norm 1.0, no weight decay, the score read at the last
token.

    python -m instructgpt_jax.main --config=configs/rm.py --workdir=W_RM \
        --config.model.init_from=W_SFT --config.data.train='comparisons/*.jsonl' \
        --config.data.bias_demonstrations='demonstrations/train*.jsonl'
Test / demo variant on the lab's synthetic comparisons (known scoring rule), a few minutes on CPU:
    python -m instructgpt_jax.main --config=configs/rm.py:tiny --workdir=W_RM --config.model.init_from=W_SFT
"""

import ml_collections

from configs import common
from instructgpt_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="6b", tiny=False)
  c = common.run_config(
    stage="rm",
    size="tiny" if a.tiny else a.size,
    total_steps=0,  # 0: derived from epochs and the number of training prompts
    checkpoint_every_steps=100,
    log_every_steps=10,
    dtype="bfloat16",
    param_dtype="float32",
    resid_dropout=0.0,  # RM trained without dropout (our choice, docs/paper.md §4.3)
  )
  c.epochs = 1  # more epochs overfit quickly (App. C.2)
  c.eval_every_steps = 100
  c.data = ml_collections.ConfigDict(
    dict(
      train="",  # comparison JSONL files (K-wise or HH-RLHF pairwise), or lab:comparisons:train:N
      eval="",
      eval_examples=0,  # with no eval files: hold out the last N training prompts
      bias_demonstrations="",  # demonstrations whose mean reward becomes 0 (the SFT training set, §4.1)
      data_dir="",  # where TFDS builds go; "" = <workdir>/tfds
      tokenizer="",  # "": the model's own (model.init_from's), else "bytes"; or a tokenizer.json / HF folder
      template="plain",
      on_error="raise",
      truncate_prompt="none",  # "left": an over-long example keeps the end of its prompt (counted)
      batch_size=64,  # prompts per batch, each with all of its K responses
      seq_len=2048,  # prompt (<= 1k) + response (<= 1k) tokens (App. C)
      max_responses=9,  # K = 4..9 in the paper
      eval_batches=0,  # 0: the whole eval split
    )
  )
  # ε 1e-8, clip 1.0, no weight decay: our choice (the paper gives none).
  c.optim = common.optim_config(
    lr=9e-6, schedule="cosine", final_lr_fraction=0.1, eps=1e-8, clip_norm=1.0, weight_decay=0.0
  )
  c.rm = ml_collections.ConfigDict(
    dict(
      # Eq. 1 divides a prompt's pair losses by C(K,2) ("binom_k"); tied pairs add no loss. "valid_pairs"
      # divides by the non-tied pairs instead, so prompts with ties keep full weight (an option). The
      # evaluation loss uses the same normalizer.
      pair_normalizer="binom_k",
      export_dir="",  # "" = <workdir>/export: the RM for PPO, with its bias
    )
  )
  if a.tiny:
    c.model.dtype = "float32"
    c.epochs = 3
    c.checkpoint_every_steps = 50
    c.eval_every_steps = 0
    c.data.update(
      train="lab:comparisons:train:2000",
      eval="lab:comparisons:eval:200",
      bias_demonstrations="lab:demonstrations:train:500",
      batch_size=16,
      seq_len=256,
      max_responses=7,
    )
    c.optim = common.optim_config(lr=1e-3, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
  return c
