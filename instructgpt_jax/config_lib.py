"""Helpers for the big_vision-style configs in `configs/`: argument strings, the model section, loading a config
as the command line does, and collecting a config's problems.

A config file defines `get_config(arg)`; `arg` is a comma-separated string such as `"size=1.3b,tiny"`.
`parse_arg` turns it into a ConfigDict typed by the defaults: `key=value` sets a field (converted to the
default's type), a bare `key` sets a boolean to True. `load_config(config_arg, overrides)` is the ConfigDict
`main.py --config=... --config.<field>=...` runs, with one-line errors; `with_values` sets dotted fields on a
copy; `Checks` collects one line per problem for `stages.check_config`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import typing
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from instructgpt_jax import errors
from instructgpt_jax.models.sizes import LoraConfig, ModelConfig


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


def config_file(config_arg: str) -> str:
  """The config file of `--config=<file>[:arg]`, checked to exist (a config file is local Python code)."""
  path = config_arg.split(":", 1)[0]
  if not os.path.isfile(path):
    raise errors.ConfigError(f"--config: {path}: no such config file")
  return path


def config_module(config_arg: str):
  """The config file of `config_arg` imported as a module (its folder's repository importable first)."""
  path = config_file(config_arg)
  make_config_importable(config_arg)
  spec = importlib.util.spec_from_file_location(f"config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def check_config_arg(config_arg: str) -> None:
  """Calls the file's `get_config(arg)` once, so that a bad argument (`:tinyy`) is its own one-line error
  rather than a line inside the traceback that ml_collections' flag parser makes of it."""
  module = config_module(config_arg)
  _, sep, arg = config_arg.partition(":")
  module.get_config(arg) if sep else module.get_config()


def load_config(config_arg: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The ConfigDict `main.py --config=<config_arg> <overrides>` would run: ml_collections' own flag parsing,
  so `--config.a.b=v` flags mean exactly what they mean on the command line. A missing file, a bad config
  argument, a field that does not exist (with the nearest name) or a value of the wrong type is one
  errors.ConfigError line."""
  check_config_arg(config_arg)
  argv = ["load_config", f"--config={config_arg}", *overrides]
  bad = [a for a in overrides if not a.startswith("--config.") or "=" not in a]
  if bad:
    raise errors.ConfigError(f"{bad[0]}: not a config override; write --config.<field>=<value>")
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=False)
  # config_flags finds the `--config.<field>` overrides by reading sys.argv, whatever argv is parsed.
  saved, sys.argv = sys.argv, argv
  try:
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    raise errors.ConfigError(override_error(e, argv)) from None
  finally:
    sys.argv = saved
  return flag_values["config"].value


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


def with_values(config: ml_collections.ConfigDict, values: dict[str, typing.Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each {"section.field": value} set."""
  config = config.copy_and_resolve_references()
  for field, value in values.items():
    *sections, key = field.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  return config


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

  A field left None takes the size table's value, so `--config.model.n_layers=4` works on any size. The adapters
  are the subsection `model.lora` (`lora_section`), so `--config.model.lora.rank=16` works on any stage.
  """
  section = {"size": size, "lora": lora_section(**fields.pop("lora", {}))}
  for f in dataclasses.fields(ModelConfig):
    if f.name == "lora":
      continue
    if f.name in fields:
      section[f.name] = fields.pop(f.name)
    else:
      section[f.name] = config_dict.placeholder(_placeholder_type(str(f.type)))
  if fields:
    raise ValueError(f"model_section: unknown model fields {sorted(fields)}")
  return ml_collections.ConfigDict(section)


def lora_section(**fields) -> ml_collections.ConfigDict:
  """The `model.lora` section: every LoraConfig field with its default (rank 0: no adapters), `fields` on top.
  A stage's adapters are its own: they replace whatever the model it starts from (`model.init_from`) had."""
  defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig)}
  unknown = sorted(set(fields) - set(defaults))
  if unknown:
    raise ValueError(f"lora_section: unknown LoRA fields {unknown}")
  return ml_collections.ConfigDict({**defaults, **fields})


class Checks:
  """Collects a config's problems, one line each, so that a command reports all of them at once (before any
  file is read or anything compiles). `raise_if_any()` raises them as one errors.ConfigError, a line each."""

  def __init__(self, prefix: str = "", *, inputs: bool = True, batches_on_mesh: bool = True):
    self.prefix = prefix  # e.g. "stages.ppo." for a stage inside the lab pipeline's config
    # Whether the config must name its inputs (data files, the models it starts from). False where something
    # else fills them in (the lab pipeline, the recipe) or nothing reads them (an AOT compile).
    self.inputs = inputs
    # Whether a batch must divide over the mesh the config fixes: an AOT plan raises one that does not instead.
    self.batches_on_mesh = batches_on_mesh
    self.problems: list[str] = []

  def require_input(self, value, field: str, what: str) -> bool:
    """An input the run reads (a path): required when `self.inputs`."""
    return not self.inputs or self.require(bool(value), field, f"required: {what}")

  def require(self, condition: bool, field: str, message: str) -> bool:
    """`field`'s problem is `message` unless `condition` holds; True when it holds."""
    if not condition:
      self.problems.append(f"{self.prefix}{field}: {message}")
    return bool(condition)

  def one_of(self, field: str, value, allowed) -> bool:
    return self.require(value in tuple(allowed), field, f"{value!r} is not one of {tuple(allowed)}")

  def at_least(self, field: str, value, low) -> bool:
    return self.require(value >= low, field, f"{value} must be >= {low}")

  def positive(self, field: str, value) -> bool:
    return self.require(value > 0, field, f"{value} must be > 0")

  def fraction(self, field: str, value, *, below_one: bool = False) -> bool:
    ok = 0.0 <= value < 1.0 if below_one else 0.0 <= value <= 1.0
    return self.require(ok, field, f"{value} is not in [0, 1{')' if below_one else ']'}")

  def capture(self, fn, *args, **kwargs):
    """Runs fn; a UserError it raises becomes a problem (its message already names its field)."""
    try:
      return fn(*args, **kwargs)
    except errors.UserError as e:
      message = str(e)
      self.problems.append(f"{self.prefix}{message}" if re.match(r"[a-z_][\w.]*: ", message) else message)
      return None

  def raise_if_any(self) -> None:
    if self.problems:
      raise errors.ConfigError("\n".join(dict.fromkeys(self.problems)))
