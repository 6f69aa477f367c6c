"""What every stage's trainer does the same way: validation before compiling, the workdir, the batch sharding."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from instructgpt_jax import checkpoint, errors, optim, paths, sharding, train_state, version
from instructgpt_jax import metrics as metrics_lib
from instructgpt_jax.data import schemes
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import model_io

ConfigError = errors.ConfigError


def check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def check_batch(name: str, batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the batch-parallel mesh axes (data × fsdp) and the hosts."""
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  check(
    batch_size % parallel == 0,
    f"{name}: {batch_size} does not divide over data×fsdp = {parallel} devices of mesh {dict(mesh.shape)}",
  )
  check(
    batch_size % jax.process_count() == 0, f"{name}: {batch_size} does not divide over {jax.process_count()} processes"
  )


def check_batch_values(field: str, batch_size: int, mesh_cfg, checks) -> None:
  """A batch size by itself: positive, and dividing over data × fsdp where the config fixes them (no -1;
  with -1 the devices decide, and `check_batch` checks it on the mesh)."""
  if not checks.at_least(field, batch_size, 1):
    return
  parallel = [mesh_cfg.get(a, 1) * mesh_cfg.get(f"dcn_{a}", 1) for a in ("data", "fsdp")]
  if checks.batches_on_mesh and all(p >= 1 for p in parallel):
    shards = parallel[0] * parallel[1]
    checks.require(
      batch_size % shards == 0, field, f"{batch_size} does not divide over data×fsdp = {shards} devices of the mesh"
    )


def check_data_values(data, checks) -> None:
  """The `data` fields several stages share, by themselves (the files are read later)."""
  from instructgpt_jax.data import formats, templates

  if "template" in data:
    checks.one_of("data.template", data.template, templates.TEMPLATES)
  if "on_error" in data:
    checks.one_of("data.on_error", data.on_error, formats.ON_ERROR)
  if "truncate_prompt" in data:
    checks.one_of("data.truncate_prompt", data.truncate_prompt, ("none", "left"))
  for field in ("seq_len", "max_prompt_len", "ptx_seq_len"):
    if field in data:
      checks.at_least(f"data.{field}", data[field], 2)
  for field in ("eval_examples", "eval_batches", "eval_prompts"):
    if field in data:
      checks.at_least(f"data.{field}", data[field], 0)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of any [batch, ...] array: the batch over data × fsdp, the other axes replicated."""
  return NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Host-local numpy batch (this process's rows) -> global arrays sharded over the batch axes."""
  sharded = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharded, v) for k, v in batch.items()}


def steps_for_epochs(config, n_examples: int, *, mix_fraction: float = 0.0) -> int:
  """config.total_steps when positive, else ceil(epochs × examples / examples per global batch), where a
  batch holds batch_size × (1 − mix_fraction) examples (the rest of its rows are mixed-in pretraining text),
  so that `epochs` counts passes over the examples themselves."""
  if config.total_steps > 0:
    return int(config.total_steps)
  exact = config.epochs * n_examples / (config.data.batch_size * (1.0 - mix_fraction))
  return max(1, math.ceil(exact - 1e-9))  # 1e-9: a whole number of steps must not round up


def run_record(config, model_cfg=None) -> dict:
  """What a run's config.json holds: the config, with the model's resolved fields (its shape from the size
  table or from `model.init_from`) where `model_cfg` is given, and the package version and git commit."""
  out = config.to_dict()
  if model_cfg is not None and isinstance(out.get("model"), dict):
    out["model"].update(dataclasses.asdict(model_cfg))
  out["instructgpt_jax_version"] = version.__version__
  out["git_commit"] = version.git_commit()
  return out


# Fields that set the learning-rate schedule, or the number of optimizer steps it is spread over: a resumed run
# that changes one of them would continue on another schedule than the one its checkpoints were trained on.
SCHEDULE_FIELDS = (
  "total_steps",
  "epochs",
  *(
    f"{o}.{f}"
    for o in ("optim", "value_optim")
    for f in ("lr", "schedule", "warmup_steps", "warmup_init_fraction", "final_lr_fraction")
  ),
  *(f"ppo.{f}" for f in ("episodes", "rollout_batch", "minibatch", "epochs")),
)


