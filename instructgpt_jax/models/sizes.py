"""Named model sizes and the resolved, hashable model configuration.

GPT-3 rows follow Brown et al. 2020, Table 2.1 (n_ctx 2048, d_ff = 4·d_model, vocabulary 50257, tied
embeddings). Two rows of that table cannot be built as printed (instructgpt_spec.md §6):
  * XL ("1.3B" in InstructGPT): 24 heads × 128 ≠ 2048. We use 16 heads × 128 (GPT-Neo-1.3B style).
  * 13B: d_model is printed as 5140; 40 heads × 128 = 5120, so 5140 is a typo and we use 5120.
InstructGPT's "6B" is the GPT-3 6.7B row. GPT-3's alternating locally-banded sparse attention is not
published in enough detail to reproduce; every layer here is dense (a documented deviation).

GPT-2 rows follow Radford et al. 2019 (n_ctx 1024). The tiny rows exist for CPU tests and demos.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from instructgpt_jax import errors


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a family's Transformer computes; the model reads these traits (ModelConfig's properties), never the
  family's name.

  positions: "learned" (a table of `max_len` position embeddings added to the token embeddings) or "rope"
    (rotary embeddings of queries and keys; no length limit in the parameters).
  norm: "layernorm" (scale and bias) or "rmsnorm" (scale).
  mlp: "gelu" (up, tanh GELU, down) or "swiglu" (silu(gate) * up, down).
  biases: every linear layer has a bias (else none, besides `ModelConfig.qkv_bias`).
  """

  positions: str
  norm: str
  mlp: str
  biases: bool


