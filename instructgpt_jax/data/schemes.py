"""Data that is made rather than read: a data field `<scheme>:<rest>` (train, eval, bias_demonstrations) or a
corpus field equal to `<scheme>` is written out as JSONL files by the scheme's functions before the data layer
reads it; the layer below reads files only.

The embedded lab registers `lab` (lab/datasets.py: `lab:demonstrations:train:400`, a corpus of "lab", and a
gold scorer of its prompts that PPO's evaluation logs as `eval_gold`). A researcher's own generated data is
one `register` call in their own script, before the run starts:

    schemes.register("mine", files=lambda spec, directory, seed: write_my_jsonl(spec, directory, seed))
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from instructgpt_jax.errors import ConfigError

SPEC_KEYS = ("train", "eval", "bias_demonstrations")  # fields that hold a file spec
CORPUS_KEYS = ("corpus", "pretrain_corpus", "ptx_corpus")  # fields that hold pretraining text


class Scheme(NamedTuple):
  files: Callable[..., str]  # (spec, directory, *, seed) -> the path of the JSONL file written
  corpus: Callable[..., str] | None  # (data section, directory, *, seed) -> the corpus path written, or None
  # (spec, *, seed) -> gold(prompt text, response text, stopped) -> a quality in [0, 1] or NaN: a known-good
  # judge of responses to the spec's prompts (the lab's gold scorer), which PPO's evaluation logs beside the RM
  gold: Callable[..., Callable[[str, str, bool], float]] | None = None


SCHEMES: dict[str, Scheme] = {}


_NAME = re.compile(r"[a-z][a-z0-9_]*")  # a scheme is a bare word: `gs://...` and `dir/a:b.jsonl` are paths


def register(name: str, files: Callable[..., str], corpus=None, gold=None) -> None:
  """Adds the scheme `name` (a new lowercase word); `del SCHEMES[name]` takes it out again."""
  if not _NAME.fullmatch(name) or name in SCHEMES:
    raise ValueError(f"schemes.register: {name!r} is {'taken' if name in SCHEMES else 'not a lowercase word'}")
  SCHEMES[name] = Scheme(files, corpus, gold)


def scheme_of(field: str, value) -> Scheme | None:
  """The registered scheme a spec names (`lab:...` -> lab's), None for a path; a spec whose bare-word prefix
  names no registered scheme is a one-line error (it would otherwise reach the file reader as a path)."""
  if not isinstance(value, str) or ":" not in value or "://" in value:
    return None
  prefix = value.split(":", 1)[0]
  if not _NAME.fullmatch(prefix):
    return None
  if prefix not in SCHEMES:
    raise ConfigError(
      f"{field}: {value!r} names the data scheme {prefix!r}, which is not registered (registered: "
      f"{', '.join(sorted(SCHEMES)) or 'none'}); import the module that registers it, or give a file path"
    )
  return SCHEMES[prefix]


def gold_scorer(spec: str, *, seed: int):
  """The gold judge of `spec`'s prompts where its scheme has one (Scheme.gold), else None."""
  scheme = scheme_of("data.eval", spec)
  return scheme.gold(spec, seed=seed) if scheme is not None and scheme.gold is not None else None


def resolve(data_cfg, directory: str, *, seed: int):
  """A copy of a `data` section (a ConfigDict or a dict) with every registered scheme's specs and corpora
  written out as files under `directory`, and replaced by their paths."""
  copy = getattr(data_cfg, "copy_and_resolve_references", None)
  data_cfg = copy() if copy else dict(data_cfg)
  for key in SPEC_KEYS:
    value = data_cfg.get(key)
    scheme = scheme_of(f"data.{key}", value)
    if scheme is not None:
      data_cfg[key] = scheme.files(value, directory, seed=seed)
  for key in CORPUS_KEYS:
    scheme = SCHEMES.get(data_cfg.get(key)) if isinstance(data_cfg.get(key), str) else None
    if scheme is not None and scheme.corpus is not None:
      data_cfg[key] = scheme.corpus(data_cfg, directory, seed=seed)
  return data_cfg
