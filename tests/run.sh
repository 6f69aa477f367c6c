#!/usr/bin/env bash
# The README's test command, and the first thing .ci/run does: on a fresh machine with Python >= 3.11, from the
# repository root, installs everything the tests need and runs the first tier (-m "not slow").
#   bash tests/run.sh                 # extra arguments go to pytest, e.g. bash tests/run.sh -k config
# 1. .venv: the package with its test extra, pinned by requirements-lock.txt.
# 2. .cache/venv-ref: the reference environment (torch, transformers, TRL, gguf; requirements-ref.txt) that the
#    transformers-parity tests and the SmolLM2 tests run against; the package itself does not depend on it.
#    Installed beside the first, at the same time.
# 3. .cache/libtpu: libtpu alone (the version jax[tpu] pins), for the tests that compile for TPU slices offline
#    (launch.aot); kept out of .venv, where it would probe for a TPU at every start.
# Every step only checks what is there when run again. Tests that need ../shared (real data, SmolLM2) skip with
# their reason where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
(python3 -m venv .cache/venv-ref && .cache/venv-ref/bin/pip install -q -r requirements-ref.txt) &
reference=$!
python3 -m venv .venv && .venv/bin/pip install -q -c requirements-lock.txt -e ".[test,eval]"
libtpu=$(grep '^libtpu==' requirements-lock.txt | cut -d= -f3)
[ -d ".cache/libtpu/libtpu-$libtpu.dist-info" ] \
  || .venv/bin/pip install -q --no-deps --target .cache/libtpu --upgrade "libtpu==$libtpu"
wait "$reference"
export INSTRUCTGPT_JAX_REF_PYTHON="$PWD/.cache/venv-ref/bin/python"
exec .venv/bin/python -m pytest -q -n 2 -m "not slow" tests "$@"
