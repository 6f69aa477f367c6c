"""LoRA adapters as PEFT folders (models/hf_peft.py), checked against peft and transformers.

Tiny float32 models with random base weights and random, nonzero A and B: our export of the base (hf.export) plus
our adapter folder, loaded by `peft.PeftModel.from_pretrained` in the reference venv (torch, transformers, peft; run
as a subprocess with INSTRUCTGPT_JAX_REF_PYTHON's python, as hf_test.py runs its reference), must give our LoRA
model's logits; so must our merged weights (lora.merged) loaded by plain transformers; and a folder that PEFT itself
trained and saved must load into our model and give PEFT's logits. Without the reference venv those comparisons
skip with the reason; the round trips and the one-line errors always run.

Then a real LoRA run (2 SFT steps from a tiny HF folder): `export --adapters` (export.py's documented command) gives
a PEFT folder on that base whose logits and greedy tokens in PEFT are the run's merged model's (read_source), and
so are the merged export's in transformers; `model.init_from=<PEFT folder>` reads it back as that merged model;
what --adapters and a PEFT folder refuse is one line.
"""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import sft
from instructgpt_jax import errors, export, generation, main, models, sharding
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import model_io
from instructgpt_jax.models import hf, hf_peft, lora
from instructgpt_jax.models.sizes import LoraConfig

import doc_examples
from runs import configured

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REF_PYTHON_VARIABLE = "INSTRUCTGPT_JAX_REF_PYTHON"
RANK, ALPHA = 3, 5.0  # scale 5/3: not a power of two, so a wrong scale cannot round to the right one
ALL = "attn/.*|mlp/.*"
QV = "attn/query|attn/value"
# name -> (size, ModelConfig fields, model.lora.targets). GPT-2's fused c_attn with one, two and three of its
# projections targeted; its two c_proj modules (attention out, MLP down) apart.
CASES = {
  "llama_all": ("tiny-llama", {}, ALL),
  "llama_qv": ("tiny-llama", {}, QV),
  "qwen3_all": ("tiny-llama", {"qk_norm": True}, ALL),
  "gpt2_all": ("tiny", {}, ALL),
  "gpt2_qv": ("tiny", {}, QV),
  "gpt2_key_out_down": ("tiny", {}, "attn/key|attn/out|mlp/down"),
}
# Folders PEFT itself makes (get_peft_model, random A and B, save_pretrained) on our base export of a case's
# model: name -> (case, PEFT target_modules, the same projections as our targets). GPT-2's c_attn then has one
# rank-r adapter, whose A its query, key and value share.
NATIVE = {
  "llama_native": ("llama_all", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ALL),
  "gpt2_native": ("gpt2_all", ["c_attn", "mlp.c_proj"], "attn/query|attn/key|attn/value|mlp/down"),
}
TOLERANCE = 1e-5  # max |Δ logit|, float32

REFERENCE = r"""
import json, sys, warnings
import numpy as np, torch, transformers, peft

def logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()

def base(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

spec = json.load(open(sys.argv[1]))
for item in spec:
  tokens = np.load(item["tokens"])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if "adapters" in item:
      model = peft.PeftModel.from_pretrained(base(item["base"]), item["adapters"], strict_adapter_check="error").eval()
      out = {"peft": logits(model, tokens)}
      with model.disable_adapter():
        out["base"] = logits(model, tokens)
      out["merged"] = logits(base(item["merged"]), tokens)
    else:  # a folder PEFT makes: random A and B, saved
      torch.manual_seed(0)
      config = peft.LoraConfig(r=item["r"], lora_alpha=item["alpha"], target_modules=item["targets"])
      model = peft.get_peft_model(base(item["base"]), config).eval()
      with torch.no_grad():
        for name, p in model.named_parameters():
          if "lora_" in name:
            p.normal_(0.0, 0.1)
      model.save_pretrained(item["save"])
      out = {"peft": logits(model, tokens)}
  out["warnings"] = np.array([str(w.message) for w in caught], dtype=str)
  np.savez(item["out"], **out)
"""


