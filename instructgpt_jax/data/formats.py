"""The JSONL formats of the RLHF data, read and validated line by line (docs/data.md shows each with an example).

Four kinds, one JSON object a line, in `.jsonl` or gzip-compressed `.jsonl.gz` files:

* "demonstrations": `{"prompt": str, "response": str}` (SFT).
* "comparisons": `{"prompt": str, "responses": [str, ...], "ranks": [int, ...]}`, K-wise: rank 0 is the best,
  equal ranks are a tie. Or HH-RLHF's pairwise `{"chosen": str, "rejected": str}`: two whole dialogues that
  share everything up to the last Assistant turn, split there into a prompt and two responses (ranks 0, 1).
* "prompts": `{"prompt": str}` (PPO).
* "text": `{"text": str}` lines, or plain text files (any other extension, e.g. `.txt`) of one document
  each (pretraining).

Files may be local or gs:// (read through etils.epath). Fields other than these are ignored; blank lines
are skipped; a UTF-8 byte-order mark at the very start of a file (Windows exports) is ignored. Any problem
is one line `file:line: field: problem` (a DataError by default, never a traceback and never a silent
drop); with `on_error="skip"` the record is skipped, counted and listed in the `Report`, whose summary is
printed. `read_parsed` is that reading with any parser (convert.py's converters use it).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence

from instructgpt_jax import errors, paths

KINDS = ("demonstrations", "comparisons", "prompts", "text")
ON_ERROR = ("raise", "skip")
HH_ASSISTANT_TURN = "\n\nAssistant:"
UTF8_BOM = b"\xef\xbb\xbf"
MAX_LISTED_ERRORS = 20  # a report lists this many skipped lines in full and counts the rest


DataError = errors.DataError  # bad input, reported as one line `file:line: field: problem`


class FieldError(ValueError):
  """A problem with one field of one record; `read_records` adds the file and line."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"{field}: {problem}")


@dataclasses.dataclass
class Report:
  """What reading one split did: records kept, skipped (with their error lines) and dropped."""

  records: int = 0
  skipped: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)  # the first MAX_LISTED_ERRORS skipped lines
  dropped_too_long: int = 0  # prompts over the length limit (dropped by design, not an error)
  identical_responses: int = 0  # comparisons with two identical responses (kept; they carry no signal)
  truncated_prompts: int = 0  # prompts cut from the left to fit (data.truncate_prompt=left)

  def skip(self, message: str) -> None:
    self.skipped += 1
    if len(self.errors) < MAX_LISTED_ERRORS:
      self.errors.append(message)

  def notable(self) -> bool:
    return bool(self.skipped or self.dropped_too_long or self.identical_responses or self.truncated_prompts)

  def summary(self, name: str) -> str:
    """One paragraph: the counts on the first line, then each listed error line indented."""
    parts = [f"{self.records} records"]
    if self.skipped:
      parts.append(f"{self.skipped} skipped (data.on_error=skip)")
    if self.dropped_too_long:
      parts.append(f"{self.dropped_too_long} dropped as over-long prompts")
    if self.truncated_prompts:
      parts.append(f"{self.truncated_prompts} prompts truncated from the left (data.truncate_prompt=left)")
    if self.identical_responses:
      parts.append(f"{self.identical_responses} with identical responses (kept)")
    return "\n".join([f"data: {name}: " + ", ".join(parts)] + self.listed_errors())

  def listed_errors(self) -> list[str]:
    """The skipped lines, indented: the first MAX_LISTED_ERRORS in full, then a count of the rest."""
    lines = [f"  {e}" for e in self.errors]
    if self.skipped > len(self.errors):
      lines.append(f"  ... and {self.skipped - len(self.errors)} more")
    return lines


def expand(patterns: str | Sequence[str], *, what: str) -> list[str]:
  """Comma-separated globs (or a list of them) -> the sorted matching files; a glob that matches nothing
  is an error naming the config field `what`."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  if not patterns:
    raise DataError(f"{what}: empty; give comma-separated globs of .jsonl or .jsonl.gz files")
  files = []
  for pattern in patterns:
    matches = paths.glob(pattern)
    if not matches:
      raise DataError(f"{pattern}: {what}: no file matches")
    files.extend(matches)
  return files


# ----------------------------------------------------------------------------------------------------
# Lines of a file
# ----------------------------------------------------------------------------------------------------


def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(line number, bytes) of a .jsonl or .jsonl.gz file, reporting unreadable files as one line."""
  try:
    with paths.path(path).open("rb") as raw:
      with gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw as f:
        yield from enumerate(f, start=1)
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"{path}: file: not a readable gzip file ({e})") from None
  except OSError as e:
    raise DataError(f"{path}: file: cannot be read ({e.strerror or e})") from None


