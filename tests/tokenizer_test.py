"""The tokenizer wrapper: byte-level round trips, special ids, and tokenizer.json files."""

import pytest

from instructgpt_jax import errors, train_tokenizer
from instructgpt_jax.data import tokenizer as tokenizer_lib


def test_byte_tokenizer_round_trips_any_text_one_token_per_byte():
  tok = tokenizer_lib.byte_tokenizer()
  text = "Héllo, wörld! 你好 🙂\n\ttabs <|endoftext|> literal"
  ids = tok.encode(text)
  assert len(ids) == len(text.encode("utf-8"))
  assert max(ids) < 256 and tok.decode(ids) == text  # special-token text in data stays plain bytes
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)


def test_from_file_finds_eos_and_pads_with_a_token_of_the_vocabulary(tmp_path):
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
  # No pad name, no unknown token, no other special token: the token of id 0 pads; no id past the vocabulary.
  assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (256, 0, 257)
  assert loaded.decode(loaded.encode("abc")) == "abc"
  # A HuggingFace folder's tokenizer_config.json names its specials: EOS <|im_end|>, and a pad equal to EOS is
  # replaced by the unknown token (as for SmolLM2-Instruct, whose pad_token is its EOS).
  bare.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  bare.save(str(path))
  (tmp_path / "tokenizer_config.json").write_text(
    '{"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": {"content": "<|endoftext|>"}, '
    '"bos_token": "<|im_start|>"}'
  )
  folder = tokenizer_lib.from_file(str(tmp_path))
  assert (folder.eos_id, folder.pad_id, folder.bos_id, folder.vocab_size) == (259, 257, 258, 260)
  assert tokenizer_lib.choose_pad(bare, "<|im_end|>") == "<|im_start|>"  # the last added special but EOS
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
  train_tokenizer.main([f"--corpus={tmp_path}/a.txt,{tmp_path}/b.jsonl", "--vocab_size=280", f"--out={out}"])
  loaded = tokenizer_lib.load(str(out))
  assert capsys.readouterr().out == f"tokenizer: {loaded.vocab_size} ids written to {out}\n"
  assert loaded.encode("hello") == [loaded.hf.token_to_id("hello")]  # a frequent word became one token


def test_the_tokenizer_follows_the_model_and_a_mismatched_one_is_one_line(tmp_path, caplog):
  """An hf: start without data.tokenizer takes the folder's own (its tokenizer_config.json specials), the run
  records it for the next stage, and a tokenizer with more ids than the model's vocabulary is refused."""
  import jax

  from configs import rm, sft
  from instructgpt_jax import models
  from instructgpt_jax.library import loop, model_io
  from instructgpt_jax.models import hf

  from runs import configured

  cfg = models.resolve({"size": "tiny"})
  _, params = models.init(cfg, jax.random.key(0))
  bpe = tokenizer_lib.train_bpe([f"word{i} and more words" for i in range(200)], vocab_size=cfg.vocab_size - 5)
  bpe.save(str(tmp_path / "bpe.json"))
  token_ids = {"eos_token_id": bpe.eos_id, "pad_token_id": bpe.pad_id}
  hf.export(str(tmp_path / "hf"), params, cfg, tokenizer=str(tmp_path / "bpe.json"), token_ids=token_ids)

  config = configured(sft, "tiny", **{"model.init_from": f"hf:{tmp_path / 'hf'}"})
  assert config.data.tokenizer == "" and config.model.resid_dropout == 0.2  # the paper's SFT dropout
  with caplog.at_level("WARNING"):
    setup = loop.setup(config, str(tmp_path / "sft"))
  # A pretrained model meets the GPT-3-from-scratch dropout: one warning naming the field and the remedy.
  warned = [r.getMessage() for r in caplog.records if "resid_dropout" in r.getMessage()]
  assert warned == [
    f"model.resid_dropout=0.2 on a pretrained model ({tmp_path / 'hf'}) that its authors may have trained "
    "without dropout; set --config.model.resid_dropout=0.0 unless you mean it"
  ]
  assert config.data.tokenizer == ""  # the config handed to the stage is left as it was
  assert setup.config.data.tokenizer == str(tmp_path / "hf")  # the run's own copy: config.json records it
  assert (setup.tokenizer.vocab_size, setup.tokenizer.eos_id, setup.tokenizer.pad_id) == (
    bpe.vocab_size,
    bpe.eos_id,
    bpe.pad_id,
  )
  loop.write_config(str(tmp_path / "sft"), setup.config)
  model_io.write_model_json(str(tmp_path / "sft"), "lm", cfg)
  source = model_io.Source("lm", cfg, str(tmp_path / "sft"), False, {"kind": "lm"}, step=1)
  assert model_io.tokenizer_of(source) == str(tmp_path / "hf")  # what the next stage inherits

  big = tokenizer_lib.train_bpe([f"token{i} " * 3 for i in range(2000)], vocab_size=cfg.vocab_size + 40)
  big.save(str(tmp_path / "big.json"))
  wrong = configured(
    rm, "tiny", **{"model.init_from": f"hf:{tmp_path / 'hf'}", "data.tokenizer": str(tmp_path / "big.json")}
  )
  with pytest.raises(errors.ConfigError) as caught:
    loop.setup(wrong, str(tmp_path / "rm"), kind="scalar")
  assert str(caught.value) == (
    f"data.tokenizer: {tmp_path / 'big.json'} has {big.vocab_size} ids, more than the model's vocabulary of "
    f"{cfg.vocab_size}; not this model's tokenizer? leave data.tokenizer empty to use the model's own"
  )
