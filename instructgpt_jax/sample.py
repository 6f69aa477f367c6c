"""Sample a completion on the command line, printing each token as soon as it is drawn.

    python -m instructgpt_jax.sample --init_from=hf:/models/SmolLM2-135M-Instruct --chat --greedy \\
        --prompt "What is the capital of France?" --max_new_tokens 64
    python -m instructgpt_jax.sample --checkpoint=/runs/ppo --prompt "Explain the moon landing." --temperature 0.7

`--init_from` takes what `model.init_from` takes (hf:PATH, a run's workdir, an exported model directory);
`--checkpoint DIR` names one of our own run workdirs or exported model directories. A PPO workdir gives the
EMA of its policy (the paper's model, and what its export holds); `--raw_policy` the optimizer's weights.
An SFT workdir gives its selected checkpoint (selected.json), else its newest.

Prompts. A HuggingFace model gets the prompt as transformers would give it: `tokenizer(prompt)` (with the
tokenizer's own special tokens, e.g. a BOS), or with `--chat` the folder's chat template (tokenizer_config.json's
`chat_template` or chat_template.jinja, rendered with jinja2) around one user message. One of our
checkpoints gets the prompt in the format its run trained on (config.json's `data.template`; `--chat`
forces the "chat" template), encoded with the run's tokenizer (`--tokenizer` overrides it).

Streaming: a Python loop over generation.py's `first_tokens` and `sample_step`, jitted (the functions
`generation.generate` runs before and inside its lax.while_loop, with the same per-step keys
fold_in(seed, t)), so the tokens are those `generate` would return, printed as they come. The completion
stops at EOS (any of the model's EOS ids) or after --max_new_tokens tokens; only the completion is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import tokenizers
from flax import nnx

from instructgpt_jax import errors, generation, paths, sharding
from instructgpt_jax.data import chat, templates
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import model_io


def stream_tokens(
  graphdef,
  params,
  prompt: list[int],
  rng: jax.Array,
  *,
  settings: generation.SamplingSettings,
  max_new_tokens: int,
  mesh,
) -> Iterator[int]:
  """Yields up to max_new_tokens sampled token ids, one per jitted step (EOS included; the caller stops).

  The cache has the P + max_new_tokens - 1 slots `generation.generate` gives it (`generation.cache_length_for`),
  and step t draws with fold_in(rng, t), so the ids are generate's for a batch of this one prompt.
  """
  rules = sharding.DEFAULT_RULES
  cache_length = generation.cache_length_for(len(prompt), max_new_tokens)

  def prefill_and_draw(params, tokens, rng):
    model = nnx.merge(graphdef, params)
    token, _, cache = generation.first_tokens(
      model, tokens, jnp.ones_like(tokens), rng, settings=settings, cache_length=cache_length
    )
    return token, cache

  def decode_and_draw(params, token, cache, rng, t):
    model = nnx.merge(graphdef, params)
    token, _, cache = generation.sample_step(model, token, jnp.ones_like(token), cache, rng, t, settings=settings)
    return token, cache

  prefill_and_draw = jax.jit(sharding.traced_with_rules(prefill_and_draw, mesh, rules))
  decode_and_draw = jax.jit(sharding.traced_with_rules(decode_and_draw, mesh, rules), donate_argnums=(2,))
  token, cache = prefill_and_draw(params, jnp.asarray([prompt], jnp.int32), rng)
  for t in range(1, max_new_tokens + 1):
    yield int(token[0])
    if t < max_new_tokens:  # t is traced: one compiled step for every position
      token, cache = decode_and_draw(params, token, cache, rng, jnp.int32(t))


# ------------------------------------------------------------------------------------------ prompts


def _read_json(path: str) -> dict:
  return paths.read_json(path, {})


def render_chat(folder: str, prompt: str) -> str:
  """One user message in the folder's chat template, with the assistant's turn opened."""
  return chat.render(folder, [{"role": "user", "content": prompt}])


def hf_prompt_ids(folder: str, prompt: str, *, chat: bool) -> list[int]:
  """The prompt's ids as transformers makes them from the tokenizer folder: `tokenizer(prompt)`, or the
  rendered chat template tokenized with its special tokens recognized and nothing added (as
  apply_chat_template does)."""
  raw = tokenizers.Tokenizer.from_str(paths.read_text(paths.join(folder, "tokenizer.json")))
  if chat:
    return raw.encode(render_chat(folder, prompt), add_special_tokens=False).ids
  return raw.encode(prompt).ids


def _hf_eos_ids(folder: str) -> set[int]:
  """The EOS ids generation stops at: generation_config.json's, else config.json's (an id or a list)."""
  for name in ("generation_config.json", "config.json"):
    eos = _read_json(paths.join(folder, name)).get("eos_token_id")
    if eos is not None:
      return set(eos) if isinstance(eos, list) else {eos}
  return set()


def _run_config(path: str) -> dict:
  """config.json of the run that wrote `path` (a workdir, or an export directory inside one)."""
  for folder in (paths.path(path), paths.path(path).parent):
    config = _read_json(folder / "config.json")
    if "data" in config:
      return config
  return {}


# ------------------------------------------------------------------------------------------ command line


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Sample a completion, streaming it as it is generated.")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--init_from", help="hf:PATH, a run's workdir or an exported model (as model.init_from)")
  which.add_argument("--checkpoint", help="one of our run workdirs or exported model directories")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--greedy", action="store_true", help="take the most likely token at every step")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0, help="0: off")
  parser.add_argument("--top_p", type=float, default=1.0, help="1: off")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
  parser.add_argument("--tokenizer", help="HF models: a tokenizer folder; our runs: a tokenizer.json or 'bytes'")
  parser.add_argument("--raw_policy", action="store_true", help="a PPO workdir: the raw policy, not its EMA")
  args = parser.parse_args(argv)
  try:
    sample(args)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def sample(args: argparse.Namespace) -> list[int]:
  """Prints the completion as it is generated; returns its token ids (EOS excluded)."""
  if args.max_new_tokens < 1:
    raise errors.UserError(f"--max_new_tokens: {args.max_new_tokens} must be at least 1")
  field = "--init_from" if args.init_from else "--checkpoint"
  source = model_io.read_source(args.init_from or args.checkpoint, field, ema=not getattr(args, "raw_policy", False))
  if source.kind != "lm":
    raise errors.UserError(f"{source.path}: a {source.kind} model has no tokens to sample (kind lm needed)")
  is_hf = source.metadata.get("format") == model_io.HF_FORMAT
  if is_hf:
    folder = args.tokenizer or source.path
    folder = folder if paths.path(folder).is_dir() else os.fspath(paths.path(folder).parent)
    if not paths.path(folder, "tokenizer.json").exists():
      raise errors.UserError(f"{folder} holds no tokenizer.json; pass --tokenizer=FOLDER")
    tokenizer_config = _read_json(paths.join(folder, "tokenizer_config.json"))
    eos_ids = _hf_eos_ids(source.path)
    eos_token = chat.special_token(tokenizer_config.get("eos_token"))
    tokenizer = tokenizer_lib.from_file(folder, eos_token=eos_token)
    prompt = hf_prompt_ids(folder, args.prompt, chat=args.chat)
  else:
    run_data = _run_config(source.path).get("data", {})
    tokenizer = tokenizer_lib.load(args.tokenizer or model_io.tokenizer_of(source, "--tokenizer"))
    eos_ids = set()
    template = templates.get("chat" if args.chat else run_data.get("template", "plain"))
    prompt = template.encode_prompt(tokenizer, args.prompt)
  eos_ids.add(tokenizer.eos_id)

  cfg = source.config
  if not cfg.positions_fit(len(prompt) + args.max_new_tokens - 1):
    raise errors.UserError(
      f"--max_new_tokens: the prompt ({len(prompt)} tokens) and {args.max_new_tokens} new tokens exceed the "
      f"model's {cfg.max_len} positions"
    )
  settings = generation.SamplingSettings(
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    greedy=args.greedy,
  )
  mesh = sharding.make_mesh({"fsdp": -1})  # the parameters spread over every local device
  graphdef, params = model_io.load_frozen(source, "lm", mesh, sharding.DEFAULT_RULES, seed=args.seed)

  completion: list[int] = []
  printed = ""
  tokens = stream_tokens(
    graphdef,
    params,
    prompt,
    jax.random.PRNGKey(args.seed),
    settings=settings,
    max_new_tokens=args.max_new_tokens,
    mesh=mesh,
  )
  for token in tokens:
    if token in eos_ids:
      break
    completion.append(token)
    text = tokenizer.decode(completion)
    if not text.endswith("\ufffd"):  # a character cut between tokens: print it once it is whole
      print(text[len(printed) :], end="", flush=True)
      printed = text
  print(tokenizer.decode(completion)[len(printed) :], flush=True)
  return completion


if __name__ == "__main__":
  main()