def _dotted(tree: dict, field: str):
  for key in field.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def check_resume(workdir: str, config) -> None:
  """A run that resumes keeps the schedule its checkpoints were trained on: a changed SCHEDULE_FIELDS value is
  refused in one line naming the field and both values, unless `allow_schedule_change` says it is meant."""
  if not checkpoint.Checkpointer.steps_in(workdir) or config.get("allow_schedule_change"):
    return
  before, now = paths.read_json(paths.join(workdir, "config.json"), {}), config.to_dict()
  changed = [
    f"{field} {_dotted(before, field)!r} -> {_dotted(now, field)!r}"
    for field in SCHEDULE_FIELDS
    if _dotted(before, field) is not None
    and _dotted(now, field) is not None
    and _dotted(before, field) != _dotted(now, field)
  ]
  check(
    not changed,
    f"--workdir: {workdir} resumes a run whose schedule this config changes ({'; '.join(changed)}); give the "
    "earlier values, a new workdir, or --config.allow_schedule_change=true to continue on the new schedule",
  )


def write_config(workdir: str, config, model_cfg=None) -> None:
  """Process 0 writes the resolved config (`run_record`) as JSON next to the checkpoints."""
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, "config.json"), run_record(config, model_cfg))


class Preemption:
  """Notices a preemption notice (SIGTERM: how TPU VMs, GKE and SLURM announce one) so that the loop saves and
  exits cleanly; `stop_requested(step)` is asked after every step.

  One process: a Python SIGTERM handler sets a flag. Several processes (jax.distributed): the notice may reach
  only one of them. JAX's preemption sync manager, started by `jax.distributed.initialize`, catches SIGTERM in
  C++ and tells the coordination service, which picks a step that no process has passed yet;
  `reached_preemption_sync_point(step)` is True at that step on every process, so all of them save the same
  checkpoint and exit. No Python handler is installed then: it would replace the C++ one, and the notice
  would never leave the process that got it.
  """

  def __enter__(self):
    self._requested = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self._requested = True

  def stop_requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def __exit__(self, *exc):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)
    return False


class LoopIO:
  """The I/O every training loop does after a step: metrics (a step late), evaluation, checkpoints.

  `end_of_step(done, state, metrics, evaluate, preempted)` is called after each optimizer step (`done` =
  steps finished; `evaluate(state)` returns a dict of metrics). Every step's metrics are fetched while the
  next step runs and checked, so a non-finite loss or gradient norm stops the run (NonFiniteError naming
  that step) before it can be checkpointed. Rows are written every `log_every_steps`; it evaluates every
  `eval_every_steps`, saves every `checkpoint_every_steps`, and on preemption saves and raises
  errors.Preempted (the checkpoint completes as the `with` block closes). With `select` (a
  checkpoint.Selection, the checkpointer made with it), every evaluated step is also saved with its metric,
  and a step better than all before it becomes the selected one once its save is complete. `data_state()`
  returns the input pipelines' state saved with each checkpoint. Use it as a context manager.
  """

  def __init__(
    self,
    config,
    workdir: str,
    ckpt: checkpoint.Checkpointer,
    data_state: Callable[[], dict],
    *,
    start_step: int,
    tokens_per_step: int = 0,
    select: checkpoint.Selection | None = None,
  ):
    self.config, self.ckpt, self.data_state, self.select = config, ckpt, data_state, select
    self.start_step = start_step
    self.writer = metrics_lib.MetricWriter(
      workdir,
      total_steps=config.total_steps,
      start_step=start_step,
      progress=config.progress_bar,
      tokens_per_step=tokens_per_step,
    )
    self.fetcher = metrics_lib.LateFetcher()
    self.last_row: dict[str, float] = {}

  def _record(self, fetched, extra: dict | None = None, *, force: bool = False) -> None:
    """Checks a fetched (step, metrics) pair; writes it on logging steps, when forced, or with extras."""
    if fetched is None:
      return
    step, values = fetched
    values = dict(values, **(extra or {}))
    metrics_lib.check_finite(step, values)
    if force or extra or step % self.config.log_every_steps == 0 or step == self.config.total_steps:
      self.last_row = self.writer.write(step, values)

  def begin(self, state, evaluate) -> None:
    """With `config.eval_at_start`, a fresh run evaluates its starting model first (a row at step 0)."""
    if self.config.get("eval_at_start") and self.start_step == 0:
      self.last_row = self.writer.write(0, self._evaluate(evaluate, state, "evaluating the starting model"))

  def _evaluate(self, evaluate, state, what: str = "evaluating") -> dict[str, float]:
    """evaluate(state), the progress bar saying so meanwhile (an evaluation that samples can take minutes)."""
    self.writer.status(what)
    try:
      return evaluate(state)
    finally:
      self.writer.status("")

  def end_of_step(self, done: int, state, step_metrics, evaluate, *, preempted: bool = False) -> bool:
    c = self.config
    final = done == c.total_steps
    save = (done % c.checkpoint_every_steps == 0 and not final) or preempted
    evaluating = bool(c.eval_every_steps) and done % c.eval_every_steps == 0 and not final
    self._record(self.fetcher.push(done, step_metrics))
    evaluation = self._evaluate(evaluate, state) if evaluating else {}
    if save or evaluating:  # this step's metrics now: a non-finite step must never be saved
      self._record(self.fetcher.flush(), evaluation or None, force=save)
    self._save(done, state, evaluation, always=save, force=preempted)
    if preempted:
      raise errors.Preempted(done)

  def _save(self, step: int, state, evaluation: dict, *, always: bool, force: bool = False) -> None:
    """Saves `step` when `always`, or when it was evaluated for a selection; records a better selection."""
    value = evaluation.get(self.select.metric) if self.select is not None else None
    if not always and value is None:
      return
    self.writer.flush()  # the rows up to this checkpoint are durable before it can be resumed from
    metrics = None if value is None else {self.select.metric: float(value)}
    self.ckpt.save(step, train_state.saved_part(state), self.data_state(), force=force, metrics=metrics)
    if value is not None and self.select.better(value):
      self.ckpt.wait()  # selected.json never names a step whose save could still fail
      self.select.record(step, value)

  def finish(self, state, evaluate) -> dict[str, float]:
    """Evaluates the final state, writes the last metrics with that evaluation, saves the final state;
    returns the row."""
    final_eval = self._evaluate(evaluate, state, "final evaluation")
    step = int(state.step)
    pending = self.fetcher.flush()
    if pending is not None:
      self._record(pending, final_eval, force=True)
    elif final_eval:  # nothing ran in this process (the run was already complete)
      self.last_row = self.writer.write(step, final_eval)
    if step > self.start_step or self.ckpt.latest_step() is None:
      self._save(step, state, final_eval, always=True, force=True)
    return self.last_row

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    """Also on an error: saves already started are finished, so the last good checkpoint is complete."""
    self.ckpt.close()
    self.writer.close()
    return False


