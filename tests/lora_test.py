"""LoRA at the model level (models/lora.py, sizes.LoraConfig): adapters off at init (B = 0) is the base model bit for
bit through every entry point; with trained-looking adapters every entry point sees them; merged weights, adapters
off without a copy, sharding by the rules, dropout, the one-line errors and the `model.lora` config section."""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from instructgpt_jax import config_lib, errors, models, sharding, stages
from instructgpt_jax.models import lora
from instructgpt_jax.models.sizes import LoraConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
BASE = {"gpt": models.resolve({"size": "tiny"}), "llama": models.resolve({"size": "tiny-llama"})}
ADAPTERS = LoraConfig(rank=4, alpha=8.0)
PATHS = {  # (block, projection) of each family's layer
  "gpt": [("attn", "query"), ("attn", "key"), ("attn", "value"), ("attn", "out"), ("mlp", "up"), ("mlp", "down")],
  "llama": [("attn", n) for n in ("query", "key", "value", "out")] + [("mlp", n) for n in ("gate", "up", "down")],
}


def configs(family, **fields):
  """(base config, the same with ADAPTERS)."""
  base = dataclasses.replace(BASE[family], **fields)
  return base, dataclasses.replace(base, lora=ADAPTERS)


def batch():
  """tokens, segment_ids [2, 8]: row 1 left-padded by 2 (padding ids outside the vocabulary)."""
  tokens = np.random.default_rng(0).integers(0, 320, (2, 8)).astype(np.int32)
  segment_ids = np.ones((2, 8), np.int32)
  segment_ids[1, :2], tokens[1, :2] = 0, 999
  return jnp.asarray(tokens), jnp.asarray(segment_ids)


def entry_points(graphdef, params, tokens, segment_ids, prompt=6):
  """Logits [B, T, V] three ways: __call__; hidden_states then logits; prefill of `prompt` tokens then one
  decode step per remaining token (the cache's end is traced: the decode loop's program)."""
  m = nnx.merge(graphdef, params)
  called, _ = m(tokens, segment_ids=segment_ids)
  via_hidden = m.logits(m.hidden_states(tokens, segment_ids=segment_ids))
  hidden, cache = m.prefill(tokens[:, :prompt], segment_ids=segment_ids[:, :prompt], cache_length=tokens.shape[1])
  steps = [hidden]
  for t in range(prompt, tokens.shape[1]):
    hidden, cache = m.decode(tokens[:, t : t + 1], cache, segment_ids=segment_ids[:, t : t + 1])
    steps.append(hidden)
  return called, via_hidden, m.logits(jnp.concatenate(steps, axis=1))


_entry_points = jax.jit(entry_points, static_argnums=0)  # one jit object: a config compiles once per session


def run(graphdef, params):
  return [np.asarray(x) for x in _entry_points(graphdef, params, *batch())]


def with_random_b(params, key, std=0.05):
  """params with every B drawn N(0, std²): adapters that have trained."""
  adapters, base = lora.split(params)
  leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
  drawn = [
    std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if path[-1].key == "lora_b" else x
    for i, (path, x) in enumerate(leaves)
  ]
  return lora.combine(jax.tree.unflatten(tree, drawn), base)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, segment_ids, dropout_rng):
  return models.apply(graphdef, params, tokens, segment_ids=segment_ids, dropout_rng=dropout_rng)[0]


def logits(graphdef, params, dropout_rng=None):
  return np.asarray(_logits(graphdef, params, *batch(), dropout_rng))


# ------------------------------------------------------------------------------------------ B = 0: the base, exactly


# Every pair of (family, layers, dtype) values once: 4 runs instead of the 8 of the full product.
@pytest.mark.parametrize(
  "family, scan_layers, dtype",
  [("gpt", False, "float32"), ("gpt", True, "bfloat16"), ("llama", False, "bfloat16"), ("llama", True, "float32")],
)
def test_at_init_every_entry_point_equals_the_base_model_exactly(family, scan_layers, dtype):
  base_cfg, cfg = configs(family, scan_layers=scan_layers, dtype=dtype)
  base_graphdef, base_params = models.init(base_cfg, jax.random.key(0))
  graphdef, params = models.init(cfg, jax.random.key(0))
  adapters, _ = lora.split(params)
  assert set(adapters["layers"]["attn"]) | set(adapters["layers"]["mlp"]) == {p for _, p in PATHS[family]}
  assert all(np.abs(np.asarray(a["lora_a"])).max() > 0 for block in adapters["layers"].values() for a in block.values())
  want = run(base_graphdef, base_params)
  for got, expected in zip(run(graphdef, params), want):
    assert got.dtype == np.float32 and np.abs(expected).max() > 0.1
    np.testing.assert_array_equal(got, expected)


