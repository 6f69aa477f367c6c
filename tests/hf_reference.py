"""The transformers side of tests/hf_test.py, run in the reference venv (torch + transformers), never imported
by the tests: they run it as a subprocess and read the .npz files it writes.

  hf_reference.py build OUT             tiny random models (OUT/<name>/) and their logits on ragged batches
  hf_reference.py evaluate SPEC.json    logits (or sequence-classifier scores) of model folders we exported
  hf_reference.py smollm2 PATH SPEC.json OUT.npz
                                        SmolLM2's prompt ids, logits and greedy continuations
  hf_reference.py special FOLDER OUT.json [FOLDER OUT.json ...]
                                        folders we exported, each loaded whole: its token ids as the config,
                                        the generation config and the tokenizer see them, a chat rendering

Every model runs in float32 in eval mode. Position ids are passed explicitly as cumsum(mask) - 1, the
positions a left-padded row needs (transformers counts positions from the first column otherwise).
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

VOCAB = 96
PAD = VOCAB - 1  # the pad id of the batches; real tokens are drawn below it
# Llama 3.x's RoPE scaling with a pretraining context of 32 and head size 16: wavelengths 2π·10⁴^(i/8) put
# i = 0 below 32/4 (kept), i = 1 between 32/4 and 32/1 (interpolated) and i >= 2 above 32 (divided by 8).
LLAMA3_ROPE = dict(
  rope_type="llama3",
  rope_theta=1e4,
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=32,
)
LONG_MODELS = ("llama3_rope",)  # also scored on a batch longer than the pretraining context (LONG_LENGTHS)
LONG_LENGTHS = (48, 20, 35)


def tiny_configs():
  """name -> transformers config: GPT-2 tied and untied; Llama with GQA (untied) and with multi-query
  attention and a head size other than d_model / n_heads (tied); Qwen2 (q/k/v biases); Mistral; Llama 3.x
  (RoPE scaling, GQA, untied); Qwen3 (q/k norms, GQA, head size 24 given explicitly, tied)."""
  llama = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128)
  llama.update(rms_norm_eps=1e-5, vocab_size=VOCAB)
  gpt2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
  return {
    "gpt2_tied": transformers.GPT2Config(**gpt2, tie_word_embeddings=True),
    "gpt2_untied": transformers.GPT2Config(**gpt2, tie_word_embeddings=False),
    "llama_gqa_untied": transformers.LlamaConfig(
      **{**llama, "vocab_size": 320}, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0
    ),
    "llama_mqa_tied": transformers.LlamaConfig(
      **llama, num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True
    ),
    "qwen2_bias": transformers.Qwen2Config(**llama, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4),
    "mistral": transformers.MistralConfig(**llama, num_attention_heads=4, num_key_value_heads=2, sliding_window=4096),
    "llama3_rope": transformers.LlamaConfig(
      **llama, num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE)
    ),
    "qwen3_gqa": transformers.Qwen3Config(
      **llama, num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, rope_theta=1e4
    ),
  }


def randomize(model, seed):
  """Every parameter random, biases and norm scales included (transformers starts those at 0 and 1, which
  would hide a misplaced bias or scale), scaled so that activations and logits are of order 1."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim >= 2:
        p.copy_(0.15 * noise)
      elif "norm" in name or "ln_" in name:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)


def ragged_batches(seed, vocab, long=False):
  """{"right": (tokens, mask), "left": (tokens, mask)}: 3 rows of 11, 4 and 7 real tokens; with `long`,
  also "long": right-padded rows of LONG_LENGTHS real tokens."""
  rng = np.random.default_rng(seed)
  out = {}
  for side in ("right", "left", "long") if long else ("right", "left"):
    lengths = LONG_LENGTHS if side == "long" else (11, 4, 7)
    width = max(lengths)
    tokens = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
      real = slice(width - n, width) if side == "left" else slice(0, n)
      tokens[row, real] = rng.integers(0, min(vocab, VOCAB) - 1, n)
      mask[row, real] = 1
    out[side] = (tokens, mask)
  return out


