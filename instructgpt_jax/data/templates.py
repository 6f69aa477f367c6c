"""Prompt templates: how a prompt and a response become token ids.

* "plain" (the default, the paper's format): the prompt's tokens, then the response's tokens, then EOS.
  There is no chat template in InstructGPT; the prompt is the raw text the user typed and the response is
  its continuation (docs/paper.md §7.1).
* "chat": ChatML's role tags around the prompt, for chat models:

      <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{response}<EOS>

  A tag that is a token of the tokenizer (as in ChatML tokenizers) becomes that one id; otherwise it is
  encoded as plain text (e.g. by the byte-level tokenizer). The response ends with the tokenizer's EOS, so
  for a ChatML model set the EOS token to <|im_end|> (`tokenizer.from_file(..., eos_token="<|im_end|>")`).

The prompt and the response are encoded separately and concatenated, so a prompt has the same ids whatever
its response: the K responses of a comparison share their prompt's ids exactly. User text can never produce
a special id (see `Tokenizer.encode`); only a template's own tags can.
"""

from __future__ import annotations

import dataclasses
import re

from instructgpt_jax.data.formats import DataError
from instructgpt_jax.data.tokenizer import Tokenizer

CHAT_TAGS = ("<|im_start|>", "<|im_end|>")
_TAG_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in CHAT_TAGS) + ")")


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt format with one "{prompt}" slot; the response follows it directly."""

  name: str
  prompt_format: str

  def render_prompt(self, prompt: str) -> str:
    """The prompt as text, tags included (what `encode_prompt` encodes)."""
    before, after = self.prompt_format.split("{prompt}")
    return before + prompt + after

  def encode_prompt(self, tokenizer: Tokenizer, prompt: str) -> list[int]:
    before, after = self.prompt_format.split("{prompt}")
    return _encode_tagged(tokenizer, before) + tokenizer.encode(prompt) + _encode_tagged(tokenizer, after)

  def encode_response(self, tokenizer: Tokenizer, response: str, *, append_eos: bool = True) -> list[int]:
    """The response's ids, followed by EOS (docs/paper.md §3.3: the policy learns to stop) unless append_eos=False."""
    return tokenizer.encode(response) + ([tokenizer.eos_id] if append_eos else [])


def _encode_tagged(tokenizer: Tokenizer, text: str) -> list[int]:
  """Template text: each tag the vocabulary holds becomes its id, the rest is encoded as text."""
  ids = []
  for piece in _TAG_PATTERN.split(text):
    tag_id = tokenizer.hf.token_to_id(piece) if piece in CHAT_TAGS else None
    if tag_id is not None:
      ids.append(tag_id)
    elif piece:
      ids.extend(tokenizer.encode(piece))
  return ids


TEMPLATES = {
  "plain": Template("plain", "{prompt}"),
  "chat": Template("chat", "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"),
}


def get(name: str) -> Template:
  if name not in TEMPLATES:
    raise DataError(f"data.template: {name!r} is not one of {tuple(TEMPLATES)}")
  return TEMPLATES[name]
