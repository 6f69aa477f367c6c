"""Fields shared by every stage's config: run length and cadence, mesh, sharding rules, optimizer.

Every stage's `get_config` starts from `run_config(...)` and adds its own sections. Any field can be
overridden on the command line, e.g. `--config.total_steps=500 --config.mesh.fsdp=8`.
"""

import ml_collections

from instructgpt_jax import config_lib, sharding


def run_config(
  *,
  stage: str,
  size: str,
  total_steps: int,
  checkpoint_every_steps: int,
  log_every_steps: int,
  seed: int = 0,
  **model_fields,
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = seed
  c.total_steps = total_steps
  c.checkpoint_every_steps = checkpoint_every_steps
  c.keep_checkpoints = 3
  c.log_every_steps = log_every_steps
  c.eval_every_steps = 0  # 0: evaluate only at the end
  c.progress_bar = True
  c.model = config_lib.model_section(size, **model_fields)
  # Device mesh (data, fsdp, tensor); -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = sharding.DEFAULT_RULES
  return c


def optim_config(
  *,
  lr: float,
  schedule: str = "cosine",
  warmup_steps: int = 0,
  warmup_init_fraction: float = 0.0,
  final_lr_fraction: float = 0.1,
  weight_decay: float = 0.0,
  clip_norm: float = 1.0,
  eps: float = 1e-8,
  tf_style_eps: bool = False,
) -> ml_collections.ConfigDict:
  """Adam with InstructGPT's β = (0.9, 0.95) (spec §2) and one of the schedules of optim.py."""
  return ml_collections.ConfigDict(
    dict(
      lr=lr,
      b1=0.9,
      b2=0.95,
      eps=eps,
      tf_style_eps=tf_style_eps,
      weight_decay=weight_decay,
      clip_norm=clip_norm,
      schedule=schedule,
      warmup_steps=warmup_steps,
      warmup_init_fraction=warmup_init_fraction,
      final_lr_fraction=final_lr_fraction,
    )
  )
