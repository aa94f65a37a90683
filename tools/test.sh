#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check loraprune tests tools
# Two workers (pytest-xdist), one torch thread each: most of the suite's time is single-threaded Python
# (torch.export, the ONNX exporter), which one process per core runs twice as fast as one process. loadgroup keeps
# the tests that share a costly module fixture on one worker (tests/conftest.py).
.venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 "$@"