def reference_python() -> str:
  path = os.environ.get(REF_PYTHON_VARIABLE) or str(REPO_ROOT / ".cache" / "venv-ref" / "bin" / "python")
  if not os.path.isfile(path):
    pytest.skip(
      f"peft reference: no reference venv at {path} (.ci/run creates it from requirements-ref.txt; "
      f"or set {REF_PYTHON_VARIABLE} to a python with torch, transformers and peft)"
    )
  return path


def configs(name: str, **lora_fields):
  """(base config, LoRA config) of a case."""
  size, fields, targets = CASES[name]
  base = dataclasses.replace(models.resolve({"size": size}), **fields)
  return base, dataclasses.replace(base, lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, **lora_fields))


def randomized(params, seed: int):
  """Every parameter random and of order 1 in its effect (as hf_reference.randomize does for transformers' models:
  a default init's zero biases, unit norm scales and zero B would hide a misplaced tensor): norm scales 1 ± 0.1,
  biases and B N(0, 0.1²), A N(0, 1/fan-in), other weights N(0, 0.15²). `params` may be abstract (shapes only)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    name = path[-1].key
    noise = rng.standard_normal(x.shape, np.float32)
    if name == "lora_a":  # [L, *in, r]
      value = noise / np.sqrt(np.prod(x.shape[1:-1]))
    elif name == "scale":
      value = 1.0 + 0.1 * noise
    else:
      value = (0.1 if name in ("bias", "lora_b") else 0.15) * noise
    out.append(jnp.asarray(value, x.dtype))
  return jax.tree.unflatten(tree, out)


def lora_model(name: str, seed: int = 0, **fields):
  """(base cfg, cfg, graphdef, params) of a case: random base weights and adapters."""
  base_cfg, cfg = configs(name)
  cfg = dataclasses.replace(cfg, **fields)
  base_cfg = dataclasses.replace(base_cfg, **fields)
  graphdef, state = models.abstract(cfg)
  return base_cfg, cfg, graphdef, randomized(nnx.to_pure_dict(state), seed)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
  return models.apply(graphdef, params, tokens, segment_ids=jnp.ones_like(tokens))[0]


def our_logits(graphdef, params, tokens) -> np.ndarray:
  return np.asarray(_forward(graphdef, params, jnp.asarray(tokens)))


def token_batch(seed: int) -> np.ndarray:
  """3 sequences of 12 tokens of the tiny vocabulary (320)."""
  return np.random.default_rng(seed).integers(0, 320, (3, 12)).astype(np.int64)


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ name mapping


@pytest.mark.parametrize("size, fields", [("tiny-llama", {}), ("tiny-llama", {"qk_norm": True}), ("tiny", {})])
def test_kernel_links_only_flatten_so_the_adapters_map_the_same_way(size, fields):
  """hf_peft maps A [*in, r] -> lora_A = A.reshape(prod(in), r)ᵀ and B [r, *out] -> lora_B = B.reshape(r, prod(out))ᵀ.
  That is right only while each kernel link writes W [*in, *out] as its flattening [prod(in), prod(out)] (GPT-2's
  Conv1D, c_attn's parts side by side) or its transpose (nn.Linear), with no permutation of heads or RoPE rows."""
  cfg = dataclasses.replace(models.resolve({"size": size}), **fields)
  links = {"/".join(link.ours[1:-1]): link for link in hf.FAMILIES[cfg.family].links(cfg) if link.ours[-1] == "kernel"}
  for site in hf_peft.sites(cfg):
    parts = []
    for path in site.parts:
      in_shape, out_shape = cfg.projections[path]
      kernel = np.random.default_rng(0).normal(size=(*in_shape, *out_shape))
      flat = kernel.reshape(np.prod(in_shape), np.prod(out_shape))
      parts.append(links[path].to_hf(kernel))
      want = flat if hf_peft.FAN_IN_FAN_OUT.get(cfg.family) else flat.T
      np.testing.assert_array_equal(parts[-1], want)
      assert links[path].hf == site.module + ".weight"
  names = {site.target: site.parts for site in hf_peft.sites(cfg)}
  if cfg.family == "gpt":
    assert names == {
      "c_attn": ("attn/query", "attn/key", "attn/value"),
      "attn.c_proj": ("attn/out",),
      "c_fc": ("mlp/up",),
      "mlp.c_proj": ("mlp/down",),
    }
  else:
    short = {"attn/query": "q", "attn/key": "k", "attn/value": "v", "attn/out": "o"}
    assert names == {f"{short.get(p, p[4:])}_proj": (p,) for p in cfg.projections}


def test_adapter_config_and_tensor_names_are_peft_s(tmp_path):
  _, cfg, _, params = lora_model("gpt2_qv")
  hf_peft.export_adapters(str(tmp_path), params, cfg, base_model="some/base")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert config["base_model_name_or_path"] == "some/base" and config["fan_in_fan_out"] is True
  assert (config["r"], config["lora_alpha"], config["target_modules"]) == (RANK, 5, ["c_attn"])
  assert config["rank_pattern"] == {"c_attn": 2 * RANK} and config["alpha_pattern"] == {"c_attn": 10}
  header = hf_peft._tensor_names(str(tmp_path / "adapter_model.safetensors"))
  assert sorted(header) == sorted(
    f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight" for i in range(2) for m in "AB"
  )
  files = hf.TensorFiles(str(tmp_path))
  b = files["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
  assert b.shape == (3 * 64, 2 * RANK)  # [q | k | v] rows; q's rank block, then v's; k's rows zero
  assert not b[64:128].any() and not b[:64, RANK:].any() and not b[128:, :RANK].any()
  np.testing.assert_array_equal(
    b[:64, :RANK], np.asarray(params["layers"]["attn"]["query"]["lora_b"][1]).reshape(RANK, 64).T
  )

  _, cfg, _, params = lora_model("llama_all")
  hf_peft.export_adapters(str(tmp_path / "llama"), params, cfg, base_model="b")
  config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
  assert config["target_modules"] == sorted(
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  )
  assert config["rank_pattern"] == {} and config["fan_in_fan_out"] is False
  files = hf.TensorFiles(str(tmp_path / "llama"))
  prefix = "base_model.model.model.layers.0."
  assert files[prefix + "self_attn.k_proj.lora_B.weight"].shape == (2 * 16, RANK)  # 2 kv heads of 16
  assert files[prefix + "self_attn.o_proj.lora_A.weight"].shape == (RANK, 64)
  assert files[prefix + "mlp.down_proj.lora_A.weight"].shape == (RANK, 192)


# ------------------------------------------------------------------------------------------ peft and transformers


def make_reference(root: pathlib.Path) -> pathlib.Path:
  """Exports every case (base, adapters, merged) and makes the NATIVE folders, then one reference run scores all."""
  spec = []
  for seed, name in enumerate(CASES):
    base_cfg, cfg, graphdef, params = lora_model(name, seed)
    folder = root / name
    hf.export(str(folder / "base"), lora.without_adapters(params), base_cfg)
    hf_peft.export_adapters(str(folder / "adapters"), params, cfg, base_model=str(folder / "base"))
    hf.export(str(folder / "merged"), lora.merged(params, cfg), base_cfg)
    np.save(folder / "tokens.npy", token_batch(seed))
    item = {"base": str(folder / "base"), "adapters": str(folder / "adapters"), "merged": str(folder / "merged")}
    spec.append({**item, "tokens": str(folder / "tokens.npy"), "out": str(folder / "reference.npz")})
  for name, (case, targets, _) in NATIVE.items():
    folder = root / case
    item = {"base": str(folder / "base"), "r": RANK, "alpha": ALPHA, "targets": targets}
    item.update(save=str(root / name), tokens=str(folder / "tokens.npy"), out=str(root / f"{name}.npz"))
    spec.append(item)
  (root / "spec.json").write_text(json.dumps(spec))
  done = subprocess.run(
    [reference_python(), "-c", REFERENCE, str(root / "spec.json")], capture_output=True, text=True, timeout=600
  )
  if done.returncode:
    raise RuntimeError(f"peft reference failed:\n{done.stderr[-4000:]}")
  return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
  reference_python()
  return make_reference(tmp_path_factory.mktemp("peft_reference"))


@pytest.mark.parametrize("name", CASES)
def test_peft_loads_our_adapters_onto_our_base_export_and_gives_our_logits(reference, name):
  _, _, graphdef, params = lora_model(name, list(CASES).index(name))
  got = np.load(reference / name / "reference.npz")
  assert list(got["warnings"]) == []  # e.g. no fan_in_fan_out correction, no pattern that matched nothing
  ours = our_logits(graphdef, params, np.load(reference / name / "tokens.npy"))
  assert np.abs(ours).max() > 1.0
  assert np.abs(got["base"] - ours).max() > 0.05  # the adapters move the logits far beyond the tolerance
  np.testing.assert_allclose(got["peft"], ours, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_transformers_loads_our_merged_export_and_gives_our_logits(reference, name):
  _, _, graphdef, params = lora_model(name, list(CASES).index(name))
  got = np.load(reference / name / "reference.npz")
  ours = our_logits(graphdef, params, np.load(reference / name / "tokens.npy"))
  np.testing.assert_allclose(got["merged"], ours, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", NATIVE)
def test_a_folder_peft_made_loads_into_our_model_and_gives_peft_s_logits(reference, name):
  case, _, targets = NATIVE[name]
  base_cfg, cfg, _, params = lora_model(case, list(CASES).index(case))
  cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, targets=targets))
  adapters = hf_peft.load_adapters(str(reference / name), cfg)
  graphdef, _ = models.abstract(cfg)
  ours = our_logits(
    graphdef, lora.combine(adapters, lora.without_adapters(params)), np.load(reference / case / "tokens.npy")
  )
  np.testing.assert_allclose(np.load(reference / f"{name}.npz")["peft"], ours, atol=TOLERANCE, rtol=0)
  if case.startswith("gpt2"):  # one rank-r c_attn adapter: query, key and value share its A
    attn = adapters["layers"]["attn"]
    np.testing.assert_array_equal(attn["query"]["lora_a"], attn["value"]["lora_a"])
    # Without the key among our targets, PEFT's update of the key's outputs has no place: refused.
    subset = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, targets="attn/query|attn/value|mlp/down"))
    assert "leaves out" in load_error(reference / name, subset)
    # ... and back out, our export of it is the block form, which PEFT reads as the same update.
    out = reference / f"{name}_again"
    hf_peft.export_adapters(str(out), lora.combine(adapters, lora.without_adapters(params)), cfg, base_model="b")
    assert_trees_equal(hf_peft.load_adapters(str(out), cfg), adapters)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", CASES)