def forward(model, tokens, mask):
  positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(tokens),
      attention_mask=torch.from_numpy(mask),
      position_ids=torch.from_numpy(positions),
    )
  return out.logits.float().numpy()


def build(out_dir):
  for seed, (name, config) in enumerate(tiny_configs().items()):
    config.pad_token_id = PAD
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed)
    folder = os.path.join(out_dir, name)
    model.save_pretrained(folder)
    arrays = {}
    for side, (tokens, mask) in ragged_batches(seed, config.vocab_size, long=name in LONG_MODELS).items():
      arrays[f"{side}_tokens"], arrays[f"{side}_mask"] = tokens, mask
      arrays[f"{side}_logits"] = forward(model, tokens, mask)
    np.savez(os.path.join(folder, "reference.npz"), **arrays)


def evaluate(spec_path):
  """spec: [{"folder", "kind", "batch" (an .npz with tokens and mask), "out", "text" (optional)}]."""
  with open(spec_path) as f:
    spec = json.load(f)
  for item in spec:
    scalar = item["kind"] == "scalar"
    auto = transformers.AutoModelForSequenceClassification if scalar else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(item["folder"], dtype=torch.float32).eval()
    batch = np.load(item["batch"])
    arrays = {"logits": forward(model, batch["tokens"], batch["mask"])}
    if "text" in item:  # the exported tokenizer, as transformers loads it
      tokenizer = transformers.AutoTokenizer.from_pretrained(item["folder"])
      arrays["text_ids"] = np.asarray(tokenizer(item["text"], add_special_tokens=False)["input_ids"])
      arrays["eos_id"] = np.asarray(tokenizer.eos_token_id)
    np.savez(item["out"], **arrays)


def smollm2(path, spec_path, out_path):
  """spec: {"chat": [prompts], "raw": [prompts], "new_tokens": N}. Writes, per prompt k: prompt_k (ids),
  logits_k [T, V] over the prompt, and greedy_k (the greedy continuation, up to N tokens)."""
  with open(spec_path) as f:
    spec = json.load(f)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  prompts = [
    tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
    for p in spec["chat"]
  ]
  ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
  ids += [tokenizer(p)["input_ids"] for p in spec["raw"]]
  arrays = {}
  for k, prompt in enumerate(ids):
    tokens = torch.tensor([prompt])
    with torch.no_grad():
      arrays[f"logits_{k}"] = model(tokens).logits[0].float().numpy()
      generated = model.generate(
        tokens,
        attention_mask=torch.ones_like(tokens),
        do_sample=False,
        max_new_tokens=spec["new_tokens"],
        pad_token_id=tokenizer.pad_token_id,
      )
    arrays[f"prompt_{k}"] = np.asarray(prompt)
    arrays[f"greedy_{k}"] = generated[0, len(prompt) :].numpy()
  arrays["eos_id"] = np.asarray(tokenizer.eos_token_id)
  np.savez(out_path, **arrays)


def special(*folders_and_outs):
  for folder, out_path in zip(folders_and_outs[::2], folders_and_outs[1::2]):
    special_tokens(folder, out_path)


def special_tokens(folder, out_path):
  """The token ids of an exported folder as transformers loads it whole (model, generation config and
  tokenizer), the tokenizer's special tokens, and the chat template rendered around one user message."""
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  generation = transformers.GenerationConfig.from_pretrained(folder)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  with torch.no_grad():  # the pad id, if any, indexes the embedding
    logits = model(torch.tensor([[1, 2, 3]])).logits
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
  result = {
    "config": {k: getattr(model.config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    "generation": {k: getattr(generation, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    "tokenizer": {
      "eos_token": tokenizer.eos_token,
      "eos_token_id": tokenizer.eos_token_id,
      "pad_token_id": tokenizer.pad_token_id,
    },
    "embedding_rows": model.get_input_embeddings().weight.shape[0],
    "finite": bool(torch.isfinite(logits).all()),
    "chat": chat,
  }
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  torch.set_num_threads(2)
  command, *args = sys.argv[1:]
  {"build": build, "evaluate": evaluate, "smollm2": smollm2, "special": special}[command](*args)
