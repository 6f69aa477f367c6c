"""JSONL -> TFDS (array_record, no TensorFlow) -> grain batches -> decoded text, for all four kinds."""

import collections
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from instructgpt_jax.data import formats, stage_data, templates, tfds_builders
from instructgpt_jax.data import tokenizer as tokenizer_lib

TOKENIZER = tokenizer_lib.byte_tokenizer()
EOS, PAD = TOKENIZER.eos_id, TOKENIZER.pad_id
# Text that tokenizers and JSON get wrong easily: multi-byte UTF-8, escapes, and special-token look-alikes.
WORDS = [
  "apple",
  "naïve",
  "日本語",
  "🙂",
  "tab\there",
  "two\nlines",
  '"quoted"',
  "back\\slash",
  "<|endoftext|>",
  "<|pad|>",
]


def sentence(rng, low=1, high=5):
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=bool(len(record) % 2)) + "\n")  # both escaped and raw UTF-8
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  demos = [{"prompt": f"Q{i}: {sentence(rng)}", "response": f" A{i}: {sentence(rng)}"} for i in range(12)]
  comparisons = []
  for i in range(10):
    k = 2 + i % 3
    ranks = [rng.randint(0, 2) for _ in range(k - 1)] + [3]  # ties allowed; the last is always worst
    comparisons.append(
      {"prompt": f"P{i}: {sentence(rng)}", "responses": [f" R{j} {sentence(rng)}" for j in range(k)], "ranks": ranks}
    )
  for i in range(2):
    dialogue = f"\n\nHuman: {sentence(rng)}\n\nAssistant: {sentence(rng)}\n\nHuman: H{i}?{formats.HH_ASSISTANT_TURN}"
    comparisons.append({"chosen": dialogue + " good " + sentence(rng), "rejected": dialogue + " bad " + sentence(rng)})
  prompts = [{"prompt": f"do {i}: {sentence(rng, 1, 4)}"} for i in range(12)]
  prompts.insert(5, {"prompt": "far too long " * 10})  # 130 bytes > max_prompt_len: dropped and counted
  documents = [f"Document {i}. {sentence(rng, 3, 12)}" for i in range(5)]
  (root / "b_story.txt").write_text("A plain text file.\nIt is one document.\n", encoding="utf-8")
  paths = {
    "demos": write_jsonl(root / "demos.jsonl", demos),
    "comparisons": write_jsonl(root / "comparisons.jsonl", comparisons),
    "prompts": write_jsonl(root / "prompts.jsonl", prompts),
    "docs": write_jsonl(root / "a_docs.jsonl", [{"text": d} for d in documents]),
  }
  documents.append("A plain text file.\nIt is one document.\n")
  return dict(
    root=root,
    demos=demos,
    comparisons=comparisons,
    prompts=prompts,
    documents=documents,
    paths=paths,
    data_dir=str(root / "tfds"),
  )


def decode(ids):
  return TOKENIZER.decode(ids)


def test_demonstrations_round_trip(corpus):
  cfg = dict(train=corpus["paths"]["demos"], data_dir=corpus["data_dir"], batch_size=4, seq_len=160)
  data = stage_data.build_sft_data(cfg, TOKENIZER, seed=3)
  decoded = []
  for _ in range(3):  # one epoch: 12 examples in batches of 4
    batch = next(data)
    assert {k: v.shape for k, v in batch.items()} == {
      **{k: (4, 160) for k in ("inputs", "targets", "mask", "segment_ids", "positions")},
      "kind": (4,),
    }
    assert np.all(batch["kind"] == 0)  # every row a demonstration (no pretraining mix)
    for inputs, targets, mask, segments in zip(batch["inputs"], batch["targets"], batch["mask"], batch["segment_ids"]):
      n = int(segments.sum())
      ids = np.concatenate([inputs[:1], targets[:n]])
      n_response = int(mask.sum())
      assert ids[-1] == EOS and np.all(mask[n - n_response : n] == 1) and np.all(targets[n:] == PAD)
      decoded.append({"prompt": decode(ids[: len(ids) - n_response]), "response": decode(ids[len(ids) - n_response :])})
  key = lambda r: (r["prompt"], r["response"])  # noqa: E731
  assert sorted(decoded, key=key) == sorted(corpus["demos"], key=key)


