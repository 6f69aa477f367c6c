"""The transformers side of tests/hf_test.py, run in the reference venv (torch + transformers), never imported
by the tests: they run it as a subprocess and read the .npz files it writes.

  hf_reference.py build OUT             tiny random models (OUT/<name>/) and their logits on ragged batches
  hf_reference.py evaluate SPEC.json    logits (or sequence-classifier scores) of model folders we exported
  hf_reference.py smollm2 PATH SPEC.json OUT.npz
                                        SmolLM2's prompt ids, logits and greedy continuations

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


def tiny_configs():
  """name -> transformers config: GPT-2 tied and untied; Llama with GQA (untied) and with multi-query
  attention and a head size other than d_model / n_heads (tied); Qwen2 (q/k/v biases); Mistral."""
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


def ragged_batches(seed, vocab):
  """{"right": (tokens, mask), "left": (tokens, mask)}: 3 rows of 11, 4 and 7 real tokens."""
  rng = np.random.default_rng(seed)
  lengths, width = (11, 4, 7), 11
  out = {}
  for side in ("right", "left"):
    tokens = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
      real = slice(0, n) if side == "right" else slice(width - n, width)
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
    for side, (tokens, mask) in ragged_batches(seed, config.vocab_size).items():
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


if __name__ == "__main__":
  torch.set_num_threads(2)
  command, *args = sys.argv[1:]
  {"build": build, "evaluate": evaluate, "smollm2": smollm2}[command](*args)