def test_at_init_a_scalar_model_with_adapters_in_its_trunk_equals_its_base_exactly():
  base_cfg, cfg = configs("llama", remat="full")
  base_graphdef, base_params = models.init(base_cfg, jax.random.key(0), kind="scalar")
  graphdef, params = models.init(cfg, jax.random.key(0), kind="scalar")
  assert params["transformer"]["layers"]["mlp"]["down"]["lora_b"].shape == (2, 4, 64)
  assert "lora_a" not in params["head"]["proj"]  # the head trains fully, without adapters
  scalars = logits(graphdef, params)  # [B, T] values of the head
  assert scalars.shape == (2, 8) and np.abs(scalars).max() > 0.1
  np.testing.assert_array_equal(scalars, logits(base_graphdef, base_params))


# ------------------------------------------------------------------------------------------ trained adapters


@pytest.mark.parametrize(
  "family, fields",
  [
    ("gpt", {}),
    ("llama", {}),
    ("gpt", {"scan_layers": True, "remat": "full"}),
    ("llama", {"scan_layers": True, "attention_impl": "xla"}),
    ("llama", {"qk_norm": True, "qkv_bias": True, "remat": "dots"}),
    ("gpt", {"attention_impl": "splash"}),  # interpreted on CPU; prefill and decode take the XLA path
  ],
)
def test_every_entry_point_sees_trained_adapters(family, fields):
  base_cfg, cfg = configs(family, **fields)
  graphdef, params = models.init(cfg, jax.random.key(0))
  params = with_random_b(params, jax.random.key(1))
  called, via_hidden, cached = run(graphdef, params)
  base = run(models.init(base_cfg, jax.random.key(0))[0], lora.without_adapters(params))[0]
  np.testing.assert_array_equal(via_hidden, called)  # the same program up to the unembedding
  np.testing.assert_allclose(cached, called, atol=1e-4, rtol=0)  # sampling_test's tolerance for the cache
  assert np.abs(cached - base).max() > 50 * 1e-4  # ... and the adapters moved them well beyond it


def test_gradients_reach_the_adapters_under_scan_and_remat():
  _, cfg = configs("llama", scan_layers=True, remat="full")
  graphdef, params = models.init(cfg, jax.random.key(0))
  adapters, base = lora.split(params)
  tokens, segment_ids = batch()

  def loss(adapters):
    out, _ = models.apply(graphdef, lora.combine(adapters, base), tokens, segment_ids=segment_ids)
    return jnp.mean(out**2)

  grads = jax.jit(jax.grad(loss))(adapters)
  for block, name in PATHS["llama"]:
    grad = grads["layers"][block][name]
    # At B = 0, dL/dA = x^T (dL/dy) B^T = 0 while dL/dB = (x A)^T dL/dy is not, in every layer.
    assert not np.asarray(grad["lora_a"]).any(), (block, name)
    assert (np.abs(np.asarray(grad["lora_b"])).max(axis=(1, 2)) > 0).all(), (block, name)


def test_merged_weights_run_as_the_base_model_equal_the_adapted_model():
  base_cfg, cfg = configs("llama")
  graphdef, params = models.init(cfg, jax.random.key(0))
  params = with_random_b(params, jax.random.key(1))
  merged = lora.merged(params, cfg)
  base_graphdef, base_params = models.init(base_cfg, jax.random.key(0))
  assert jax.tree.structure(merged) == jax.tree.structure(base_params)
  query = params["layers"]["attn"]["query"]
  delta = jnp.einsum("ldr,lrnh->ldnh", query["lora_a"], query["lora_b"], precision="highest")
  np.testing.assert_allclose(merged["layers"]["attn"]["query"]["kernel"], query["kernel"] + 2.0 * delta, atol=1e-7)
  adapted, base = logits(graphdef, params), logits(base_graphdef, base_params)
  np.testing.assert_allclose(logits(base_graphdef, merged), adapted, atol=1e-5, rtol=0)
  assert np.abs(adapted - base).max() > 50 * 1e-5


