"""The train state pytree, its sharded initialization, and the one jitted-step pattern every trainer uses.

    graphdef, state, shardings = train_state.create_sharded(model_cfg, tx, seed, mesh, rules)
    step = train_state.jit_step(train_step, shardings, batch_shardings)
    state, metrics = step(state, batch)

Initialization is abstract first (`jax.eval_shape`), then partition specs from the parameters' logical axis
names, then a jitted init with `out_shardings`: every device creates only its own shards, so no host ever
holds a whole large model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instructgpt_jax import models, sharding


@struct.dataclass
class TrainState:
  """step: optimizer steps taken; rng: a raw uint32[2] key, split once per step; ema: EMA of params or None."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema: Any = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array, *, ema: bool = False):
    return cls(
      step=jnp.zeros([], jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=rng,
      ema=jax.tree.map(jnp.copy, params) if ema else None,
    )

  def apply_gradients(self, grads, tx: optax.GradientTransformation, *, ema_decay: float | None = None):
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema
    if ema is not None and ema_decay is not None:
      ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema=ema)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_state: TrainState, param_shardings, tx, mesh: Mesh) -> TrainState:
  """Shardings of a whole TrainState: optimizer moments shard like their parameters, scalars replicate."""
  opt = optax.tree_map_params(
    tx, lambda _, s: s, abstract_state.opt_state, param_shardings, transform_non_params=lambda _: replicated(mesh)
  )
  return TrainState(
    step=replicated(mesh),
    params=param_shardings,
    opt_state=opt,
    rng=replicated(mesh),
    ema=None if abstract_state.ema is None else param_shardings,
  )


def param_shardings_for(model_cfg: models.ModelConfig, mesh: Mesh, rules, *, kind: str = "lm", check: bool = True):
  """(graphdef, abstract params with shardings) of a model: shapes, dtypes and shardings, nothing allocated.
  `check`: refuse a large parameter left whole on every device of a mesh meant to split them."""
  graphdef, abstract_params = models.abstract(model_cfg, kind=kind)
  names = sharding.logical_axes(abstract_params)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract_params))
  shardings = sharding.tree_shardings(shapes, names, mesh, rules)
  if check and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:  # parameters are meant to be split: check they are
    sharding.assert_large_params_sharded(shapes, shardings)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return graphdef, target


def random_params(model_cfg: models.ModelConfig, target, key: jax.Array, *, kind: str = "lm"):
  """A random initialization created shard by shard into `target`'s shardings (jitted with out_shardings)."""
  shardings = jax.tree.map(lambda t: t.sharding, target)
  return jax.jit(lambda key: models.init(model_cfg, key, kind=kind)[1], out_shardings=shardings)(key)


def abstract_state(
  model_cfg: models.ModelConfig,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  rules,
  *,
  kind: str = "lm",
  ema: bool = False,
):
  """(graphdef, abstract TrainState carrying shardings, the shardings): a restore target; nothing allocated."""
  graphdef, target = param_shardings_for(model_cfg, mesh, rules, kind=kind)
  return (graphdef, *abstract_state_for(target, tx, mesh, ema=ema))


