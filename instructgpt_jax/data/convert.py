"""Converting public formats into ours: `python -m instructgpt_jax.data.convert` (docs/data.md, "Converting
public formats").

    python -m instructgpt_jax.data.convert --input=hh/train.jsonl.gz --out_dir=data/hh \\
      --kinds=demonstrations,prompts,comparisons

Two input formats, recognised per record:

* HH-RLHF pairs `{"chosen": dialogue, "rejected": dialogue}`. All three kinds come from the one split the
  comparison reader makes (formats.parse_hh_pair): the prompt is the dialogue both share, up to and including
  its last "\\n\\nAssistant:"; the comparison's responses are the rest of chosen and of rejected (ranks 0, 1);
  the demonstration's response is the rest of chosen; the prompt record is the prompt alone.
* Chat conversations `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`:
  demonstrations (the last assistant message is the response, everything before it the prompt) and prompts
  (all but a trailing assistant message). They hold no comparison. The prompt is rendered as text in the
  HH style, a system message first as plain text, then "\\n\\nHuman: {user}" and "\\n\\nAssistant: {assistant}"
  turns, ending with "\\n\\nAssistant:"; a response is " " + its content. So prompt + response reads as the
  whole conversation, as in HH-RLHF, and data.template=plain trains on it as it trains on HH.

A record becomes one record of every requested kind or none (line i of each output file comes from the
same input record). Problems are the readers' one-line `file:line: field: problem` errors (formats.py);
with `--on_error=skip` the record is skipped, counted and listed. Paths may be local or gs://. An output file
is written under a temporary name and moved (or uploaded) into place only when the whole input converted,
so a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from instructgpt_jax import errors, paths
from instructgpt_jax.data import formats
from instructgpt_jax.data.formats import FieldError

KINDS = ("demonstrations", "prompts", "comparisons")
ROLES = ("system", "user", "assistant")
HUMAN_TURN = "\n\nHuman:"
ASSISTANT_TURN = formats.HH_ASSISTANT_TURN


# ----------------------------------------------------------------------------------------------------
# One record
# ----------------------------------------------------------------------------------------------------


def convert_record(obj: dict, kinds: Sequence[str]) -> dict[str, dict]:
  """One input object -> {kind: our record} for each of `kinds`; FieldError when it cannot give them all."""
  if "messages" in obj:
    return from_messages(obj, kinds)
  if "chosen" in obj or "rejected" in obj:
    return from_hh_pair(obj, kinds)
  raise FieldError("line", 'neither an HH-RLHF pair ("chosen", "rejected") nor a chat conversation ("messages")')


def from_hh_pair(obj: dict, kinds: Sequence[str]) -> dict[str, dict]:
  comparison = formats.parse_hh_pair(obj)
  prompt = comparison["prompt"]
  records = {
    "demonstrations": {"prompt": prompt, "response": comparison["responses"][0]},
    "prompts": {"prompt": prompt},
    "comparisons": comparison,
  }
  return {kind: records[kind] for kind in kinds}


def from_messages(obj: dict, kinds: Sequence[str]) -> dict[str, dict]:
  messages = parse_messages(obj)
  if "comparisons" in kinds:
    raise FieldError("messages", "a chat conversation holds no comparison; leave comparisons out of --kinds")
  records = {}
  if "demonstrations" in kinds:
    last = next((i for i in reversed(range(len(messages))) if messages[i][0] == "assistant"), None)
    if last is None:
      raise FieldError("messages", "no assistant message; a demonstration's response is the last one")
    prompt = render_prompt(messages[:last], missing_user="no user message before the last assistant message")
    records["demonstrations"] = {"prompt": prompt, "response": " " + messages[last][1]}
  if "prompts" in kinds:
    end = len(messages) - 1 if messages[-1][0] == "assistant" else len(messages)
    records["prompts"] = {"prompt": render_prompt(messages[:end], missing_user="no user message")}
  return {kind: records[kind] for kind in kinds}


def parse_messages(obj: dict) -> list[tuple[str, str]]:
  """The validated (role, content) pairs of `obj["messages"]`."""
  value = obj["messages"]
  if not isinstance(value, list):
    raise FieldError("messages", f"expected a list, got {formats.type_name(value)}")
  if not value:
    raise FieldError("messages", "empty list")
  messages = []
  for i, message in enumerate(value):
    field = f"messages[{i}]"
    if not isinstance(message, dict):
      raise FieldError(field, f"expected an object, got {formats.type_name(message)}")
    for key in ("role", "content"):
      if key not in message:
        raise FieldError(f"{field}.{key}", "missing")
    role = message["role"]
    if not isinstance(role, str):
      raise FieldError(f"{field}.role", f"expected a string, got {formats.type_name(role)}")
    if role not in ROLES:
      raise FieldError(f"{field}.role", f'expected "system", "user" or "assistant", got {json.dumps(role)}')
    if role == "system" and i > 0:
      raise FieldError(f"{field}.role", 'a "system" message is accepted only first')
    content = message["content"]
    if role == "system":  # may be empty: it then adds nothing
      if not isinstance(content, str):
        raise FieldError(f"{field}.content", f"expected a string, got {formats.type_name(content)}")
    else:
      formats.nonempty_string(content, f"{field}.content")
    messages.append((role, content))
  return messages


def render_prompt(messages: Sequence[tuple[str, str]], *, missing_user: str) -> str:
  """Messages as HH-style text, ending with the assistant's turn opened: "{system}\\n\\nHuman: ...\\n\\nAssistant:"."""
  if not any(role == "user" for role, _ in messages):
    raise FieldError("messages", missing_user)
  turns = {"system": "{}", "user": HUMAN_TURN + " {}", "assistant": ASSISTANT_TURN + " {}"}
  return "".join(turns[role].format(content) for role, content in messages) + ASSISTANT_TURN


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Conversion:
  """What `convert` did: the files written and their record counts, and the reader's report."""

  inputs: list[str]
  files: dict[str, str]  # kind -> output file
  written: int  # records written to each file
  report: formats.Report
  identical_responses: int = 0  # HH comparisons whose two responses are the same (kept)
  limit: int | None = None  # the --limit, when the conversion stopped there

  def summary(self) -> str:
    """One paragraph: what was read and written, then the skipped lines (the first 20, then a count)."""
    source = self.inputs[0] if len(self.inputs) == 1 else f"{len(self.inputs)} files"
    written = ", ".join(f"{self.written} {kind} ({path})" for kind, path in self.files.items())
    line = f"convert: {source}: wrote {written}"
    if self.identical_responses:
      line += f"; {self.identical_responses} comparisons with identical responses (kept)"
    if self.limit is not None:
      line += f" (--limit={self.limit} reached)"
    skipped = f"{self.report.skipped} records skipped (--on_error=skip)" if self.report.skipped else "none skipped"
    return "\n".join([f"{line}; {skipped}"] + self.report.listed_errors())