def test_without_adapters_is_the_base_params_same_arrays_no_copy():
  base_cfg, cfg = configs("gpt")
  _, params = models.init(cfg, jax.random.key(0))
  _, base_params = models.init(base_cfg, jax.random.key(0))  # the same seed draws the same base weights
  stripped = lora.without_adapters(params)
  assert jax.tree.structure(stripped) == jax.tree.structure(base_params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(stripped):
    original = params
    for key in path:
      original = original[key.key]
    assert leaf is original, path
  jax.tree.map(np.testing.assert_array_equal, stripped, base_params)
  adapters, base = lora.split(params)
  assert len(jax.tree.leaves(adapters)) == 2 * 6 and all(
    lora.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)
  )
  assert jax.tree.structure(lora.combine(adapters, base)) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(lora.combine(adapters, base)), jax.tree.leaves(params)))


# ------------------------------------------------------------------------------------------ sharding


def test_sharded_on_8_devices_equals_one_device_and_adapters_follow_the_rules():
  _, cfg = configs("llama", scan_layers=True)
  graphdef, state = models.abstract(cfg)
  names = sharding.logical_axes(state)
  _, params = models.init(cfg, jax.random.key(0))
  params = with_random_b(params, jax.random.key(1))
  want = logits(graphdef, params)

  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  shardings = sharding.tree_shardings(params, names, mesh, sharding.DEFAULT_RULES)
  attn, mlp = shardings["layers"]["attn"], shardings["layers"]["mlp"]
  assert attn["query"]["lora_a"].spec == P(None, "fsdp", None)  # [L, D, r]: embed over fsdp (r: fsdp taken)
  assert attn["query"]["lora_b"].spec == P(None, "fsdp", "tensor", None)  # [L, r, N, H]: r over fsdp, heads tensor
  assert attn["key"]["lora_b"].spec == P(None, "fsdp", "tensor", None)  # kv_heads over tensor
  assert attn["out"]["lora_a"].spec == P(None, "tensor", None, "fsdp")  # [L, N, H, r]
  assert attn["out"]["lora_b"].spec == P(None, "fsdp", None)  # [L, r, D]: r first takes fsdp
  assert mlp["up"]["lora_b"].spec == P(None, "fsdp", "tensor")
  assert mlp["down"]["lora_a"].spec == P(None, "tensor", "fsdp")
  placed = jax.device_put(params, shardings)
  assert placed["layers"]["attn"]["query"]["lora_a"].sharding.shard_shape((2, 64, 4)) == (2, 16, 4)
  forward = sharding.jit_on_mesh(lambda p, t, s: models.apply(graphdef, p, t, segment_ids=s)[0], mesh=mesh)
  np.testing.assert_allclose(np.asarray(forward(placed, *batch())), want, atol=1e-5, rtol=0)
  assert dict(sharding.DECODE_RULES)["lora_rank"] is None


# ------------------------------------------------------------------------------------------ dropout


def test_adapter_dropout_acts_only_with_a_key_and_leaves_the_residual_masks_alone():
  base_cfg, _ = configs("llama")
  cfg = dataclasses.replace(base_cfg, lora=dataclasses.replace(ADAPTERS, dropout=0.5))
  graphdef, params = models.init(cfg, jax.random.key(0))
  trained = with_random_b(params, jax.random.key(1))
  no_dropout_graphdef, _ = models.init(dataclasses.replace(cfg, lora=ADAPTERS), jax.random.key(0))
  key = jax.random.key(7)
  deterministic = logits(graphdef, trained)
  np.testing.assert_array_equal(deterministic, logits(no_dropout_graphdef, trained))  # no key: no dropout
  dropped = logits(graphdef, trained, dropout_rng=key)
  np.testing.assert_array_equal(dropped, logits(graphdef, trained, dropout_rng=key))  # the key decides
  assert np.abs(dropped - deterministic).max() > 1e-3
  assert np.abs(dropped - logits(graphdef, trained, dropout_rng=jax.random.key(8))).max() > 1e-3
  # With residual dropout too and B = 0, the model equals its base under the same key: the residual masks are
  # the base's (the adapters' dropout draws from its own stream).
  resid_base = dataclasses.replace(base_cfg, resid_dropout=0.3)
  resid_lora = dataclasses.replace(cfg, resid_dropout=0.3)
  base_graphdef, base_params = models.init(resid_base, jax.random.key(0))
  lora_graphdef, _ = models.init(resid_lora, jax.random.key(0))
  with_key = logits(lora_graphdef, params, dropout_rng=key)
  np.testing.assert_array_equal(with_key, logits(base_graphdef, base_params, dropout_rng=key))
  assert np.abs(with_key - logits(base_graphdef, base_params)).max() > 1e-3  # the residual dropout did act