def abstract_state_for(target, tx: optax.GradientTransformation, mesh: Mesh, *, ema: bool = False):
  """(abstract TrainState carrying shardings, the shardings) for any abstract params with shardings."""
  param_shardings = jax.tree.map(lambda t: t.sharding, target)
  abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.PRNGKey(0), ema=ema), target)
  shardings = state_shardings(abstract, param_shardings, tx, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def create_from_params(
  params, tx: optax.GradientTransformation, key: jax.Array, shardings: TrainState, *, ema: bool = False
) -> TrainState:
  """A TrainState around sharded params, its optimizer state created directly in `shardings`."""
  create = jax.jit(
    lambda params, key: TrainState.create(params, tx, key, ema=ema),
    in_shardings=(shardings.params, replicated(_mesh_of(shardings))),
    out_shardings=shardings,
  )
  return create(params, key)


def create_sharded(
  model_cfg: models.ModelConfig,
  tx: optax.GradientTransformation,
  seed: int,
  mesh: Mesh,
  rules,
  *,
  kind: str = "lm",
  ema: bool = False,
  load_params: Callable[[Any], Any] | None = None,
):
  """(graphdef, state, shardings): a TrainState created directly in its shardings.

  Parameters come from `load_params(target)` when given (a checkpoint restored into `target`, the abstract
  params with shardings), else from a random initialization. Either way no host holds a whole model.
  """
  graphdef, abstract, shardings = abstract_state(model_cfg, tx, mesh, rules, kind=kind, ema=ema)
  params_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
  if load_params is None:
    params = random_params(model_cfg, abstract.params, params_key, kind=kind)
  else:
    params = load_params(abstract.params)
  return graphdef, create_from_params(params, tx, state_key, shardings, ema=ema), shardings


def microbatched_grads(sums_fn: Callable, params, batch: dict, rng: jax.Array, microbatches: int = 1):
  """Exact gradient accumulation: (sums, grads of Σloss / Σcount) over `microbatches` slices of `batch`.

  `sums_fn(params, microbatch, rng) -> (loss_sum, sums)` returns a loss summed over its tokens and a dict of
  sums that includes "count" (the number of tokens). Summing loss sums, counts and gradients over the
  slices and dividing once gives exactly the full-batch masked mean; averaging per-slice means would not
  when slices hold different numbers of tokens. Slice m takes rows m, m + M, m + 2M, ..., so every device
  of a batch-sharded mesh contributes its local rows to every slice.
  """
  grad_fn = jax.value_and_grad(sums_fn, has_aux=True)
  if microbatches == 1:
    (loss_sum, sums), grads = grad_fn(params, batch, rng)
  else:

    def split(x):
      if x.shape[0] % microbatches:
        raise ValueError(f"optim.microbatches: {microbatches} does not divide the batch of {x.shape[0]}")
      return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    def body(totals, xs):
      (loss_sum, sums), grads = grad_fn(params, *xs)
      return jax.tree.map(jnp.add, totals, (loss_sum, sums, grads)), None

    slices = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], slices)
    shapes = jax.eval_shape(lambda: (*grad_fn(params, first, rng)[0], params))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss_sum, sums, grads), _ = jax.lax.scan(body, zeros, (slices, jax.random.split(rng, microbatches)))
  count = jnp.maximum(sums["count"], 1.0)
  return loss_sum / count, sums, jax.tree.map(lambda g: g / count, grads)


def sums_step(loss_sums: Callable, tx, lr_schedule, microbatches: int, summarize: Callable) -> Callable:
  """train_step(state, batch) -> (state, metrics) for a loss given as sums (`microbatched_grads`), so exact
  over `microbatches`. `summarize(sums, batch)` gives the stage's own metrics; loss, grad_norm and lr are
  added. The state's RNG key is split once per step and its second half goes to `loss_sums`."""

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    loss, sums, grads = microbatched_grads(loss_sums, state.params, batch, step_rng, microbatches)
    metrics = {
      "loss": loss,
      **summarize(sums, batch),
      "grad_norm": optax.tree.norm(grads),
      "lr": lr_schedule(state.step),
    }
    return state.apply_gradients(grads, tx).replace(rng=rng), metrics

  return train_step


def jit_step(fn: Callable, state_shardings: TrainState, batch_shardings, rules, *, static_argnums=()) -> Callable:
  """jit of fn(state, batch, ...) -> (state, metrics) with explicit shardings; the input state is donated.

  Metrics come back replicated (small scalars). This is the pjit pattern: `jax.jit` with in/out shardings.
  The activation constraints of `rules` apply inside (sharding.traced_with_rules).
  """
  mesh = _mesh_of(state_shardings)
  return jax.jit(
    sharding.traced_with_rules(fn, mesh, rules),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, replicated(mesh)),
    donate_argnums=(0,),
    static_argnums=static_argnums,
  )


def jit_eval(fn: Callable, mesh: Mesh, rules, params_shardings=None, *, out_shardings=None) -> Callable:
  """jit of an evaluation fn(params, batch, ...) (nothing donated): with `params_shardings`, the params in
  them and the batch over data × fsdp (as jit_step lays them out), else the inputs keep the shardings they
  arrive with; `out_shardings` e.g. replicated(mesh) for per-row results every host reads. The activation
  constraints of `rules` apply inside (sharding.traced_with_rules)."""
  kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
  if params_shardings is not None:
    batch = NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules))
    kwargs["in_shardings"] = (params_shardings, batch)
  return jax.jit(sharding.traced_with_rules(fn, mesh, rules), **kwargs)


def _mesh_of(tree) -> Mesh:
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding))[0].mesh
