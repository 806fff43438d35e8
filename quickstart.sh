#!/usr/bin/env bash
# Set everything up, then run the main job: `selfflow train` with the default preset
# (encodes the bundled digits into a zarr store, trains Self-Flow on CPU, writes samples).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/selfflow train "$@"
