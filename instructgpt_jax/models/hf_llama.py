"""The Llama family of HuggingFace as our family "llama": its config mapping and weight links.

  llama, mistral    (SmolLM and SmolLM2 are llama; Llama 3.x's RoPE scaling; a sliding window caps max_len)
  qwen2             qkv_bias=True (q/k/v projections with biases)
  qwen3             qk_norm=True  (per-head RMSNorm of queries and keys)

Exported as LlamaForCausalLM, or Qwen2 with qkv_bias, Qwen3 with qk_norm (and their ForSequenceClassification).
The tensor names are docs/hf.md's table.
"""

from __future__ import annotations

from typing import Any

from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models.hf_family import Family, Link, refuse, refuse_export, transposed
from instructgpt_jax.models.sizes import ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Llama 3.x's RoPE scaling: config.json's rope_scaling / rope_parameters keys -> our ModelConfig fields.
LLAMA3_ROPE_KEYS = {
  "factor": "rope_factor",
  "low_freq_factor": "rope_low_freq_factor",
  "high_freq_factor": "rope_high_freq_factor",
  "original_max_position_embeddings": "rope_original_max_len",
}


def fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  refuse(hf.get("hidden_act", "silu") != "silu", f"activation {hf.get('hidden_act')!r} (ours: SiLU)")
  refuse(hf.get("attention_bias", False), "attention_bias (an output-projection bias)")
  refuse(hf.get("mlp_bias", False), "mlp_bias")
  n_heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim") or d_model // n_heads
  kv_heads = hf.get("num_key_value_heads") or n_heads
  max_len = hf.get("max_position_embeddings", 2048)
  rope = _rope_fields(hf, max_len)
  # A sliding window changes nothing for sequences that fit in it: cap the length there.
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  if window and window < max_len:
    max_len = window
  return dict(
    family="llama",
    vocab_size=hf["vocab_size"],
    n_layers=hf["num_hidden_layers"],
    d_model=d_model,
    n_heads=n_heads,
    n_kv_heads=None if kv_heads == n_heads else kv_heads,
    d_head=None if head_dim * n_heads == d_model else head_dim,
    d_ff=hf["intermediate_size"],
    max_len=max_len,
    tied_embeddings=hf.get("tie_word_embeddings", False),
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    qkv_bias=hf["model_type"] == "qwen2",
    qk_norm=hf["model_type"] == "qwen3",
    **rope,
  )


def _rope_fields(hf, max_position_embeddings: int) -> dict[str, Any]:
  """rope_theta and the RoPE scaling fields of a llama-family config.json, read as transformers 5 reads them.

  transformers 4 wrote `rope_theta` and `rope_scaling`; 5 writes `rope_parameters` (theta included) and,
  given both, takes `rope_scaling` first. A theta inside the dict comes before a top-level one.
  """
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  refuse(any(isinstance(v, dict) for v in rope.values()), "RoPE parameters per layer type")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  refuse(partial != 1.0, f"partial_rotary_factor {partial} (ours rotates the whole head)")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  refuse(rope_type not in ("default", "llama3"), f"RoPE scaling {rope_type!r}")
  fields: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
  if rope_type == "llama3":
    # transformers 5 prefers a top-level original_max_position_embeddings, then the dict's, then the length.
    rope = {"original_max_position_embeddings": max_position_embeddings, **rope}
    if hf.get("original_max_position_embeddings") is not None:
      rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    missing = [key for key in LLAMA3_ROPE_KEYS if rope.get(key) is None]
    if missing:
      raise ConfigError(f"hf: RoPE scaling 'llama3' without {', '.join(missing)} in config.json")
    fields.update({ours: rope[key] for key, ours in LLAMA3_ROPE_KEYS.items()}, rope_scaling="llama3")
    fields["rope_original_max_len"] = int(fields["rope_original_max_len"])
    for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
      fields[name] = float(fields[name])
  return fields


