#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one go, on a bare GPU host without network: SFT/pretraining
# step MFU at 124M and 1.3B, decode at 1.3B against the bandwidth bound, a PPO iteration at 124M (ours, and
# TRL 1.12's where trl can be installed), printed as one table in under 8 minutes.
#
#   bash benchmarks/gpu.sh [WHEEL_DIR]       # WHEEL_DIR default: .whl (fill it with benchmarks/gpu_wheels.sh)
#
# The host needs python3 with jax (CUDA), flax, optax, orbax-checkpoint, torch and transformers (a CUDA
# image's usual set); whatever else the package or TRL needs is installed from WHEEL_DIR, only where the
# host lacks it, into a private folder (nothing in the system's site-packages changes). PYTHON overrides
# the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
python="${PYTHON:-python3}"
site="${TMPDIR:-/tmp}/instructgpt_jax_site"

missing=()
if [ -d "$wheels" ]; then
  for wheel in "$wheels"/*.whl; do
    [ -e "$wheel" ] || continue
    name="$(basename "$wheel" | cut -d- -f1)"
    "$python" -m pip show -q "$name" >/dev/null 2>&1 || missing+=("$wheel")
  done
else
  echo "gpu.sh: no wheel folder $wheels; using the host's packages as they are" >&2
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu.sh: installing ${#missing[@]} missing packages from $wheels into $site" >&2
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${missing[@]}" || exit 1
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRL_EXPERIMENTAL_SILENCE=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
"$python" -c "import jax, flax; print('# jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
[ -n "${SMOLLM2_HF:-}" ] && "$python" benchmarks/lm_eval_speed.py --hf "$SMOLLM2_HF" --ref_python "$python" --ref_device cuda --batch_size 64  # lm-eval backends, ours vs HF: SMOLLM2_HF = SmolLM2's HF folder; needs lm-eval[hf] and ../shared/data
exec "$python" benchmarks/gpu_suite.py --budget_s "${BUDGET_S:-420}"
