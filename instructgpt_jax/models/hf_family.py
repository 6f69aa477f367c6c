"""What a HuggingFace model family is to models/hf.py: one config mapping and one weight-link table.

A `Family` (one per module: hf_gpt2.py, hf_llama.py; the table `hf.FAMILIES`, keyed by our family name) says

  * which config.json `model_type`s it reads, and how: `fields_from_hf` (config.json -> ModelConfig fields,
    refusing with `refuse` what our Transformer cannot compute exactly) and `config_to_hf` (ModelConfig ->
    the architecture's part of config.json; hf.hf_config adds the fields every family shares);
  * where each of our parameters lives in the checkpoint: `links(cfg)`, a list of `Link`s (our parameter path
    <-> the HF tensor name, with the reshapes, transposes and slices between them), and the trunk's name
    prefix in a task model (`prefix`).

Everything else (the safetensors files, sharded loading, export, tokenizer files, token ids) is generic, in
models/hf.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models.sizes import ModelConfig

EMBEDDING = ("embed", "embedding")  # our token embedding, which every family's links map


def same(x):
  return x


def transposed(x):
  return x.T


@dataclasses.dataclass(frozen=True)
class Link:
  """One of our parameters and where it lives in the HF checkpoint.

  ours: its path in our params tree ("layers" leaves are stacked [L, ...] and read layer by layer).
  hf: the HF tensor name; "{p}" is the trunk prefix ("model.", "transformer." or ""), "{i}" the layer.
  to_ours: HF tensor -> ours, by reshapes and transposes only (NumPy views, so a shard reads only its part).
  to_hf: ours -> HF tensor. Links that share an HF name are concatenated along its last axis, in order.
  """

  ours: tuple[str, ...]
  hf: str
  to_ours: Callable[[np.ndarray], np.ndarray] = same
  to_hf: Callable[[np.ndarray], np.ndarray] = same

  @property
  def layered(self) -> bool:
    return "{i}" in self.hf


@dataclasses.dataclass(frozen=True)
class Family:
  """A family's config mapping and weight-link table (module docstring).

  name: our family (ModelConfig.family, a key of models/sizes.py ARCHITECTURES).
  model_types: the config.json `model_type`s read as this family.
  prefix: the trunk's tensor-name prefix in a task model (`<Arch>ForCausalLM`); base models have none.
  fields_from_hf: a config.json dict -> ModelConfig fields (family included).
  config_to_hf: (cfg, head) -> config.json's architecture part; head is "ForSequenceClassification" for a
    scalar model, else None (a language model).
  links: cfg -> the Links of a Transformer trunk (the untied unembedding and a scalar head are generic).
  """

  name: str
  model_types: tuple[str, ...]
  prefix: str
  fields_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
  config_to_hf: Callable[[ModelConfig, str | None], dict[str, Any]]
  links: Callable[[ModelConfig], list[Link]]

  def embedding(self, cfg: ModelConfig) -> str:
    """The HF name template of the token embedding ("{p}wte.weight"), by which hf.py finds the prefix."""
    return next(link.hf for link in self.links(cfg) if link.ours == EMBEDDING)


def refuse(condition: bool, message: str) -> None:
  """A one-line ConfigError when a config.json asks for what our Transformer does not compute."""
  if condition:
    raise ConfigError(f"hf: {message}: our Transformer cannot compute this model exactly")


def refuse_export(condition: bool, message: str) -> None:
  """A one-line ConfigError when our model has no HF architecture of this family."""
  if condition:
    raise ConfigError(f"hf export: {message}")
