"""Pretraining: next-token prediction on plain text (later also the ptx data of PPO-ptx).

The default is the CPU demo: a ~10M-parameter GPT on the generated world prose (no download; about
three minutes on two cores).
    python -m instructgpt_jax.main --config=configs/pretrain.py --workdir=/tmp/pretrain
The test variant (a 2-layer model, 200 steps):
    python -m instructgpt_jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/pretrain_tiny
A GPT-3 size on your own text files (learning rate and token batch from GPT-3 Table 2.1):
    python -m instructgpt_jax.main --config=configs/pretrain.py:size=1.3b \
        --config.data.corpus='/data/text/*.txt' --config.data.tokenizer=/models/gpt2/tokenizer.json \
        --config.mesh.fsdp=8 --workdir=gs://bucket/pretrain_1.3b
"""

import ml_collections

from configs import common
from instructgpt_jax import config_lib
from instructgpt_jax.models import sizes

# GPT-3 pretraining learning rate and batch size in tokens (Brown et al. 2020, Table 2.1).
GPT3_LR_AND_BATCH = {
  "gpt3-125m": (6.0e-4, 0.5e6),
  "gpt3-350m": (3.0e-4, 0.5e6),
  "gpt3-760m": (2.5e-4, 0.5e6),
  "gpt3-1.3b": (2.0e-4, 1e6),
  "gpt3-2.7b": (1.6e-4, 1e6),
  "gpt3-6.7b": (1.2e-4, 2e6),
  "gpt3-13b": (1.0e-4, 2e6),
  "gpt3-175b": (0.6e-4, 3.2e6),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="", tiny=False)
  # Three kinds of run: the CPU demo (no argument), the test variant (`tiny`), a named size (`size=...`).
  size = "tiny" if a.tiny else a.size or "mini"
  # bfloat16 compute with float32 parameters, except in the CPU demo: CPUs emulate bfloat16 matmuls
  # slowly. The tiny test variant keeps bfloat16 so that the tests exercise mixed precision.
  demo = not a.tiny and not a.size
  c = common.run_config(
    stage="pretrain",
    size=size,
    total_steps=200,
    checkpoint_every_steps=100,
    log_every_steps=10,
    dtype="float32" if demo else "bfloat16",
    param_dtype="float32",
  )
  c.data = ml_collections.ConfigDict(
    dict(
      corpus="lab",  # "lab": the generated world prose; else comma-separated globs of .txt / .jsonl files
      lab_documents=4000,
      tokenizer="",  # "": the model's own (model.init_from's), else "bytes"; or a tokenizer.json / HF folder
      seq_len=128,
      batch_size=16,  # global batch, in sequences
      eval_fraction=0.02,  # the last 2% of sequences are held out for evaluation
      eval_batches=4,
    )
  )
  c.optim = common.optim_config(lr=1e-3, warmup_steps=20, weight_decay=0.1)

  gpt3 = GPT3_LR_AND_BATCH.get(sizes.ALIASES.get(size, size))
  if gpt3:
    lr, batch_tokens = gpt3
    c.data.corpus = ""  # required: the GPT-3 sizes train on the user's text
    c.data.seq_len = 2048
    c.data.batch_size = int(batch_tokens // 2048)
    c.total_steps = 100_000
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.optim = common.optim_config(lr=lr, warmup_steps=375, weight_decay=0.1)
    c.model.remat = "dots_no_batch"
    c.model.scan_layers = True
  if a.tiny:
    c.data.lab_documents = 1000
    c.optim = common.optim_config(lr=3e-3, warmup_steps=10, weight_decay=0.0)
  return c
