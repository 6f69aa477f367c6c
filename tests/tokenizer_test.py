"""The tokenizer wrapper: byte-level round trips, special ids, and tokenizer.json files."""

import pytest

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
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.from_file(str(tmp_path / "missing.json"))