def train_loop(setup: Setup, workdir: str, ckpt, data, state, step_fn, evaluate, **io):
  """The loop of every training stage (pretraining, SFT, RM, DPO, PPO): `step_fn(state, global batch)` from
  the state's step to config.total_steps, a batch being `next(data)` (this host's rows) made global over the
  mesh, with LoopIO's metrics, evaluations and checkpoints (`io`: its tokens_per_step and select; `data`'s
  get_state goes into every checkpoint) and a clean stop on preemption. -> (the final state, the final row)."""
  config = setup.config
  start_step = int(state.step)
  io_ = LoopIO(config, workdir, ckpt, data.get_state, start_step=start_step, **io)
  with io_, Preemption() as preemption:
    io_.begin(state, evaluate)
    for step in range(start_step, config.total_steps):
      state, step_metrics = step_fn(state, to_global(next(data), setup.mesh, setup.rules))
      io_.end_of_step(step + 1, state, step_metrics, evaluate, preempted=preemption.stop_requested(step + 1))
    return state, io_.finish(state, evaluate)


def resume_or_start(ckpt: checkpoint.Checkpointer, abstract, data, start: Callable[[], object]):
  """The one init-or-resume of every stage: the run's newest checkpoint restored into `abstract` (a state of
  ShapeDtypeStructs carrying shardings), and `data` (its set_state) put back where that checkpoint left it;
  else `start()`, the stage's iteration-0 state. Nothing is allocated twice, except under LoRA, where the
  checkpoint holds only the trainable part (train_state.saved_part) and `start()` gives the frozen base (its
  fresh adapters and optimizer state, small, are dropped for the restored ones)."""
  if ckpt.latest_step() is None:
    return start()
  if train_state.has_frozen(abstract):  # LoRA: the checkpoint holds the adapters; the base is read again
    state, data_state = ckpt.restore(train_state.saved_part(abstract))
    state = train_state.with_frozen(state, start())
  else:
    state, data_state = ckpt.restore(abstract)
  if data is not None:
    data.set_state(data_state)
  logging.info("resumed from step %d of %s", int(state.step), ckpt.directory)
  return state


