"""TFDS dataset builders for the RLHF formats, from JSONL files (local or gs://), without TensorFlow.

`build(kind, {"train": files, "eval": files}, data_dir=..., tokenizer=...)` reads and validates the files
(formats.py), encodes every record with the tokenizer and the template (templates.py), and writes one
array_record file per split with `tfds.core.GeneratorBasedBuilder`. Records keep their text and their token
ids, so batching never tokenizes and decoded batches can be checked against the input. Reading is
`as_data_source()`: random access, decoded to numpy and bytes, and no TensorFlow anywhere (TFDS needs
TensorFlow only for `as_dataset`, and for nested ragged features, which is why a comparison's responses are
stored as one flat id sequence plus their lengths).

A build is named by a fingerprint of everything that shapes it: the kind, the files' names and contents,
the tokenizer, the template and the limits. Changing any of them builds a new variant
(`data_dir/<kind>/<template>-<fingerprint>/1.0.0/`); an unchanged one is reused without reading the files
again. The counts of each split (records, skipped, dropped, identical responses) are stored with the build
and printed whenever something was skipped, dropped or identical.

A `data_dir` in a bucket is mirrored, because array_record (TFDS's file format here) reads and writes local
files only: its C++ reader has no GCS client unless TensorFlow registers one. TFDS then builds into a local
cache folder (`local_cache_dir(data_dir)`, under the system's temporary folder); process 0 uploads the
prepared variant to `data_dir`, a `_COMPLETE` object last; and a host that lacks the variant locally (a new
VM after a preemption, another worker) downloads it when `_COMPLETE` is there instead of reading and
tokenizing the JSONL again. The build is deterministic, so hosts that build the same variant agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile

import filelock
import jax
import numpy as np
import tensorflow_datasets as tfds

from instructgpt_jax import paths
from instructgpt_jax.data import formats, templates
from instructgpt_jax.data.tokenizer import Tokenizer

BUILD_VERSION = "1.0.0"
# Builds here take seconds; TFDS's progress bars would only clutter the training logs.
tfds.disable_progress_bar()


def _ids():
  return tfds.features.Tensor(shape=(None,), dtype=np.int32)


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes pre-validated examples handed to it; `build` below does the reading and the encoding."""

  VERSION = tfds.core.Version(BUILD_VERSION)

  @classmethod
  def get_builder_config(cls, name, version=None):
    # Every config name is valid: it is the fingerprint of the build's inputs (see `build`).
    return tfds.core.BuilderConfig(name=name)

  def __init__(self, *, examples_by_split=None, reports=None, **kwargs):
    self._examples_by_split = examples_by_split or {}
    self._reports = reports or {}
    super().__init__(file_format="array_record", **kwargs)

  def _features(self) -> dict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps the records in file and line order; grain shuffles when reading.
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(self._features()),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(self._reports),
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(examples) for split, examples in self._examples_by_split.items()}

  def _generate_examples(self, examples):
    yield from enumerate(examples)


class Demonstrations(_LocalFilesBuilder):
  """SFT demonstrations; response_ids end with EOS."""

  def _features(self):
    text = tfds.features.Text
    return {"prompt": text(), "response": text(), "prompt_ids": _ids(), "response_ids": _ids(), "source": text()}


class Comparisons(_LocalFilesBuilder):
  """K ranked responses of one prompt; response k's ids (with EOS) are response_ids split by response_lengths."""

  def _features(self):
    text = tfds.features.Text
    return {
      "prompt": text(),
      "responses": tfds.features.Sequence(text()),
      "ranks": _ids(),
      "prompt_ids": _ids(),
      "response_ids": _ids(),
      "response_lengths": _ids(),
      "source": text(),
    }


class Prompts(_LocalFilesBuilder):
  """PPO prompts, already in their template; prompts over the limit are dropped and counted."""

  def _features(self):
    return {"prompt": tfds.features.Text(), "prompt_ids": _ids(), "source": tfds.features.Text()}


