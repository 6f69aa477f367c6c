"""The sharded core: meshes, logical rules, sharded init, mesh-independent steps, restores across meshes."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from instructgpt_jax import checkpoint, main, models, optim, sharding, train_state

from runs import read_metrics, tiny_config

RULES = sharding.rules_dict(sharding.DEFAULT_RULES)


def test_make_mesh_fills_one_axis_and_lays_out_slices():
  assert dict(sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  # Slices are outermost: data index 0 holds the first slice's four devices.
  assert sorted(d.id for d in mesh.devices[0].flat) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match=r"mesh: at most one ici axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
  with pytest.raises(
    ValueError, match=r"mesh: ici sizes \{'data': 3, 'fsdp': -1, 'tensor': 1\} do not divide 8 devices"
  ):
    sharding.make_mesh({"data": 3, "fsdp": -1, "tensor": 1})
  with pytest.raises(ValueError, match=r"mesh: unknown axes \['model'\]"):
    sharding.make_mesh({"data": -1, "model": 2})


def test_logical_to_spec_applies_rules_divisibility_and_axis_reuse():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_spec(("embed", "mlp"), RULES, (64, 256), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "length", "embed"), RULES, (8, 16, 64), mesh) == P(
    ("data", "fsdp"), None, None
  )
  # One kv head cannot split over tensor=2: that dimension is replicated instead of failing.
  assert sharding.logical_to_spec(("embed", "kv_heads", "kv"), RULES, (64, 1, 16), mesh) == P("fsdp", None, None)
  # A batch of 2 divides data but not data×fsdp.
  assert sharding.logical_to_spec(("batch",), RULES, (2,), mesh) == P("data")
  with pytest.raises(ValueError, match="sharding: logical axis 'heads_typo' has no rule"):
    sharding.logical_to_spec(("heads_typo",), RULES)


def test_abstract_gpt3_shardings_split_every_large_parameter():
  # Nothing is allocated: eval_shape gives the 1.3B model's shapes and names.
  cfg = models.resolve({"size": "gpt3-1.3b"})
  _, abstract = models.abstract(cfg)
  names = sharding.logical_axes(abstract)
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  shardings = sharding.tree_shardings(nnx_to_pure(params), names, mesh, RULES)
  sharding.assert_large_params_sharded(nnx_to_pure(params), shardings)
  q = shardings["layers"]["attn"]["query"]["kernel"]
  assert q.spec == P(None, "fsdp", "tensor", None)  # [layers, embed, heads, kv]
  # A rules table that maps nothing onto the mesh leaves 1.3B parameters replicated: caught.
  nothing = {k: None for k in RULES}
  with pytest.raises(AssertionError, match="large parameters are replicated"):
    sharding.assert_large_params_sharded(
      nnx_to_pure(params), sharding.tree_shardings(nnx_to_pure(params), names, mesh, nothing)
    )


def nnx_to_pure(tree):
  from flax import nnx

  return nnx.to_pure_dict(tree)


def test_create_sharded_places_each_shard_on_its_device():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  cfg = models.resolve({"size": "tiny"})
  tx = optim.make_optimizer(tiny_config().optim, 10)
  _, state, shardings = train_state.create_sharded(cfg, tx, 0, mesh, RULES)
  up = state.params["layers"]["mlp"]["up"]["kernel"]  # [layers 2, embed 64, mlp 256]
  assert up.sharding.spec == P(None, "fsdp", "tensor")
  assert {s.data.shape for s in up.addressable_shards} == {(2, 16, 128)}
  mu = state.opt_state[1].mu["layers"]["mlp"]["up"]["kernel"]  # Adam moments shard like their params
  assert mu.sharding == up.sharding
  _, reference = models.init(cfg, jax.random.split(jax.random.PRNGKey(0))[0])
  # The same values as an unsharded init (to float rounding: jitted and eager initializers may round apart).
  np.testing.assert_allclose(np.asarray(up), np.asarray(reference["layers"]["mlp"]["up"]["kernel"]), rtol=1e-6)


def one_step(tmp_path, name, **mesh):
  config = tiny_config(total_steps=1, log_every_steps=1, **{"model.dtype": "float32"})
  for axis, size in mesh.items():
    config.mesh[axis] = size
  main.run(config, str(tmp_path / name))
  rows = read_metrics(tmp_path / name)
  return rows[0]["loss"], checkpoint.Checkpointer(str(tmp_path / name)).restore_params(1)


@pytest.fixture(scope="module")
def single_device_step(tmp_path_factory):
  """One pretraining step on a single device, in a subprocess that sees one CPU device."""
  import os
  import subprocess
  import sys

  workdir = tmp_path_factory.mktemp("one_device") / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [
    sys.executable,
    "-m",
    "instructgpt_jax.main",
    "--config=configs/pretrain.py:tiny",
    f"--workdir={workdir}",
    "--config.total_steps=1",
    "--config.log_every_steps=1",
    "--config.model.dtype=float32",
    "--config.progress_bar=false",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  loss = read_metrics(workdir)[0]["loss"]
  return loss, checkpoint.Checkpointer(str(workdir)).restore_params(1)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (1, 2, 4)])
def test_one_step_on_a_mesh_equals_one_device(tmp_path, single_device_step, mesh):
  loss, params = one_step(tmp_path, "run", **dict(zip(("data", "fsdp", "tensor"), mesh)))
  want_loss, want_params = single_device_step
  assert loss == pytest.approx(want_loss, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), params, want_params)


def test_microbatched_gradients_equal_the_full_batch(tmp_path):
  config = tiny_config(total_steps=3, log_every_steps=1, **{"model.dtype": "float32"})
  main.run(config, str(tmp_path / "full"))
  config.optim.microbatches = 4
  main.run(config, str(tmp_path / "micro"))
  full = [r["loss"] for r in read_metrics(tmp_path / "full")]
  micro = [r["loss"] for r in read_metrics(tmp_path / "micro")]
  np.testing.assert_allclose(micro, full, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
    checkpoint.Checkpointer(str(tmp_path / "micro")).restore_params(3),
    checkpoint.Checkpointer(str(tmp_path / "full")).restore_params(3),
  )


def test_checkpoint_from_one_mesh_restores_onto_another(tmp_path):
  cfg = models.resolve({"size": "tiny-llama"})
  tx = optim.make_optimizer(tiny_config().optim, 10)
  mesh_a = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  mesh_b = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  _, state_a, _ = train_state.create_sharded(cfg, tx, 3, mesh_a, RULES)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(5, state_a, {"next_batch": 5})
  ckpt.wait()
  _, template_b, _ = train_state.create_sharded(cfg, tx, 99, mesh_b, RULES)  # other values, other mesh
  restored, data_state = ckpt.restore(template_b)
  ckpt.close()
  assert data_state == {"next_batch": 5}
  kernel = restored.params["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.mesh.shape == mesh_b.shape and kernel.sharding.spec == P(None, "fsdp", None)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state_a)


def test_export_and_import_params_with_metadata(tmp_path):
  cfg = models.resolve({"size": "tiny"})
  _, params = models.init(cfg, jax.random.key(0))
  checkpoint.export_params(str(tmp_path / "model"), params, {"size": "tiny", "reward_bias": -0.25})
  loaded, metadata = checkpoint.import_params(str(tmp_path / "model"))
  assert metadata == {"size": "tiny", "reward_bias": -0.25}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  names = sharding.logical_axes(models.abstract(cfg)[1])
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    params,
    sharding.tree_shardings(params, names, mesh, RULES),
  )
  sharded, _ = checkpoint.import_params(str(tmp_path / "model"), target)
  assert sharded["embed"]["embedding"].sharding.spec == P(None, "fsdp")
  with pytest.raises(FileNotFoundError, match="not an exported model"):
    checkpoint.import_params(str(tmp_path))


def test_activation_constraints_apply_when_the_jitted_function_is_first_called_later():
  # jax.jit traces at the first call; the rules must be active then, not only where jax.jit was written.
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  double = jax.jit(sharding.traced_with_rules(lambda x: sharding.constrain(2 * x, ("batch", None)), mesh, RULES))
  out = double(np.ones((8, 4), np.float32))
  assert tuple(out.sharding.spec)[:1] == ("data",) and len(out.sharding.device_set) == 8
  plain = jax.jit(lambda x: sharding.constrain(2 * x, ("batch", None)))
  assert len(plain(np.ones((8, 4), np.float32)).sharding.device_set) == 1  # no rules active: no constraint