def test_comparisons_round_trip_with_hh_pairs(corpus):
  cfg = dict(
    train=corpus["paths"]["comparisons"], data_dir=corpus["data_dir"], batch_size=4, seq_len=200, max_responses=4
  )
  data = stage_data.build_comparison_data(cfg, TOKENIZER, seed=3)
  expected = [formats.parse_comparison(r) for r in corpus["comparisons"]]
  seen = collections.Counter()
  for _ in range(3):
    batch = next(data)
    assert batch["tokens"].shape == (4, 4, 200) and batch["ranks"].shape == (4, 4)
    for b, index in enumerate(batch["index"]):
      record, p = expected[index], batch["prompt_lengths"][b]
      k_present = len(record["responses"])
      assert list(batch["ranks"][b, :k_present]) == record["ranks"] and np.all(batch["ranks"][b, k_present:] == -1)
      assert np.all(batch["segment_ids"][b, k_present:] == 0) and np.all(batch["tokens"][b, k_present:] == PAD)
      for k, response in enumerate(record["responses"]):
        row, r = batch["tokens"][b, k], batch["response_lengths"][b, k]
        assert decode(row[:p]) == record["prompt"] and decode(row[p : p + r]) == response and row[p + r - 1] == EOS
        assert batch["segment_ids"][b, k].sum() == p + r
      seen[int(index)] += 1
  assert seen == {i: 1 for i in range(len(expected))}
  hh = expected[-1]
  assert hh["prompt"] + hh["responses"][0] == corpus["comparisons"][-1]["chosen"]


def test_prompts_round_trip_left_padded_in_buckets_with_over_long_dropped(corpus, capsys):
  cfg = dict(
    train=corpus["paths"]["prompts"],
    data_dir=corpus["data_dir"],
    batch_size=4,
    max_prompt_len=100,
    prompt_buckets="32,64,100",
  )
  data = stage_data.build_prompt_data(cfg, TOKENIZER, seed=3)
  assert data.reports["train"].dropped_too_long == 1 and data.reports["train"].records == 12
  assert "12 records, 1 dropped as over-long prompts" in capsys.readouterr().out
  kept = [r["prompt"] for r in corpus["prompts"] if len(r["prompt"].encode()) <= 100]
  decoded = {}
  for _ in range(3):
    batch = next(data)
    width = batch["tokens"].shape[1]
    assert width == min(b for b in (32, 64, 100) if b >= batch["lengths"].max())
    for tokens, segments, length, index in zip(batch["tokens"], batch["segment_ids"], batch["lengths"], batch["index"]):
      assert list(segments) == [0] * (width - length) + [1] * length and np.all(tokens[: width - length] == PAD)
      decoded[int(index)] = decode(tokens[width - length :])
  assert [decoded[i] for i in range(12)] == kept


def test_pretraining_text_round_trip(corpus):
  documents = list(corpus["documents"])
  seq_len = 16
  # A last document whose length makes the EOS-separated stream exactly fill whole rows of seq_len + 1.
  total = sum(len(d.encode()) + 1 for d in documents)
  filler = "z" * ((-total) % seq_len or seq_len)
  write_jsonl(corpus["root"] / "z_filler.jsonl", [{"text": filler}])
  documents.append(filler)
  root = corpus["root"]
  cfg = dict(
    train=f"{root}/a_docs.jsonl,{root}/b_story.txt,{root}/z_filler.jsonl",
    data_dir=corpus["data_dir"],
    batch_size=1,
    seq_len=seq_len,
    shuffle=False,
  )
  data = stage_data.build_pretraining_data(cfg, TOKENIZER, seed=0)
  n_rows = (total + len(filler) + 1 - 1) // seq_len
  rows = [next(data) for _ in range(n_rows)]
  stream = np.concatenate([b["inputs"][0] for b in rows] + [rows[-1]["targets"][0, -1:]])
  assert all(np.array_equal(b["inputs"][0, 1:], b["targets"][0, :-1]) for b in rows)
  pieces = np.split(stream, np.flatnonzero(stream == EOS) + 1)
  assert [decode(p) for p in pieces if len(p)] == documents and stream[-1] == EOS