# ------------------------------------------------------------------------------------------ config and errors


@pytest.mark.parametrize(
  "size, lora_fields, message",
  [
    (
      "tiny",
      {"rank": 4, "targets": "query"},
      "model.lora.targets: 'query' matches none of this model's projections (attn/query, attn/key, attn/value, "
      "attn/out, mlp/up, mlp/down; matched whole, with re.fullmatch); e.g. 'attn/.*|mlp/.*' for all",
    ),
    ("tiny", {"rank": 4, "targets": "mlp/gate"}, "model.lora.targets: 'mlp/gate' matches none"),  # gpt: no gate
    ("tiny", {"rank": 4, "targets": "attn/(query"}, "model.lora.targets: 'attn/(query' is not a regular expression"),
    (
      "tiny-llama",
      {"rank": 33},
      "model.lora.rank: 33 exceeds 32, the smaller side of attn/key (64 -> 2x16); lower model.lora.rank to <= 32 "
      "or leave attn/key out of model.lora.targets",
    ),
    ("tiny", {"rank": -1}, "model.lora.rank: -1 is not an integer >= 0 (0: no adapters)"),
    ("tiny", {"rank": 4, "alpha": 0.0}, "model.lora.alpha: 0.0 must be > 0"),
    ("tiny", {"rank": 4, "dropout": 1.0}, "model.lora.dropout: 1.0 is not in [0, 1)"),
    ("tiny", {"rnk": 4}, "model.lora.rnk: not a LoRA field; known fields: rank, alpha, dropout, targets"),
  ],
)
def test_a_bad_lora_section_is_a_one_line_error(size, lora_fields, message):
  with pytest.raises(errors.ConfigError) as e:
    models.resolve({"size": size, "lora": lora_fields})
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_rank_is_bounded_by_the_targeted_projections_only():
  cfg = models.resolve({"size": "tiny-llama", "lora": {"rank": 33, "targets": "mlp/.*|attn/(query|out)"}})
  assert cfg.lora_modules == ("attn/query", "attn/out", "mlp/gate", "mlp/up", "mlp/down")
  assert models.resolve({"size": "tiny-llama", "lora": {"rank": 0, "targets": "nothing"}}).lora_modules == ()


def test_a_stage_config_takes_model_lora_and_rank_0_builds_todays_params():
  sft = f"{CONFIGS}/sft.py:tiny"
  config = stages.load_checked(sft, ["--config.model.lora.rank=4"], inputs=False)
  cfg = models.resolve(config.model)
  assert cfg.lora == LoraConfig(rank=4) and cfg.lora.scale == 4.0
  assert cfg.lora_modules == ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/up", "mlp/down")
  assert models.resolve(config.model.to_dict()) == cfg  # as library/aot.py resolves it
  for stage in ("rm", "dpo", "ppo", "pretrain"):
    overrides = ["--config.model.lora.rank=8", "--config.model.lora.targets=attn/.*"]
    loaded = stages.load_checked(f"{CONFIGS}/{stage}.py:tiny", overrides, inputs=False)
    assert loaded.model.lora.rank == 8 and loaded.model.lora.targets == "attn/.*", stage
  with pytest.raises(errors.ConfigError, match=r"^model\.lora\.targets: 'q' matches none"):
    stages.load_checked(sft, ["--config.model.lora.rank=4", "--config.model.lora.targets=q"], inputs=False)

  plain = stages.load_checked(sft, inputs=False)
  assert plain.model.lora.to_dict() == {"rank": 0, "alpha": 16.0, "dropout": 0.0, "targets": "attn/.*|mlp/.*"}
  cfg0 = models.resolve(plain.model)
  _, params = models.init(cfg0, jax.random.key(0))
  todays = {k: v for k, v in dataclasses.asdict(cfg0).items() if k != "lora"}  # a model.json from before LoRA
  _, before = models.init(models.ModelConfig(**todays), jax.random.key(0))
  assert not lora.split(params)[0] and jax.tree.structure(params) == jax.tree.structure(before)
  jax.tree.map(np.testing.assert_array_equal, params, before)


def test_model_json_round_trips_the_adapters():
  _, cfg = configs("llama")
  written = json.loads(json.dumps(dataclasses.asdict(cfg)))
  assert written["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "attn/.*|mlp/.*"}
  assert models.ModelConfig(**written) == cfg and hash(models.ModelConfig(**written)) == hash(cfg)
  assert config_lib.model_section("tiny", lora={"rank": 2}).lora.rank == 2