class PretrainingText(_LocalFilesBuilder):
  """Documents and their ids (no EOS: packing adds it between documents)."""

  def _features(self):
    return {"text": tfds.features.Text(), "ids": _ids(), "source": tfds.features.Text()}


BUILDERS = {"demonstrations": Demonstrations, "comparisons": Comparisons, "prompts": Prompts, "text": PretrainingText}


# ----------------------------------------------------------------------------------------------------
# Encoding and length limits
# ----------------------------------------------------------------------------------------------------


def _encoder(
  kind: str,
  tokenizer: Tokenizer,
  template: templates.Template,
  max_tokens,
  append_eos: bool,
  truncate_prompt: str = "none",
  report: formats.Report | None = None,
):
  """A `check` for formats.read_records: adds the token ids to a record, enforcing the length limit.

  The limits: prompt + response (with EOS) for demonstrations and for every response of a comparison;
  the prompt alone for prompts (over-long prompts are dropped and counted, not errors: PPO caps them at 1k).
  With truncate_prompt="left", a demonstration or comparison over the limit keeps only the end of its
  prompt (the latest turns of a dialogue) so that the longest response fits; each is counted. A response
  that alone exceeds the limit stays an error.
  """

  def encode(record: dict) -> bool:
    if kind == "text":
      record["ids"] = tokenizer.encode(record["text"])
      return True
    prompt_ids = template.encode_prompt(tokenizer, record["prompt"])
    record["prompt_ids"] = prompt_ids
    if kind == "prompts":
      return max_tokens is None or len(prompt_ids) <= max_tokens
    responses = [record["response"]] if kind == "demonstrations" else record["responses"]
    response_ids = [template.encode_response(tokenizer, r, append_eos=append_eos) for r in responses]
    room = None if max_tokens is None else max_tokens - max(len(ids) for ids in response_ids)
    if truncate_prompt == "left" and room is not None and 0 < room < len(prompt_ids):
      prompt_ids = record["prompt_ids"] = prompt_ids[len(prompt_ids) - room :]
      if report is not None:
        report.truncated_prompts += 1
    if max_tokens is not None:
      _check_length(kind, len(prompt_ids), [len(ids) for ids in response_ids], max_tokens, append_eos)
    if kind == "demonstrations":
      record["response_ids"] = response_ids[0]
    else:
      record["response_ids"] = [t for ids in response_ids for t in ids]
      record["response_lengths"] = [len(ids) for ids in response_ids]
    return True

  return encode


def _check_length(kind: str, prompt_len: int, response_lens: list[int], max_tokens: int, append_eos: bool) -> None:
  """One line naming what is too long, its token counts, the limit and the remedies. A response that alone
  leaves no room for the prompt is too long itself (reported first: no prompt truncation can fit it);
  otherwise the prompt is too long for the response, and data.truncate_prompt=left would fit it."""
  over = [k for k, n in enumerate(response_lens) if prompt_len + n > max_tokens]
  if not over:
    return
  k = next((k for k in over if response_lens[k] >= max_tokens), over[0])
  field = "response" if kind == "demonstrations" else f"responses[{k}]"
  n, eos = prompt_len + response_lens[k], " + EOS" if append_eos else ""
  counts = f"prompt {prompt_len} + response {response_lens[k] - bool(append_eos)}{eos} = {n}"
  if response_lens[k] >= max_tokens:
    raise formats.FieldError(
      field,
      f"too long: {counts} tokens, over the limit of {max_tokens}, and the response alone ({response_lens[k]} tokens) "
      "leaves no room for the prompt; raise data.seq_len or set data.on_error=skip",
    )
  room = max_tokens - max(response_lens)  # what left truncation keeps, so that the longest response fits
  which = "" if kind == "demonstrations" else f" for {field}"
  raise formats.FieldError(
    "prompt",
    f"too long{which}: {counts} tokens, over the limit of {max_tokens}; raise data.seq_len, or set "
    f"data.truncate_prompt=left (keeps the prompt's last {room} tokens) or data.on_error=skip",
  )


