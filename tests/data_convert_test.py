"""The converter of public formats (HH-RLHF pairs, chat "messages") into our three JSONL kinds, field by field and
read back by formats.read_records; its one-line errors; a byte-order mark at the start of a file; and the length
error that names what is too long and the remedy."""

import gzip
import json
import os
import subprocess
import sys
import tempfile

import pytest

from instructgpt_jax import errors, paths
from instructgpt_jax.data import convert, formats, tfds_builders
from instructgpt_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = formats.HH_ASSISTANT_TURN
ALL = "demonstrations,prompts,comparisons"
BOM = b"\xef\xbb\xbf"


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def assert_one_line_error(excinfo, expected):
  message = str(excinfo.value)
  assert message == expected
  assert "\n" not in message
  error = excinfo.value
  assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # no chained traceback


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  command = [sys.executable, "-m", "instructgpt_jax.data.convert", *args]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------------------------------
# HH-RLHF pairs
# ----------------------------------------------------------------------------------------------------

HH = [
  {"chosen": f"\n\nHuman: What is 2+2?{T} 4.", "rejected": f"\n\nHuman: What is 2+2?{T} 5."},
  {
    "chosen": f"\n\nHuman: Hi{T} Hello.\n\nHuman: Help me?{T} Sure, how?",
    "rejected": f"\n\nHuman: Hi{T} Hello.\n\nHuman: Help me?{T} No.",
  },
  # The chosen reply holds a further turn: the cut is the last Assistant turn the two dialogues share.
  {"chosen": f"\n\nHuman: Go{T} Ok.  Human: more?{T} Done.", "rejected": f"\n\nHuman: Go{T} No."},
]
HH_EXPECTED = {
  "demonstrations": [
    {"prompt": f"\n\nHuman: What is 2+2?{T}", "response": " 4."},
    {"prompt": f"\n\nHuman: Hi{T} Hello.\n\nHuman: Help me?{T}", "response": " Sure, how?"},
    {"prompt": f"\n\nHuman: Go{T}", "response": f" Ok.  Human: more?{T} Done."},
  ],
  "prompts": [
    {"prompt": f"\n\nHuman: What is 2+2?{T}"},
    {"prompt": f"\n\nHuman: Hi{T} Hello.\n\nHuman: Help me?{T}"},
    {"prompt": f"\n\nHuman: Go{T}"},
  ],
  "comparisons": [
    {"prompt": f"\n\nHuman: What is 2+2?{T}", "responses": [" 4.", " 5."], "ranks": [0, 1]},
    {"prompt": f"\n\nHuman: Hi{T} Hello.\n\nHuman: Help me?{T}", "responses": [" Sure, how?", " No."], "ranks": [0, 1]},
    {"prompt": f"\n\nHuman: Go{T}", "responses": [f" Ok.  Human: more?{T} Done.", " No."], "ranks": [0, 1]},
  ],
}


def test_hh_pairs_convert_to_all_three_kinds_and_read_back(tmp_path):
  source = write_jsonl(tmp_path / "hh.jsonl", HH)
  out = tmp_path / "out"
  result = convert.convert(source, str(out), ALL)
  assert sorted(os.listdir(out)) == ["comparisons.jsonl", "demonstrations.jsonl", "prompts.jsonl"]  # no temp left
  for kind, expected in HH_EXPECTED.items():
    assert read_jsonl(out / f"{kind}.jsonl") == expected, kind
    report = formats.Report()
    records = [r for _, r in formats.read_records([str(out / f"{kind}.jsonl")], kind, report=report)]
    assert records == expected and (report.records, report.skipped) == (3, 0)
  # The comparisons are exactly what the reader makes of the original pairs.
  assert [r for _, r in formats.read_records([source], "comparisons")] == HH_EXPECTED["comparisons"]
  assert result.written == 3 and result.report.skipped == 0
  assert result.summary() == (
    f"convert: {source}: wrote 3 demonstrations ({out}/demonstrations.jsonl), 3 prompts ({out}/prompts.jsonl), "
    f"3 comparisons ({out}/comparisons.jsonl); none skipped"
  )


