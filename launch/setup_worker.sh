#!/usr/bin/env bash
# Sets up one TPU worker; `python -m launch.tpu setup` runs it on every worker (--worker=all) after copying
# the code to ~/instructgpt_jax. Idempotent: a second run only checks what is already there.
#   bash launch/setup_worker.sh
# No bucket is mounted: the package reads and writes gs:// paths itself (gcsfs and tensorstore), with the
# VM's service account.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"  # the package needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10

if ! command -v "$PYTHON" >/dev/null; then
  sudo apt-get update -q && sudo apt-get install -y -q "$PYTHON" "$PYTHON-venv"
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c requirements-lock.txt -e ".[tpu]"
.venv/bin/python -c "import jax; print(f'{jax.process_index()}: {jax.local_device_count()} local TPU devices')" \
  || echo "note: jax could not see the TPU (another process may hold it); the install itself succeeded"
echo "worker $(hostname): ready"