def config_to_hf(cfg: ModelConfig, head: str | None) -> dict[str, Any]:
  """Qwen3 with qk_norm, Qwen2 with qkv_bias, else Llama."""
  refuse_export(cfg.qk_norm and cfg.qkv_bias, "q/k norms with q/k/v biases alone are no HF architecture")
  arch = "Qwen3" if cfg.qk_norm else "Qwen2" if cfg.qkv_bias else "Llama"
  out = dict(
    architectures=[arch + (head or "ForCausalLM")],
    model_type=arch.lower(),
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.d_ff,
    num_hidden_layers=cfg.n_layers,
    num_attention_heads=cfg.n_heads,
    num_key_value_heads=cfg.kv_heads,
    head_dim=cfg.head_dim,
    max_position_embeddings=cfg.max_len,
    rms_norm_eps=cfg.norm_eps,
    hidden_act="silu",
    attention_dropout=0.0,
    **_rope_config(cfg),
  )
  if cfg.qk_norm:
    out.update(attention_bias=False, use_sliding_window=False)
  elif cfg.qkv_bias:
    out.update(use_sliding_window=False)
  else:
    out.update(attention_bias=False, mlp_bias=False)
  return out


def _rope_config(cfg: ModelConfig) -> dict[str, Any]:
  """RoPE in config.json, in the spellings of transformers 4 (rope_theta, rope_scaling) and 5 (rope_parameters,
  theta included), so that readers of either (vLLM among them) agree."""
  scaling = {}
  if cfg.rope_scaling == "llama3":
    scaling = {"rope_type": "llama3", **{key: getattr(cfg, ours) for key, ours in LLAMA3_ROPE_KEYS.items()}}
  out = dict(
    rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **scaling}
  )
  if scaling:
    out["rope_scaling"] = scaling
  return out


def links(cfg: ModelConfig) -> list[Link]:
  """Llama / Mistral / Qwen2 / Qwen3. HF Linear weights are [out, in]; our kernels are [in, ...out]."""
  d, h = cfg.d_model, cfg.head_dim
  layer = "{p}layers.{i}."

  def projection(name, heads):  # HF [heads·H, D] <-> ours [D, heads, H]
    kernel = Link(
      ("layers", "attn", name, "kernel"),
      layer + f"self_attn.{name[0]}_proj.weight",
      lambda w: w.reshape(heads, h, d).transpose(2, 0, 1),
      lambda k: k.transpose(1, 2, 0).reshape(heads * h, d),
    )
    bias = Link(
      ("layers", "attn", name, "bias"),
      layer + f"self_attn.{name[0]}_proj.bias",
      lambda b: b.reshape(heads, h),
      lambda b: b.reshape(heads * h),
    )
    return [kernel, bias] if cfg.qkv_bias else [kernel]

  def mlp(name):
    return Link(("layers", "mlp", name, "kernel"), layer + f"mlp.{name}_proj.weight", transposed, transposed)

  qk_norms = [  # Qwen3: one [H] scale per layer for all query heads, one for all key heads
    Link(("layers", "attn", "query_norm", "scale"), layer + "self_attn.q_norm.weight"),
    Link(("layers", "attn", "key_norm", "scale"), layer + "self_attn.k_norm.weight"),
  ]
  return [
    Link(("embed", "embedding"), "{p}embed_tokens.weight"),
    Link(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight"),
    *projection("query", cfg.n_heads),
    *projection("key", cfg.kv_heads),
    *projection("value", cfg.kv_heads),
    *(qk_norms if cfg.qk_norm else []),
    Link(
      ("layers", "attn", "out", "kernel"),
      layer + "self_attn.o_proj.weight",
      lambda w: w.reshape(d, cfg.n_heads, h).transpose(1, 2, 0),  # [D, N·H] -> [N, H, D]
      lambda k: k.transpose(2, 0, 1).reshape(d, cfg.n_heads * h),
    ),
    Link(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight"),
    mlp("gate"),
    mlp("up"),
    mlp("down"),
    Link(("final_norm", "scale"), "{p}norm.weight"),
  ]


FAMILY = Family(
  name="llama",
  model_types=MODEL_TYPES,
  prefix="model.",
  fields_from_hf=fields_from_hf,
  config_to_hf=config_to_hf,
  links=links,
)
