"""Attention implementations (models/attention.py): each one that runs on CPU (splash in Pallas interpret mode)
equals XLA's `jax.nn.dot_product_attention` on causal, left-padded and packed inputs, forward and gradient, alone
and inside both model families; "auto" picks per platform; what cannot run is a one-line error."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import models, sharding
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import attention, transformer

TINY = {"gpt": models.resolve({"size": "tiny"}), "llama": models.resolve({"size": "tiny-llama"})}

# segment ids [2, 40]: "causal" (one segment), "left_padded" (7 and 19 padding slots first), "packed" (three and
# two examples, padding between and after). T = 40 is not a multiple of splash's block, which then pads.
T = 40
SEGMENTS = {
  "causal": np.ones((2, T), np.int32),
  "left_padded": np.stack([np.r_[np.zeros(7), np.ones(T - 7)], np.r_[np.zeros(19), np.ones(T - 19)]]).astype(np.int32),
  "packed": np.stack([np.r_[[1] * 11, [2] * 9, [3] * 15, [0] * 5], np.r_[[0] * 3, [1] * 20, [0] * 2, [2] * 15]]).astype(
    np.int32
  ),
}


def _qkv(seed, heads=4, kv_heads=2, h=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = ((2, T, heads, h), (2, T, kv_heads, h), (2, T, kv_heads, h))
  return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _run(impl, q, k, v, segments, f32_probs=True):
  mask = transformer.attention_mask(segments)
  return attention.attend(q, k, v, mask, segments, impl=impl, f32_probs=f32_probs)


@pytest.mark.parametrize("impl", ["einsum", "splash"])
@pytest.mark.parametrize("inputs", sorted(SEGMENTS))
def test_each_implementation_equals_xla_forward_and_gradient(impl, inputs):
  segments = jnp.asarray(SEGMENTS[inputs])
  q, k, v = _qkv(0)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def loss(impl, q, k, v):
    return jnp.sum(_run(impl, q, k, v, segments) * cotangent)

  reference = jax.jit(lambda *x: _run("xla", *x, segments))(q, k, v)
  ours = jax.jit(lambda *x: _run(impl, *x, segments))(q, k, v)
  np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)  # every row, padding rows too
  grads = jax.jit(jax.grad(lambda *x: loss(impl, *x), argnums=(0, 1, 2)))(q, k, v)
  reference_grads = jax.jit(jax.grad(lambda *x: loss("xla", *x), argnums=(0, 1, 2)))(q, k, v)
  for ours, theirs in zip(grads, reference_grads):
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_einsum_in_bfloat16_rounds_only_its_output_with_f32_probs_and_its_probs_without():
  segments = jnp.asarray(SEGMENTS["packed"])
  bf = _qkv(2, dtype=jnp.bfloat16)
  exact = _run("einsum", *[x.astype(jnp.float32) for x in bf], segments)
  np.testing.assert_array_equal(_run("einsum", *bf, segments), exact.astype(jnp.bfloat16))
  # Without f32_probs the probabilities are rounded to bfloat16 before P·V, as the XLA path rounds them.
  rounded = _run("einsum", *bf, segments, f32_probs=False)
  assert not np.array_equal(np.asarray(rounded), np.asarray(exact.astype(jnp.bfloat16)))
  np.testing.assert_allclose(np.asarray(rounded, np.float32), np.asarray(exact), atol=0.05)


def _traced_einsum(q, k, v, mask, f32_probs=True):
  """The einsum path as it was before its written-out gradient: autodiff traces this softmax (the reference)."""
  b, t, n, h = q.shape
  q = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) / np.sqrt(h)
  probs = jax.nn.softmax(jnp.where(mask[:, :, None], logits, -0.7 * jnp.finfo(jnp.float32).max), axis=-1)
  if f32_probs:
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32))
  else:
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(v.dtype)


@pytest.mark.parametrize("block", [16, 7, 128])
@pytest.mark.parametrize("inputs", sorted(SEGMENTS))
def test_einsum_causal_blocks_and_written_out_gradient_equal_the_traced_softmax(block, inputs):
  """Query blocks of 16 (16, 16, 8 rows), 7 (uneven) and 128 (one block: T = 40) that skip the keys after them
  give the traced full softmax's output and gradient, every row (padding rows too)."""
  segments = jnp.asarray(SEGMENTS[inputs])
  mask = transformer.attention_mask(segments)
  q, k, v = _qkv(6)
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  blocked = lambda q, k, v: attention.einsum_attention(q, k, v, mask, causal=True, block=block)
  traced = lambda q, k, v: _traced_einsum(q, k, v, mask)
  np.testing.assert_allclose(jax.jit(blocked)(q, k, v), jax.jit(traced)(q, k, v), atol=1e-6, rtol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)
  for ours, theirs in zip(grad(blocked), grad(traced)):
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("f32_probs", [True, False])
def test_einsum_gradient_in_bfloat16_is_the_traced_ones_to_bfloat16_rounding(f32_probs):
  """In bfloat16 the written-out gradient runs in float32 and rounds once at the end; autodiff of the traced
  softmax rounds where its forward did. Both stay within bfloat16's rounding of the float32 gradient."""
  segments = jnp.asarray(SEGMENTS["packed"])
  mask = transformer.attention_mask(segments)
  bf = _qkv(8, dtype=jnp.bfloat16)
  cotangent = jnp.asarray(np.random.default_rng(9).normal(size=bf[0].shape), jnp.bfloat16)

  def grad(f, x):
    return jax.jit(jax.grad(lambda *x: jnp.sum((f(*x) * cotangent).astype(jnp.float32)), argnums=(0, 1, 2)))(*x)

  ours = grad(lambda *x: attention.einsum_attention(*x, mask, f32_probs=f32_probs, causal=True, block=16), bf)
  traced = grad(lambda *x: _traced_einsum(*x, mask, f32_probs=f32_probs), bf)
  exact = grad(lambda *x: _traced_einsum(*x, mask), [x.astype(jnp.float32) for x in bf])
  for o, t, e in zip(ours, traced, exact):
    assert o.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(e)))
    ours_error = float(jnp.max(jnp.abs(o.astype(jnp.float32) - e))) / scale
    traced_error = float(jnp.max(jnp.abs(t.astype(jnp.float32) - e))) / scale
    assert ours_error <= max(traced_error, 2**-8), (ours_error, traced_error)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("inputs", sorted(SEGMENTS))
