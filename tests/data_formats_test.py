"""Reading the JSONL formats: every kind of bad input gives its documented one-line error; skip mode counts
and prints; HH-RLHF pairs split at the last shared Assistant turn (the real file when ../shared/data exists)."""

import gzip
import json

import pytest

from instructgpt_jax.data import formats, stage_data, text, tfds_builders
from instructgpt_jax.data import tokenizer as tokenizer_lib

T = formats.HH_ASSISTANT_TURN
GOOD_DEMO = '{"prompt": "Say hi.", "response": " Hi!"}'
GOOD_COMPARISON = '{"prompt": "Pick", "responses": [" a", " b"], "ranks": [0, 1]}'

# (file name, kind, lines, expected message after "<path>:")
MALFORMED = [
  (
    "json.jsonl",
    "demonstrations",
    [GOOD_DEMO, '{"prompt": "a", "response": "b"'],
    "2: line: malformed JSON (Expecting ',' delimiter at column 32)",
  ),
  (
    "trailing.jsonl",
    "demonstrations",
    ['{"prompt": "a", "response": "b"} x'],
    "1: line: malformed JSON (Extra data at column 34)",
  ),
  ("array.jsonl", "demonstrations", [GOOD_DEMO, GOOD_DEMO, "[1, 2]"], "3: line: expected a JSON object, got a list"),
  ("no_prompt.jsonl", "demonstrations", ['{"response": "b"}'], "1: prompt: missing"),
  (
    "prompt_number.jsonl",
    "demonstrations",
    ['{"prompt": 7, "response": "b"}'],
    "1: prompt: expected a string, got a number",
  ),
  (
    "response_null.jsonl",
    "demonstrations",
    ['{"prompt": "a", "response": null}'],
    "1: response: expected a string, got null",
  ),
  (
    "response_empty.jsonl",
    "demonstrations",
    [GOOD_DEMO, '{"prompt": "a", "response": ""}'],
    "2: response: empty string",
  ),
  (
    "no_responses.jsonl",
    "comparisons",
    ['{"prompt": "a", "ranks": [0, 1]}'],
    '1: responses: missing (a comparison has "prompt", "responses" and "ranks")',
  ),
  (
    "responses_str.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": "b", "ranks": [0]}'],
    "1: responses: expected a list, got a string",
  ),
  (
    "response_item.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", 3], "ranks": [0, 1]}'],
    "1: responses[1]: expected a string, got a number",
  ),
  (
    "response_item_empty.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", ""], "ranks": [0, 1]}'],
    "1: responses[1]: empty string",
  ),
  (
    "one_response.jsonl",
    "comparisons",
    [GOOD_COMPARISON, '{"prompt": "a", "responses": ["b"], "ranks": [0]}'],
    "2: responses: 1 response(s); a comparison needs at least 2",
  ),
  (
    "too_many.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", "c", "d", "e"], "ranks": [0, 1, 2, 3]}'],
    "1: responses: 4 responses, more than the limit of 3",
  ),
  ("no_ranks.jsonl", "comparisons", ['{"prompt": "a", "responses": ["b", "c"]}'], "1: ranks: missing"),
  (
    "ranks_length.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", "c", "d"], "ranks": [0, 1]}'],
    "1: ranks: 2 ranks for 3 responses",
  ),
  (
    "rank_str.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", "c"], "ranks": [0, "1"]}'],
    "1: ranks[1]: expected an integer, got a string",
  ),
  (
    "rank_float.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", "c"], "ranks": [0.5, 1]}'],
    "1: ranks[0]: expected an integer, got a number",
  ),
  (
    "rank_bool.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", "c"], "ranks": [true, 0]}'],
    "1: ranks[0]: expected an integer, got a boolean",
  ),
  (
    "rank_negative.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", "c"], "ranks": [-1, 0]}'],
    "1: ranks[0]: negative rank -1 (0 is the best)",
  ),
  (
    "all_tied.jsonl",
    "comparisons",
    ['{"prompt": "a", "responses": ["b", "c"], "ranks": [1, 1]}'],
    "1: ranks: every response is tied; the record holds no comparison",
  ),
  (
    "hh_no_turn.jsonl",
    "comparisons",
    [json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"})],
    "1: chosen: no 'Assistant:' turn shared with rejected",
  ),
  (
    "hh_empty.jsonl",
    "comparisons",
    [json.dumps({"chosen": f"\n\nHuman: hi{T}", "rejected": f"\n\nHuman: hi{T} Hey"})],
    "1: chosen: empty response after the shared dialogue",
  ),
  ("hh_no_rejected.jsonl", "comparisons", [json.dumps({"chosen": f"\n\nHuman: hi{T} Hey"})], "1: rejected: missing"),
  ("prompt_kind.jsonl", "prompts", ['{"text": "a"}'], "1: prompt: missing"),
  ("text_kind.jsonl", "text", ['{"text": ["a"]}'], "1: text: expected a string, got a list"),
]


