"""Helpers for the big_vision-style configs in `configs/`: argument strings and the model section.

A config file defines `get_config(arg)`; `arg` is a comma-separated string such as `"size=1.3b,tiny"`.
`parse_arg` turns it into a ConfigDict typed by the defaults: `key=value` sets a field (converted to the
default's type), a bare `key` sets a boolean to True.
"""

from __future__ import annotations

import dataclasses
import os
import sys
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


def make_config_importable(config_arg: str) -> None:
  """Config files import `configs.common`: put the repository that holds the config file (the folder above
  its `configs/`) on sys.path, so `--config=/any/where/configs/sft.py` works from any folder. A config file
  is Python code on the local disk, never a gs:// path."""
  path = config_arg.split(":", 1)[0]
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)


def override_error(error: Exception, argv: list[str]) -> str:
  """One line for a flag that absl or ml_collections refused: a `--config.<field>` that does not exist
  (named with ml_collections' nearest field), a value of the wrong type, a missing config file."""
  cause = error
  while isinstance(cause, AttributeError) and cause.args and isinstance(cause.args[0], KeyError):
    cause = cause.args[0]
  if not (isinstance(cause, KeyError) and cause.args):
    return " ".join(str(error).split())
  name, _, hint = str(cause.args[0]).partition("\n")
  name = name.strip("'\"")
  flag = next((a for a in argv if a.startswith("--config.") and name in a.split("=", 1)[0].split(".")), "--config")
  suggestion = hint.split('"')[1] if hint.count('"') >= 2 else ""
  return f"{flag.split('=', 1)[0]}: no such config field {name!r}" + (
    f"; did you mean {suggestion!r}?" if suggestion else ""
  )


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