# ----------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
  """A built dataset: its TFDS builder and the report of each split."""

  builder: tfds.core.DatasetBuilder
  reports: dict[str, formats.Report]

  def source(self, split: str = "train"):
    """Random-access records of `split` (TFDS split syntax, e.g. "train[:2000]"): dicts of numpy arrays,
    bytes and lists of bytes."""
    return self.builder.as_data_source(split=split)


MIRROR_COMPLETE = "_COMPLETE"


def local_cache_dir(data_dir: str) -> str:
  """Where TFDS builds for `data_dir`: itself when local, else a local folder named after it."""
  if not paths.is_remote(data_dir):
    return os.fspath(paths.path(data_dir))
  name = hashlib.sha256(data_dir.encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "instructgpt_jax-tfds", name)


def fingerprint(kind: str, files_by_split: dict[str, list[str]], tokenizer: Tokenizer, options: dict) -> str:
  digest = hashlib.sha256()
  settings = {"kind": kind, "version": BUILD_VERSION, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, **options}
  digest.update(json.dumps(settings, sort_keys=True).encode())
  digest.update(tokenizer.hf.to_str().encode())
  for split in sorted(files_by_split):
    for path in files_by_split[split]:
      digest.update(f"{split}/{paths.path(path).name}".encode())
      try:
        with paths.path(path).open("rb") as f:
          for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
      except OSError as e:
        raise formats.DataError(f"{path}: file: cannot be read ({e.strerror or e})") from None
  return digest.hexdigest()[:16]


class _DropTfdsNotBuiltWarning(logging.Filter):
  def filter(self, record):
    return not record.getMessage().startswith("Variant folder")


@contextlib.contextmanager
def _quiet_tfds():
  """Hides TFDS's progress prints and its warning that a variant is not built yet (we check on purpose)."""
  absl_logger = logging.getLogger("absl")
  quiet = _DropTfdsNotBuiltWarning()
  absl_logger.addFilter(quiet)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.removeFilter(quiet)


def build(
  kind: str,
  files: dict[str, str | list[str]],
  *,
  data_dir: str,
  tokenizer: Tokenizer,
  template: str = "plain",
  max_tokens: int | None = None,
  max_responses: int | None = None,
  append_eos: bool = True,
  on_error: str = "raise",
  truncate_prompt: str = "none",
) -> Dataset:
  """Builds (or reuses) the TFDS dataset of `kind` from local JSONL files.

  Args:
    kind: "demonstrations", "comparisons", "prompts" or "text".
    files: split name -> comma-separated globs or a list of paths, e.g. {"train": "sft/*.jsonl"}.
    data_dir: where TFDS writes (a folder per kind and variant below it).
    tokenizer, template: how text becomes ids (template: "plain" or "chat").
    max_tokens: the length limit in tokens (see `_encoder`); None for no limit.
    max_responses: comparisons with more responses are errors (the static K of comparison batches).
    append_eos: end every response with EOS.
    on_error: "raise" or "skip" (see formats.read_records).
    truncate_prompt: "none" or "left": over-long prompts of demonstrations and comparisons keep their end.

  Returns:
    The Dataset; `dataset.source("train")` reads a split.
  """
  if kind not in BUILDERS:
    raise ValueError(f"data kind {kind!r} is not one of {tuple(BUILDERS)}")
  paths_by_split = {split: formats.expand(globs, what=f"data.{split}") for split, globs in files.items()}
  template_obj = templates.get(template)
  if truncate_prompt not in ("none", "left"):
    raise formats.DataError(f"data.truncate_prompt: {truncate_prompt!r} is not 'none' or 'left'")
  options = dict(
    template=template,
    max_tokens=max_tokens,
    max_responses=max_responses,
    append_eos=append_eos,
    on_error=on_error,
    truncate_prompt=truncate_prompt,
  )
  config_name = f"{template}-{fingerprint(kind, paths_by_split, tokenizer, options)}"
  builder, variant = _prepared_builder(
    kind, config_name, data_dir, lambda: _read_examples(kind, paths_by_split, tokenizer, template_obj, options)
  )
  if (
    paths.is_remote(data_dir)
    and jax.process_index() == 0
    and not paths.path(data_dir, variant, MIRROR_COMPLETE).exists()
  ):
    paths.copy_tree(os.path.join(local_cache_dir(data_dir), variant), paths.join(data_dir, variant))
    paths.write_text(paths.join(data_dir, variant, MIRROR_COMPLETE), "")
  return Dataset(builder, _logged_reports(kind, builder))


