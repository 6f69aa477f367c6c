"""The tokenizer wrapper: byte-level round trips, special ids, and tokenizer.json files."""

import pytest

from instructgpt_jax import errors
from instructgpt_jax.data import tokenizer as tokenizer_lib


def test_byte_tokenizer_round_trips_any_text_one_token_per_byte():
  tok = tokenizer_lib.byte_tokenizer()
  text = "Héllo, wörld! 你好 🙂\n\ttabs <|endoftext|> literal"
  ids = tok.encode(text)
  assert len(ids) == len(text.encode("utf-8"))
  assert max(ids) < 256 and tok.decode(ids) == text  # special-token text in data stays plain bytes
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)


def test_from_file_finds_eos_and_adds_a_distinct_pad(tmp_path):
  tok = tokenizer_lib.byte_tokenizer()
  hf = tok.hf
  path = tmp_path / "tokenizer.json"
  # A tokenizer.json with EOS but without a pad token.
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  bare = tokenizers.Tokenizer(
    models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord))}, merges=[])
  )
  bare.pre_tokenizer, bare.decoder = hf.pre_tokenizer, decoders.ByteLevel()
  bare.add_special_tokens(["</s>"])
  bare.save(str(path))
  loaded = tokenizer_lib.from_file(str(tmp_path))
  assert loaded.eos_id == 256 and loaded.pad_id == 257 and loaded.pad_id != loaded.eos_id
  assert loaded.decode(loaded.encode("abc")) == "abc"
  with pytest.raises(errors.ConfigError, match=r"^data.tokenizer: .*missing.json does not exist; give a tokenizer"):
    tokenizer_lib.from_file(str(tmp_path / "missing.json"))


def test_trained_bpe_round_trips_saves_and_loads(tmp_path):
  corpus = [f"The {w} sat on the mat near the {w}." for w in ("cat", "dog", "owl", "fox")] * 25
  tok = tokenizer_lib.train_bpe(corpus, vocab_size=300)
  # Specials, 256 bytes, then merges until 300 or no pair occurs twice (this corpus runs out first).
  assert (tok.eos_id, tok.pad_id) == (0, 1) and 258 + 10 < tok.vocab_size <= 300
  seen, unseen = "The cat sat on the mat.", "Ünseen wörds 🙂 <|endoftext|>"
  assert len(tok.encode(seen)) < len(seen.encode()) / 2  # merges learned from the corpus
  for text in (seen, unseen):  # the byte alphabet is always there: any text round-trips
    assert tok.decode(tok.encode(text)) == text
  assert tok.eos_id not in tok.encode(unseen)  # special-token text in data stays plain text
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  loaded = tokenizer_lib.load(str(path))
  assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, tok.vocab_size)
  assert loaded.encode(seen) == tok.encode(seen)
  with pytest.raises(ValueError, match="cannot hold 256 bytes and 2 special tokens"):
    tokenizer_lib.train_bpe(corpus, vocab_size=200)


def test_bpe_command_line_trains_on_a_local_corpus(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("hello world, hello tokens\n" * 40, encoding="utf-8")
  (tmp_path / "b.jsonl").write_text('{"text": "hello again"}\n' * 10, encoding="utf-8")
  out = tmp_path / "tok.json"
  tokenizer_lib.main([f"--corpus={tmp_path}/a.txt,{tmp_path}/b.jsonl", "--vocab_size=280", f"--out={out}"])
  loaded = tokenizer_lib.load(str(out))
  assert capsys.readouterr().out == f"tokenizer: {loaded.vocab_size} ids written to {out}\n"
  assert loaded.encode("hello") == [loaded.hf.token_to_id("hello")]  # a frequent word became one token