def write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def read_all(path, kind, **kwargs):
  return list(formats.read_records([path], kind, max_responses=3, **kwargs))


def assert_one_line_error(excinfo, expected):
  message = str(excinfo.value)
  assert message == expected
  assert "\n" not in message
  error = excinfo.value
  assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # no chained traceback


@pytest.mark.parametrize("name, kind, lines, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_gives_its_one_line_error(tmp_path, name, kind, lines, expected):
  path = write_lines(tmp_path / name, lines)
  with pytest.raises(formats.DataError) as excinfo:
    read_all(path, kind)
  assert_one_line_error(excinfo, f"{path}:{expected}")


def test_file_level_errors_are_one_line(tmp_path):
  bad_utf8 = tmp_path / "utf8.jsonl"
  bad_utf8.write_bytes(GOOD_DEMO.encode() + b'\n{"prompt": "caf\xe9", "response": "b"}\n')
  bad_gzip = tmp_path / "broken.jsonl.gz"
  bad_gzip.write_bytes(b"this is not gzip")
  truncated = tmp_path / "truncated.jsonl.gz"
  truncated.write_bytes(gzip.compress((GOOD_DEMO + "\n").encode() * 50)[:-30])
  wrong_ext = write_lines(tmp_path / "demos.csv", [GOOD_DEMO])
  bad_txt = tmp_path / "doc.txt"
  bad_txt.write_bytes(b"first line\nsecond \xff line\n")
  cases = [
    (str(bad_utf8), "demonstrations", f"{bad_utf8}:2: line: invalid UTF-8 (byte 0xe9 at column 16)"),
    (str(bad_gzip), "demonstrations", f"{bad_gzip}: file: not a readable gzip file (Not a gzipped file (b'th'))"),
    (
      str(truncated),
      "demonstrations",
      f"{truncated}: file: not a readable gzip file "
      "(Compressed file ended before the end-of-stream marker was reached)",
    ),
    (wrong_ext, "demonstrations", f"{wrong_ext}: file: expected a .jsonl or .jsonl.gz file"),
    (str(bad_txt), "text", f"{bad_txt}:2: text: invalid UTF-8 (byte 0xff at column 8)"),
  ]
  for path, kind, expected in cases:
    with pytest.raises(formats.DataError) as excinfo:
      read_all(path, kind)
    assert_one_line_error(excinfo, expected)
  with pytest.raises(formats.DataError) as excinfo:
    formats.expand(f"{tmp_path}/nothing_*.jsonl", what="data.train")
  assert_one_line_error(excinfo, f"{tmp_path}/nothing_*.jsonl: data.train: no file matches")
  with pytest.raises(formats.DataError) as excinfo:
    text.load_documents(str(bad_txt))  # the pretraining reader reports the same way
  assert str(excinfo.value) == cases[-1][2]


def test_over_long_and_empty_files_are_reported_by_the_build(tmp_path):
  tokenizer = tokenizer_lib.byte_tokenizer()
  demos = write_lines(tmp_path / "long.jsonl", [GOOD_DEMO, '{"prompt": "0123456789", "response": " abcdefghij"}'])
  comparisons = write_lines(
    tmp_path / "long_c.jsonl",
    [GOOD_COMPARISON, '{"prompt": "p", "responses": ["ok", "' + "z" * 30 + '"], "ranks": [1, 0]}'],
  )
  empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
  cases = [
    (
      "demonstrations",
      demos,
      f"{demos}:2: prompt: too long: prompt 10 + response 11 + EOS = 22 tokens, over the limit of 20; raise "
      "data.seq_len, or set data.truncate_prompt=left (keeps the prompt's last 8 tokens) or data.on_error=skip",
    ),
    (
      "comparisons",
      comparisons,
      f"{comparisons}:2: responses[1]: too long: prompt 1 + response 30 + EOS = 32 tokens, over the limit of 20, "
      "and the response alone (31 tokens) leaves no room for the prompt; raise data.seq_len or set data.on_error=skip",
    ),
    ("demonstrations", empty, f"{empty}: file: no valid records for split 'train'"),
  ]
  for kind, path, expected in cases:
    with pytest.raises(formats.DataError) as excinfo:
      tfds_builders.build(kind, {"train": path}, data_dir=str(tmp_path / "tfds"), tokenizer=tokenizer, max_tokens=20)
    assert_one_line_error(excinfo, expected)
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))  # nothing half-built


def test_malformed_corpus_has_at_least_twenty_files():
  assert len({name for name, *_ in MALFORMED}) >= 20  # plus the file-level and build cases above