def test_kinds_limit_gzip_input_and_the_command_line(tmp_path):
  source = tmp_path / "hh.jsonl.gz"
  source.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in HH).encode()))
  out = tmp_path / "out"
  run = run_cli(f"--input={source}", f"--out_dir={out}", "--kinds=comparisons", "--limit=2")
  assert run.returncode == 0, run.stderr
  assert run.stdout == (
    f"convert: {source}: wrote 2 comparisons ({out}/comparisons.jsonl) (--limit=2 reached); none skipped\n"
  )
  assert os.listdir(out) == ["comparisons.jsonl"]
  assert read_jsonl(out / "comparisons.jsonl") == HH_EXPECTED["comparisons"][:2]
  run = run_cli(f"--input={tmp_path}/nothing*.jsonl", f"--out_dir={out}", "--kinds=prompts")
  assert (run.returncode, run.stdout) == (2, "")
  assert run.stderr == f"error: {tmp_path}/nothing*.jsonl: --input: no file matches\n"
  with pytest.raises(errors.UserError) as excinfo:
    convert.convert(str(source), str(out), "prompts,labels")
  assert_one_line_error(excinfo, "--kinds: 'labels' is not one of demonstrations,prompts,comparisons")


# ----------------------------------------------------------------------------------------------------
# Chat messages
# ----------------------------------------------------------------------------------------------------


def msg(role, content):
  return {"role": role, "content": content}


CHATS = [
  # system first, two full turns
  {
    "messages": [
      msg("system", "Be brief."),
      msg("user", "Hi"),
      msg("assistant", "Hello!"),
      msg("user", "Bye?"),
      msg("assistant", "Bye."),
    ],
    "id": 7,
  },
  # ends with a user message: the demonstration takes the last assistant reply; the prompt keeps everything
  {"messages": [msg("user", "Name a color."), msg("assistant", "Red."), msg("user", "Another?")]},
  # an empty system message adds nothing; text is kept exactly (newlines, unicode)
  {"messages": [msg("system", ""), msg("user", "日本語\nline 2"), msg("assistant", "\nok 🙂")]},
]
CHAT_EXPECTED = {
  "demonstrations": [
    {"prompt": "Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye?\n\nAssistant:", "response": " Bye."},
    {"prompt": "\n\nHuman: Name a color.\n\nAssistant:", "response": " Red."},
    {"prompt": "\n\nHuman: 日本語\nline 2\n\nAssistant:", "response": " \nok 🙂"},
  ],
  "prompts": [
    {"prompt": "Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye?\n\nAssistant:"},
    {"prompt": "\n\nHuman: Name a color.\n\nAssistant: Red.\n\nHuman: Another?\n\nAssistant:"},
    {"prompt": "\n\nHuman: 日本語\nline 2\n\nAssistant:"},
  ],
}


def test_messages_convert_to_demonstrations_and_prompts_in_the_hh_style(tmp_path):
  source = write_jsonl(tmp_path / "chat.jsonl", CHATS)
  out = tmp_path / "out"
  result = convert.convert(source, str(out), "demonstrations,prompts")
  assert result.written == 3
  for kind, expected in CHAT_EXPECTED.items():
    assert read_jsonl(out / f"{kind}.jsonl") == expected, kind
    assert [r for _, r in formats.read_records([str(out / f"{kind}.jsonl")], kind)] == expected
  assert "日本語" in (out / "prompts.jsonl").read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
  # The same rendering as HH: prompt + response of a two-message conversation is an HH dialogue.
  demo = convert.from_messages({"messages": [msg("user", "What is 2+2?"), msg("assistant", "4.")]}, ["demonstrations"])
  assert demo["demonstrations"]["prompt"] + demo["demonstrations"]["response"] == HH[0]["chosen"]


def test_hh_and_messages_records_may_share_a_file(tmp_path):
  source = write_jsonl(tmp_path / "mixed.jsonl", [HH[0], CHATS[1]])
  out = tmp_path / "out"
  convert.convert(source, str(out), "prompts")
  assert read_jsonl(out / "prompts.jsonl") == [HH_EXPECTED["prompts"][0], CHAT_EXPECTED["prompts"][1]]


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------

