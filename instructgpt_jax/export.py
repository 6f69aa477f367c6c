"""Export a run as a HuggingFace model folder that transformers and vLLM load as it is.

    python -m instructgpt_jax.export --workdir=runs/ppo --out=runs/ppo-hf [--dtype=bfloat16]
    python -m instructgpt_jax.export --workdir=runs/rm --out=runs/rm-hf

Which weights each kind of run gives (docs/hf.md has the table):
  SFT or pretraining workdir   the checkpoint the run selected (selected.json; else its newest), or --step
  PPO workdir                  the EMA of the policy (the paper's model, App. C.4); --raw_policy for the
                               optimizer's weights of the newest checkpoint
  RM workdir                   its export (`<workdir>/export`, or an exported model directory): a one-label
                               sequence classifier whose logit + head_bias − reward_bias is the normalized
                               reward (config.json holds both biases)
  an exported model directory  as it is
The folder gets config.json, safetensors weights, generation_config.json and the run's tokenizer (an HF
folder's tokenizer files and chat template, or our tokenizer.json), with its EOS, BOS and pad ids. Paths may
be local or gs://.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from instructgpt_jax import errors, paths, sharding, train_state
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.models import hf
from instructgpt_jax.trainers import model_io


def export(workdir: str, out: str, *, dtype: str | None = None, raw_policy: bool = False, step: str = "") -> str:
  """Writes the HF folder of run (or exported model) `workdir` into `out`; returns a one-line summary."""
  paths.check_output_dir(out, "--out")
  source = model_io.read_source(workdir, "--workdir", step=step, ema=not raw_policy)
  if source.kind == "scalar" and not source.exported:
    exported = paths.join(workdir, "export")
    if not paths.path(exported, "metadata.json").exists():
      raise errors.UserError(f"--workdir: {workdir}: an RM run exports its model (and bias) when it ends; not yet")
    source = model_io.read_source(exported, "--workdir")
  spec = model_io.tokenizer_of(source)
  tokenizer = tokenizer_lib.load(spec)
  mesh = sharding.make_mesh({"fsdp": -1})
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  _, target = train_state.param_shardings_for(source.config, mesh, rules, kind=source.kind)
  params = model_io.load(source, source.kind, target, source.config, 0)
  token_ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id}
  metadata = {k: source.metadata[k] for k in ("reward_bias",) if k in source.metadata}
  with tempfile.TemporaryDirectory() as scratch:
    files = spec if spec != "bytes" else tokenizer_lib.save_to(tokenizer, f"{scratch}/tokenizer.json")
    hf.export(
      out, params, source.config, kind=source.kind, tokenizer=files, token_ids=token_ids, metadata=metadata, dtype=dtype
    )
  what = "EMA policy" if source.ema else f"{source.kind} model"
  step_text = f" step {source.step}" if source.step is not None else ""
  return f"exported the {what} of {workdir}{step_text} to {out} (tokenizer {spec})"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Export a run's model as a HuggingFace folder.")
  parser.add_argument("--workdir", required=True, help="a run's workdir or an exported model directory")
  parser.add_argument("--out", required=True, help="the folder to write (local or gs://)")
  parser.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: as trained)")
  parser.add_argument("--raw_policy", action="store_true", help="PPO: the optimizer's weights, not their EMA")
  parser.add_argument("--step", default="", help="which checkpoint: '' (selected, else newest), 'latest' or a step")
  args = parser.parse_args(argv)
  try:
    print(export(args.workdir, args.out, dtype=args.dtype, raw_policy=args.raw_policy, step=args.step))
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