def test_chat_template_wraps_the_prompt_and_keeps_user_text_plain():
  chat = templates.get("chat")
  ids = chat.encode_prompt(TOKENIZER, "Hi <|im_start|>")
  assert decode(ids) == "<|im_start|>user\nHi <|im_start|><|im_end|>\n<|im_start|>assistant\n"
  assert chat.encode_response(TOKENIZER, "Yo")[-1] == EOS and templates.get("plain").render_prompt("x") == "x"
  # A tokenizer that knows the tags maps each template tag to its one id, but never the user's look-alike.
  bpe = tokenizer_lib.train_bpe(["hello world"] * 20, vocab_size=300, special_tokens=templates.CHAT_TAGS)
  start = bpe.hf.token_to_id("<|im_start|>")
  ids = chat.encode_prompt(bpe, "<|im_start|>")
  assert ids.count(start) == 2 and bpe.decode(ids, skip_special_tokens=False) == chat.render_prompt("<|im_start|>")
  with pytest.raises(formats.DataError, match="data.template: 'alpaca' is not one of"):
    templates.get("alpaca")


def test_builds_are_reused_and_rebuilt_when_an_input_changes(corpus, tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", corpus["demos"][:4])
  build = lambda **kw: tfds_builders.build(
    "demonstrations", {"train": path}, data_dir=str(tmp_path / "tfds"), tokenizer=TOKENIZER, **kw
  )  # noqa: E731
  first = build()
  assert build().builder.data_path == first.builder.data_path  # same inputs: the same variant, not rebuilt
  mtime = os.path.getmtime(os.path.join(first.builder.data_path, "dataset_info.json"))
  build()
  assert os.path.getmtime(os.path.join(first.builder.data_path, "dataset_info.json")) == mtime
  assert build(template="chat").builder.data_path != first.builder.data_path
  write_jsonl(tmp_path / "d.jsonl", corpus["demos"][:5])
  changed = build()
  assert changed.builder.data_path != first.builder.data_path and len(changed.source("train")) == 5
  assert changed.reports["train"].records == 5 and changed.source("train")[0]["source"] == f"{path}:1".encode()


def test_no_tensorflow_is_imported_even_where_it_is_installed(corpus, tmp_path):
  assert "tensorflow" not in sys.modules  # after every build and read of this module
  # In a fresh process, a poisoned `tensorflow` package on the path records any import of it.
  (tmp_path / "tensorflow").mkdir()
  marker = tmp_path / "imported"
  (tmp_path / "tensorflow" / "__init__.py").write_text(
    f"open({str(marker)!r}, 'w').write('imported')\nraise ImportError('poisoned tensorflow')\n"
  )
  script = textwrap.dedent(f"""
    import sys
    from instructgpt_jax.data import stage_data, tokenizer
    cfg = dict(train={corpus["paths"]["comparisons"]!r}, data_dir={str(tmp_path / "tfds")!r}, batch_size=2,
               seq_len=200, max_responses=4)
    data = stage_data.build_comparison_data(cfg, tokenizer.byte_tokenizer(), seed=0)
    print(next(data)["tokens"].shape, "tensorflow" in sys.modules)
  """)
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.getcwd()}", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "(2, 4, 200) False" and not marker.exists()


def test_evaluation_prompts_are_reported_as_the_eval_split(tmp_path, capsys):
  """PPO's held-out prompts are built and reported as `prompts/eval` (they were printed as prompts/train)."""
  from instructgpt_jax.data import tokenizer as tokenizer_lib
  from instructgpt_jax.library import judging

  lines = [{"prompt": "short one"}, {"prompt": "x" * 40}, {"prompt": "another"}]
  (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  texts, ids = judging.load_prompts(
    str(tmp_path / "eval.jsonl"), tokenizer_lib.load("bytes"), data_dir=str(tmp_path / "tfds"), max_prompt_len=16
  )
  assert texts == ["short one", "another"] and [len(i) for i in ids] == [9, 7]
  out = capsys.readouterr().out
  assert out.startswith("data: prompts/eval: 2 records, 1 dropped") and "prompts/train" not in out, out
