"""Checks that several test files share: one trace per shape, and sharded == single-device results."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def count_traces(fn, *argument_sets):
  """Runs jax.jit(fn) on each argument set; returns (number of traces, outputs)."""
  traces = []

  def counted(*args):
    traces.append(None)
    return fn(*args)

  step = jax.jit(counted)
  outputs = [step(*args) for args in argument_sets]
  return len(traces), outputs


def assert_batch_sharded_equals_single_device(fn, args, *, name="", rtol=1e-5, atol=1e-6):
  """fn on args placed on one device == fn on args sharded over all 8 devices along their first axis."""
  assert jax.device_count() == 8, "conftest forces 8 CPU devices"
  step = jax.jit(fn)
  single = step(*jax.device_put(args, jax.devices()[0]))
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded_args = jax.device_put(args, sharding)
  assert all(len(a.sharding.device_set) == 8 for a in sharded_args)
  sharded = step(*sharded_args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name), single, sharded)
