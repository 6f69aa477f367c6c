"""The stages: which module runs a config (`STAGES`, `run`), and the whole config checked before anything runs
(`check_config`). One module per stage in this folder (pretrain, sft, rm, dpo, ppo, pipeline, recipe), each
orchestration only, over the library (instructgpt_jax/library/); chain.py and compare.py are the pipeline's.

Kept apart from main.py (the command line) so that Python code, the lab pipeline and the launchers (`launch/`)
run and check stages without importing the flag definitions a second time.

`check_config` is what every command does first, main.py and the launchers alike: every value the stage
reads, checked by itself and against the others, without reading a file or touching a device, so a typo in
a sweep or a pod's dry run fails here in one line per problem. What needs the files (a data path, a model's
shape, the mesh's devices) is checked by the stage itself, still before anything compiles.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence

import jax

from instructgpt_jax import config_lib, errors, optim, paths, sharding
from instructgpt_jax.lab import datasets as _lab_datasets  # noqa: F401 (registers the `lab` data scheme)
from instructgpt_jax.models import sizes

# config.stage -> the module that runs it (its `train(config, workdir)`, `check_config(config, checks)` and,
# optionally, `unused_fields(config)`). The one table the dispatch reads: a researcher's own stage is one entry,
# added from their own script.
STAGES = {
  name: f"instructgpt_jax.stages.{name}" for name in ("pretrain", "sft", "rm", "ppo", "dpo", "pipeline", "recipe")
}
DISTRIBUTED_MODES = ("off", "auto", "manual")
DTYPES = ("float32", "bfloat16", "float16")
OPTIM_SECTIONS = ("optim", "value_optim")


def stage_module(name: str):
  """The module that runs the stage `name` (STAGES)."""
  return importlib.import_module(STAGES[name])


# ------------------------------------------------------------------------------------------ checking a config


def _check_run_fields(config, checks: config_lib.Checks) -> None:
  """The fields every training stage's config has (configs/loop.py)."""
  checks.at_least("seed", config.seed, 0)
  for field in ("total_steps", "eval_every_steps"):
    if field in config:
      checks.at_least(field, config[field], 0)
  for field in ("checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
    if field in config:
      checks.at_least(field, config[field], 1)
  if "epochs" in config:
    checks.at_least("epochs", config.epochs, 0)
    checks.require(config.epochs > 0 or config.total_steps > 0, "epochs", "0 with total_steps 0: set one of them")
  if "mesh" in config:
    _check_mesh(config.mesh, checks)
  if "distributed" in config:
    d = config.distributed
    if checks.one_of("distributed.mode", d.mode, DISTRIBUTED_MODES) and d.mode == "manual":
      checks.require(
        bool(d.coordinator_address), "distributed.coordinator_address", "required with mode=manual (host:port)"
      )
      if checks.at_least("distributed.num_processes", d.num_processes, 1):
        checks.require(
          0 <= d.process_id < d.num_processes,
          "distributed.process_id",
          f"{d.process_id} is not in [0, distributed.num_processes {d.num_processes})",
        )
  for section in OPTIM_SECTIONS:
    if section in config:
      _check_optim(section, config[section], checks)
  if hasattr(config.get("model"), "items"):  # the recipe's `model` is the HF folder it starts from
    _check_model(config.model, checks)


def _check_mesh(mesh, checks: config_lib.Checks) -> None:
  for axis, size in mesh.items():
    checks.require(
      axis.removeprefix("dcn_") in sharding.MESH_AXES, f"mesh.{axis}", f"not a mesh axis {sharding.MESH_AXES}"
    )
    ok = size >= 1 or (size == -1 and not axis.startswith("dcn_"))
    checks.require(
      ok, f"mesh.{axis}", f"{size} must be >= 1" + ("" if axis.startswith("dcn_") else " or -1 (the rest)")
    )
  ici = [axis for axis in sharding.MESH_AXES if mesh.get(axis) == -1]
  checks.require(len(ici) <= 1, "mesh", f"at most one axis may be -1, got {', '.join(ici)}")


def _check_optim(name: str, o, checks: config_lib.Checks) -> None:
  checks.positive(f"{name}.lr", o.lr)
  checks.one_of(f"{name}.schedule", o.schedule, optim.SCHEDULES)
  checks.at_least(f"{name}.warmup_steps", o.warmup_steps, 0)
  checks.fraction(f"{name}.warmup_init_fraction", o.warmup_init_fraction)
  checks.fraction(f"{name}.final_lr_fraction", o.final_lr_fraction)
  checks.fraction(f"{name}.b1", o.b1, below_one=True)
  checks.fraction(f"{name}.b2", o.b2, below_one=True)
  checks.positive(f"{name}.eps", o.eps)
  checks.at_least(f"{name}.weight_decay", o.weight_decay, 0)
  checks.at_least(f"{name}.clip_norm", o.clip_norm, 0)
  checks.at_least(f"{name}.microbatches", o.microbatches, 1)


def _check_model(model, checks: config_lib.Checks) -> None:
  """The model section: a random start resolves in full (size, shape, runtime fields); a start from
  `init_from` takes its shape from there (checked when the stage reads it), so only the fields that say how
  the model runs are checked here."""
  from instructgpt_jax.library import model_io

  for field in ("dtype", "param_dtype"):
    if model.get(field) is not None:
      checks.one_of(f"model.{field}", model[field], DTYPES)
  if not model.get("init_from"):
    checks.capture(sizes.resolve, {k: v for k, v in model.items() if k not in ("init_from", "init_from_step")})
    return
  skip = (*model_io.SHAPE_FIELDS, *model_io.NOT_MODEL_FIELDS, "lora")
  runtime = {k: v for k, v in model.items() if k not in skip}
  checks.capture(sizes.resolve, {**runtime, "size": "tiny"})  # a shape to check the runtime fields against
  # The adapters' own fields; their rank and targets against the model's projections when the stage reads it.
  checks.capture(sizes.LoraConfig.of, model.get("lora"))


def unused_overrides(config, overridden: Iterable[str]) -> dict[str, str]:
  """{field: why this config cannot use it} for each of the `overridden` dotted fields that would change nothing
  in this config (each stage's `unused_fields`; `model.size` beside `model.init_from` for every stage). The
  stages inside the lab pipeline's and the recipe's configs answer for their `stages.<name>.` fields."""
  unused = unused_fields(config)
  stage = config.get("stage")
  if stage in STAGES:
    unused.update(getattr(stage_module(stage), "unused_fields", lambda c: {})(config))
  out = {}
  for field in overridden:
    reason = next((why for prefix, why in unused.items() if field == prefix or field.startswith(prefix + ".")), None)
    if reason is not None:
      out[field] = reason
  for name, sub in (config.get("stages") or {}).items():
    prefix = f"stages.{name}."
    inner = unused_overrides(sub, [f.removeprefix(prefix) for f in overridden if f.startswith(prefix)])
    out.update({prefix + field: why for field, why in inner.items()})
  return out


def unused_fields(config) -> dict[str, str]:
  """{field or section: why this config ignores it}, for the fields every stage has."""
  model = config.get("model")
  if hasattr(model, "get") and model.get("init_from"):
    return {"model.size": f"model.init_from ({model.init_from}) decides the model's shape"}
  return {}


def check_config(
  config, overridden: Iterable[str] = (), *, inputs: bool = True, batches_on_mesh: bool = True, prefix: str = ""
) -> None:
  """Checks every value `config` holds, by itself and against the others, without reading a file; raises
  errors.ConfigError with one line per problem. `overridden`: the dotted fields the user set
  (`--config.<field>=...`); one that this config cannot use (e.g. `model.size` beside `model.init_from`) is a
  problem too (`unused_overrides`). `inputs` False: the data files and starting models may be left empty
  (an AOT compile reads none). `batches_on_mesh` False: a batch need not divide over the mesh the config fixes
  (an AOT plan raises it instead). The stage's own checks are its trainer's `check_config(config, checks)`; the
  stages inside the lab pipeline's and the recipe's configs are checked too, their inputs left to the
  pipeline."""
  checks = config_lib.Checks(prefix, inputs=inputs, batches_on_mesh=batches_on_mesh)
  overridden = list(overridden)
  stage = config.get("stage")
  if not checks.one_of("stage", stage, tuple(STAGES)):
    checks.raise_if_any()
  _check_run_fields(config, checks)
  module = stage_module(stage)
  module.check_config(config, checks)
  if not prefix:  # the outermost config answers for the stages inside it too (unused_overrides)
    for field, why in unused_overrides(config, overridden).items():
      checks.require(False, field, f"given, but {why}; drop it")
  for name, sub in (config.get("stages") or {}).items():  # the lab pipeline and the recipe: a config per stage
    try:
      check_config(sub, inputs=False, prefix=f"{prefix}stages.{name}.")
    except errors.ConfigError as e:
      checks.problems += str(e).splitlines()
  checks.raise_if_any()


def overridden_fields(overrides: Iterable[str]) -> list[str]:
  """["--config.ppo.kl_coef=0.1", ...] -> ["ppo.kl_coef", ...]."""
  return [o.split("=", 1)[0].removeprefix("--config.") for o in overrides]


def load_checked(config_arg: str, overrides: Sequence[str] = (), *, inputs: bool = True, batches_on_mesh: bool = True):
  """The config `main.py --config=<config_arg> <overrides>` would run, checked (`check_config`): what every
  command that starts or prints runs does first. Raises errors.ConfigError, one line per problem."""
  config = config_lib.load_config(config_arg, overrides)
  check_config(config, overridden_fields(overrides), inputs=inputs, batches_on_mesh=batches_on_mesh)
  return config


def resolved_config(config) -> dict:
  """The config as the run's config.json will hold it: the model's shape resolved (from the size table, or read
  from `model.init_from`), the version and the git commit (`main.py --print_config`). The stages of the lab
  pipeline and of the recipe take their models from the stage before, so theirs are shown as configured."""
  from instructgpt_jax.library import loop, model_io

  model = config.get("model")
  model_cfg = model_io.resolve(model)[0] if hasattr(model, "get") and "size" in model else None
  return loop.run_record(config, model_cfg)


# ------------------------------------------------------------------------------------------ running a stage


def initialize_distributed(dist) -> None:
  """jax.distributed.initialize from the config's `distributed` section (checked by check_config), before any
  device is touched."""
  if dist.mode == "auto":  # TPU VMs, SLURM and other clusters JAX detects by itself
    jax.distributed.initialize()
  elif dist.mode == "manual":
    jax.distributed.initialize(
      coordinator_address=dist.coordinator_address, num_processes=dist.num_processes, process_id=dist.process_id
    )


# Programs that compile faster than this are not worth a cache entry (JAX's default: 1 s). Lower, so that the many
# small programs of a PPO iteration (sampler buckets, scoring, evaluation) are kept too.
CACHE_MIN_COMPILE_SECONDS = 0.2


def use_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory` (local, "~" expanded, or gs://); "" turns it off. Where
  JAX_COMPILATION_CACHE_DIR is set, JAX's own setting stays, as for any JAX program."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  if not directory:
    jax.config.update("jax_compilation_cache_dir", None)
    return
  jax.config.update("jax_compilation_cache_dir", os.fspath(paths.absolute(directory)))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)


def run(config, workdir: str):
  """Runs the stage named by `config.stage` in `workdir`; returns that stage's final metrics."""
  check_config(config)
  use_compilation_cache(config.get("compilation_cache_dir", ""))
  if config.get("distributed") and not jax.distributed.is_initialized():
    initialize_distributed(config.distributed)
  return stage_module(config.stage).train(config, workdir)