def test_load_of_export_is_the_adapters_exactly(tmp_path, name):
  _, cfg, _, params = lora_model(name)
  hf_peft.export_adapters(str(tmp_path), params, cfg, base_model="b")
  assert_trees_equal(hf_peft.load_adapters(str(tmp_path), cfg), lora.split(params)[0])


def test_load_places_bfloat16_adapters_on_the_target_s_shardings(tmp_path):
  _, cfg, _, params = lora_model("gpt2_qv", param_dtype="bfloat16")
  hf_peft.export_adapters(str(tmp_path), params, cfg, base_model="b")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("layers", "rest"))
  shardings = {"lora_a": NamedSharding(mesh, P("layers", "rest")), "lora_b": NamedSharding(mesh, P("layers"))}

  def abstract(path, x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings.get(path[-1].key, NamedSharding(mesh, P())))

  target = jax.tree_util.tree_map_with_path(abstract, params)  # whole params: their adapters are taken
  got = hf_peft.load_adapters(str(tmp_path), cfg, target)
  assert_trees_equal(got, lora.split(params)[0])
  assert got["layers"]["attn"]["query"]["lora_a"].sharding == shardings["lora_a"]
  assert got["layers"]["attn"]["value"]["lora_b"].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------ one-line errors


def load_error(folder, cfg) -> str:
  with pytest.raises(errors.ConfigError) as caught:
    hf_peft.load_adapters(str(folder), cfg)
  message = str(caught.value)
  assert "\n" not in message and str(folder) in message
  return message


