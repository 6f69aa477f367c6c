"""Export a run as a HuggingFace model folder that transformers and vLLM load as it is.

    python -m instructgpt_jax.export --workdir=runs/ppo --out=runs/ppo-hf [--dtype=bfloat16]
    python -m instructgpt_jax.export --workdir=runs/rm --out=runs/rm-hf
    python -m instructgpt_jax.export --workdir=runs/sft-lora --out=runs/sft-lora-peft --adapters

Which weights each kind of run gives (docs/hf.md has the table):
  SFT or pretraining workdir   the checkpoint the run selected (selected.json; else its newest), or --step
  PPO workdir                  the EMA of the policy (the paper's model, App. C.4); --raw_policy for the
                               optimizer's weights of the newest checkpoint
  RM workdir                   its export (`<workdir>/export`, or an exported model directory): a one-label
                               sequence classifier whose logit + head_bias − reward_bias is the normalized
                               reward (config.json holds both biases)
  an exported model directory  as it is
The folder gets config.json, safetensors weights, generation_config.json and the run's tokenizer (an HF
folder's tokenizer files and chat template, or our tokenizer.json), with its EOS, BOS and pad ids. A LoRA run
(model.lora.rank > 0) exports merged: the base with its adapters folded in. Paths may be local or gs://.

--adapters (a LoRA run of a language model: SFT, pretraining, DPO, PPO's policy) writes its adapters instead, the
same checkpoint (and EMA) as above, as a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(<base>, DIR)` loads, and that model.init_from=DIR reads back merged. Its
base_model_name_or_path is the base's HF folder when the run started from hf:PATH; else the base (the run's
model.init_from, as it read it) is exported into DIR/base and named. --dtype casts the adapters and DIR/base.
"""

from __future__ import annotations

import argparse
import sys

from instructgpt_jax import errors
from instructgpt_jax.library import model_io


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Export a run's model as a HuggingFace folder.")
  parser.add_argument("--workdir", required=True, help="a run's workdir or an exported model directory")
  parser.add_argument("--out", required=True, help="the folder to write (local or gs://)")
  parser.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: as trained)")
  parser.add_argument("--raw_policy", action="store_true", help="PPO: the optimizer's weights, not their EMA")
  parser.add_argument("--step", default="", help="which checkpoint: '' (selected, else newest), 'latest' or a step")
  parser.add_argument("--adapters", action="store_true", help="a LoRA run: its adapters as a PEFT folder, not merged")
  args = parser.parse_args(argv)
  try:
    options = dict(dtype=args.dtype, raw_policy=args.raw_policy, step=args.step, adapters=args.adapters)
    print(model_io.export_hf(args.workdir, args.out, **options))
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
