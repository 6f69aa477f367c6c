"""Tokenizers: one wrapper over HuggingFace `tokenizers`, for a `tokenizer.json` or the byte-level vocabulary,
and training a small byte-level BPE on a local corpus (`train_bpe`; its command is
instructgpt_jax/train_tokenizer.py).

The padding id is always distinct from EOS (docs/paper.md §8 row 2) and always a token the vocabulary
already has, so that every id fits the model's embedding and an exported config names a real pad token.
Padding is only filler (masks and segment ids say what is real), so any token but EOS serves; see
`choose_pad` for the order in which one is chosen.

A HuggingFace tokenizer folder (tokenizer.json beside tokenizer_config.json) gives its own special tokens:
tokenizer_config.json's eos_token (what the model's generation stops at, e.g. <|im_end|> for a chat
model), bos_token, pad_token and unk_token.
"""

from __future__ import annotations

from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from instructgpt_jax import errors, paths

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
    for role, token in (("EOS", eos_token), ("pad", pad_token)):
      if hf.token_to_id(token) is None:
        raise errors.ConfigError(f"tokenizer {name}: its {role} token {token!r} is not in the vocabulary")
    self.eos_id = hf.token_to_id(eos_token)
    self.pad_id = hf.token_to_id(pad_token)
    self.bos_id = hf.token_to_id(bos_token) if bos_token else None
    if self.pad_id == self.eos_id:
      raise errors.ConfigError(f"tokenizer {name}: the pad token must differ from EOS ({eos_token!r})")

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
    paths.write_text(path, self.hf.to_str(pretty=True))


def byte_tokenizer() -> Tokenizer:
  """256 byte ids (GPT-2's byte-to-character table) plus <|endoftext|> (256) and <|pad|> (257).

  A BPE with no merges over the byte-level alphabet: every UTF-8 byte is one token, so any text
  round-trips exactly. `train_bpe` learns merges on a corpus for a real BPE.
  """
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
  hf = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  hf.decoder = decoders.ByteLevel()
  hf.add_special_tokens([DEFAULT_EOS, DEFAULT_PAD])
  return Tokenizer(hf, eos_token=DEFAULT_EOS, pad_token=DEFAULT_PAD, name="bytes")


def train_bpe(
  texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2, special_tokens: Iterable[str] = ()
) -> Tokenizer:
  """A byte-level BPE (GPT-2 style) trained on `texts`: <|endoftext|> is id 0, <|pad|> id 1, then any extra
  `special_tokens` (e.g. the chat template's tags), the 256 byte symbols and the learned merges.

  The byte alphabet is always in the vocabulary, so any text encodes and decodes exactly, even characters
  the corpus never showed.
  """
  specials = [DEFAULT_EOS, DEFAULT_PAD, *(t for t in special_tokens if t not in (DEFAULT_EOS, DEFAULT_PAD))]
  if vocab_size < len(specials) + 256:
    raise ValueError(f"tokenizer: vocab_size {vocab_size} cannot hold 256 bytes and {len(specials)} special tokens")
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=specials,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  hf.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(hf, eos_token=DEFAULT_EOS, pad_token=DEFAULT_PAD, name=f"bpe{vocab_size}")


def _first_present(hf: tokenizers.Tokenizer, candidates) -> str | None:
  return next((t for t in candidates if hf.token_to_id(t) is not None), None)


def _special_token(value) -> str | None:
  """A tokenizer_config.json special token: a string, or {"content": string}."""
  return value.get("content") if isinstance(value, dict) else value


def folder_special_tokens(folder: str) -> dict[str, str]:
  """{"eos_token", "bos_token", "pad_token", "unk_token"} that a HuggingFace folder's tokenizer_config.json
  names (those it names)."""
  config = paths.read_json(paths.join(folder, "tokenizer_config.json"), {})
  out = {k: _special_token(config.get(k)) for k in ("eos_token", "bos_token", "pad_token", "unk_token")}
  return {k: v for k, v in out.items() if v}


def choose_pad(hf: tokenizers.Tokenizer, eos: str, *, configured: str | None = None, unk: str | None = None) -> str:
  """A token of the vocabulary to pad with, never EOS: the configured pad token, else a usual pad name, else
  the unknown token, else the last added special token that is not EOS, else the token of id 0 (or 1)."""
  added = [token.content for _, token in sorted(hf.get_added_tokens_decoder().items(), reverse=True)]
  for candidate in (configured, *PAD_CANDIDATES, unk, *added):
    if candidate and candidate != eos and hf.token_to_id(candidate) is not None:
      return candidate
  return next(hf.id_to_token(i) for i in (0, 1) if hf.id_to_token(i) != eos)


def from_file(
  path: str, *, eos_token: str | None = None, pad_token: str | None = None, bos_token: str | None = None
) -> Tokenizer:
  """Loads a `tokenizer.json`, or a folder holding one (local or gs://): a HuggingFace folder's
  tokenizer_config.json names its special tokens; otherwise they default to the usual names. The pad token
  is one the vocabulary has (`choose_pad`)."""
  specials = {}
  if paths.path(path).is_dir():
    specials = folder_special_tokens(path)
    path = paths.join(path, "tokenizer.json")
  if not paths.path(path).exists():
    raise errors.ConfigError(
      f"data.tokenizer: {path} does not exist; give a tokenizer.json, a folder holding one, or 'bytes'"
    )
  hf = tokenizers.Tokenizer.from_str(paths.read_text(path))
  eos = eos_token or specials.get("eos_token") or _first_present(hf, EOS_CANDIDATES)
  if eos is None:
    raise errors.DataError(f"{path}: no EOS token among {EOS_CANDIDATES}; add one to the tokenizer as a special token")
  pad = choose_pad(hf, eos, configured=pad_token or specials.get("pad_token"), unk=specials.get("unk_token"))
  return Tokenizer(
    hf,
    eos_token=eos,
    pad_token=pad,
    bos_token=bos_token or specials.get("bos_token") or _first_present(hf, BOS_CANDIDATES),
    name=path,
  )


def save_to(tokenizer: Tokenizer, path: str) -> str:
  """Writes `tokenizer` as a tokenizer.json at `path`; returns the path."""
  tokenizer.save(path)
  return path


def load(spec: str) -> Tokenizer:
  """ "bytes" for the byte-level tokenizer, else a path to a tokenizer.json or a folder with one."""
  return byte_tokenizer() if spec == "bytes" else from_file(spec)