@pytest.mark.parametrize(
  "name, exported, loaded, words",
  [
    ("llama_all", {"d_model": 32, "d_ff": 96}, {}, "d_model 64"),
    ("gpt2_all", {"d_model": 32}, {}, "d_model 64"),
    ("llama_all", {"n_layers": 3}, {}, "n_layers 2"),
    ("gpt2_all", {}, {"n_layers": 3}, "n_layers 3"),
    ("llama_all", {}, {"targets": QV}, "leaves out"),  # k_proj's adapter has no place
    ("llama_qv", {}, {"targets": ALL}, "has no adapter for k_proj"),
    ("gpt2_all", {}, {"targets": QV}, "has rank 9, model.lora.rank is 3"),  # c_attn's three blocks, two wanted
    ("llama_all", {}, {"alpha": 6.0}, "lora_alpha / r = 5 / 3"),
  ],
)
def test_a_folder_for_another_model_is_refused_in_one_line(tmp_path, name, exported, loaded, words):
  base_cfg, cfg = configs(name)
  cfg_out = dataclasses.replace(cfg, **exported)
  params = randomized(nnx.to_pure_dict(models.abstract(cfg_out)[1]), 0)
  hf_peft.export_adapters(str(tmp_path), params, cfg_out, base_model="b")
  lora_fields = {k: v for k, v in loaded.items() if k in ("targets", "alpha")}
  cfg_in = dataclasses.replace(cfg, **{k: v for k, v in loaded.items() if k not in lora_fields})
  cfg_in = dataclasses.replace(cfg_in, lora=dataclasses.replace(cfg_in.lora, **lora_fields))
  assert words in load_error(tmp_path, cfg_in)


