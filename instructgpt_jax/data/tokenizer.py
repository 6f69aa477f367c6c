"""Tokenizers: one wrapper over HuggingFace `tokenizers`, for a `tokenizer.json` or the byte-level vocabulary.

The padding id is always distinct from EOS (spec §8 row 2): a tokenizer without a pad token gets one
appended after its vocabulary. Padding ids never reach an embedding lookup (the model replaces them), so
a pad id at or past the model's vocabulary size is harmless.
"""

from __future__ import annotations

import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
DEFAULT_EOS, DEFAULT_PAD = "<|endoftext|>", "<|pad|>"


class Tokenizer:
  """Text <-> ids with explicit special ids.

  `encode` never produces a special id: the text "<|endoftext|>" inside a document is encoded as plain
  text, so data cannot forge an EOS or a pad. Special ids are appended by the code that builds batches.
  """

  def __init__(
    self, hf: tokenizers.Tokenizer, *, eos_token: str, pad_token: str, bos_token: str | None = None, name: str = ""
  ):
    self.hf = hf
    self.hf.encode_special_tokens = True
    self.name = name
    missing = [t for t in (eos_token, pad_token) if hf.token_to_id(t) is None]
    if eos_token in missing:
      raise ValueError(f"tokenizer {name}: EOS token {eos_token!r} is not in the vocabulary")
    if pad_token in missing:
      hf.add_special_tokens([pad_token])
    self.eos_id = hf.token_to_id(eos_token)
    self.pad_id = hf.token_to_id(pad_token)
    self.bos_id = hf.token_to_id(bos_token) if bos_token else None
    if self.pad_id == self.eos_id:
      raise ValueError(f"tokenizer {name}: the pad token must differ from EOS ({eos_token!r})")

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included (the largest id + 1)."""
    return self.hf.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, path: str) -> None:
    self.hf.save(path)


def byte_tokenizer() -> Tokenizer:
  """256 byte ids (GPT-2's byte-to-character table) plus <|endoftext|> (256) and <|pad|> (257).

  A BPE with no merges over the byte-level alphabet: every UTF-8 byte is one token, so any text
  round-trips exactly. Training merges on a corpus (data issue) turns it into a real BPE.
  """
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
  hf = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  hf.decoder = decoders.ByteLevel()
  hf.add_special_tokens([DEFAULT_EOS, DEFAULT_PAD])
  return Tokenizer(hf, eos_token=DEFAULT_EOS, pad_token=DEFAULT_PAD, name="bytes")


def _first_present(hf: tokenizers.Tokenizer, candidates) -> str | None:
  return next((t for t in candidates if hf.token_to_id(t) is not None), None)


def from_file(
  path: str, *, eos_token: str | None = None, pad_token: str | None = None, bos_token: str | None = None
) -> Tokenizer:
  """Loads a `tokenizer.json` (or a folder holding one). Special tokens default to the usual names."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer: {path} does not exist")
  hf = tokenizers.Tokenizer.from_file(path)
  eos = eos_token or _first_present(hf, EOS_CANDIDATES)
  if eos is None:
    raise ValueError(f"{path}: no EOS token found among {EOS_CANDIDATES}; set data.eos_token")
  return Tokenizer(
    hf,
    eos_token=eos,
    pad_token=pad_token or _first_present(hf, PAD_CANDIDATES) or DEFAULT_PAD,
    bos_token=bos_token or _first_present(hf, BOS_CANDIDATES),
    name=path,
  )


def load(spec: str) -> Tokenizer:
  """ "bytes" for the byte-level tokenizer, else a path to a tokenizer.json or a folder with one."""
  return byte_tokenizer() if spec == "bytes" else from_file(spec)
