#!/usr/bin/env bash
# The runs that benchmarks/same_results.py compares before and after a refactor, into the folder $1:
#   bash benchmarks/same_results_runs.sh runs/before   # at the old commit
#   bash benchmarks/same_results_runs.sh runs/after    # at the new one
#   for r in chain_sft chain_rm chain_ppo_ptx ppo_shared_trunk ppo_bf16 dpo lab_quick; do
#     python benchmarks/same_results.py runs/before/$r runs/after/$r; done
# The README's tiny SFT -> RM -> PPO-ptx chain (shrunk as the tests shrink it), PPO with a shared trunk, PPO in
# bfloat16, DPO, and the lab's lab_quick pipeline; one CPU device, as a user runs them. About 20 minutes on 2 cores.
set -euo pipefail
out=${1:?usage: bash benchmarks/same_results_runs.sh OUT}
py=${PYTHON:-python}
mkdir -p "$out"
export XLA_FLAGS=--xla_force_host_platform_device_count=1
run() { "$py" -m instructgpt_jax.main "$@" --config.progress_bar=false > /dev/null; }
ppo=(--config=configs/ppo.py:tiny --config.model.init_from="$out/chain_sft" --config.ppo.reward_model="$out/chain_rm/export"
  --config.ppo.episodes=128 --config.data.eval=lab:prompts:eval:32)
run --config=configs/sft.py:tiny,variant=ppo_init --workdir="$out/chain_sft" --config.total_steps=40 \
  --config.data.train=lab:demonstrations:train:400 --config.data.pretrain_mix_by=rows
run --config=configs/rm.py:tiny --workdir="$out/chain_rm" --config.model.init_from="$out/chain_sft" \
  --config.total_steps=20 --config.data.train=lab:comparisons:train:400
run "${ppo[@]}" --workdir="$out/chain_ppo_ptx"
run "${ppo[@]}" --workdir="$out/ppo_shared_trunk" --config.ppo.shared_trunk=true
run "${ppo[@]}" --workdir="$out/ppo_bf16" --config.model.dtype=bfloat16
run --config=configs/dpo.py:tiny --workdir="$out/dpo" --config.model.init_from="$out/chain_sft" --config.total_steps=20 \
  --config.data.train=lab:comparisons:train:400
run --config=configs/pipeline.py:lab_quick --workdir="$out/lab_quick"
echo "runs in $out"
