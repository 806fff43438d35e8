#!/usr/bin/env bash
# Run the whole test-suite (sets the machine up first if needed). Exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