class Setup(NamedTuple):
  """What every stage sets up before it builds anything (all checked before any compile). `config` is the
  run's own copy of the config the stage was given (data.tokenizer resolved; start_training sets its
  total_steps): a stage never changes the config it is handed."""

  config: object  # ml_collections.ConfigDict
  model_cfg: object  # models.ModelConfig
  source: object  # model_io.Source or None: where the weights come from
  tokenizer: object
  mesh: Mesh
  rules: dict
  data_cfg: object  # config.data with lab:... specs written out and data_dir set

  @property
  def process(self) -> dict[str, int]:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def setup(config, workdir: str, *, kind: str = "lm", seq_len: int | None = None) -> Setup:
  """Model config (with `model.init_from`), tokenizer, mesh, rules and the data section; the shared checks:
  the workdir can be written (its bucket exists, or its local parent folder) and holds no other run.

  The tokenizer follows the model: `data.tokenizer` "" takes the one `model.init_from` came with (an HF
  folder's own, or what the earlier run recorded; "bytes" for a random start), and the resolved spec is
  written into the run's copy of the config (Setup.config), so this run's config.json records it for the next
  stage.
  """
  config = config.copy_and_resolve_references()
  paths.check_output_dir(workdir, "--workdir")
  model_cfg, source = model_io.resolve(config.model)
  model_io.check_same_run(workdir, config.stage, kind, model_cfg)
  spec = config.data.tokenizer or model_io.tokenizer_of(source)
  config.data.tokenizer = spec if spec == "bytes" or paths.is_remote(spec) else os.fspath(paths.absolute(spec))
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  remedy = (
    f"raise model.vocab_size to at least {tokenizer.vocab_size}"
    if source is None
    else "not this model's tokenizer? leave data.tokenizer empty to use the model's own"
  )
  check(
    tokenizer.vocab_size <= model_cfg.vocab_size,
    f"data.tokenizer: {spec} has {tokenizer.vocab_size} ids, more than the model's vocabulary of "
    f"{model_cfg.vocab_size}; {remedy}",
  )
  if source is not None and source.metadata.get("format") == model_io.HF_FORMAT and model_cfg.resid_dropout > 0:
    logging.warning(
      "model.resid_dropout=%g on a pretrained model (%s) that its authors may have trained without dropout; "
      "set --config.model.resid_dropout=0.0 unless you mean it",
      model_cfg.resid_dropout,
      source.path,
    )
  mesh = sharding.make_mesh(config.mesh.to_dict())
  data_cfg = schemes.resolve(config.data, paths.join(workdir, "data"), seed=config.seed)
  if "data_dir" in data_cfg:
    data_cfg["data_dir"] = data_cfg["data_dir"] or paths.join(workdir, "tfds")
  if seq_len is not None:
    check(seq_len <= model_cfg.max_len, f"data.seq_len: {seq_len} exceeds the model's max_len {model_cfg.max_len}")
  return Setup(config, model_cfg, source, tokenizer, mesh, sharding.rules_dict(config.sharding_rules), data_cfg)


class Training(NamedTuple):
  """A stage's model and optimizer, created or resumed (`start_training`)."""

  graphdef: object
  state: object  # train_state.TrainState
  shardings: object  # its shardings
  ckpt: checkpoint.Checkpointer
  tx: object  # the optax transformation
  lr_schedule: object


def record_run(setup: Setup, workdir: str, total_steps: int, kind: str, **model_json) -> None:
  """Fixes the run's total_steps (in its own config), refuses a resumed run whose schedule changed, and
  records the run: config.json, and model.json (`model_json`: where the params sit in the checkpoint)."""
  setup.config.total_steps = total_steps
  check_resume(workdir, setup.config)
  write_config(workdir, setup.config, setup.model_cfg)
  model_io.write_model_json(workdir, kind, setup.model_cfg, source=setup.source, seed=setup.config.seed, **model_json)


def start_training(
  setup: Setup, workdir: str, *, kind: str, total_steps: int, data, select: checkpoint.Selection | None = None
) -> Training:
  """Records the run (record_run), then creates the optimizer and the train state: resumed from this run's
  newest checkpoint, else started from `model.init_from` (or randomly). `select`: keep the best evaluated
  checkpoint (see LoopIO)."""
  config = setup.config
  record_run(setup, workdir, total_steps, kind)
  tx = optim.make_optimizer(config.optim, total_steps)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints, select=select)
  graphdef, abstract, shardings = train_state.abstract_state(setup.model_cfg, tx, setup.mesh, setup.rules, kind=kind)

  def start():
    return model_io.create_state(
      setup.model_cfg, setup.source, tx, setup.mesh, setup.rules, seed=config.seed, kind=kind
    )

  state = resume_or_start(ckpt, abstract, data, start)
  return Training(graphdef, state, shardings, ckpt, tx, optim.schedule(config.optim, total_steps))


def print_summary(stage: str, row: dict[str, float], **extra) -> None:
  """The one-screen summary a stage ends with (process 0)."""
  if jax.process_index() != 0:
    return
  lines = [f"== {stage}: done =="]
  lines += [f"  {k:<24} {v:.6g}" if isinstance(v, float) else f"  {k:<24} {v}" for k, v in sorted(row.items())]
  lines += [f"  {k:<24} {v:.6g}" if isinstance(v, float) else f"  {k:<24} {v}" for k, v in extra.items()]
  print("\n".join(lines), flush=True)
