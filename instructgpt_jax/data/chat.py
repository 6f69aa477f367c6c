"""A tokenizer folder's chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja),
rendered with jinja2 as transformers' `apply_chat_template` renders it, for `sample --chat` and `evaluate --chat`."""

from __future__ import annotations

from instructgpt_jax import errors, paths


def special_token(value) -> str | None:
  """A tokenizer_config.json special token: a string or {"content": string}."""
  return value.get("content") if isinstance(value, dict) else value


def template_of(folder: str) -> str | None:
  """The folder's chat template: tokenizer_config.json's `chat_template` or chat_template.jinja."""
  template = paths.read_json(paths.join(folder, "tokenizer_config.json"), {}).get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if template is None and paths.path(folder, "chat_template.jinja").exists():
    template = paths.read_text(paths.join(folder, "chat_template.jinja"))
  return template


_MARK = "CONTINUE_FINAL_MESSAGE_TAG "  # the sentinel transformers uses for continue_final_message


def render(
  folder: str,
  messages: list[dict],
  *,
  add_generation_prompt: bool = True,
  continue_final: bool = False,
  field: str = "--chat",
) -> str:
  """`messages` ([{"role", "content"}, ...]) in the folder's chat template, the assistant's turn opened when
  `add_generation_prompt`. `continue_final`: the text ends where the last message's content ends (its
  end-of-turn left out), so a model continues it: the content is marked, rendered, and the text cut at the
  mark (after trailing spaces the template trimmed), as transformers' `continue_final_message`. A folder
  without a template is a one-line UserError naming `field`."""
  template = template_of(folder)
  if template is None:
    raise errors.UserError(f"{field}: {folder} has no chat template (tokenizer_config.json or chat_template.jinja)")
  try:
    from jinja2 import sandbox
  except ImportError:
    raise errors.UserError(f"{field}: rendering a chat template needs jinja2 (pip install jinja2)") from None

  def raise_exception(message):
    raise errors.UserError(f"{field}: the chat template refused the messages: {message}")

  # The settings transformers renders chat templates with, so the text (and its ids) are the same.
  environment = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
  )
  environment.globals["raise_exception"] = raise_exception
  special = paths.read_json(paths.join(folder, "tokenizer_config.json"), {})
  if continue_final:
    messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _MARK}]
  text = environment.from_string(template).render(
    messages=messages,
    add_generation_prompt=add_generation_prompt,
    bos_token=special_token(special.get("bos_token")) or "",
    eos_token=special_token(special.get("eos_token")) or "",
  )
  if not continue_final:
    return text
  if _MARK.strip() not in text:
    raise errors.UserError(f"{field}: the chat template drops part of the last message; it cannot be continued")
  at = text.rindex(_MARK.strip())
  return text[:at] if text[at : at + len(_MARK)] == _MARK else text[:at].rstrip()
