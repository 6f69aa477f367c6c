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
from instructgpt_jax.models import lora


@struct.dataclass
class TrainState:
  """step: optimizer steps taken; rng: a raw uint32[2] key, split once per step; ema: EMA of params or None.

  With LoRA adapters in `params` only the trainable part (`lora.split_trainable`: the adapters and a scalar
  head) has optimizer moments and an EMA, and gradients are taken over it alone; the frozen base rides along
  in `params` unchanged. Without adapters that part is all of params (full fine-tuning)."""

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
      opt_state=tx.init(trainable(params)),
      rng=rng,
      ema=jax.tree.map(jnp.copy, trainable(params)) if ema else None,
    )

  def apply_gradients(self, grads, tx: optax.GradientTransformation, *, ema_decay: float | None = None):
    """One optimizer step; `grads` are over the trainable part (`trainable(params)`)."""
    train, frozen = lora.split_trainable(self.params)
    updates, opt_state = tx.update(grads, self.opt_state, train)
    train = optax.apply_updates(train, updates)
    ema = self.ema
    if ema is not None and ema_decay is not None:
      ema = optax.incremental_update(train, ema, step_size=1.0 - ema_decay)
    return self.replace(step=self.step + 1, params=lora.combine(train, frozen), opt_state=opt_state, ema=ema)


def ema_params(state: TrainState):
  """The EMA weights as a whole params tree: the EMA of the trainable part beside the frozen part (the LoRA
  base, which never changes); all of it without adapters."""
  return lora.combine(state.ema, lora.split_trainable(state.params)[1])


def trainable(params):
  """The part of params that trains (all of it without LoRA adapters; lora.split_trainable)."""
  return lora.split_trainable(params)[0]


def trainable_grad(loss_fn: Callable, params) -> tuple[Callable, Any]:
  """(jax.value_and_grad(has_aux=True) of loss_fn(params, *args) as a function of the trainable part of params,
  that part): the frozen LoRA base is closed over, so it gets no gradient and no backward matmuls for its
  weights. Without adapters the function takes all of params."""
  train, frozen = lora.split_trainable(params)
  return jax.value_and_grad(lambda t, *a: loss_fn(lora.combine(t, frozen), *a), has_aux=True), train


def _is_state(x) -> bool:
  return isinstance(x, TrainState)


def saved_part(state):
  """What a checkpoint holds of `state` (a TrainState, or a pytree of them such as PPO's): each TrainState's
  params cut to their trainable part. Full fine-tuning: all of it. LoRA: the adapters (and heads), not a second
  copy of the frozen base, which is read again from the run's `model.init_from` (or its seed) on resume."""
  return jax.tree.map(lambda x: x.replace(params=trainable(x.params)) if _is_state(x) else x, state, is_leaf=_is_state)


def has_frozen(state) -> bool:
  """Whether any TrainState in `state` has a frozen part (LoRA), which its checkpoint does not hold."""
  states = jax.tree.leaves(state, is_leaf=_is_state)
  return any(_is_state(x) and jax.tree.leaves(lora.split_trainable(x.params)[1]) for x in states)


def with_frozen(saved, fresh):
  """The inverse of `saved_part`: the restored `saved` with the frozen params of `fresh` (the same pytree of
  TrainStates, started from the run's base) put back beside them."""
  return jax.tree.map(
    lambda s, f: s.replace(params=lora.combine(s.params, lora.split_trainable(f.params)[1])) if _is_state(s) else s,
    saved,
    fresh,
    is_leaf=_is_state,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_state: TrainState, param_shardings, tx, mesh: Mesh) -> TrainState:
  """Shardings of a whole TrainState: optimizer moments shard like their parameters, scalars replicate."""
  opt = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract_state.opt_state,
    trainable(param_shardings),
    transform_non_params=lambda _: replicated(mesh),
  )
  return TrainState(
    step=replicated(mesh),
    params=param_shardings,
    opt_state=opt,
    rng=replicated(mesh),
    ema=None if abstract_state.ema is None else trainable(param_shardings),
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
  params_key, state_key = init_keys(seed)
  if load_params is None:
    params = random_params(model_cfg, abstract.params, params_key, kind=kind)
  else:
    params = load_params(abstract.params)
  return graphdef, create_from_params(params, tx, state_key, shardings, ema=ema), shardings


def init_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(the random initialization's key, the train state's RNG key) of a run's `seed`."""
  params_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
  return params_key, state_key


def microbatched_grads(sums_fn: Callable, params, batch: dict, rng: jax.Array, microbatches: int = 1):
  """Exact gradient accumulation: (sums, grads of Σloss / Σcount) over `microbatches` slices of `batch`.

  The gradients are over the trainable part of params (`trainable`: the adapters and a scalar head under LoRA).
  `sums_fn(params, microbatch, rng) -> (loss_sum, sums)` returns a loss summed over its tokens and a dict of
  sums that includes "count" (the number of tokens). Summing loss sums, counts and gradients over the
  slices and dividing once gives exactly the full-batch masked mean; averaging per-slice means would not
  when slices hold different numbers of tokens. Slice m takes rows m, m + M, m + 2M, ..., so every device
  of a batch-sharded mesh contributes its local rows to every slice.
  """
  grad_fn, train = trainable_grad(sums_fn, params)
  if microbatches == 1:
    (loss_sum, sums), grads = grad_fn(train, batch, rng)
  else:

    def split(x):
      if x.shape[0] % microbatches:
        raise ValueError(f"optim.microbatches: {microbatches} does not divide the batch of {x.shape[0]}")
      return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    def body(totals, xs):
      (loss_sum, sums), grads = grad_fn(train, *xs)
      return jax.tree.map(jnp.add, totals, (loss_sum, sums, grads)), None

    slices = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], slices)
    shapes = jax.eval_shape(lambda: (*grad_fn(train, first, rng)[0], train))
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