# (name, kinds, lines, expected message after "<path>:")
BAD = [
  (
    "malformed",
    ALL,
    [json.dumps(HH[0]), '{"chosen": "x"'],
    "2: line: malformed JSON (Expecting ',' delimiter at column 15)",
  ),
  (
    "no_assistant_turn",
    ALL,
    [json.dumps({"chosen": "\n\nHuman: hi\n\nHuman: yo", "rejected": "\n\nHuman: hi\n\nHuman: no"})],
    "1: chosen: no 'Assistant:' turn shared with rejected",
  ),
  ("hh_no_rejected", ALL, [json.dumps({"chosen": f"\n\nHuman: hi{T} a"})], "1: rejected: missing"),
  (
    "no_assistant_message",
    "demonstrations",
    [json.dumps({"messages": [msg("system", "s"), msg("user", "hi")]})],
    "1: messages: no assistant message; a demonstration's response is the last one",
  ),
  (
    "no_user_message",
    "demonstrations",
    [json.dumps({"messages": [msg("assistant", "a")]})],
    "1: messages: no user message before the last assistant message",
  ),
  (
    "chat_comparisons",
    "demonstrations,comparisons",
    [json.dumps({"messages": [msg("user", "u"), msg("assistant", "a")]})],
    "1: messages: a chat conversation holds no comparison; leave comparisons out of --kinds",
  ),
  (
    "tool_role",
    "prompts",
    [json.dumps({"messages": [msg("user", "u"), msg("tool", "t")]})],
    '1: messages[1].role: expected "system", "user" or "assistant", got "tool"',
  ),
  (
    "late_system",
    "prompts",
    [json.dumps({"messages": [msg("user", "u"), msg("system", "s")]})],
    '1: messages[1].role: a "system" message is accepted only first',
  ),
  (
    "content_parts",
    "prompts",
    [json.dumps({"messages": [msg("user", [{"type": "text", "text": "u"}])]})],
    "1: messages[0].content: expected a string, got a list",
  ),
  ("empty_content", "prompts", [json.dumps({"messages": [msg("user", "")]})], "1: messages[0].content: empty string"),
  ("no_content", "prompts", [json.dumps({"messages": [{"role": "user"}]})], "1: messages[0].content: missing"),
  ("not_a_message", "prompts", [json.dumps({"messages": ["hi"]})], "1: messages[0]: expected an object, got a string"),
  ("messages_str", "prompts", [json.dumps({"messages": "hi"})], "1: messages: expected a list, got a string"),
  ("messages_empty", "prompts", [json.dumps({"messages": []})], "1: messages: empty list"),
  (
    "neither",
    "prompts",
    [json.dumps({"prompt": "p"})],
    '1: line: neither an HH-RLHF pair ("chosen", "rejected") nor a chat conversation ("messages")',
  ),
]


