"""Helpers for the big_vision-style configs in `configs/`: argument strings and the model section.

A config file defines `get_config(arg)`; `arg` is a comma-separated string such as `"size=1.3b,tiny"`.
`parse_arg` turns it into a ConfigDict typed by the defaults: `key=value` sets a field (converted to the
default's type), a bare `key` sets a boolean to True.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from instructgpt_jax import errors
from instructgpt_jax.models.sizes import ModelConfig


def _convert(key: str, value: str, default):
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise errors.ConfigError(f"config arg {key}: {value!r} is not a boolean")
  if default is None or isinstance(default, str):
    return value
  try:
    return type(default)(value)
  except ValueError:
    raise errors.ConfigError(f"config arg {key}: {value!r} is not a {type(default).__name__}") from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """parse_arg("size=1.3b,tiny", size="125m", tiny=False) -> {size: "1.3b", tiny: True}."""
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise errors.ConfigError(f"config arg {key!r}: not one of {sorted(defaults)}")
    out[key] = _convert(key, value if "=" in item else "true", defaults[key])
  return ml_collections.ConfigDict(out)


def _placeholder_type(annotation: str):
  """The placeholder type for a ModelConfig field annotation such as "int | None"."""
  base = annotation.replace(" | None", "").strip()
  return {"int": int, "float": float, "str": str, "bool": bool}[base]


def model_section(size: str, **fields) -> ml_collections.ConfigDict:
  """The `model` config section: a named size plus every ModelConfig field as a typed placeholder.

  A field left None takes the size table's value, so `--config.model.n_layers=4` works on any size.
  """
  section = {"size": size}
  for f in dataclasses.fields(ModelConfig):
    if f.name in fields:
      section[f.name] = fields.pop(f.name)
    else:
      section[f.name] = config_dict.placeholder(_placeholder_type(str(f.type)))
  if fields:
    raise ValueError(f"model_section: unknown model fields {sorted(fields)}")
  return ml_collections.ConfigDict(section)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, typing.Any]:
  return config.to_dict()
