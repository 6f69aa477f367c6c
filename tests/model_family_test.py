"""One seam per model family: the model reads a family's traits (ModelConfig's properties, from
models/sizes.py ARCHITECTURES), and HuggingFace interop reads its config mapping and weight-link table
(models/hf.py FAMILIES); no other module compares a family's name."""

import ast
import dataclasses
import pathlib

import jax
import pytest

from instructgpt_jax import flops, models
from instructgpt_jax.models import hf, sizes

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "instructgpt_jax"
TINY = {"gpt": models.resolve({"size": "tiny"}), "llama": models.resolve({"size": "tiny-llama"})}
# What each family is: (learned_positions, rope, norm, mlp, biases).
EXPECTED = {"gpt": (True, False, "layernorm", "gelu", True), "llama": (False, True, "rmsnorm", "swiglu", False)}
# The one module that may name families: models/sizes.py (its table ARCHITECTURES and the check of the name).
# lab/ is left out: there a "family" is a task family (lab/tasks.py).
ALLOWED = {"instructgpt_jax/models/sizes.py"}
EXCLUDED_DIRS = ("instructgpt_jax/lab/",)


def traits(cfg):
  return (cfg.learned_positions, cfg.rope, cfg.norm, cfg.mlp, cfg.biases)


def test_every_family_has_an_architecture_and_an_hf_entry():
  assert set(sizes.ARCHITECTURES) == set(sizes.FAMILIES) == set(hf.FAMILIES) == set(EXPECTED)
  assert sizes.FAMILIES == tuple(sizes.ARCHITECTURES)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_properties(family):
  cfg = TINY[family]
  assert traits(cfg) == EXPECTED[family]
  assert cfg.architecture is sizes.ARCHITECTURES[family]
  # Options do not change the family's traits.
  if family == "llama":
    assert traits(dataclasses.replace(cfg, qkv_bias=True, qk_norm=True)) == EXPECTED[family]


def test_positions_fit_only_learned_positions_limit_the_length():
  gpt, llama = TINY["gpt"], TINY["llama"]
  assert gpt.max_len == llama.max_len == 256
  assert gpt.positions_fit(256) and not gpt.positions_fit(257)
  assert llama.positions_fit(256) and llama.positions_fit(10**6)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_the_model_and_the_counts_follow_the_properties(family):
  cfg = TINY[family]
  _, params = models.init(cfg, jax.random.key(0))
  layer = params["layers"]
  assert ("pos_embed" in params) == cfg.learned_positions
  assert ("gate" in layer["mlp"]) == (cfg.mlp == "swiglu")
  assert ("bias" in layer["attn_norm"]) == ("bias" in params["final_norm"]) == (cfg.norm == "layernorm")
  assert ("bias" in layer["attn"]["out"]) == ("bias" in layer["mlp"]["down"]) == cfg.biases
  assert models.param_count(params) == sizes.param_count_formula(cfg)
  positions = cfg.max_len * cfg.d_model if cfg.learned_positions else 0
  embedding = 0 if cfg.tied_embeddings else cfg.vocab_size * cfg.d_model  # a lookup table when untied
  assert flops.matmul_params(cfg) == sizes.param_count_formula(cfg) - positions - embedding


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_hf_family_has_a_config_mapping_and_a_weight_link_table(family):
  entry = hf.FAMILIES[family]
  assert entry.name == family and entry.model_types and entry.prefix
  assert callable(entry.fields_from_hf) and callable(entry.config_to_hf) and callable(entry.links)
  cfg = TINY[family]
  # The config mapping both ways: our config -> config.json -> our config.
  assert hf.config_from_hf(hf.hf_config(cfg)) == (cfg, "lm")
  assert hf.config_from_hf(hf.hf_config(cfg, kind="scalar")) == (cfg, "scalar")
  assert hf.hf_config(cfg)["model_type"] in entry.model_types
  # The link table maps every parameter of the trunk once, and each to its own HF tensor (or slice of one).
  _, params = models.init(cfg, jax.random.key(0))
  leaves = {tuple(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  links = hf.trunk_links(cfg, unembed=not cfg.tied_embeddings)
  assert sorted(link.ours for link in links) == sorted(leaves)
  assert entry.embedding(cfg).startswith("{p}")  # the name by which loading finds the trunk's prefix


def test_model_types_belong_to_one_family():
  types = [t for entry in hf.FAMILIES.values() for t in entry.model_types]
  assert len(types) == len(set(types))


def _relative(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _names_family(node: ast.AST) -> bool:
  """`x.family`, `family`, or `x["family"]`."""
  if isinstance(node, ast.Attribute):
    return node.attr == "family"
  if isinstance(node, ast.Name):
    return node.id == "family"
  if isinstance(node, ast.Subscript):
    return isinstance(node.slice, ast.Constant) and node.slice.value == "family"
  return False


def family_comparisons(path: pathlib.Path) -> list[str]:
  """`family ==`, `!=`, `in`, `not in` (either side) and `match ... family:` in a file, as 'path:line'."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Compare):
      operands = [node.left, *node.comparators]
      kinds = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
      if any(isinstance(op, kinds) for op in node.ops) and any(_names_family(o) for o in operands):
        found.append(f"{_relative(path)}:{node.lineno}")
    elif isinstance(node, ast.Match) and _names_family(node.subject):
      found.append(f"{_relative(path)}:{node.lineno}")
  return found


def test_the_scan_sees_a_family_comparison(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text(
    'if cfg.family == "gpt" or "llama" != c["family"]:\n  pass\n'
    'a = family in ("a",)\n'
    "match cfg.family:\n  case _:\n    pass\n"
    "b = cfg.family\nc = cfg.learned_positions\nd = model_type == 'gpt2'\n"
  )
  assert sorted(int(line.rsplit(":", 1)[1]) for line in family_comparisons(sample)) == [1, 1, 3, 4]


def test_no_module_outside_the_family_table_compares_family_names():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    name = _relative(path)
    if name in ALLOWED or name.startswith(EXCLUDED_DIRS):
      continue
    found += family_comparisons(path)
  assert found == [], "read ModelConfig's properties (models/sizes.py) or hf.FAMILIES instead"


def test_only_models_hf_imports_the_family_modules():
  family_modules = {entry.links.__module__ for entry in hf.FAMILIES.values()}
  importers = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if _relative(path) == "instructgpt_jax/models/hf.py" or path.stem in {m.rsplit(".", 1)[1] for m in family_modules}:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        names = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        if names & family_modules:
          importers.append(_relative(path))
  assert importers == []
