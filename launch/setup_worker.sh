#!/usr/bin/env bash
# Sets up one TPU worker; `python -m launch.tpu setup` runs it on every worker (--worker=all) after copying
# the code to ~/instructgpt_jax. Idempotent: a second run only checks what is already there.
#   bash launch/setup_worker.sh [BUCKET]    # BUCKET: mount gs://BUCKET at /gcs/BUCKET with gcsfuse
set -euo pipefail
cd "$(dirname "$0")/.."
BUCKET="${1:-}"
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

if [ -n "$BUCKET" ]; then
  if ! command -v gcsfuse >/dev/null; then
    codename="$(lsb_release -c -s)"
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$codename main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
  fi
  sudo mkdir -p "/gcs/$BUCKET" && sudo chown "$USER" "/gcs/$BUCKET"
  if ! mountpoint -q "/gcs/$BUCKET"; then
    gcsfuse --implicit-dirs "$BUCKET" "/gcs/$BUCKET"
  fi
fi
echo "worker $(hostname): ready"