@pytest.mark.parametrize("name, kinds, lines, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, name, kinds, lines, expected):
  source = tmp_path / f"{name}.jsonl"
  source.write_text("\n".join(lines) + "\n", encoding="utf-8")
  out = tmp_path / "out"
  with pytest.raises(formats.DataError) as excinfo:
    convert.convert(str(source), str(out), kinds)
  assert_one_line_error(excinfo, f"{source}:{expected}")
  assert os.listdir(out) == []  # no partial output, no temporary folder


def test_the_command_line_prints_the_error_without_a_traceback(tmp_path):
  name, kinds, lines, expected = BAD[3]  # a messages list without an assistant message, for demonstrations
  source = tmp_path / "chat.jsonl"
  source.write_text("\n".join(lines) + "\n", encoding="utf-8")
  run = run_cli(f"--input={source}", f"--out_dir={tmp_path}/out", f"--kinds={kinds}")
  assert (run.returncode, run.stdout, run.stderr) == (2, "", f"error: {source}:{expected}\n")


def test_skip_mode_counts_and_lists_skipped_records(tmp_path):
  lines = [
    json.dumps(HH[0]),
    "not json",
    json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}),
    json.dumps(CHATS[1]),
    json.dumps({"messages": [msg("user", "no reply")]}),
  ]
  source = tmp_path / "mixed.jsonl"
  source.write_text("\n".join(lines) + "\n", encoding="utf-8")
  out = tmp_path / "out"
  run = run_cli(f"--input={source}", f"--out_dir={out}", "--kinds=demonstrations,prompts", "--on_error=skip")
  assert run.returncode == 0, run.stderr
  assert run.stdout.splitlines() == [
    f"convert: {source}: wrote 2 demonstrations ({out}/demonstrations.jsonl), 2 prompts ({out}/prompts.jsonl); "
    "3 records skipped (--on_error=skip)",
    f"  {source}:2: line: malformed JSON (Expecting value at column 1)",
    f"  {source}:3: chosen: no 'Assistant:' turn shared with rejected",
    f"  {source}:5: messages: no assistant message; a demonstration's response is the last one",
  ]
  # A record gives every kind or none, so line i of each file comes from the same input record.
  assert read_jsonl(out / "demonstrations.jsonl") == [
    HH_EXPECTED["demonstrations"][0],
    CHAT_EXPECTED["demonstrations"][1],
  ]
  assert read_jsonl(out / "prompts.jsonl") == [HH_EXPECTED["prompts"][0], CHAT_EXPECTED["prompts"][1]]


# ----------------------------------------------------------------------------------------------------
# The real HH-RLHF file, and buckets
# ----------------------------------------------------------------------------------------------------


def test_real_hh_rlhf_file_converts_to_2312_of_each_kind(shared_data, tmp_path):
  path = str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz")
  out = tmp_path / "out"
  result = convert.convert(path, str(out), ALL)
  assert (result.written, result.report.skipped, result.identical_responses) == (2312, 0, 0)
  read = {}
  for kind in convert.KINDS:
    report = formats.Report()
    read[kind] = [r for _, r in formats.read_records([str(out / f"{kind}.jsonl")], kind, report=report)]
    assert (report.records, report.skipped) == (2312, 0), kind
  assert read["comparisons"] == [r for _, r in formats.read_records([path], "comparisons")]
  with gzip.open(path, "rt", encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  for row, demo, prompt, comparison in zip(raw, read["demonstrations"], read["prompts"], read["comparisons"]):
    assert demo["prompt"] == prompt["prompt"] == comparison["prompt"] and demo["prompt"].endswith(T)
    assert demo["prompt"] + demo["response"] == row["chosen"]


def test_inputs_and_outputs_in_a_bucket(gcs):
  bucket = gcs.make_bucket()
  staged_before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(".convert-")}
  paths.write_text(f"gs://{bucket}/in/hh.jsonl", "".join(json.dumps(r) + "\n" for r in HH))
  out = f"gs://{bucket}/out"
  result = convert.convert(f"gs://{bucket}/in/*.jsonl", out, "demonstrations,comparisons")
  assert result.written == 3
  assert gcs.objects(bucket) == ["in/hh.jsonl", "out/comparisons.jsonl", "out/demonstrations.jsonl"]
  for kind in ("demonstrations", "comparisons"):
    assert [r for _, r in formats.read_records([f"{out}/{kind}.jsonl"], kind)] == HH_EXPECTED[kind]
  # Staged in the local temporary folder, uploaded whole, then removed.
  assert {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(".convert-")} == staged_before


