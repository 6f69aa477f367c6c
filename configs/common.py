"""Fields shared by every stage's config: run length and cadence, mesh, sharding rules, optimizer.

Every stage's `get_config` starts from `run_config(...)` and adds its own sections. Any field can be
overridden on the command line, e.g. `--config.total_steps=500 --config.mesh.fsdp=8`.
"""

import ml_collections

from instructgpt_jax import config_lib, sharding

# JAX's persistent compilation cache (stages.use_compilation_cache): a second run of the same programs (a resume, the
# next sweep point) reads them instead of compiling. A per-user local folder by default; a gs:// folder serves a
# whole pod; "" turns it off. JAX_COMPILATION_CACHE_DIR, where set, decides instead, as for any JAX program.
DEFAULT_COMPILATION_CACHE = "~/.cache/instructgpt_jax/jax"


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
  c.eval_at_start = False  # evaluate the starting model before the first step (a metrics row at step 0)
  c.progress_bar = True
  # A resumed run refuses a changed schedule (total steps, learning rates, warmup: library/loop.py
  # SCHEDULE_FIELDS) unless this is True.
  c.allow_schedule_change = False
  c.compilation_cache_dir = DEFAULT_COMPILATION_CACHE
  c.model = config_lib.model_section(size, **model_fields)
  c.model.init_from = ""  # "", an earlier run's workdir, an exported model, or hf:<path> (library/model_io.py)
  # Which checkpoint of an init_from workdir: "" = the one that run selected (SFT: best RM score or validation
  # loss; selected.json), else its newest; "latest"; or a step number.
  c.model.init_from_step = ""
  # Device mesh (data, fsdp, tensor) within a slice; -1 takes the remaining devices. dcn_* multiply an axis
  # across slices (multi-slice TPU). docs/scaling.md says how to choose.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  c.sharding_rules = sharding.DEFAULT_RULES
  # Multi-host: jax.distributed.initialize before anything touches a device. "auto" detects TPU VMs and
  # SLURM; "manual" uses the three fields below (e.g. two processes on one machine); "off" is one process.
  c.distributed = ml_collections.ConfigDict(dict(mode="off", coordinator_address="", num_processes=1, process_id=0))
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
  microbatches: int = 1,
) -> ml_collections.ConfigDict:
  """Adam with InstructGPT's β = (0.9, 0.95) (docs/paper.md §2) and one of the schedules of optim.py.

  `microbatches` > 1 accumulates gradients over that many slices of each batch (same result, less memory).
  """
  return ml_collections.ConfigDict(
    dict(
      lr=lr,
      b1=0.9,
      b2=0.95,
      eps=eps,
      tf_style_eps=tf_style_eps,
      microbatches=microbatches,
      weight_decay=weight_decay,
      clip_norm=clip_norm,
      schedule=schedule,
      warmup_steps=warmup_steps,
      warmup_init_fraction=warmup_init_fraction,
      final_lr_fraction=final_lr_fraction,
    )
  )