def test_a_folder_without_its_files_or_with_unsupported_fields_is_refused_in_one_line(tmp_path):
  _, cfg, _, params = lora_model("llama_qv")
  assert "no adapter_config.json" in load_error(tmp_path, cfg)
  hf_peft.export_adapters(str(tmp_path), params, cfg, base_model="b")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
  assert "use_dora" in load_error(tmp_path, cfg)
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  (tmp_path / "adapter_model.safetensors").unlink()
  assert "no adapter_model.safetensors" in load_error(tmp_path, cfg)
  with pytest.raises(errors.UserError, match="model.lora.rank 0"):
    hf_peft.export_adapters(str(tmp_path), lora.without_adapters(params), configs("llama_qv")[0], base_model="b")


# ------------------------------------------------------------------------------------------ LoRA runs and PEFT

# A real LoRA run: 2 SFT steps (rank 4) from a tiny HF base, on the query, value and MLP-down projections, so that
# GPT-2's c_attn carries two of its three parts (the block form with a zero block that init_from must place).
RUN_FLAGS = {
  "model.lora.rank": 4,
  "model.lora.alpha": 8.0,
  "model.lora.targets": "attn/query|attn/value|mlp/down",
  "optim.lr": 1e-2,
  "optim.warmup_steps": 0,
  "data.train": "lab:demonstrations:train:32",
  "data.eval": "",
  "data.batch_size": 8,
  "model.resid_dropout": 0.0,
  "total_steps": 2,
  "eval_every_steps": 0,
  "log_every_steps": 1,
}
NEW_TOKENS = 10

RUN_REFERENCE = r"""
import sys
import numpy as np, torch, transformers, peft

base, adapters, merged, tokens, new_tokens, out = sys.argv[1:]
tokens = torch.from_numpy(np.load(tokens))

def load(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

model = peft.PeftModel.from_pretrained(load(base), adapters).eval()
arrays = {}
with torch.no_grad():
  arrays["peft"] = model(input_ids=tokens).logits.float().numpy()
  arrays["merged"] = load(merged)(input_ids=tokens).logits.float().numpy()
  for k, row in enumerate(tokens[:, :8]):
    row = row[None]
    done = model.generate(input_ids=row, attention_mask=torch.ones_like(row), do_sample=False,
                          max_new_tokens=int(new_tokens))
    arrays[f"greedy_{k}"] = done[0, row.shape[1]:].numpy()
np.savez(out, **arrays)
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> pathlib.Path:
  """root/base: a tiny GPT-2 HF folder (random weights, our byte tokenizer); root/run: a LoRA SFT run from it."""
  root = tmp_path_factory.mktemp("lora_run")
  cfg = models.resolve({"size": "tiny"})
  tokenizer = tokenizer_lib.byte_tokenizer()
  tokenizer.save(str(root / "bytes.json"))
  token_ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
  params = randomized(nnx.to_pure_dict(models.abstract(cfg)[1]), 11)
  hf.export(str(root / "base"), params, cfg, tokenizer=str(root / "bytes.json"), token_ids=token_ids)
  main.run(configured(sft, "tiny", **{"model.init_from": f"hf:{root / 'base'}", **RUN_FLAGS}), str(root / "run"))
  return root


def merged_model(init_from: str):
  """(float32 graphdef, params) of what `model.init_from=init_from` reads (model_io.read_source)."""
  source = model_io.read_source(init_from)
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  _, params = model_io.load_frozen(source, "lm", mesh, sharding.rules_dict(sharding.DEFAULT_RULES))
  return models.abstract(dataclasses.replace(source.config, dtype="float32"))[0], params


def greedy(graphdef, params, prompts: np.ndarray) -> list[list[int]]:
  """Our sampler's greedy continuations of equal-length prompts, NEW_TOKENS at most, up to and with EOS."""
  tokenizer = tokenizer_lib.byte_tokenizer()
  settings = generation.SamplingSettings(tokenizer.eos_id, tokenizer.pad_id, greedy=True)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(NEW_TOKENS,))
  tokens, segments = generation.left_pad(prompts.tolist(), buckets=(prompts.shape[1],), pad_id=tokenizer.pad_id)
  rollout = sampler(params, tokens, segments, jax.random.PRNGKey(0), max_new_tokens=NEW_TOKENS)
  return [np.asarray(t)[np.asarray(m) > 0].tolist() for t, m in zip(rollout.tokens, rollout.mask)]


