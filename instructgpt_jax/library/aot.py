"""Ahead-of-time compilation of each stage's step for a target topology, and what it needs per device.

    python -m launch.aot --target=v5p-1024 --config=configs/sft.py:size=175b \
        --config.mesh.fsdp=64 --config.mesh.tensor=8 --config.data.batch_size=64 --config.model.remat=full

The same configs and overrides as `main.py`; nothing runs and no accelerator is needed. Targets are named as in
`accelerators.py` (any v4/v5e/v5p/v6e slice, GPU clusters, fake CPU devices). A TPU target's devices come from
libtpu's topology description (`jax.experimental.topologies`, installed with `jax[tpu]`), so XLA:TPU compiles
the real sharded program and `memory_analysis()` gives its per-device buffers; a program that does not fit
fails to compile with RESOURCE_EXHAUSTED, which is reported as such. A GPU cluster is compiled by XLA:TPU for
as many v5p chips (no XLA:GPU compiler runs offline). A `cpu` target uses fake CPU devices: parameter,
optimizer and batch sizes are exact (they follow from the shardings), but XLA:CPU's temporary memory is far
from an accelerator's, so it is not reported and only the state decides whether a plan fits.

Per device, for each program a stage runs:
  params      parameters (frozen models included: PPO's reference and reward model)
  opt_state   optimizer state (Adam moments), and PPO's EMA of the policy
  kv_cache    keys and values of the sampler's cache (PPO rollouts), from the cache's shardings
  temp        XLA's temporary buffers: activations, gradients, logits; the KV cache lives here too
  peak        everything resident while the program runs: all stage state + the program's other inputs,
              its outputs that are not donated inputs, and temp

`report` raises a global batch the mesh does not divide to the next size it does (`batch_fallback`, and
says so); a plan that does not fit tries a few single changes (`single_changes`: more fsdp, more tensor,
more microbatches or smaller PPO batches, full remat) and names the first that fits.

The steps are the stages' own: SFT's `lm_steps.make_train_step` under `train_state.jit_step`, exactly as
`stages/sft.py` builds it; the RM's `lm_steps.make_rm_train_step`, as `stages/rm.py`; PPO's state, rollout
sampler and minibatch step from `library/ppo_steps.py` (`abstract_state`, `jit_steps`), the pieces
`stages/ppo.py` runs, with a separate critic or a shared trunk as the config says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding

from instructgpt_jax import accelerators, config_lib, errors, generation, models, optim, sharding, train_state
from instructgpt_jax.library import lm_steps, loop, model_io, ppo_steps
from instructgpt_jax.models import kv_cache

GiB = 2**30


Target = accelerators.Target


def tpu_environment(target: Target) -> None:
  """Before libtpu starts (the first topology it describes): libtpu asks the TPU VM's metadata server for the
  slice and its workers; off a TPU VM it gets no answer and prints an `E0000 ... unexpected worker hostname`
  error and a host-bounds warning, harmless for a topology named explicitly. Naming this one host and a slice
  (the first TPU target's; the topology compiled for is the one passed to get_topology_desc) silences both.
  ALLOW_MULTIPLE_LIBTPU_LOAD: two processes (pytest -n 2) may compile at once, without libtpu's lock file."""
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
  os.environ.setdefault("TPU_LOG_DIR", "/tmp/tpu_logs")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def target_devices(target: Target) -> list:
  if target.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < target.devices:
      raise ValueError(
        f"target {target.name}: needs {target.devices} CPU devices, {len(devices)} present; set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={target.devices} before jax starts"
      )
    return devices[: target.devices]
  tpu_environment(target)
  from jax.experimental import topologies

  bounds = {"chips_per_host_bounds": list(target.chips_per_host)} if target.chips_per_host else {}
  topology = topologies.get_topology_desc(
    topology_name=target.topology, platform=target.platform, chip_config_name=target.chip_config, **bounds
  )
  devices = list(topology.devices)
  if len(devices) != target.devices:
    raise ValueError(f"target {target.name}: topology {target.topology} has {len(devices)} devices")
  return devices


# ------------------------------------------------------------------------------------------ bytes per device


def device_bytes(tree) -> int:
  """Bytes one device holds of the ShapeDtypeStructs in `tree` (the largest shard of each); other leaves
  (static Python values) hold none."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.ShapeDtypeStruct):
      continue
    shape = x.sharding.shard_shape(x.shape) if isinstance(x.sharding, NamedSharding) else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_spec(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch arrays {name: (shape, dtype)} sharded over the batch axes like `loop.to_global`."""
  sh = loop.batch_sharding(mesh, rules)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class Program:
  """One jitted program of a stage, lowered with abstract arguments. `state_args`: which positional
  arguments are stage state (counted in the stage's resident bytes), the others are per-call inputs."""

  name: str
  jitted: Any
  args: tuple
  state_args: tuple[int, ...]
  kwargs: dict = dataclasses.field(default_factory=dict)  # abstract keyword arguments and static values

  def lower(self):
    return self.jitted.lower(*self.args, **self.kwargs)

  @property
  def argument_bytes(self) -> int:
    return device_bytes((self.args, self.kwargs))


@dataclasses.dataclass
class StagePlan:
  """What a stage keeps on the devices (per-device bytes, exact) and the programs it runs."""

  stage: str
  params: int
  opt_state: int
  kv_cache: int
  programs: list[Program]
  models: dict[str, int]  # model name -> parameter count
  resident: int  # all state kept between programs: params, optimizer state, EMA, step counters, RNG keys
  batch: str = ""  # the global batch, in words
  rollout_layout: str = ""  # PPO: the rollout's layout (ppo.rollout_layout) and why


# ------------------------------------------------------------------------------------------ stages


def _tx(config):
  return optim.make_optimizer(config.optim, 1000)


def _per_shard(rows: int, mesh) -> str:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return f"{rows // shards} per data×fsdp shard of {shards}"


def sft_plan(config, mesh, rules) -> StagePlan:
  """The SFT (and pretraining) step: lm_steps.make_train_step under train_state.jit_step, as stages/sft.py."""
  model_cfg = models.resolve(config.model.to_dict())
  tx = _tx(config)
  graphdef, abstract, shardings = train_state.abstract_state(model_cfg, tx, mesh, rules)
  step = lm_steps.make_train_step(
    graphdef, model_cfg, tx, optim.schedule(config.optim, 1000), microbatches=config.optim.microbatches
  )
  b, n = config.data.batch_size, config.data.seq_len
  loop.check_batch("data.batch_size", b, mesh)
  keys = {k: ((b, n), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  keys["mask"] = ((b, n), jnp.float32)
  if config.data.get("pretrain_mix"):
    keys["kind"] = ((b,), jnp.int32)
  batch = batch_spec(keys, mesh, rules)
  jitted = train_state.jit_step(step, shardings, loop.batch_sharding(mesh, rules), rules)
  micro = config.optim.microbatches
  return StagePlan(
    "sft",
    params=device_bytes(abstract.params),
    opt_state=device_bytes(abstract.opt_state),
    kv_cache=0,
    programs=[Program("train_step", jitted, (abstract, batch), (0,))],
    models={"policy": models.param_count(abstract.params)},
    resident=device_bytes(abstract),
    batch=f"{b} sequences × {n} tokens ({_per_shard(b, mesh)}" + (f", in {micro} microbatches)" if micro > 1 else ")"),
  )


def rm_plan(config, mesh, rules) -> StagePlan:
  model_cfg = models.resolve(config.model.to_dict())
  tx = _tx(config)
  graphdef, abstract, shardings = train_state.abstract_state(model_cfg, tx, mesh, rules, kind="scalar")
  step = lm_steps.make_rm_train_step(
    graphdef, tx, optim.schedule(config.optim, 1000), config.optim.microbatches, config.rm.pair_normalizer
  )
  b, k, n = config.data.batch_size, config.data.max_responses, config.data.seq_len
  loop.check_batch("data.batch_size", b, mesh)
  batch = batch_spec(
    {"tokens": ((b, k, n), jnp.int32), "segment_ids": ((b, k, n), jnp.int32), "ranks": ((b, k), jnp.int32)},
    mesh,
    rules,
  )
  jitted = train_state.jit_step(step, shardings, loop.batch_sharding(mesh, rules), rules)
  micro = config.optim.microbatches
  return StagePlan(
    "rm",
    params=device_bytes(abstract.params),
    opt_state=device_bytes(abstract.opt_state),
    kv_cache=0,
    programs=[Program("train_step", jitted, (abstract, batch), (0,))],
    models={"reward model": models.param_count(abstract.params)},
    resident=device_bytes(abstract),
    batch=f"{b} prompts × {k} responses × {n} tokens ({_per_shard(b, mesh)}"
    + (f", in {micro} microbatches)" if micro > 1 else ")"),
  )


def kv_cache_spec(policy_cfg, rows: int, length: int, mesh, m: ppo_steps.Models):
  """The sampler's KV cache (kv_cache.empty_cache's shapes) with the shardings KV_CACHE_AXES gives it under the
  rollout's rules."""
  cache = jax.eval_shape(lambda: kv_cache.empty_cache(policy_cfg, rows, length))

  def laid_out(x, axes):
    spec = sharding.logical_to_spec(axes, m.rollout_rules, x.shape, mesh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return cache._replace(
    keys=laid_out(cache.keys, kv_cache.KV_CACHE_AXES), values=laid_out(cache.values, kv_cache.KV_CACHE_AXES)
  )


def ppo_plan(config, mesh, rules, *, rm_size: str = "6b") -> StagePlan:
  """PPO-ptx: policy (with optimizer and EMA), reference, reward model and critic (`rm_size`, the critic
  starts from the RM; a value head on the policy with ppo.shared_trunk; none with a critic-free
  ppo.advantage_estimator); programs: the rollout sampler (KV
  cache) and the minibatch step, both built by ppo_steps as the PPO stage builds them."""
  p = config.ppo
  policy_cfg = models.resolve(config.model.to_dict())
  m = _ppo_models(config, policy_cfg, mesh, rules, rm_size)
  state, shardings = ppo_steps.abstract_state(m)
  steps = ppo_steps.jit_steps(m, shardings)
  replicated = train_state.replicated(mesh)

  # Rollout: the largest prompt bucket and the response bucket, as the trainer's sampler runs them.
  prompt_len, rollout, minibatch = config.data.max_prompt_len, p.rollout_batch, p.minibatch
  loop.check_batch("ppo.minibatch", minibatch, mesh)
  prompts = batch_spec({k: ((rollout, prompt_len), jnp.int32) for k in ("tokens", "segment_ids")}, mesh, rules)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  rollout_program = Program(
    "rollout",
    steps.sample.jitted,
    (m.lm(state.policy.params), prompts["tokens"], prompts["segment_ids"], key),
    (0,),
    {"max_new_tokens": p.max_new_tokens, "length_limit": limit},
  )
  cache = kv_cache_spec(policy_cfg, rollout, generation.cache_length_for(prompt_len, p.max_new_tokens), mesh, m)

  # Training: one minibatch of the scored rollout and its pretraining rows.
  scored = jax.eval_shape(
    functools.partial(ppo_steps.score_rollout, m),
    state.policy.params,
    state.critic.params if m.has_critic else None,
    m.targets["reference"],
    m.targets["reward"],
    state.kl.kl_coef,
    prompts["tokens"],
    prompts["segment_ids"],
    jax.eval_shape(steps.sample.jitted, *rollout_program.args, **rollout_program.kwargs),
  )[0]
  scored = with_shardings(scored, jax.tree.map(lambda _: loop.batch_sharding(mesh, rules), scored))
  rows = jax.ShapeDtypeStruct((minibatch,), jnp.int32, sharding=replicated)
  ptx_batch = {}
  if p.ptx_coef:
    ptx_rows, n = ppo_steps.ptx_rows(p), config.data.ptx_seq_len
    keys = {k: ((ptx_rows, n), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    ptx_batch = batch_spec(dict(keys, mask=((ptx_rows, n), jnp.float32)), mesh, rules)
  train_program = Program("train_step", steps.train, (state, scored, rows, ptx_batch), (0,))

  critic = (state.critic,) if m.has_critic else ()  # critic-free estimators hold none
  batch = (
    f"rollout {rollout} responses ({rollout // p.samples_per_prompt} prompts of <= {prompt_len} tokens, "
    f"<= {p.max_new_tokens} new tokens; {_per_shard(rollout, mesh)}), minibatch {minibatch}"
  )
  if p.ptx_coef:
    batch += f" + {ptx_batch['inputs'].shape[0]} pretraining sequences × {config.data.ptx_seq_len} tokens"
  return StagePlan(
    "ppo",
    params=device_bytes((state.policy.params, [c.params for c in critic], m.targets["reference"], m.targets["reward"])),
    opt_state=device_bytes((state.policy.opt_state, state.policy.ema, [c.opt_state for c in critic])),
    kv_cache=device_bytes(cache.keys) + device_bytes(cache.values),
    programs=[rollout_program, train_program],
    models=_ppo_param_counts(m, state),
    resident=device_bytes((state, m.targets["reference"], m.targets["reward"])),
    batch=batch,
    rollout_layout=rollout_layout_text(p.rollout_layout, mesh, policy_cfg),
  )


def _ppo_models(config, policy_cfg, mesh, rules, rm_size: str) -> ppo_steps.Models:
  """PPO's models as the stage describes them: the RM and critic of `rm_size`'s shape with the policy's
  runtime fields (dtypes, remat, scanned layers); token ids, the bias and the schedules' lengths change no
  buffer."""
  runtime = {k: v for k, v in config.model.to_dict().items() if k not in model_io.SHAPE_FIELDS}
  critic_cfg = models.resolve(dict(runtime, size=rm_size))  # with the policy's adapters, as the stage gives it
  reward_cfg = dataclasses.replace(critic_cfg, lora=models.LoraConfig())  # frozen: no adapters
  lora_reference = policy_cfg.lora.rank and not config.ppo.reference  # stages/ppo.lora_reference
  return ppo_steps.Models.build(
    config.ppo,
    policy_cfg=policy_cfg,
    reference_cfg=None if lora_reference else dataclasses.replace(policy_cfg, lora=models.LoraConfig()),
    reward_cfg=reward_cfg,
    critic_cfg=critic_cfg,
    reward_bias=0.0,
    eos_id=0,  # token ids change no buffer
    pad_id=1,
    policy_tx=_tx(config),
    policy_lr=optim.schedule(config.optim, 1000),
    critic_tx=optim.make_optimizer(config.value_optim, 1000),
    mesh=mesh,
    rules=rules,
  )


def _ppo_param_counts(m: ppo_steps.Models, state) -> dict[str, int]:
  counts = {
    "policy": models.param_count(m.lm(state.policy.params)),
    "reference": models.param_count(m.targets["reference"]) if m.targets["reference"] is not None else 0,
    "reward model": models.param_count(m.targets["reward"]),
  }
  counts.update({"value head": models.param_count(state.policy.params["value_head"])} if m.shared_trunk else {})
  counts.update({"critic": models.param_count(state.critic.params)} if m.has_critic else {})
  return counts


def rollout_layout_text(layout: str, mesh, policy_cfg) -> str:
  """The rollout's layout as ppo_steps.rollout_layout picks it, and why."""
  chosen = ppo_steps.rollout_layout(layout, mesh, policy_cfg)
  if layout != "auto":
    return f"{chosen} (ppo.rollout_layout={layout})"
  if chosen == "decode":
    why = f"fsdp = {mesh.shape['fsdp']} splits the weights and fsdp × tensor divides the {policy_cfg.kv_heads} kv heads"
  elif mesh.shape["fsdp"] == 1:
    why = "fsdp = 1: no weights to gather per token"
  else:
    split = mesh.shape["fsdp"] * mesh.shape["tensor"]
    why = f"fsdp × tensor = {split} does not divide the {policy_cfg.kv_heads} kv heads the decode layout splits"
  return f"{chosen} (ppo.rollout_layout=auto: {why})"


PLANS = {"sft": sft_plan, "pretrain": sft_plan, "rm": rm_plan, "ppo": ppo_plan}


# ------------------------------------------------------------------------------------------ compile and report


@dataclasses.dataclass
class ProgramMemory:
  name: str
  arguments: int  # bytes per device, as the compiled program counts them
  outputs: int
  aliased: int  # outputs written into donated inputs
  temp: int | None  # None: not measured (fake CPU devices)
  peak: int | None  # resident stage state + this program's other inputs + new outputs + temp
  compile_s: float
  error: str = ""  # the compiler's message when the program does not fit


@dataclasses.dataclass(frozen=True)
class BatchChange:
  """A global batch the mesh does not divide, raised for the compile to the next size it does."""

  field: str  # "data.batch_size", "ppo.minibatch", "ppo.rollout_batch"
  old: int
  new: int
  why: str

  @property
  def flag(self) -> str:
    return f"--config.{self.field}={self.new}"

  def __str__(self) -> str:
    return f"{self.field} {self.old} -> {self.new}: {self.why}; to run this plan on the pod, pass {self.flag}"


@dataclasses.dataclass
class Candidate:
  """One change tried on a plan that does not fit: the flags to add, and what it gave."""

  flags: list[str]
  report: Report | None = None  # None: not compiled
  verdict: str = ""  # one line: its peak against the memory, or why it was not compiled


@dataclasses.dataclass
class Report:
  target: Target
  stage: str
  mesh: dict[str, int]
  plan: StagePlan
  programs: list[ProgramMemory]
  batch_changes: list[BatchChange] = dataclasses.field(default_factory=list)
  candidates: list[Candidate] = dataclasses.field(default_factory=list)

  @property
  def peak(self) -> int | None:
    peaks = [program.peak for program in self.programs]
    return None if any(p is None for p in peaks) else max(peaks)

  @property
  def hbm(self) -> int:
    return int(self.target.hbm_gib * GiB)

  @property
  def fits(self) -> bool | None:
    if any(program.error for program in self.programs):
      return False
    if self.peak is None:  # temp unmeasured: the state alone decides only when it does not fit
      return False if self.plan.resident > self.hbm else None
    return self.peak <= self.hbm

  @property
  def used(self) -> int:
    """The bytes per device that decide the fit: the peak, or the resident state where temp is not measured."""
    return self.plan.resident if self.peak is None else self.peak

  @property
  def tight(self) -> bool:
    """Fits (or its state does), with under HEADROOM of the memory left."""
    return self.fits is not False and self.used > (1 - HEADROOM) * self.hbm

  @property
  def fitting_candidate(self) -> Candidate | None:
    return next((c for c in self.candidates if c.report is not None and c.report.fits is not False), None)


HEADROOM = 0.10  # a plan that leaves less of the memory free is reported as tight


_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED|exceed|Ran out of memory", re.IGNORECASE)


@contextlib.contextmanager
def without_persistent_cache():
  """JAX's persistent compilation cache off: a program compiled for a topology, with no client of its own,
  cannot be read back from it (every such read warns and compiles again), so it is neither read nor written.
  JAX decides once per process whether the cache is used; reset_cache makes it decide again, on the way in
  and on the way out."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


def compile_program(program: Program, resident: int, *, measure_temp: bool) -> ProgramMemory:
  """Lowers and compiles `program`; its per-device memory from `memory_analysis()` only. `measure_temp`: a
  compile for an accelerator's topology (temp measured; the persistent cache left out of it)."""
  t0 = time.perf_counter()
  state_in_args = device_bytes([program.args[i] for i in program.state_args])
  try:
    with without_persistent_cache() if measure_temp else contextlib.nullcontext():
      compiled = program.lower().compile()
  except Exception as e:  # XLA reports a program that cannot fit as a compile error
    message = str(e)
    if not _EXHAUSTED.search(message):
      raise
    first = next((line for line in message.splitlines() if _EXHAUSTED.search(line)), message.splitlines()[0])
    return ProgramMemory(program.name, 0, 0, 0, None, None, time.perf_counter() - t0, error=first.strip()[:300])
  memory = compiled.memory_analysis()
  temp = int(memory.temp_size_in_bytes) if measure_temp else None
  outputs, aliased, arguments = (
    int(memory.output_size_in_bytes),
    int(memory.alias_size_in_bytes),
    int(memory.argument_size_in_bytes),
  )
  peak = None
  if temp is not None:
    peak = resident + (arguments - state_in_args) + (outputs - aliased) + temp
  return ProgramMemory(program.name, arguments, outputs, aliased, temp, peak, time.perf_counter() - t0)


def target_mesh(config, target: Target):
  """The config's mesh over `target`'s devices (errors.ConfigError where it does not lay them out)."""
  return sharding.make_mesh(config.mesh.to_dict(), devices=target_devices(target))


def plan_for(config, target: Target, *, rm_size: str = "6b", mesh=None) -> tuple[Any, StagePlan]:
  """(mesh, the stage's plan) on `target`'s devices: exact state sizes and the programs, nothing compiled."""
  if config.stage not in PLANS:
    raise errors.ConfigError(f"stage: aot plans {', '.join(PLANS)}, not {config.stage!r}")
  mesh = target_mesh(config, target) if mesh is None else mesh
  rules = sharding.rules_dict(config.sharding_rules)
  plan_fn = PLANS[config.stage]
  plan = plan_fn(config, mesh, rules, rm_size=rm_size) if config.stage == "ppo" else plan_fn(config, mesh, rules)
  return mesh, plan


def _round_up(value: int, unit: int) -> int:
  return max(unit, -(-value // unit) * unit)


def batch_fallback(config, mesh) -> list[BatchChange]:
  """The global batches `mesh` does not divide, each raised to the smallest size at or above it that it does:
  every data×fsdp shard needs whole rows (SFT sequences, RM prompts with their K responses, PPO rollouts),
  whole microbatches of them (optim.microbatches), and PPO's rollout whole minibatches and prompt groups."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  changes = []

  def change(field: str, old: int, unit: int, parts: str):
    new = _round_up(old, unit)
    if new != old:
      changes.append(BatchChange(field, old, new, f"{old} is not a multiple of {unit} ({parts})"))
    return new

  where = f"data×fsdp = {shards} shards"
  if config.stage == "ppo":
    p = config.ppo
    minibatch = change("ppo.minibatch", p.minibatch, shards, where)
    unit = math.lcm(minibatch, p.samples_per_prompt)
    group = f", ppo.samples_per_prompt {p.samples_per_prompt}" if p.samples_per_prompt > 1 else ""
    change("ppo.rollout_batch", p.rollout_batch, unit, f"whole minibatches of {minibatch}{group}")
  elif config.stage in PLANS:
    micro = config.optim.microbatches
    parts = where + (f", optim.microbatches = {micro}" if micro > 1 else "")
    change("data.batch_size", config.data.batch_size, math.lcm(shards, micro), parts)
  return changes


def _compiled(config, target: Target, mesh, plan: StagePlan) -> Report:
  programs = [compile_program(p, plan.resident, measure_temp=target.platform != "cpu") for p in plan.programs]
  return Report(target, config.stage, dict(mesh.shape), plan, programs)


def report(config, target: Target, *, rm_size: str = "6b", candidates: int = 0) -> Report:
  """Compiles every program of `config.stage` for `target`; per-device memory of each and of the stage.

  A global batch the mesh does not divide is raised first (`batch_fallback`; the report lists the changes).
  A plan that does not fit tries single changes (`single_changes`), compiling at most `candidates` of them,
  and stops at the first that fits (`Report.candidates`)."""
  mesh = target_mesh(config, target)
  changes = batch_fallback(config, mesh)
  config = config_lib.with_values(config, {c.field: c.new for c in changes})
  _, plan = plan_for(config, target, rm_size=rm_size, mesh=mesh)
  r = _compiled(config, target, mesh, plan)
  r.batch_changes = changes
  if candidates and r.fits is False:
    r.candidates = try_changes(config, target, r, rm_size=rm_size, budget=candidates)
  return r


def single_changes(config, mesh_shape: dict[str, int]) -> list[dict[str, Any]]:
  """Single changes that lower the memory per device, {field: value} each, in the order they are tried: fsdp
  doubled (the state splits further; the batch per device stays), tensor doubled where it divides the heads
  (from data, else from fsdp), the activations of a step halved (twice the microbatches; PPO: half the
  minibatch, then half the rollout), and full rematerialization."""
  axes = sharding.MESH_AXES
  ici = {a: mesh_shape[a] // int(config.mesh.get(f"dcn_{a}", 1)) for a in axes}
  model_cfg = models.resolve(config.model.to_dict())
  shards = mesh_shape["data"] * mesh_shape["fsdp"]

  def mesh_change(**sizes):
    return {f"mesh.{a}": v for a, v in {**ici, **sizes}.items()}

  out = []
  if ici["data"] % 2 == 0:
    out.append(mesh_change(data=ici["data"] // 2, fsdp=ici["fsdp"] * 2))
  tensor = ici["tensor"] * 2
  if model_cfg.n_heads % tensor == 0 and ici["data"] % 2 == 0:
    out.append(mesh_change(data=ici["data"] // 2, tensor=tensor))
  elif model_cfg.n_heads % tensor == 0 and ici["fsdp"] % 2 == 0:
    out.append(mesh_change(fsdp=ici["fsdp"] // 2, tensor=tensor))
  if config.stage == "ppo":
    p = config.ppo
    if p.minibatch % (2 * shards) == 0:
      out.append({"ppo.minibatch": p.minibatch // 2})
    half = p.rollout_batch // 2
    if p.rollout_batch % 2 == 0 and half % math.lcm(p.minibatch, p.samples_per_prompt) == 0:
      out.append({"ppo.rollout_batch": half})
  elif config.data.batch_size % (2 * config.optim.microbatches * shards) == 0:
    out.append({"optim.microbatches": 2 * config.optim.microbatches})
  if model_cfg.remat != "full":
    out.append({"model.remat": "full"})
  return out


def change_flags(config, change: dict[str, Any]) -> list[str]:
  """The `--config.` flags that make `change` on the command line: a mesh axis configured as -1 (the rest) or
  already at its value needs none."""
  flags = []
  for field, value in change.items():
    section, key = field.split(".")
    configured = config[section][key]
    if section == "mesh" and configured in (-1, value):
      continue
    flags.append(f"--config.{field}={value}")
  return flags


def try_changes(config, target: Target, base: Report, *, rm_size: str, budget: int) -> list[Candidate]:
  """`single_changes` of a plan that does not fit, in order, until one fits or `budget` have been compiled.
  A change whose state alone exceeds the memory is judged without compiling."""
  tried, compiled = [], 0
  for change in single_changes(config, base.mesh):
    if compiled >= budget:
      break
    candidate = Candidate(change_flags(config, change))
    tried.append(candidate)
    changed = config_lib.with_values(config, change)
    try:
      mesh, plan = plan_for(changed, target, rm_size=rm_size)
    except errors.UserError as e:
      candidate.verdict = f"not compiled: {str(e).splitlines()[0]}"
      continue
    if plan.resident > base.hbm:
      candidate.verdict = f"its state alone is {_gib(plan.resident)} per device; not compiled"
      continue
    try:
      candidate.report = _compiled(changed, target, mesh, plan)
    except Exception as e:  # a change XLA cannot compile (not for memory) says so and the next is tried
      candidate.verdict = f"does not compile: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      continue
    finally:
      compiled += 1
    candidate.verdict = verdict(candidate.report)
    if candidate.report.fits is not False:
      break
  return tried


def _gib(n: int | None) -> str:
  """Bytes as GiB, or MiB below 0.01 GiB (tiny test models)."""
  if n is None:
    return "n/m"
  return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / 2**20:.2f} MiB"


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


TABLE_COLUMNS = (
  "target",
  "stage",
  "models",
  "mesh (data, fsdp, tensor)",
  "program",
  "params",
  "opt state",
  "KV cache",
  "temp",
  "peak",
  "HBM",
  "fits",
)


_TEMP_OVER = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _short_error(error: str) -> str:
  """libtpu's out-of-memory message as a table cell: 'temp 31.05 G > 30.75 G usable'."""
  found = _TEMP_OVER.search(error)
  return f"no compile: temp {found[1]} G > {found[2]} G usable" if found else error


def table_records(r: Report) -> list[dict[str, str]]:
  """One row per program, keyed by TABLE_COLUMNS, GiB per device (`metrics.markdown_table` writes them)."""
  mesh = f"{r.mesh['data']}, {r.mesh['fsdp']}, {r.mesh['tensor']}"
  models_text = " + ".join(f"{_count(n)} {name}" for name, n in r.plan.models.items())
  words = {True: "yes", False: "**no**", None: "state only: yes"}
  out = []
  for program in r.programs:
    if program.error or program.peak is not None:
      fit = words[not program.error and program.peak <= r.target.hbm_gib * GiB]
    else:
      fit = words[r.fits]
    cells = (
      r.target.name,
      r.stage,
      models_text,
      mesh,
      program.name,
      _gib(r.plan.params),
      _gib(r.plan.opt_state),
      _gib(r.plan.kv_cache) if program.name == "rollout" else "-",
      _gib(program.temp),
      _short_error(program.error) if program.error else _gib(program.peak),
      f"{r.target.hbm_gib:g}",
      fit,
    )
    out.append(dict(zip(TABLE_COLUMNS, cells)))
  return out


def verdict(r: Report) -> str:
  """One line: whether `r` fits, and by how much."""
  hbm = f"{r.target.hbm_gib:g} GiB"
  if r.fits is False:
    over = [p.name for p in r.programs if p.error or (p.peak is not None and p.peak > r.hbm)]
    if over:
      return f"does NOT fit: {', '.join(over)} over {hbm}" + (f" (peak {_gib(r.peak)})" if r.peak else "")
    return f"does NOT fit: the state alone is {_gib(r.plan.resident)} per device, of {hbm}"
  free = f"{1 - r.used / r.hbm:.0%} free" + (f", under {HEADROOM:.0%} headroom" if r.tight else "")
  if r.fits is None:
    return f"state fits: {_gib(r.used)} of {hbm} per device ({free}); activations not measured"
  return f"fits: peak {_gib(r.used)} of {hbm} per device ({free})"


def summary(r: Report) -> str:
  """What the CLI prints for one plan: the mesh, the global batch (and any batch raised to fit the mesh), the
  rollout layout, per-device bytes by kind, the verdict, a warning under 10% headroom, the changes tried."""
  lines = [f"{r.stage} on {r.target.name} ({r.target.devices} devices, {r.target.hbm_gib:g} GiB each), mesh {r.mesh}"]
  if r.target.note:
    lines.append(f"  note: {r.target.note}")
  lines += [f"  batch raised: {c}" for c in r.batch_changes]
  lines.append(f"  global batch: {r.plan.batch}")
  if r.plan.rollout_layout:
    lines.append(f"  rollout layout: {r.plan.rollout_layout}")
  lines.append("  models: " + ", ".join(f"{name} {_count(n)} params" for name, n in r.plan.models.items()))
  lines.append(
    f"  per device: params {_gib(r.plan.params)}, optimizer state {_gib(r.plan.opt_state)}"
    + (f", KV cache {_gib(r.plan.kv_cache)}" if r.plan.kv_cache else "")
  )
  for program in r.programs:
    if program.error:
      lines.append(f"  {program.name}: does not fit ({program.error}) [{program.compile_s:.0f} s]")
    else:
      lines.append(
        f"  {program.name}: arguments {_gib(program.arguments)}, temp {_gib(program.temp)}, peak {_gib(program.peak)} "
        f"[compiled in {program.compile_s:.1f} s]"
      )
  lines.append(f"  => {verdict(r)}")
  if r.tight:
    what = "peak" if r.peak is not None else "state alone"
    lines.append(
      f"  warning: under {HEADROOM:.0%} headroom ({what} {_gib(r.used)} of {r.target.hbm_gib:g} GiB): XLA, the "
      "runtime and fragmentation take some of it; a longer sequence or another libtpu may not fit"
    )
  for c in r.candidates:
    lines.append(f"  tried {' '.join(c.flags) or '(no flag)'}: {c.verdict}")
  if r.candidates:
    found = r.fitting_candidate
    if found:
      lines.append(f"  => the smallest change tried that fits: add {' '.join(found.flags)}")
    else:
      lines.append(
        f"  => none of the {len(r.candidates)} single changes tried fits: combine them, or take a larger slice"
      )
  return "\n".join(lines)


def libtpu_version() -> str:
  try:
    import importlib.metadata

    return importlib.metadata.version("libtpu")
  except Exception:
    return "none"