def convert(
  inputs: str | Sequence[str],
  out_dir: str,
  kinds: str | Sequence[str],
  *,
  limit: int | None = None,
  on_error: str = "raise",
) -> Conversion:
  """Converts the input files (comma-separated globs, local or gs://) into `out_dir/<kind>.jsonl` for each
  kind; `limit`: stop after that many records. Raises errors.UserError (one line) on bad input."""
  kinds = parse_kinds(kinds)
  if limit is not None and limit < 1:
    raise errors.UserError(f"--limit: {limit} must be at least 1")
  if on_error not in formats.ON_ERROR:
    raise errors.UserError(f"--on_error: {on_error!r} is not one of {', '.join(formats.ON_ERROR)}")
  files = formats.expand(inputs, what="--input")
  paths.check_output_dir(out_dir, "--out_dir")
  paths.make_dir(out_dir)
  report = formats.Report()
  outputs = {kind: paths.join(out_dir, f"{kind}.jsonl") for kind in kinds}
  result = Conversion(inputs=files, files=outputs, written=0, report=report)
  records = formats.read_parsed(files, lambda obj: convert_record(obj, kinds), on_error=on_error, report=report)
  with _Staged(out_dir, outputs) as staged:
    for _, converted in records:
      for kind, record in converted.items():
        try:
          staged[kind].write(json.dumps(record, ensure_ascii=False) + "\n")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the input's JSON) stays escaped
          staged[kind].write(json.dumps(record) + "\n")
      if "comparisons" in converted and len(set(converted["comparisons"]["responses"])) == 1:
        result.identical_responses += 1
      result.written += 1
      if result.written == limit:  # the rest of the input is not read
        result.limit = limit
        break
  return result


def parse_kinds(kinds: str | Sequence[str]) -> list[str]:
  names = [k.strip() for k in kinds.split(",") if k.strip()] if isinstance(kinds, str) else list(kinds)
  if not names:
    raise errors.UserError(f"--kinds: empty; give one or more of {','.join(KINDS)}")
  for name in names:
    if name not in KINDS:
      raise errors.UserError(f"--kinds: {name!r} is not one of {','.join(KINDS)}")
  if len(set(names)) < len(names):
    raise errors.UserError(f"--kinds: {','.join(names)} names a kind twice")
  return names


class _Staged:
  """Text files written under temporary local names and put in place (moved, or uploaded to a bucket) only
  when the block ends without an error; otherwise removed."""

  def __init__(self, out_dir: str, outputs: dict[str, str]):
    self._outputs = outputs
    local = None if paths.is_remote(out_dir) else os.fspath(paths.path(out_dir))
    self._dir = tempfile.mkdtemp(prefix=".convert-", dir=local)
    self._files = {}

  def __enter__(self) -> dict:
    for kind in self._outputs:
      self._files[kind] = open(os.path.join(self._dir, f"{kind}.jsonl"), "w", encoding="utf-8")
    return self._files

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      for f in self._files.values():
        f.close()
      if exc_type is None:
        for kind, target in self._outputs.items():
          self._publish(os.path.join(self._dir, f"{kind}.jsonl"), target)
    finally:
      shutil.rmtree(self._dir, ignore_errors=True)

  @staticmethod
  def _publish(staged: str, target: str) -> None:
    try:
      if paths.is_remote(target):  # an object appears whole when its upload completes
        with open(staged, "rb") as src, paths.path(target).open("wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
      else:
        os.replace(staged, target)
    except OSError as e:
      raise errors.UserError(f"{target}: file: cannot be written ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m instructgpt_jax.data.convert",
    description="Convert HH-RLHF pairs or chat 'messages' JSONL into our demonstrations, prompts and comparisons.",
  )
  parser.add_argument("--input", required=True, help="comma-separated globs of .jsonl / .jsonl.gz files")
  parser.add_argument("--out_dir", required=True, help="folder (local or gs://) for <kind>.jsonl")
  parser.add_argument("--kinds", required=True, help=f"comma-separated, of {','.join(KINDS)}")
  parser.add_argument("--limit", type=int, default=None, help="stop after this many records")
  parser.add_argument("--on_error", choices=formats.ON_ERROR, default="raise", help="skip: count and list bad records")
  args = parser.parse_args(argv)
  try:
    result = convert(args.input, args.out_dir, args.kinds, limit=args.limit, on_error=args.on_error)
  except errors.UserError as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(result.summary(), flush=True)


if __name__ == "__main__":
  main()
