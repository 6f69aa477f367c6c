"""DPO on the reward model's comparison data (beyond the paper; docs/losses.md): the policy against a frozen
reference (the SFT model), a prompt's K ranked responses in one batch element (`losses.dpo_loss`). `dpo.form`:
"all_pairs" (default) is the all-pairs Bradley-Terry generalization, every C(K,2) pair as the RM trains;
"plackett_luce" is DPO's own K-wise loss (Rafailov et al. 2023, App. A.3). The two agree at K = 2. Logs the
implicit-reward accuracy and margin, on held-out comparisons too.

    python -m instructgpt_jax.main --config=configs/dpo.py:tiny --workdir=W_DPO --config.model.init_from=W_SFT

`dpo.reference` "" = model.init_from. K-wise or pairwise (HH-RLHF) comparison files, as configs/rm.py reads.
"""

import ml_collections

from configs import common, rm
from instructgpt_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="1.3b", tiny=False)
  c = common.run_config(
    stage="dpo",
    size="tiny" if a.tiny else a.size,
    total_steps=0,  # 0: derived from epochs and the number of training prompts
    checkpoint_every_steps=100,
    log_every_steps=10,
    dtype="bfloat16",
    param_dtype="float32",
    resid_dropout=0.0,
  )
  c.epochs = 1
  c.eval_every_steps = 100
  # The RM's comparison data, read the same way (K-wise or HH-RLHF pairwise); the RM's bias has no use here.
  c.data = rm.get_config("tiny" if a.tiny else "").data
  del c.data["bias_demonstrations"]
  c.optim = common.optim_config(
    lr=1e-6, schedule="cosine", warmup_steps=100, final_lr_fraction=0.1, eps=1e-8, clip_norm=1.0, weight_decay=0.0
  )
  c.dpo = ml_collections.ConfigDict(
    dict(
      beta=0.1,  # β of the implicit reward β·log(π/π_ref) (Rafailov et al. 2023)
      form="all_pairs",  # "all_pairs" (Eq. 1 on the implicit rewards) or "plackett_luce" (Rafailov et al., App. A.3)
      pair_normalizer="binom_k",  # as rm.pair_normalizer: 1/C(K,2) per prompt (Eq. 1); "all_pairs" only
      reference="",  # "" = model.init_from (the SFT model)
    )
  )
  if a.tiny:
    c.model.dtype = "float32"
    c.checkpoint_every_steps = 20
    c.eval_every_steps = 0
    c.optim = common.optim_config(lr=1e-4, schedule="cosine", warmup_steps=5, final_lr_fraction=0.1)
  return c


def sweep():
  """β of the implicit reward."""
  return [{"dpo.beta": beta} for beta in (0.05, 0.1, 0.3)]