# The families, by name (a new family is a row here, a row of models/hf.py's FAMILIES, docs/hf.md).
ARCHITECTURES = {
  "gpt": Architecture(positions="learned", norm="layernorm", mlp="gelu", biases=True),  # GPT-2 / GPT-3
  "llama": Architecture(positions="rope", norm="rmsnorm", mlp="swiglu", biases=False),  # Llama, Mistral, Qwen
}
FAMILIES = tuple(ARCHITECTURES)
ROPE_SCALINGS = ("llama3",)  # besides None (plain RoPE)
LLAMA3_ROPE_FIELDS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "einsum", "cudnn", "splash")  # models/attention.py


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (Hu et al. 2021) on a layer's projections: the config's `model.lora` section.

  A targeted projection y = x·W (kernel W [*in, *out]) becomes y = x·W + (alpha / rank) · dropout(x)·A·B with
  A [*in, rank] and B [rank, *out] trained and W frozen (models/lora.py). rank 0: no adapters (the default).
  targets: a regular expression `re.fullmatch`ed against the path of each projection of a layer
    (`ModelConfig.projections`: attn/query, attn/key, attn/value, attn/out, mlp/gate (llama), mlp/up, mlp/down),
    whole: "attn/query" matches the query projection only, "attn/.*" every attention one, "query" nothing.
  The scale alpha / rank lets a run change the rank without retuning the learning rate (Hu et al. §4.1).
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0  # on the adapter's input x only; applied where a forward pass gets a dropout key (training)
  targets: str = "attn/.*|mlp/.*"  # every attention and MLP projection

  def __post_init__(self):
    """The checks that need no model shape (ModelConfig checks the targets and the rank against its projections)."""
    if not isinstance(self.rank, int) or self.rank < 0:
      raise errors.ConfigError(f"model.lora.rank: {self.rank!r} is not an integer >= 0 (0: no adapters)")
    if self.rank == 0:
      return
    if not self.alpha > 0:
      raise errors.ConfigError(f"model.lora.alpha: {self.alpha} must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise errors.ConfigError(f"model.lora.dropout: {self.dropout} is not in [0, 1)")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise errors.ConfigError(f"model.lora.targets: {self.targets!r} is not a regular expression ({e})") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def of(cls, value) -> LoraConfig:
    """A LoraConfig from the config's `model.lora` section (a ConfigDict or dict; a None field keeps its default)
    or from model.json's dict; None (a model.json written before LoRA existed) is the default, no adapters."""
    if value is None:
      return cls()
    if isinstance(value, cls):
      return value
    known = [f.name for f in dataclasses.fields(cls)]
    fields = {key: value[key] for key in value.keys() if value[key] is not None}
    for key in fields:
      if key not in known:
        raise errors.ConfigError(f"model.lora.{key}: not a LoRA field; known fields: {', '.join(known)}")
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything needed to build a decoder-only Transformer. Frozen, so it can be a static jit argument."""

  family: str  # "gpt": learned positions, LayerNorm, GELU, biases. "llama": RoPE, RMSNorm, SwiGLU, GQA.
  vocab_size: int
  n_layers: int
  d_model: int
  n_heads: int
  d_ff: int
  max_len: int
  n_kv_heads: int | None = None  # None: = n_heads (multi-head attention); 1: multi-query attention.
  d_head: int | None = None  # None: d_model // n_heads.
  tied_embeddings: bool = True
  qkv_bias: bool = False  # llama family: biases on the query/key/value projections (Qwen2). "gpt" always has them.
  qk_norm: bool = False  # llama family: RMSNorm over each head's query and key, before RoPE (Qwen3)
  rope_theta: float = 10_000.0
  # RoPE frequency scaling. None: plain RoPE. "llama3": Llama 3.1's scaling (transformer.rope_frequencies),
  # which needs the four fields below; they are None otherwise.
  rope_scaling: str | None = None
  rope_factor: float | None = None  # low frequencies are divided by this
  rope_low_freq_factor: float | None = None  # wavelengths above original_max_len / this are scaled
  rope_high_freq_factor: float | None = None  # wavelengths below original_max_len / this are kept
  rope_original_max_len: int | None = None  # the pretraining context (original_max_position_embeddings)
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # dtype of the stored (master) parameters
  resid_dropout: float = 0.0  # dropout on each residual branch output (GPT-2 resid_pdrop; SFT uses 0.2)
  remat: str = "none"  # one of REMAT_POLICIES
  scan_layers: bool = False  # stack layers and run them under lax.scan (fast compiles for deep models)
  # One of ATTENTION_IMPLS (models/attention.py). "auto": einsum on CPU, cuDNN on GPU, splash on TPU. None, as
  # configs saved before the field took names have it, means "auto".
  attention_impl: str | None = "auto"
  # Under a bfloat16 `dtype` (no effect in float32), the ops whose rounding made scoring and training disagree
  # on a real model (docs/ppo.md "bfloat16 parity"): attention probabilities stay float32 through P·V (the
  # "einsum" implementation only; the XLA path and the fused kernels round them to the compute dtype), and the
  # final norm and the unembedding run in float32.
  f32_attention_probs: bool = True
  f32_logits: bool = True
  # Low-rank adapters (LoraConfig; models/lora.py). Given as a LoraConfig, or as a dict (model.json, the config's
  # `model.lora` section), which __post_init__ turns into one.
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    object.__setattr__(self, "lora", LoraConfig.of(self.lora))  # frozen: the one field normalized on the way in
    if self.family not in FAMILIES:
      raise errors.ConfigError(f"model.family: {self.family!r} is not one of {FAMILIES}")
    if self.remat not in REMAT_POLICIES:
      raise errors.ConfigError(f"model.remat: {self.remat!r} is not one of {REMAT_POLICIES}")
    if self.attention_impl not in (None, *ATTENTION_IMPLS):
      raise errors.ConfigError(f"model.attention_impl: {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise errors.ConfigError(
        f"model.attention_impl: 'cudnn' needs model.dtype bfloat16 or float16, not {self.dtype}; use 'auto'"
      )
    if self.n_heads % self.kv_heads:
      raise errors.ConfigError(f"model.n_kv_heads: {self.kv_heads} does not divide n_heads={self.n_heads}")
    if self.d_head is None and self.d_model % self.n_heads:
      raise errors.ConfigError(f"model.n_heads: {self.n_heads} does not divide d_model={self.d_model}; set d_head")
    if self.rope and self.head_dim % 2:
      raise errors.ConfigError(f"model.d_head: RoPE needs an even head size, got {self.head_dim}")
    if self.qk_norm and not self.rope:  # norms of the queries and keys that RoPE then rotates
      raise errors.ConfigError("model.qk_norm: query/key norms exist in the llama family only")
    self._check_rope_scaling()
    if not 0.0 <= self.resid_dropout < 1.0:
      raise errors.ConfigError(f"model.resid_dropout: {self.resid_dropout} is not in [0, 1)")
    self._check_lora()

  def _check_rope_scaling(self) -> None:
    given = [name for name in LLAMA3_ROPE_FIELDS if getattr(self, name) is not None]
    if self.rope_scaling is None:
      if given:
        raise errors.ConfigError(f"model.{given[0]}: set only with model.rope_scaling (one of {ROPE_SCALINGS})")
      return
    if self.rope_scaling not in ROPE_SCALINGS:
      raise errors.ConfigError(f"model.rope_scaling: {self.rope_scaling!r} is not None or one of {ROPE_SCALINGS}")
    if not self.rope:
      raise errors.ConfigError("model.rope_scaling: RoPE exists in the llama family only")
    missing = [name for name in LLAMA3_ROPE_FIELDS if name not in given]
    if missing:
      raise errors.ConfigError(f"model.rope_scaling: {self.rope_scaling!r} needs model.{', model.'.join(missing)}")
    if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise errors.ConfigError(
        f"model.rope_high_freq_factor: {self.rope_high_freq_factor} must exceed rope_low_freq_factor "
        f"{self.rope_low_freq_factor} > 0"
      )
    if self.rope_factor <= 0 or self.rope_original_max_len <= 0:
      raise errors.ConfigError("model.rope_factor, model.rope_original_max_len: must be positive")

  def _check_lora(self) -> None:
    """The adapters against this model's projections (LoraConfig checked its own fields)."""
    lora = self.lora
    if lora.rank == 0:
      return
    if not self.lora_modules:
      raise errors.ConfigError(
        f"model.lora.targets: {lora.targets!r} matches none of this model's projections "
        f"({', '.join(self.projections)}; matched whole, with re.fullmatch); e.g. 'attn/.*|mlp/.*' for all"
      )
    for path in self.lora_modules:
      in_dims, out_dims = self.projections[path]
      smallest = min(math.prod(in_dims), math.prod(out_dims))
      if lora.rank > smallest:
        raise errors.ConfigError(
          f"model.lora.rank: {lora.rank} exceeds {smallest}, the smaller side of {path} "
          f"({'x'.join(map(str, in_dims))} -> {'x'.join(map(str, out_dims))}); lower model.lora.rank to "
          f"<= {smallest} or leave {path} out of model.lora.targets"
        )

  @property
  def projections(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each projection of a layer, by the path `model.lora.targets` matches -> (input dims, output dims) of its
    kernel [*in, *out] (transformer.py; the gpt family has no mlp/gate)."""
    d, n, k, h, ff = self.d_model, self.n_heads, self.kv_heads, self.head_dim, self.d_ff
    shapes = {
      "attn/query": ((d,), (n, h)),
      "attn/key": ((d,), (k, h)),
      "attn/value": ((d,), (k, h)),
      "attn/out": ((n, h), (d,)),
      "mlp/gate": ((d,), (ff,)),
      "mlp/up": ((d,), (ff,)),
      "mlp/down": ((ff,), (d,)),
    }
    if self.mlp != "swiglu":
      del shapes["mlp/gate"]
    return shapes

  @property
  def uses_dropout(self) -> bool:
    """Whether a training forward pass draws dropout masks: residual dropout, or the adapters' input dropout."""
    return self.resid_dropout > 0 or bool(self.lora_modules and self.lora.dropout > 0)

  @property
  def lora_modules(self) -> tuple[str, ...]:
    """The projections that carry adapters: those `model.lora.targets` matches whole; () with rank 0."""
    if self.lora.rank == 0:
      return ()
    return tuple(path for path in self.projections if re.fullmatch(self.lora.targets, path))

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  # The family's architecture (ARCHITECTURES), which the model, the FLOP count and the samplers read.
  @property
  def architecture(self) -> Architecture:
    return ARCHITECTURES[self.family]

  @property
  def learned_positions(self) -> bool:
    """A learned table of `max_len` position embeddings (gpt): a sequence longer than max_len cannot run."""
    return self.architecture.positions == "learned"

  @property
  def rope(self) -> bool:
    """Rotary position embeddings of queries and keys (llama)."""
    return self.architecture.positions == "rope"

  @property
  def norm(self) -> str:
    """The norm: "layernorm" (gpt) or "rmsnorm" (llama)."""
    return self.architecture.norm

  @property
  def mlp(self) -> str:
    """The MLP: "gelu" (gpt) or "swiglu" (llama)."""
    return self.architecture.mlp

  @property
  def biases(self) -> bool:
    """Every linear layer has a bias (gpt); else none, besides the q/k/v biases of `qkv_bias`."""
    return self.architecture.biases

  def positions_fit(self, length: int) -> bool:
    """Whether a sequence of `length` tokens has a position embedding for each token: always with RoPE, up to
    `max_len` with learned positions. (Samplers ask with prompt + new tokens - 1: the last token is not fed back.)"""
    return not self.learned_positions or length <= self.max_len


def _gpt(n_layers, d_model, n_heads, d_head=None, *, max_len=2048, vocab_size=50257):
  return dict(
    family="gpt",
    n_layers=n_layers,
    d_model=d_model,
    n_heads=n_heads,
    d_head=d_head,
    d_ff=4 * d_model,
    max_len=max_len,
    vocab_size=vocab_size,
    tied_embeddings=True,
  )


SIZES: dict[str, dict[str, Any]] = {
  # GPT-3 (Brown et al. 2020, Table 2.1).
  "gpt3-125m": _gpt(12, 768, 12),
  "gpt3-350m": _gpt(24, 1024, 16),
  "gpt3-760m": _gpt(24, 1536, 16),
  "gpt3-1.3b": _gpt(24, 2048, 16),  # the paper prints 24 heads × 128; see the module docstring
  "gpt3-2.7b": _gpt(32, 2560, 32),
  "gpt3-6.7b": _gpt(32, 4096, 32),
  "gpt3-13b": _gpt(40, 5120, 40),  # the paper prints d_model 5140; see the module docstring
  "gpt3-175b": _gpt(96, 12288, 96),
  # GPT-2 (Radford et al. 2019).
  "gpt2-124m": _gpt(12, 768, 12, max_len=1024),
  "gpt2-355m": _gpt(24, 1024, 16, max_len=1024),
  "gpt2-774m": _gpt(36, 1280, 20, max_len=1024),
  "gpt2-1.5b": _gpt(48, 1600, 25, max_len=1024),
  # Llama family: SmolLM2-135M (HuggingFaceTB/SmolLM2-135M, a small real pretrained Llama).
  "smollm2-135m": dict(
    family="llama",
    n_layers=30,
    d_model=576,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    max_len=8192,
    vocab_size=49152,
    tied_embeddings=True,
    rope_theta=100_000.0,
  ),
  # CPU sizes for tests and the embedded demo. Vocabulary 320 holds the byte tokenizer's 259 ids.
  "tiny": _gpt(2, 64, 4, max_len=256, vocab_size=320),
  "tiny-llama": dict(
    family="llama",
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    d_ff=192,
    max_len=256,
    vocab_size=320,
    tied_embeddings=False,
  ),
  "mini": _gpt(6, 384, 6, max_len=512, vocab_size=320),  # about 10M parameters
  "mini-llama": dict(
    family="llama",
    n_layers=6,
    d_model=384,
    n_heads=6,
    n_kv_heads=2,
    d_ff=1024,
    max_len=512,
    vocab_size=320,
    tied_embeddings=False,
  ),
}

# The names InstructGPT uses for its three policy sizes.
ALIASES = {
  "1.3b": "gpt3-1.3b",
  "6b": "gpt3-6.7b",
  "6.7b": "gpt3-6.7b",
  "175b": "gpt3-175b",
  "125m": "gpt3-125m",
  "124m": "gpt2-124m",
}


def paper_value_lr(size: str) -> float:
  """PPO's value-function lr by the policy's size (paper App. C.4): 5e-6 for the 175B policy, 9e-6 for 1.3B and
  6B (and, our choice, for every other size)."""
  return 5e-6 if ALIASES.get(size, size) == "gpt3-175b" else 9e-6


def size_names() -> list[str]:
  return sorted(SIZES) + sorted(ALIASES)


def lookup(name: str) -> dict[str, Any]:
  """The field dict of a named size (aliases resolved). Raises a one-line error naming the choices."""
  key = ALIASES.get(name, name)
  if key not in SIZES:
    raise errors.ConfigError(f"model.size: unknown size {name!r}; choose one of {', '.join(size_names())}")
  return dict(SIZES[key])


def resolve(model_cfg: Mapping[str, Any]) -> ModelConfig:
  """Turns a config's `model` section into a ModelConfig.

  `model.size` picks a row of SIZES; every other field that is set (not None) overrides that row, so
  `--config.model.n_layers=4` or `--config.model.dtype=bfloat16` work on top of any size.
  """
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  values = lookup(model_cfg["size"]) if model_cfg.get("size") else {}
  for key, value in model_cfg.items():
    if key in ("size", "init_from", "init_from_step") or value is None:  # where the weights come from (the stages)
      continue
    if key not in fields:
      raise errors.ConfigError(f"model.{key}: not a model field; known fields: {', '.join(sorted(fields))}")
    values[key] = value
  missing = [
    f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING and f.name not in values
  ]
  if missing:
    raise errors.ConfigError(f"model: set model.size or the fields {', '.join(missing)}")
  return ModelConfig(**values)


def param_count_formula(cfg: ModelConfig) -> int:
  """Closed-form parameter count (docs/paper.md §6: 12·d² + 13·d per GPT layer, plus embeddings), for checks."""
  d, h, kv, ff = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.d_ff
  mlp_kernels = 3 if cfg.mlp == "swiglu" else 2  # gate, up, down / up, down
  norm = 2 * d if cfg.norm == "layernorm" else d  # scale and bias / scale
  per_layer = d * (h + 2 * kv) + h * d + mlp_kernels * d * ff + 2 * norm
  per_layer += h + 2 * kv if cfg.biases or cfg.qkv_bias else 0
  per_layer += d + (mlp_kernels - 1) * ff + d if cfg.biases else 0  # the output projection's, the MLP's
  per_layer += 2 * cfg.head_dim if cfg.qk_norm else 0
  extra = norm + (cfg.max_len * d if cfg.learned_positions else 0)  # the final norm, learned positions
  unembed = 0 if cfg.tied_embeddings else d * cfg.vocab_size
  return cfg.n_layers * per_layer + cfg.vocab_size * d + unembed + extra
