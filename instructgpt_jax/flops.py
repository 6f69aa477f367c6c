"""Model FLOPs of a training step and the peak FLOP rates they are measured against (MFU).

Model FLOPs utilization (Chowdhery et al. 2022, PaLM, Appendix B) is the throughput a step would have if
it did only the model's own matrix products, over the device's peak:

    MFU = tokens/s × (6N + 12·L·H·Q·T) / peak FLOP/s

per token: 6N for the forward (2N) and backward (4N) products with the N weights, plus 12·L·H·Q·T for the
attention scores and their weighted sums (L layers, H query heads of size Q, sequence length T; the
causal half is counted too, as PaLM does). Recomputation (remat), optimizer updates, norms and
activations are not model FLOPs: a step that recomputes its forward pass does more work at the same MFU.

N counts the parameters a token is multiplied by: every parameter except the lookup tables (the learned
position table, and the input embedding of an untied model; a tied embedding counts once, as the
unembedding). For GPT-2 124M that is 124.4M − 1024·768 = 123.7M.

Worked example, the "tiny" size (2 layers, d 64, 4 heads × 16, d_ff 256, vocabulary 320, max_len 256,
tied): each layer holds 64·192 + 192 (qkv) + 64·64 + 64 (out) + 2·64·256 + 256 + 64 (MLP) + 4·64 (norms)
= 49,984 parameters; N = 2·49,984 + 320·64 (unembedding) + 2·64 (final norm) = 120,576. At T = 128 a
token costs 6·120,576 + 12·2·4·16·128 = 723,456 + 196,608 = 920,064 FLOPs.
"""

from __future__ import annotations

from instructgpt_jax.models.sizes import ModelConfig, param_count_formula

# Dense (no structured sparsity) bf16 matrix-multiply peaks in TFLOP/s, from the vendors' datasheets,
# matched against jax's device_kind in this order (more specific names first).
PEAK_BF16_TFLOPS = (
  ("H200 NVL", 836.0),
  ("H200", 989.4),  # SXM
  ("H100 NVL", 835.0),
  ("H100 PCIe", 756.0),
  ("H100", 989.4),  # SXM, "NVIDIA H100 80GB HBM3"
  ("A100", 312.0),
  ("L4", 121.0),
  ("TPU v6 lite", 918.0),  # v6e
  ("TPU v5 lite", 197.0),  # v5e
  ("TPU v5", 459.0),  # v5p
  ("TPU v4", 275.0),
)


def matmul_params(cfg: ModelConfig) -> int:
  """N of the PaLM formula: the parameters a token is multiplied by (all but the lookup tables)."""
  lookup_tables = 0
  if cfg.learned_positions:
    lookup_tables += cfg.max_len * cfg.d_model
  if not cfg.tied_embeddings:
    lookup_tables += cfg.vocab_size * cfg.d_model  # the input embedding; the unembedding is a product
  return param_count_formula(cfg) - lookup_tables


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """6N + 12·L·H·Q·T: model FLOPs of one training token (forward and backward) at sequence length T."""
  return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """2N + 4·L·H·Q·T: the forward third of `train_flops_per_token` (scoring, prefill)."""
  return 2 * matmul_params(cfg) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of a known accelerator, else None (CPUs: measure, see benchmarks/train_step.py)."""
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None