def _prepared_builder(kind: str, config_name: str, data_dir: str, read_examples) -> tuple:
  """The builder of the variant `config_name`, prepared in the local cache: as found there, else downloaded
  from a bucket's complete mirror, else built from `read_examples()` (examples and reports by split).
  Returns (builder, its variant folder "<name>/<config_name>")."""
  builder_cls = BUILDERS[kind]
  remote, local_dir = paths.is_remote(data_dir), local_cache_dir(data_dir)
  os.makedirs(local_dir, exist_ok=True)
  # Processes that share a disk (one machine, or NFS) would build the same variant at once: one builds.
  with filelock.FileLock(os.path.join(local_dir, f".{kind}-{config_name}.lock")):
    with _quiet_tfds():
      builder = builder_cls(data_dir=local_dir, config=config_name)
      prepared = builder.is_prepared()
    variant = f"{builder.name}/{config_name}"
    if not prepared and remote and paths.path(data_dir, variant, MIRROR_COMPLETE).exists():
      paths.copy_tree(paths.join(data_dir, variant), os.path.join(local_dir, variant))
      with _quiet_tfds():
        builder = builder_cls(data_dir=local_dir, config=config_name)
        prepared = builder.is_prepared()
    if not prepared:
      examples_by_split, reports = read_examples()
      with _quiet_tfds():
        builder = builder_cls(
          examples_by_split=examples_by_split, reports=reports, data_dir=local_dir, config=config_name
        )
        builder.download_and_prepare()
  return builder, variant


def _read_examples(
  kind: str, paths_by_split: dict[str, list[str]], tokenizer: Tokenizer, template_obj, options: dict
) -> tuple[dict[str, list[dict]], dict[str, dict]]:
  """Reads, validates and encodes every split's files: (examples by split, each split's Report as a dict)."""
  examples_by_split, reports = {}, {}
  for split, split_files in paths_by_split.items():
    report = formats.Report()
    encode = _encoder(
      kind,
      tokenizer,
      template_obj,
      options["max_tokens"],
      options["append_eos"],
      options["truncate_prompt"],
      report,
    )
    records = formats.read_records(
      split_files,
      kind,
      on_error=options["on_error"],
      max_responses=options["max_responses"],
      check=encode,
      report=report,
    )
    examples_by_split[split] = [dict(record, source=source) for source, record in records]
    if not examples_by_split[split]:
      raise formats.DataError(f"{','.join(split_files)}: file: no valid records for split {split!r}")
    reports[split] = dataclasses.asdict(report)
  return examples_by_split, reports


def _logged_reports(kind: str, builder) -> dict[str, formats.Report]:
  """The build's stored counts by split, printed when something was skipped, dropped or identical, else logged."""
  reports = {split: formats.Report(**r) for split, r in builder.info.metadata.items()}
  for split, report in reports.items():
    name = f"{kind}/{split}"
    if report.notable():
      print(report.summary(name), flush=True)
    else:
      logging.info("%s", report.summary(name))
  return reports