def test_the_model_gives_the_same_logits_and_gradients_with_every_implementation(family, inputs):
  segments = jnp.asarray(SEGMENTS[inputs])
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, segments.shape), jnp.int32)
  real = np.asarray(segments) > 0

  def run(impl):
    cfg = dataclasses.replace(TINY[family], attention_impl=impl)
    graphdef, params = models.init(dataclasses.replace(TINY[family], attention_impl="xla"), jax.random.key(4))
    graphdef = models.init(cfg, jax.random.key(4))[0]

    def loss(p):
      logits = models.apply(graphdef, p, tokens, segment_ids=segments)[0]
      return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)[..., 0]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits)[real], grads

  reference_logits, reference_grads = run("xla")
  for impl in ("einsum", "splash"):
    logits, grads = run(impl)
    np.testing.assert_allclose(logits, reference_logits, atol=1e-5, rtol=1e-5, err_msg=impl)
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=impl)  # noqa: B023
    jax.tree.map(close, grads, reference_grads)


def test_splash_on_a_mesh_runs_per_shard_and_equals_one_device():
  """Under the 8-device mesh the kernel runs in shard_map over the batch (data × fsdp) and kv heads (tensor)."""
  segments = jnp.asarray(np.tile(SEGMENTS["packed"], (4, 1)))  # batch 8 over data 2 × fsdp 2
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, T, 4, 16), (8, T, 2, 16), (8, T, 2, 16)))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  run = sharding.jit_on_mesh(lambda q, k, v: _run("splash", q, k, v, segments), mesh=mesh)
  sharded = run(q, k, v)
  assert "sdy.manual_computation" in run.lower(q, k, v).as_text()  # the shard_map
  np.testing.assert_allclose(sharded, _run("xla", q, k, v, segments), atol=1e-5, rtol=1e-5)


def test_auto_picks_the_platforms_kernel():
  pick = lambda on, dtype="bfloat16", head_dim=64: attention.resolve("auto", dtype=dtype, head_dim=head_dim, on=on)
  assert pick("cpu") == "einsum" and pick("tpu") == "splash" and pick("gpu") == "cudnn"
  assert pick("gpu", dtype="float32") == "xla" and pick("gpu", head_dim=160) == "xla"
  assert attention.resolve(None, dtype="float32", head_dim=64, on="cpu") == "einsum"  # configs saved before "auto"
  assert attention.resolve("auto", dtype="float32", head_dim=16) == "einsum"  # this machine, no mesh


@pytest.mark.parametrize(
  "impl, on, message",
  [
    ("cudnn", "cpu", "model.attention_impl: 'cudnn' runs on NVIDIA GPUs, these devices are cpu; use 'auto'"),
    ("splash", "gpu", "model.attention_impl: 'splash' runs on TPUs (and on CPU, interpreted), not gpu"),
    ("flash", "cpu", "model.attention_impl: 'flash' is not one of ('auto', 'xla', 'einsum', 'cudnn', 'splash')"),
  ],
)
def test_an_implementation_the_devices_lack_is_a_one_line_error(impl, on, message):
  with pytest.raises(ConfigError) as raised:
    attention.resolve(impl, dtype="bfloat16", head_dim=64, on=on)
  assert str(raised.value) == message


def test_config_refuses_cudnn_in_float32_and_unknown_names_in_one_line():
  with pytest.raises(ConfigError, match=r"^model.attention_impl: 'cudnn' needs model.dtype bfloat16 or float16"):
    dataclasses.replace(TINY["gpt"], attention_impl="cudnn")
  with pytest.raises(ConfigError, match=r"^model.attention_impl: 'fused' is not one of"):
    dataclasses.replace(TINY["gpt"], attention_impl="fused")
  # A command line reaching a model running on CPU: a one-line error before anything compiles.
  cfg = dataclasses.replace(TINY["gpt"], attention_impl="cudnn", dtype="bfloat16")
  graphdef, params = models.init(cfg, jax.random.key(0))
  with pytest.raises(ConfigError, match="^model.attention_impl: 'cudnn' runs on NVIDIA GPUs"):
    jax.eval_shape(lambda p: models.apply(graphdef, p, jnp.zeros((1, 4), jnp.int32)), params)
