"""Checkpoints with orbax: async saves, the last K kept, resume from the newest, restore onto any mesh.

Layout: `workdir/checkpoints/<step>/{state,data[,metrics]}`. `state` is the TrainState pytree (params,
optimizer state, step, RNG key); `data` is the JSON state of the data iterator, so a resumed run sees
exactly the batches an uninterrupted run would. A run that selects a checkpoint (SFT: by RM score or
validation loss) saves each evaluated step with its `metrics`; retention then keeps the `keep` newest steps
and, always, the best one, which `workdir/selected.json` names (`Selection`).

Orbax writes each step into a temporary folder and renames it when complete (on GCS, which has no rename,
it writes a commit marker last), so a crash during a save leaves the previous checkpoint intact. Every path
may be local or gs:// (orbax writes through epath and tensorstore).
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from instructgpt_jax import paths


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a tree of arrays (or of ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _saved_tree(path) -> Any:
  """The tree of array metadata (shapes, dtypes) of a saved pytree."""
  metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
  return dict(getattr(metadata, "tree", metadata))


def _restore_subtree(path, target: Any) -> Any:
  """Restores the arrays `target` names (a subtree of what was saved) into `target`'s shardings."""
  target = _abstract(target)
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
  args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
  return ocp.PyTreeCheckpointer().restore(path, args=args)


class Selection:
  """Which checkpoint of a run the next stage starts from: the step with the best `metric` (largest for
  mode "max", smallest for "min") among the evaluated ones, recorded in `workdir/selected.json` as
  {"step", "metric", "value"} by process 0 whenever a better step is saved."""

  FILE = "selected.json"

  def __init__(self, workdir: str, metric: str, mode: str):
    if mode not in ("max", "min"):
      raise ValueError(f"selection mode {mode!r} is not 'max' or 'min'")
    self.path, self.metric, self.mode = paths.join(workdir, self.FILE), metric, mode
    recorded = paths.read_json(self.path)
    self.best = recorded if recorded and recorded.get("metric") == metric else None

  def better(self, value: float) -> bool:
    if self.best is None:
      return True
    return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

  def record(self, step: int, value: float) -> None:
    self.best = {"step": int(step), "metric": self.metric, "value": float(value)}
    if jax.process_index() == 0:
      paths.write_json(self.path, self.best)

  @classmethod
  def step_of(cls, workdir: str) -> int | None:
    """The step `workdir/selected.json` names, or None without one."""
    recorded = paths.read_json(paths.join(workdir, cls.FILE))
    return None if recorded is None else int(recorded["step"])


def _on_first_device(tree: Any) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one workdir."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, select: Selection | None = None):
    self.directory = paths.absolute(workdir) / "checkpoints"
    policy = ocp.checkpoint_managers.LatestN(n=keep)
    if select is not None:  # the best evaluated step survives retention, whatever its age
      best = ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda m: m[select.metric],
        reverse=select.mode == "min",  # BestN keeps the last n after sorting
        n=1,
        keep_checkpoints_without_metrics=False,
      )
      policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, best])
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save, create=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  @staticmethod
  def steps_in(workdir: str) -> list[int]:
    """The steps saved under `workdir/checkpoints` (without opening a manager, which would create it)."""
    directory = paths.path(workdir) / "checkpoints"
    if not directory.is_dir():
      return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
    self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False, metrics: dict | None = None
  ) -> bool:
    """Saves `step` (asynchronously); `metrics` (evaluation results) are kept with it for retention."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force, metrics=metrics)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the shardings carried by `abstract_state` (a tree of ShapeDtypeStructs with
    `.sharding`, or of arrays), so a checkpoint written on one mesh loads onto another."""
    step = self.latest_step() if step is None else step
    target = _abstract(abstract_state)
    out = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    return out.state, dict(out.data or {})

  def restore_params(self, step: int | None = None, target: Any | None = None, *, keys=("params",)) -> Any:
    """The parameters alone (the optimizer state is not read), for handing a model to the next stage.

    `keys` is the path of the parameters inside the saved state (PPO keeps ("policy", "params")). With
    `target` (a params tree of arrays or ShapeDtypeStructs carrying shardings) they load straight into
    those shardings; without, onto this process's first device, whatever mesh wrote them.
    """
    step = self.latest_step() if step is None else step
    path = self.directory / str(step) / "state"
    if target is None:
      target = _saved_tree(path)
      for key in keys:
        target = target[key]
      target = _on_first_device(target)
    for key in reversed(keys):
      target = {key: target}
    restored = _restore_subtree(path, target)
    for key in keys:
      restored = restored[key]
    return restored

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------------------------- model export
# A stage hands its model to the next as parameters plus a JSON metadata file (the resolved model config,
# and for a reward model its bias): `<dir>/params` (orbax) and `<dir>/metadata.json`.


def export_params(directory: str, params: Any, metadata: dict) -> None:
  """Writes params and metadata into `directory` (synchronously; every process calls it)."""
  directory = paths.absolute(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "params", params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_json(directory / "metadata.json", metadata)


def import_params(directory: str, target: Any | None = None) -> tuple[Any, dict]:
  """(params, metadata) from `export_params`. With `target` (arrays or ShapeDtypeStructs carrying
  shardings, possibly a subtree of what was saved) the params load straight into those shardings; without,
  onto this process's first device."""
  directory = paths.absolute(directory)
  metadata = paths.read_json(directory / "metadata.json")
  if metadata is None:
    raise FileNotFoundError(f"{directory}: not an exported model (no metadata.json)")
  path = directory / "params"
  return _restore_subtree(path, target if target is not None else _on_first_device(_saved_tree(path))), metadata
