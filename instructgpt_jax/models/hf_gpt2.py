"""The GPT-2 family of HuggingFace (`model_type` gpt2) as our family "gpt": its config mapping and weight links.

GPT2LMHeadModel and GPT2ForSequenceClassification; tanh GELU only. The tensor names are docs/hf.md's table.
"""

from __future__ import annotations

from typing import Any

from instructgpt_jax.models.hf_family import Family, Link, refuse, refuse_export
from instructgpt_jax.models.sizes import ModelConfig


def fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  activation = hf.get("activation_function", "gelu_new")
  refuse(activation not in ("gelu_new", "gelu_pytorch_tanh"), f"activation {activation!r} (ours: tanh GELU)")
  refuse(hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx")
  refuse(not hf.get("scale_attn_weights", True), "scale_attn_weights=False")
  d_model = hf["n_embd"]
  return dict(
    family="gpt",
    vocab_size=hf["vocab_size"],
    n_layers=hf["n_layer"],
    d_model=d_model,
    n_heads=hf["n_head"],
    d_ff=hf.get("n_inner") or 4 * d_model,
    max_len=hf["n_positions"],
    tied_embeddings=hf.get("tie_word_embeddings", True),
    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
  )


def config_to_hf(cfg: ModelConfig, head: str | None) -> dict[str, Any]:
  refuse_export(cfg.kv_heads != cfg.n_heads, "GPT-2 has no grouped-query attention")
  refuse_export(cfg.head_dim * cfg.n_heads != cfg.d_model, "GPT-2's head size is d_model / n_heads")
  return dict(
    architectures=["GPT2" + (head or "LMHeadModel")],
    model_type="gpt2",
    vocab_size=cfg.vocab_size,
    n_positions=cfg.max_len,
    n_embd=cfg.d_model,
    n_layer=cfg.n_layers,
    n_head=cfg.n_heads,
    n_inner=cfg.d_ff,
    activation_function="gelu_new",
    layer_norm_epsilon=cfg.norm_eps,
    scale_attn_weights=True,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
  )


def links(cfg: ModelConfig) -> list[Link]:
  """GPT-2. Its Conv1D weights are already [in, out]; c_attn holds [q | k | v] along the output axis."""
  d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
  layer = "{p}h.{i}."

  def qkv(j, name):
    kernel = Link(
      ("layers", "attn", name, "kernel"),
      layer + "attn.c_attn.weight",
      lambda w: w[:, j * d : (j + 1) * d].reshape(d, n, h),
      lambda k: k.reshape(d, n * h),
    )
    bias = Link(
      ("layers", "attn", name, "bias"),
      layer + "attn.c_attn.bias",
      lambda b: b[j * d : (j + 1) * d].reshape(n, h),
      lambda b: b.reshape(n * h),
    )
    return kernel, bias

  def norm(ours, hf):
    return [Link((*ours, "scale"), hf + ".weight"), Link((*ours, "bias"), hf + ".bias")]

  (q, q_bias), (k, k_bias), (v, v_bias) = qkv(0, "query"), qkv(1, "key"), qkv(2, "value")
  return [
    Link(("embed", "embedding"), "{p}wte.weight"),
    Link(("pos_embed", "embedding"), "{p}wpe.weight"),
    *norm(("layers", "attn_norm"), layer + "ln_1"),
    q,
    k,
    v,
    q_bias,
    k_bias,
    v_bias,
    Link(
      ("layers", "attn", "out", "kernel"),
      layer + "attn.c_proj.weight",
      lambda w: w.reshape(n, h, d),
      lambda k: k.reshape(n * h, d),
    ),
    Link(("layers", "attn", "out", "bias"), layer + "attn.c_proj.bias"),
    *norm(("layers", "mlp_norm"), layer + "ln_2"),
    Link(("layers", "mlp", "up", "kernel"), layer + "mlp.c_fc.weight"),
    Link(("layers", "mlp", "up", "bias"), layer + "mlp.c_fc.bias"),
    Link(("layers", "mlp", "down", "kernel"), layer + "mlp.c_proj.weight"),
    Link(("layers", "mlp", "down", "bias"), layer + "mlp.c_proj.bias"),
    *norm(("final_norm",), "{p}ln_f"),
  ]


FAMILY = Family(
  name="gpt",
  model_types=("gpt2",),
  prefix="transformer.",
  fields_from_hf=fields_from_hf,
  config_to_hf=config_to_hf,
  links=links,
)