def export_command(*args: str) -> None:
  export.main(list(args))


@pytest.fixture(scope="module")
def run_exports(lora_run) -> pathlib.Path:
  """The run exported both ways: `peft` by export.py's documented --adapters command, `merged` without it."""
  command = next(c for c in doc_examples._commands(export.__doc__) if "--adapters" in c)
  paths = {"runs/sft-lora-peft": str(lora_run / "peft"), "runs/sft-lora": str(lora_run / "run")}
  export_command(*doc_examples.argv(doc_examples.shrink(command, paths))[3:])
  export_command(f"--workdir={lora_run / 'run'}", f"--out={lora_run / 'merged'}")
  return lora_run


def test_export_adapters_of_a_lora_run_gives_peft_our_merged_logits_and_greedy_tokens(run_exports):
  """`export --adapters`: a PEFT folder on the run's own HF base that PEFT loads (the reference venv) and that gives
  the logits of the run's merged model (read_source(workdir)); the plain export, merged, gives them in transformers
  too; greedy decoding (PEFT's generate, our sampler) gives the same tokens."""
  root = run_exports
  config = json.loads((root / "peft" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str(root / "base")  # hf:PATH: that folder itself, no copy
  assert config["rank_pattern"] == {"c_attn": 8} and sorted(config["target_modules"]) == ["c_attn", "mlp.c_proj"]
  assert not (root / "peft" / "base").exists()
  tokens = token_batch(5)
  np.save(root / "tokens.npy", tokens)
  spec = [str(root / name) for name in ("base", "peft", "merged", "tokens.npy")]
  done = subprocess.run(
    [reference_python(), "-c", RUN_REFERENCE, *spec, str(NEW_TOKENS), str(root / "run_reference.npz")],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  got = np.load(root / "run_reference.npz")
  graphdef, params = merged_model(str(root / "run"))
  ours = our_logits(graphdef, params, tokens)
  base_graphdef, base_params = merged_model(f"hf:{root / 'base'}")
  assert np.abs(ours - our_logits(base_graphdef, base_params, tokens)).max() > 1e-2  # 2 steps moved the model
  np.testing.assert_allclose(got["peft"], ours, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(got["merged"], ours, atol=TOLERANCE, rtol=0)
  assert greedy(graphdef, params, tokens[:, :8]) == [got[f"greedy_{k}"].tolist() for k in range(len(tokens))]


def test_init_from_a_peft_folder_reads_it_merged_on_its_base(run_exports, tmp_path):
  """model.init_from=<PEFT folder>: the base (hf:<base_model_name_or_path>, its tokenizer) with the folder's
  adapters merged: the LoRA run's merged model again. c_attn's adapter of rank 2r holds two of query, key and
  value; which two is found (the zero block of the key)."""
  root = run_exports
  source = model_io.read_source(str(root / "peft"))
  assert (source.kind, source.config.lora.rank) == ("lm", 0)
  assert model_io.tokenizer_of(source) == str(root / "base")
  tokens = token_batch(6)
  peft_logits = our_logits(*merged_model(str(root / "peft")), tokens)
  np.testing.assert_allclose(peft_logits, our_logits(*merged_model(str(root / "run")), tokens), atol=TOLERANCE, rtol=0)


def test_export_adapters_of_a_run_from_our_own_model_exports_its_base_beside_them(run_exports, tmp_path):
  """A run whose base is not an HF folder (here an exported model: the run's record says so, as a run from one
  writes it): `--adapters` exports the base into DIR/base and names it; the folder reads back as the run does."""
  root = run_exports
  source = model_io.read_source(f"hf:{root / 'base'}")
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  _, params = model_io.load_frozen(source, "lm", mesh, sharding.rules_dict(sharding.DEFAULT_RULES))
  model_io.export(str(tmp_path / "base_export"), params, "lm", source.config, tokenizer="bytes")
  run = tmp_path / "run"
  shutil.copytree(root / "run", run)
  info = json.loads((run / "model.json").read_text())
  (run / "model.json").write_text(
    json.dumps({**info, "base": {"init_from": str(tmp_path / "base_export"), "ema": False}})
  )
  export_command(f"--workdir={run}", f"--out={tmp_path / 'peft'}", "--adapters")
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str(tmp_path / "peft" / "base")
  assert (tmp_path / "peft" / "base" / "tokenizer.json").exists()
  tokens = token_batch(7)
  back = our_logits(*merged_model(str(tmp_path / "peft")), tokens)
  np.testing.assert_allclose(back, our_logits(*merged_model(str(root / "run")), tokens), atol=TOLERANCE, rtol=0)


def test_init_from_a_folder_peft_made_gives_peft_s_logits(reference):
  """A folder PEFT itself saved (GPT-2: one rank-r c_attn adapter for query, key and value) read by init_from."""
  ours = our_logits(*merged_model(str(reference / "gpt2_native")), np.load(reference / "gpt2_all" / "tokens.npy"))
  np.testing.assert_allclose(np.load(reference / "gpt2_native.npz")["peft"], ours, atol=TOLERANCE, rtol=0)


def export_error(capsys, *args: str) -> str:
  """The one line `export` prints before it exits with status 2."""
  with pytest.raises(SystemExit) as caught:
    export_command(*args)
  assert caught.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_adapters_of_a_run_without_them_and_a_peft_folder_without_its_base_are_one_line_errors(
  run_exports, tmp_path, capsys
):
  root = run_exports
  full = tmp_path / "full"  # a full fine-tuning run of 1 step from the same base
  flags = {**RUN_FLAGS, "model.lora.rank": 0, "total_steps": 1, "model.init_from": f"hf:{root / 'base'}"}
  main.run(configured(sft, "tiny", **flags), str(full))
  err = export_error(capsys, f"--workdir={full}", f"--out={tmp_path / 'out'}", "--adapters")
  assert "is not a LoRA run" in err and str(full) in err
  err = export_error(capsys, f"--workdir={root / 'merged'}", f"--out={tmp_path / 'out'}", "--adapters")
  assert "holds no model" in err  # an HF folder is not a run (and `export` reads runs and our exports)

  scalar = tmp_path / "rm_like"  # the run's record with kind "scalar", as an RM run's model.json has it
  shutil.copytree(root / "run", scalar)
  info = json.loads((scalar / "model.json").read_text())
  (scalar / "model.json").write_text(json.dumps({**info, "kind": "scalar"}))
  err = export_error(capsys, f"--workdir={scalar}", f"--out={tmp_path / 'out'}", "--adapters")
  assert "PEFT has no form for its scalar head" in err
  assert not (tmp_path / "out").exists()

  orphan = tmp_path / "orphan"
  shutil.copytree(root / "peft", orphan)
  config = json.loads((orphan / "adapter_config.json").read_text())
  for base in (str(tmp_path / "moved"), "openai-community/gpt2"):  # a missing folder; a Hub name
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    with pytest.raises(errors.ConfigError) as caught:
      model_io.read_source(str(orphan))
    message = str(caught.value)
    assert "\n" not in message and str(orphan) in message and "base_model_name_or_path" in message and base in message
