"""Device mesh, logical axis rules, and shardings for parameters and activations.

Every parameter and key activation names its axes logically (`vocab`, `embed`, `mlp`, `heads`,
`kv_heads`, `kv`, `layers`, `lora_rank`, `batch`, `length`, ...). A rules table, part of the config, maps each
logical name onto zero or more mesh axes (`data`, `fsdp`, `tensor`). Changing the parallelism of a run is a
config change; no model code mentions a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instructgpt_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES_KEY = "logical_axes"  # the nnx.Variable metadata key that holds a parameter's axis names

# Logical name -> mesh axes. Parameters: FSDP over the embedding axis, tensor parallelism over heads,
# MLP and vocabulary. Activations: the batch over data × fsdp (an activation's `embed` axis then finds
# fsdp taken and stays replicated, see logical_to_spec).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("pos", None),
  ("scalar", None),
  # LoRA's rank r (models/lora.py): over fsdp where the adapter's other axes leave it free (B [L, r, *out] with
  # heads / mlp outputs; A [L, D, r] already splits D over fsdp), so an 8B model's adapters are split on an
  # fsdp-only mesh, as assert_large_params_sharded asks.
  ("lora_rank", "fsdp"),
)

# The rollout's layout (ppo.rollout_layout="decode"): the weights split over the model-parallel axes fsdp and
# tensor together, Megatron style (heads, MLP width and vocabulary), and replicated over data; the batch over
# data only. A decode step then all-reduces [B, 1, D] activations twice per layer instead of all-gathering
# every layer's weights (what FSDP costs per generated token). The KV cache follows: kv heads over fsdp × tensor.
DECODE_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", "data"),
  ("length", None),
  ("embed", None),
  ("vocab", ("tensor", "fsdp")),
  ("heads", ("tensor", "fsdp")),
  ("kv_heads", ("tensor", "fsdp")),
  ("kv", None),
  ("mlp", ("tensor", "fsdp")),
  ("layers", None),
  ("pos", None),
  ("scalar", None),
  ("lora_rank", None),  # LoRA's rank r (models/lora.py): small, replicated
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("mesh_rules", default=None)


def rules_dict(rules: Iterable[Sequence[Any]]) -> dict[str, Any]:
  out = {}
  for name, axes in rules:
    out[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
  return out


def logical_to_spec(
  names: Sequence[str | None], rules, shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
  """PartitionSpec for logical axis `names` under `rules`.

  With `shape` and `mesh`, a mesh axis is dropped from a dimension it does not divide (for example
  `kv_heads` = 1 under tensor parallelism 4): that dimension is replicated instead of failing.
  A mesh axis is used at most once per array; a later dimension that asks for a taken axis is replicated.
  """
  rules = rules if isinstance(rules, dict) else rules_dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise errors.ConfigError(f"sharding: logical axis {name!r} has no rule; rules cover {sorted(rules)}")
    axes = rules[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for axis in axes:
      if axis in used or (mesh is not None and mesh.shape.get(axis, 1) == 1):
        continue  # an absent or size-1 mesh axis shards nothing; leaving it out keeps specs readable
      size = math.prod(mesh.shape[a] for a in kept + [axis]) if mesh is not None else 1
      if shape is not None and shape[i] % size:
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def logical_axes(state) -> Any:
  """The tree of logical axis-name tuples of an nnx State (as a pure dict, like nnx.to_pure_dict)."""

  def names(v):
    axes = v.get_metadata().get(LOGICAL_AXES_KEY)
    if axes is None:
      raise ValueError(f"sharding: a parameter of shape {v.shape} carries no logical axis names")
    return tuple(axes)

  return nnx.to_pure_dict(jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def tree_shardings(abstract_tree, names_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) whose axes are named by `names_tree`."""
  rules = rules if isinstance(rules, dict) else rules_dict(rules)
  return jax.tree.map(
    lambda x, n: NamedSharding(mesh, logical_to_spec(n, rules, x.shape, mesh)),
    abstract_tree,
    names_tree,
    is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x),
  )


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules):
  """Activates `constrain` for code traced inside this block (trace time, not run time)."""
  token = _ACTIVE.set((mesh, rules if isinstance(rules, dict) else rules_dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def traced_with_rules(fn, mesh: Mesh, rules):
  """fn, entering `use_mesh_rules(mesh, rules)` while it runs, so the constraints apply whenever it is traced.

  `jax.jit` traces lazily, at the first call: wrapping the traced function (rather than the jax.jit call)
  keeps every logical constraint active however late that call comes.
  """

  @functools.wraps(fn)
  def under_rules(*args, **kwargs):
    with use_mesh_rules(mesh, rules):
      return fn(*args, **kwargs)

  return under_rules


def jit_on_mesh(fn, *, mesh: Mesh | None = None, rules=None, static_argnames=()):
  """jax.jit of fn whose trace runs under `use_mesh_rules(mesh, rules)` (`traced_with_rules`).

  Inputs keep the shardings they arrive with (params sharded by their logical axes, batches over
  data × fsdp); the constraints inside shard the activations, the KV cache and the outputs. Without a mesh,
  a plain jit.
  """
  if mesh is None:
    return jax.jit(fn, static_argnames=static_argnames)
  rules = DEFAULT_RULES if rules is None else rules
  return jax.jit(traced_with_rules(fn, mesh, rules), static_argnames=static_argnames)


def active_mesh_and_rules() -> tuple[Mesh, dict] | None:
  """The (mesh, rules) of the enclosing `use_mesh_rules` block at trace time, or None outside one."""
  return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside `use_mesh_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(names, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _fill(sizes: dict[str, int], n_devices: int, what: str) -> dict[str, int]:
  """Replaces one -1 in `sizes` by what makes their product `n_devices`; checks the product."""
  sizes = dict(sizes)
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise errors.ConfigError(f"mesh: at most one {what} axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % known:
      raise errors.ConfigError(f"mesh: {what} sizes {sizes} do not divide {n_devices} devices")
    sizes[free[0]] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    raise errors.ConfigError(
      f"mesh: {what} sizes {sizes} need {math.prod(sizes.values())} devices, but {n_devices} are present"
    )
  return sizes


def make_mesh(mesh_cfg: dict[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh from a config's `mesh` section.

  `data`, `fsdp`, `tensor` are sizes within a slice (ICI); `dcn_data`, `dcn_fsdp`, `dcn_tensor` (default 1)
  multiply them across slices (data-center network) for multi-slice TPU runs. One ICI size may be -1: it
  takes the devices left. Built with `jax.sharding.Mesh`, so the axes are Auto (`jax.make_mesh` makes
  Explicit axes, which the logical-constraint style here does not use).
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(mesh_cfg, dict):
    mesh_cfg = dict(zip(MESH_AXES, mesh_cfg))
  unknown = set(mesh_cfg) - set(MESH_AXES) - {f"dcn_{a}" for a in MESH_AXES}
  if unknown:
    raise errors.ConfigError(f"mesh: unknown axes {sorted(unknown)}; use {MESH_AXES} and dcn_<axis>")
  dcn = {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES}
  n_slices = math.prod(dcn.values())
  if len(devices) % n_slices:
    raise errors.ConfigError(f"mesh: {len(devices)} devices do not split into {n_slices} slices (dcn sizes {dcn})")
  ici = _fill({a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}, len(devices) // n_slices, "ici")
  ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
  if n_slices == 1:
    grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  elif devices[0].platform == "cpu":
    # Fake CPU devices have no slices: lay them out as a multi-slice mesh would (slices outermost on each
    # axis) so that multi-slice configs run in tests.
    grid = np.asarray(devices).reshape(dcn_shape + ici_shape).transpose(0, 3, 1, 4, 2, 5)
    grid = grid.reshape([d * i for d, i in zip(dcn_shape, ici_shape)])
  else:
    grid = mesh_utils.create_hybrid_device_mesh(
      ici_shape,
      dcn_shape,
      devices,
      process_is_granule=not hasattr(devices[0], "slice_index"),
      allow_split_physical_axes=True,
    )
  return Mesh(grid, MESH_AXES)


def assert_large_params_sharded(params, shardings, *, min_size: int = 2**20) -> None:
  """Raises if a parameter with at least `min_size` elements is fully replicated on a mesh of > 1 device.

  With FSDP or tensor parallelism every large matrix must be split; a replicated one means a missing or
  misspelled logical name, or a rules table that maps it nowhere.
  """
  replicated = []
  for path, x, s in zip(
    jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params), jax.tree.leaves(shardings)
  ):
    n_shards = math.prod(s.mesh.shape[a] for a in jax.tree.leaves(tuple(s.spec)) if a is not None)
    if x.size >= min_size and n_shards == 1:
      replicated.append(f"{jax.tree_util.keystr(path[0])} {tuple(x.shape)}")
  if replicated and len(jax.tree.leaves(shardings)[0].mesh.devices.flat) > 1:
    raise AssertionError(f"sharding: {len(replicated)} large parameters are replicated: {', '.join(replicated[:5])}")