def _decode_utf8(raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise FieldError("line", f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _json_objects(path: str) -> Iterator[tuple[int, dict | FieldError]]:
  """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file; a line that is not a JSON
  object yields its error. A UTF-8 byte-order mark is dropped at the very start of the file only."""
  for lineno, raw in _raw_lines(path):
    if lineno == 1 and raw.startswith(UTF8_BOM):
      raw = raw[len(UTF8_BOM) :]
    if not raw.strip():
      continue
    try:
      line = _decode_utf8(raw.rstrip(b"\r\n"))
      if line.startswith("\ufeff"):  # json's own message would suggest Python's "utf-8-sig"
        raise FieldError("line", "a UTF-8 byte-order mark, accepted only at the very start of a file")
      obj = json.loads(line)
    except FieldError as e:
      yield lineno, e
      continue
    except json.JSONDecodeError as e:
      yield lineno, FieldError("line", f"malformed JSON ({e.msg} at column {e.colno})")
      continue
    if not isinstance(obj, dict):
      yield lineno, FieldError("line", f"expected a JSON object, got {type_name(obj)}")
      continue
    yield lineno, obj


def read_text_file(path: str) -> str:
  """A whole .txt file as one document; invalid UTF-8 is reported with its line."""
  try:
    raw = paths.path(path).read_bytes()
  except OSError as e:
    raise DataError(f"{path}: file: cannot be read ({e.strerror or e})") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    lineno = raw.count(b"\n", 0, e.start) + 1
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(f"{path}:{lineno}: text: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None


# ----------------------------------------------------------------------------------------------------
# Fields
# ----------------------------------------------------------------------------------------------------


def type_name(value) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
    type(value), "a number"
  )


def _string(obj: dict, field: str) -> str:
  if field not in obj:
    raise FieldError(field, "missing")
  return nonempty_string(obj[field], field)


def nonempty_string(value, field: str) -> str:
  if not isinstance(value, str):
    raise FieldError(field, f"expected a string, got {type_name(value)}")
  if not value:
    raise FieldError(field, "empty string")
  return value


def _list(obj: dict, field: str) -> list:
  if field not in obj:
    raise FieldError(field, "missing")
  if not isinstance(obj[field], list):
    raise FieldError(field, f"expected a list, got {type_name(obj[field])}")
  return obj[field]


def parse_demonstration(obj: dict) -> dict:
  return {"prompt": _string(obj, "prompt"), "response": _string(obj, "response")}


def parse_prompt(obj: dict) -> dict:
  return {"prompt": _string(obj, "prompt")}


def parse_text(obj: dict) -> dict:
  return {"text": _string(obj, "text")}


def parse_comparison(obj: dict, *, max_responses: int | None = None) -> dict:
  """A K-wise `{"prompt", "responses", "ranks"}` or a pairwise `{"chosen", "rejected"}` record."""
  if "responses" not in obj and ("chosen" in obj or "rejected" in obj):
    return parse_hh_pair(obj)
  if "responses" not in obj and "prompt" in obj:
    raise FieldError("responses", 'missing (a comparison has "prompt", "responses" and "ranks")')
  prompt = _string(obj, "prompt")
  responses = [nonempty_string(r, f"responses[{k}]") for k, r in enumerate(_list(obj, "responses"))]
  if len(responses) < 2:
    raise FieldError("responses", f"{len(responses)} response(s); a comparison needs at least 2")
  if max_responses is not None and len(responses) > max_responses:
    raise FieldError("responses", f"{len(responses)} responses, more than the limit of {max_responses}")
  ranks = _list(obj, "ranks")
  if len(ranks) != len(responses):
    raise FieldError("ranks", f"{len(ranks)} ranks for {len(responses)} responses")
  for k, rank in enumerate(ranks):
    if not isinstance(rank, int) or isinstance(rank, bool):
      raise FieldError(f"ranks[{k}]", f"expected an integer, got {type_name(rank)}")
    if rank < 0:
      raise FieldError(f"ranks[{k}]", f"negative rank {rank} (0 is the best)")
  if len(set(ranks)) == 1:
    raise FieldError("ranks", "every response is tied; the record holds no comparison")
  return {"prompt": prompt, "responses": responses, "ranks": ranks}


def parse_hh_pair(obj: dict) -> dict:
  """HH-RLHF's `{"chosen", "rejected"}` record -> {prompt, responses [chosen, rejected], ranks [0, 1]}: the
  comparison this reader makes, and the one split the converter (convert.py) makes its demonstrations and
  prompts from."""
  return split_hh_pair(_string(obj, "chosen"), _string(obj, "rejected"))


def split_hh_pair(chosen: str, rejected: str) -> dict:
  """HH-RLHF's two dialogues -> {prompt, responses [chosen, rejected], ranks [0, 1]}.

  The prompt is the dialogue both share, up to and including its last "\\n\\nAssistant:" marker; each
  response is the rest of its dialogue. Taking the marker inside the common prefix (rather than each
  dialogue's own last marker) matters for the few rows whose response itself contains a later
  "\\n\\nAssistant:" or "Human:" turn.
  """
  shared = len(os.path.commonprefix([chosen, rejected]))
  cut = chosen.rfind(HH_ASSISTANT_TURN, 0, shared)
  if cut < 0:
    raise FieldError("chosen", f"no {HH_ASSISTANT_TURN.strip()!r} turn shared with rejected")
  prompt_end = cut + len(HH_ASSISTANT_TURN)
  responses = [chosen[prompt_end:], rejected[prompt_end:]]
  for field, response in zip(("chosen", "rejected"), responses):
    if not response:
      raise FieldError(field, "empty response after the shared dialogue")
  return {"prompt": chosen[:prompt_end], "responses": responses, "ranks": [0, 1]}


# ----------------------------------------------------------------------------------------------------
# Records of a split
# ----------------------------------------------------------------------------------------------------


def read_records(
  paths: Sequence[str],
  kind: str,
  *,
  on_error: str = "raise",
  max_responses: int | None = None,
  check: Callable[[dict], bool] | None = None,
  report: Report | None = None,
) -> Iterator[tuple[str, dict]]:
  """Yields ("file:line", record) for every valid record of `paths`, in file and line order.

  Args:
    paths: .jsonl / .jsonl.gz files (and plain text files for kind "text").
    kind: one of KINDS.
    on_error: "raise" (a DataError `file:line: field: problem` at the first bad record) or "skip" (count it
      in `report` and go on).
    max_responses: comparisons with more responses are errors (the static K of the batches).
    check: an extra test of a parsed record (the token-length limits, which need the tokenizer; it may add
      the token ids to the record): raises FieldError for a bad record, returns False to drop a record by
      design (counted in `report.dropped_too_long`), True to keep it.
    report: filled with the counts.
  """
  if kind not in KINDS:
    raise ValueError(f"data kind {kind!r} is not one of {KINDS}")
  parse = {
    "demonstrations": parse_demonstration,
    "comparisons": lambda obj: parse_comparison(obj, max_responses=max_responses),
    "prompts": parse_prompt,
    "text": parse_text,
  }[kind]
  return read_parsed(paths, parse, text_files=kind == "text", on_error=on_error, check=check, report=report)


def read_parsed(
  paths: Sequence[str],
  parse: Callable[[dict], dict],
  *,
  text_files: bool = False,
  on_error: str = "raise",
  check: Callable[[dict], bool] | None = None,
  report: Report | None = None,
) -> Iterator[tuple[str, dict]]:
  """`read_records` with any `parse` (a JSON object -> a record, raising FieldError): the lines, the one-line
  errors, skip mode and the counts of every reader of JSONL here. `text_files`: a file that is not .jsonl /
  .jsonl.gz is one `{"text"}` document."""
  if on_error not in ON_ERROR:
    raise DataError(f"data.on_error: {on_error!r} is not one of {ON_ERROR}")
  report = report if report is not None else Report()
  for path in paths:
    for lineno, obj in _objects(path, text_files):
      source = f"{path}:{lineno}"
      try:
        if isinstance(obj, FieldError):
          raise obj
        record = parse(obj)
        keep = check(record) if check is not None else True
      except FieldError as e:
        if on_error == "raise":
          raise DataError(f"{source}: {e}") from None
        report.skip(f"{source}: {e}")
        continue
      if not keep:
        report.dropped_too_long += 1
        continue
      if isinstance(record.get("responses"), list) and len(set(record["responses"])) < len(record["responses"]):
        report.identical_responses += 1
      report.records += 1
      yield source, record


def _objects(path: str, text_files: bool) -> Iterator[tuple[int, dict | FieldError]]:
  if path.endswith((".jsonl", ".jsonl.gz")):
    return _json_objects(path)
  if text_files:  # a plain text file is one document
    return iter([(1, {"text": read_text_file(path)})])
  raise DataError(f"{path}: file: expected a .jsonl or .jsonl.gz file")