# ----------------------------------------------------------------------------------------------------
# Byte-order marks (formats.py)
# ----------------------------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted_only_at_the_start_of_a_file(tmp_path):
  demo = b'{"prompt": "Say hi.", "response": " Hi!"}\n'
  plain = tmp_path / "bom.jsonl"
  plain.write_bytes(BOM + demo + demo)
  zipped = tmp_path / "bom.jsonl.gz"
  zipped.write_bytes(gzip.compress(BOM + demo))
  blank_first = tmp_path / "bom_blank.jsonl"
  blank_first.write_bytes(BOM + b"\r\n" + demo)
  expected = {"prompt": "Say hi.", "response": " Hi!"}
  assert [r for _, r in formats.read_records([str(plain)], "demonstrations")] == [expected, expected]
  assert [r for _, r in formats.read_records([str(zipped)], "demonstrations")] == [expected]
  assert list(formats.read_records([str(blank_first)], "demonstrations")) == [(f"{blank_first}:2", expected)]
  middle = tmp_path / "joined.jsonl"
  middle.write_bytes(BOM + demo + BOM + demo)  # two exported files joined with cat
  with pytest.raises(formats.DataError) as excinfo:
    list(formats.read_records([str(middle)], "demonstrations"))
  assert_one_line_error(
    excinfo, f"{middle}:2: line: a UTF-8 byte-order mark, accepted only at the very start of a file"
  )
  hh = tmp_path / "hh_bom.jsonl"
  hh.write_bytes(BOM + (json.dumps(HH[0]) + "\n").encode())
  convert.convert(str(hh), str(tmp_path / "out"), "comparisons")  # the converter reads the same way
  assert read_jsonl(tmp_path / "out" / "comparisons.jsonl") == HH_EXPECTED["comparisons"][:1]


# ----------------------------------------------------------------------------------------------------
# The length error (tfds_builders)
# ----------------------------------------------------------------------------------------------------

LONG = [
  (  # the prompt does not fit beside the response, which fits alone: truncation would help
    "demonstrations",
    {"prompt": "0123456789", "response": " abcdefghij"},
    "prompt: too long: prompt 10 + response 11 + EOS = 22 tokens, over the limit of 20; raise data.seq_len, "
    "or set data.truncate_prompt=left (keeps the prompt's last 8 tokens) or data.on_error=skip",
  ),
  (  # the response alone fills the limit: no prompt truncation can fit it
    "demonstrations",
    {"prompt": "p", "response": "r" * 19},
    "response: too long: prompt 1 + response 19 + EOS = 21 tokens, over the limit of 20, and the response alone "
    "(20 tokens) leaves no room for the prompt; raise data.seq_len or set data.on_error=skip",
  ),
  (  # truncation keeps what the longest response leaves
    "comparisons",
    {"prompt": "0123456789", "responses": ["ok", "x" * 12], "ranks": [0, 1]},
    "prompt: too long for responses[1]: prompt 10 + response 12 + EOS = 23 tokens, over the limit of 20; raise "
    "data.seq_len, or set data.truncate_prompt=left (keeps the prompt's last 7 tokens) or data.on_error=skip",
  ),
  (  # a response too long by itself is named first, even after one the prompt is too long for
    "comparisons",
    {"prompt": "0123456789", "responses": ["y" * 12, "z" * 30], "ranks": [1, 0]},
    "responses[1]: too long: prompt 10 + response 30 + EOS = 41 tokens, over the limit of 20, and the response "
    "alone (31 tokens) leaves no room for the prompt; raise data.seq_len or set data.on_error=skip",
  ),
]


@pytest.mark.parametrize("kind, record, expected", LONG, ids=["prompt", "response", "comparison_prompt", "both"])
def test_length_error_names_what_is_too_long_and_the_remedy(tmp_path, kind, record, expected):
  path = write_jsonl(tmp_path / "long.jsonl", [record])
  tokenizer = tokenizer_lib.byte_tokenizer()
  build = dict(data_dir=str(tmp_path / "tfds"), tokenizer=tokenizer, max_tokens=20)
  with pytest.raises(formats.DataError) as excinfo:
    tfds_builders.build(kind, {"train": path}, **build)
  assert_one_line_error(excinfo, f"{path}:1: {expected}")
  if expected.startswith("prompt:"):  # the remedy the message names works, keeping that many prompt tokens
    dataset = tfds_builders.build(kind, {"train": path}, truncate_prompt="left", **build)
    kept = int(expected.split("last ")[1].split(" ")[0])
    assert len(dataset.source("train")[0]["prompt_ids"]) == kept