def test_skip_mode_counts_skipped_records_and_prints_a_summary(tmp_path, capsys):
  lines = [GOOD_DEMO, '{"prompt": 1, "response": "x"}', "not json", GOOD_DEMO, '{"prompt": "a"}', GOOD_DEMO]
  path = write_lines(tmp_path / "mixed.jsonl", lines)
  report = formats.Report()
  records = read_all(path, "demonstrations", on_error="skip", report=report)
  assert [source for source, _ in records] == [f"{path}:1", f"{path}:4", f"{path}:6"]
  assert (report.records, report.skipped) == (3, 3)
  assert report.errors == [
    f"{path}:2: prompt: expected a string, got a number",
    f"{path}:3: line: malformed JSON (Expecting value at column 1)",
    f"{path}:5: response: missing",
  ]
  dataset = tfds_builders.build(
    "demonstrations",
    {"train": path},
    data_dir=str(tmp_path / "tfds"),
    tokenizer=tokenizer_lib.byte_tokenizer(),
    on_error="skip",
  )
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == "data: demonstrations/train: 3 records, 3 skipped (data.on_error=skip)"
  assert printed[1:] == [f"  {e}" for e in report.errors]
  assert len(dataset.source("train")) == 3
  with pytest.raises(formats.DataError, match="data.on_error: 'ignore' is not one of"):
    read_all(path, "demonstrations", on_error="ignore")


def test_report_lists_twenty_errors_and_counts_the_rest():
  report = formats.Report(records=1)
  for i in range(25):
    report.skip(f"f.jsonl:{i}: prompt: missing")
  lines = report.summary("demonstrations/train").splitlines()
  assert lines[0] == "data: demonstrations/train: 1 records, 25 skipped (data.on_error=skip)"
  assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 5 more"


# ----------------------------------------------------------------------------------------------------
# HH-RLHF
# ----------------------------------------------------------------------------------------------------


def test_hh_pair_splits_at_the_last_shared_assistant_turn():
  shared = f"\n\nHuman: Hi{T} Hello.\n\nHuman: Help me?{T}"
  record = formats.split_hh_pair(shared + " Sure.", shared + " No.")
  assert record == {"prompt": shared, "responses": [" Sure.", " No."], "ranks": [0, 1]}
  # A response that itself contains a later turn stays whole: the cut is inside the shared dialogue.
  record = formats.split_hh_pair(shared + " Yes. Human: more?" + T + " Ok.", shared + " No.")
  assert record["prompt"] == shared and record["responses"][0] == " Yes. Human: more?" + T + " Ok."


def test_identical_hh_responses_are_kept_counted_and_printed(tmp_path, capsys):
  pair = {"chosen": f"\n\nHuman: x{T} same", "rejected": f"\n\nHuman: x{T} same"}
  other = {"chosen": f"\n\nHuman: y{T} good", "rejected": f"\n\nHuman: y{T} bad"}
  path = write_lines(tmp_path / "hh.jsonl", [json.dumps(pair), json.dumps(other), json.dumps(pair)])
  dataset = tfds_builders.build(
    "comparisons", {"train": path}, data_dir=str(tmp_path / "tfds"), tokenizer=tokenizer_lib.byte_tokenizer()
  )
  assert dataset.reports["train"].identical_responses == 2 and len(dataset.source("train")) == 3
  assert capsys.readouterr().out == "data: comparisons/train: 3 records, 2 with identical responses (kept)\n"


def test_real_hh_rlhf_file_gives_2312_comparisons(shared_data, tmp_path):
  path = str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz")
  report = formats.Report()
  records = [record for _, record in formats.read_records([path], "comparisons", report=report)]
  assert len(records) == 2312 and report.records == 2312 and report.skipped == 0
  assert report.identical_responses == 0  # counted and reported; this file has none
  with gzip.open(path, "rt", encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  own_last_turn = 0
  for row, record in zip(raw, records):
    prompt, (chosen, rejected) = record["prompt"], record["responses"]
    assert prompt.endswith(T) and record["ranks"] == [0, 1]
    assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"]
    own_last_turn += row["chosen"].rfind(T) + len(T) == len(prompt) == row["rejected"].rfind(T) + len(T)
  # In all but 5 rows the shared prompt ends at both dialogues' own last Assistant turn; in those 5 a
  # response contains a further turn of its own.
  assert own_last_turn == 2312 - 5
  # Through TFDS to RM batches, held out as the RM trainer does: 2,000 to train on, 312 to evaluate.
  cfg = dict(train=path, data_dir=str(tmp_path), batch_size=2, seq_len=8192, max_responses=2, eval_examples=312)
  data = stage_data.build_comparison_data(cfg, tokenizer_lib.byte_tokenizer(), seed=0)
  assert len(data.train_source) == 2000 and len(data.eval_source) == 312
  assert data.reports["train"].records == 2312 and data.reports["train"].identical_responses == 0
  batch = next(data)
  assert batch["tokens"].shape == (2, 2, 8192) and batch["ranks"].tolist() == [[0, 1], [0, 1]]
